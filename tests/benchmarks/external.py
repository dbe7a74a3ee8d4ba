"""Code the benchmarks import from a folder that is not installed: the paper's own code
(``bench_steerable --paper-code DIR``) and another version of the engine (``bench_versions``)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def import_package(name: str, root) -> ModuleType:
    """The top-level package ``name`` of the folder ``root``, without putting ``root`` on sys.path.

    The package is registered under ``name`` (``sys.modules``), so that its own absolute imports
    (``from name.sub import ...``) and the caller's resolve inside ``root/name``; a package without
    an ``__init__.py`` (a namespace package, as the paper's ``Utils``) works too. Importing
    anything else from ``root`` is not possible this way (neither benchmark needs it).

    Raises:
        ImportError: ``root`` holds no package ``name``, or one named so is already imported
            from elsewhere.
    """
    root = Path(root).resolve()
    loaded = sys.modules.get(name)
    if loaded is not None:
        where = [Path(p).resolve() for p in getattr(loaded, "__path__", [])]
        if where and all(p.is_relative_to(root) for p in where):
            return loaded
        raise ImportError(f"{name} is already imported from {where or loaded}, not from {root}")
    spec = importlib.machinery.PathFinder.find_spec(name, [str(root)])
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"no package {name} in {root}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        if spec.loader is not None:  # None: a namespace package, nothing to run
            spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
