"""The reconstruction's run-level checks on its composed config (``reconstruct.py``), made before
any long work: numbers that must be integers or numbers, the run directory, the initial guess's
scale, stochastic EM's patches per iteration; and the checkpoint's identity for summary.json.

Each check names the key, the value and what is allowed. The engine's own checks (``mtd``) are
not repeated here: these are the ones only the run can make, because they need the config.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import mtd

# check_scale: an initial guess peaking at more than this many times the measurement's peak is on
# another scale (a 0-255 digit against MNIST measurements at SNR 0.1-10: 45-200 times; the
# presets' guesses: below 1).
SCALE_RATIO = 10.0


ROOT = Path(__file__).resolve().parent


def register_project_resolver() -> None:
    """``${project:PATH}`` in configs: a file shipped with the project, wherever the command is run
    from (the entry points register it before Hydra composes their configs)."""
    OmegaConf.register_new_resolver("project", lambda p="": str(ROOT / p), replace=True)


# Errors our checks raise for bad input: one line, exit status 2, no traceback (tracebacks are for
# bugs; HYDRA_FULL_ERROR=1 shows them anyway). Every entry point exits through user_error_exit.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def user_error_exit(error: Exception) -> None:
    """Re-raise under HYDRA_FULL_ERROR=1; otherwise print ``error: <message>`` and exit 2."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    sys.exit(2)


def is_none(value) -> bool:
    return value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))


def integer(cfg: DictConfig, key: str, minimum: int | None = None) -> int:
    """``cfg``'s value at the dotted ``key`` as an int, or an error naming the key and value."""
    value = OmegaConf.select(cfg, key)
    try:
        number = int(value)
        if isinstance(value, bool) or number != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be an integer, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return number


def number(cfg: DictConfig, key: str) -> float:
    """``cfg``'s value at the dotted ``key`` as a float, or an error naming the key and value."""
    value = OmegaConf.select(cfg, key)
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number, got {value!r}") from None


def threshold(cfg: DictConfig, key: str, named: tuple[str, ...] = ("noise",)) -> float | str:
    """A picker's operating point at the dotted ``key``: one of the rules ``named`` (null: the
    first), or a finite number; else an error naming the key, the value and what is allowed."""
    value = OmegaConf.select(cfg, key)
    if is_none(value):
        return named[0]
    if value in named:
        return value
    try:
        if isinstance(value, bool) or not math.isfinite(float(value)):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        allowed = ", ".join(repr(n) for n in named)
        raise ValueError(f"{key} must be a number, {allowed} or null, got {value!r}") from None


# Config values that must be integers (with their least value) or numbers, checked up front so that
# a typo names its key instead of failing in int() / float() somewhere later.
INTEGER_KEYS = {
    "seed": None,
    "max_shift": 0,
    "crop": 1,
    "image_every": 0,
    "stochastic_min_patches": 0,
    "em.K": 1,
    "em.iterations": 1,
    "em.polish": 0,
    "em.restarts": 1,
}
SIMULATE_INTEGER_KEYS = {"measurement.index": 0, "measurement.seed": None, "measurement.K": 1}
NUMBER_KEYS = ("em.tol", "em.stochastic")


def check_numbers(cfg: DictConfig) -> None:
    """Every integer and number of the config is one, or an error naming its key and value."""
    keys = dict(INTEGER_KEYS)
    if cfg.measurement.source == "simulate":
        keys.update(SIMULATE_INTEGER_KEYS)
    for key, least in keys.items():
        if key in ("max_shift", "image_every") and OmegaConf.select(cfg, key) is None:
            continue  # null: off, as 0
        integer(cfg, key, least)
    for key in NUMBER_KEYS:
        number(cfg, key)


def checkpoint_identity(ckpt) -> dict:
    """What summary.json records of the prior, so that report.py never averages runs of two
    different checkpoints: its path, size in bytes and SHA-256 (None for ckpt=none)."""
    if is_none(ckpt):
        return {"path": None}
    path = Path(str(ckpt))
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def check_run_dir(out: Path) -> None:
    """Refuse a run directory that already holds a finished run (its summary.json): a run never
    writes into another run's directory. A folder left by an interrupted run (no summary.json)
    is reused."""
    if (out / "summary.json").exists():
        raise ValueError(
            f"the run directory {out} already holds a finished run (summary.json); outputs never "
            "overwrite another run: point hydra.run.dir (or paths.output_dir) at a new folder, "
            "or delete that one"
        )


def check_scale(init: torch.Tensor, data, what: str) -> float:
    """Warn when the initial guess is on another scale than the measurement (e.g. 0-255 grey
    levels against a measurement in [0, 1]): EM then starts, and often stays, far off.

    The measurement's scale is its largest absolute value over an evenly strided sample of at most
    about 10^6 pixels (memory-mapped files read only those); the guess's, its largest absolute
    value. The measurement's peak is at least about a copy's (copies plus noise), so a guess
    peaking at more than SCALE_RATIO times it is on another scale. A guess far below it is not
    flagged: at low SNR the noise alone makes the measurement's peak many times the image's.

    Returns:
        The ratio of the two peaks.
    """
    if not torch.is_tensor(data):
        data = mtd.open_micrograph(data if isinstance(data, str | Path) else data[0])
    step = max(1, int(math.sqrt(data.shape[0] * data.shape[1] / 1e6)))
    sample = data[::step, ::step]
    sample = sample if torch.is_tensor(sample) else torch.from_numpy(np.array(sample))
    peak_data = float(sample.abs().max())
    peak_init = float(init.abs().max())
    ratio = peak_init / peak_data if peak_data > 0 else math.inf
    if ratio > SCALE_RATIO:
        print(
            f"warning: the initial guess ({what}) peaks at {peak_init:.4g}, the measurement at "
            f"{peak_data:.4g}: {ratio:.3g} times its scale; EM expects the guess in the "
            "measurement's units (images stored as 0-255 grey levels: divide by 255)",
            file=sys.stderr,
        )
    return ratio


def patch_count(info: dict) -> int:
    """D, the measurement's number of non-overlapping L x L patches (all files together)."""
    L, shapes = int(info["L"]), info["N"]
    shapes = [[shapes, shapes]] if isinstance(shapes, int) else shapes
    return sum((int(n0) // L) * (int(n1) // L) for n0, n1 in shapes)


def check_stochastic(cfg: DictConfig, D: int) -> None:
    """Warn when stochastic EM draws fewer patches per iteration than ``stochastic_min_patches``.

    Measured (README): em=mnist at SNR 1 on 121 patches, 40 stochastic iterations and a polish
    of 10, three targets: with 12, 24 or 36 patches per iteration the estimate with the prior ends
    worse than its initial guess for some target (at 12: 1.11 and 1.25 against 0.78 and 0.82);
    from 60 on every target ends below its initial guess, and from 85 on within 0.01 of EM on all
    patches.
    """
    fraction = number(cfg, "em.stochastic")
    if fraction == 1 or not 0 < fraction < 1:  # off, or refused with its message by mtd
        return
    per_iteration = round(fraction * D)
    least = int(cfg.stochastic_min_patches)
    if per_iteration < least:
        print(
            f"warning: em.stochastic={fraction:g} draws {per_iteration} of the measurement's {D} "
            f"patches per iteration; below {least} (stochastic_min_patches) stochastic EM was "
            f"measured to end worse than its initial guess: use em.stochastic >= "
            f"{min(1.0, math.ceil(100 * least / D) / 100):g} (1: off) on data this small",
            file=sys.stderr,
        )
