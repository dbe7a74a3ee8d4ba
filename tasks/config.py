"""A composed Hydra config read once into typed objects (dataclasses), before any work.

Every value the commands use is converted and checked here, whether or not this run uses it: a
typo names its key, its value and what is allowed (``measurement.L must be an integer, got
'abc'``), in one line, before a measurement is simulated or a file opened. The dataclasses of
each command (``tasks.settings``) declare the types; ``read`` fills them:

    int, float, bool, str        a value of that type (an integer may be written 2.0, not 2.5);
                                 ``field(metadata={"min": m})`` bounds an int or float below,
                                 ``{"finite": True}`` refuses inf and nan
    Literal["a", "b"]            one of the names
    X | None                     X, or null / none / "" (the config's ways of saying "nothing")
    X | Y                        X, else Y (an error lists both)
    list[X]                      a list of X
    a dataclass                  a config node, read recursively
    Any                          the node as it is (objects Hydra builds from ``_target_``)
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue


def is_none(value) -> bool:
    """null, or the strings none / null / "" (how a command line says "no value")."""
    return value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))


class _Mismatch(Exception):
    """A value is not of a type (internal: ``read`` turns it into the one-line ValueError)."""


def _parts(tp) -> list[str]:
    """What a type allows, one phrase per alternative ("an integer", "'noise'", "null")."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return [repr(a) for a in typing.get_args(tp)]
    if origin in (typing.Union, types.UnionType):
        return [part for a in typing.get_args(tp) for part in _parts(a)]
    if origin is list:
        return [f"a list of {_describe(typing.get_args(tp)[0]).split(' ', 1)[1]}s"]
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return ["null" if tp is type(None) else names.get(tp, getattr(tp, "__name__", str(tp)))]


def _describe(tp) -> str:
    """How an error names what a type allows ("an integer or null", "a number or 'noise')."""
    parts = _parts(tp)
    return ", ".join(parts[:-1]) + " or " + parts[-1] if len(parts) > 1 else parts[0]


def _scalar(tp, value, meta: dict):
    """``value`` as ``tp`` (int, float, bool, str), or _Mismatch."""
    if tp is bool:
        if not isinstance(value, bool):
            raise _Mismatch
        return value
    if tp is str:
        if not isinstance(value, str):
            raise _Mismatch
        return value
    if isinstance(value, bool) or isinstance(value, DictConfig | ListConfig):
        raise _Mismatch
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _Mismatch from None
    if tp is int:
        if not math.isfinite(number) or number != int(number):
            raise _Mismatch
        number = int(number)
    elif isinstance(value, int):
        number = value  # a float field given 2: kept as written (messages show what was typed)
    if meta.get("finite") and not math.isfinite(number):
        raise _Mismatch
    return number


def _convert(tp, value, key: str, meta: dict):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, DictConfig | dict):
            raise _Mismatch
        return read(tp, value, key + ".")
    if origin is Literal:
        if value not in args:
            raise ValueError(
                f"{key} must be one of {', '.join(map(str, args))}, got {value!r}"
            ) from None
        return value
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and is_none(value):
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, key, meta)
            except (_Mismatch, ValueError):
                continue
        raise _Mismatch
    if origin is list:
        if not isinstance(value, ListConfig | list | tuple):
            raise _Mismatch
        return [_convert(args[0], v, f"{key}[{i}]", meta) for i, v in enumerate(value)]
    return _scalar(tp, value, meta)


def _bounded(value, key: str, tp, meta: dict):
    low = meta.get("min")
    if low is not None and isinstance(value, int | float) and value < low:
        kind = "an integer" if int in _flat(tp) else "a number"
        raise ValueError(f"{key} must be {kind} >= {low}, got {value!r}")
    return value


def _flat(tp) -> set:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return {a for arg in typing.get_args(tp) for a in _flat(arg)}
    return {tp}


def read(cls, node, prefix: str = ""):
    """An instance of the dataclass ``cls`` from the config ``node`` (every field converted).

    A field absent from the node takes its default (a field without one must be there). A value
    that is not of the field's type raises ``ValueError("<key> must be <what>, got <value>")``.

    Args:
        cls: the dataclass.
        node: a ``DictConfig`` (interpolations resolved as they are read) or a dict.
        prefix: the node's dotted key, for the messages ("measurement.").
    """
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if f.name not in (node.keys() if hasattr(node, "keys") else node):  # (??? is present)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{key} is missing from the config")
            continue
        try:
            raw = node[f.name]
        except MissingMandatoryValue:
            raise ValueError(f"{key} is required: give {key}=...") from None
        tp, meta = hints[f.name], dict(f.metadata)
        try:
            values[f.name] = _bounded(_convert(tp, raw, key, meta), key, tp, meta)
        except _Mismatch:
            shown = (
                OmegaConf.to_container(raw) if isinstance(raw, DictConfig | ListConfig) else raw
            )
            raise ValueError(f"{key} must be {_describe(tp)}, got {shown!r}") from None
    return cls(**values)


def at_least(low, **meta) -> dict:
    """``field`` metadata bounded below by ``low``: ``field(default=1, metadata=at_least(1))``."""
    return {"min": low, **meta}
