"""Files: micrographs, image stacks and volumes as .npy / .mrc (memory-mapped where they are
read), written whole or not at all (``atomic_write``), and a run's JSON summary.

One MRC writer serves micrographs, images and volumes (float32, the voxel size in the header, a
fixed label so that runs are byte-identical). The array axis order of a volume (0, 1, 2) is the
MRC file's (z, y, x), as ``mrcfile`` reads and writes it (``mtd.so3``).
"""

from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

MRC_SUFFIXES = (".mrc", ".mrcs", ".map")


def expand_paths(spec, key: str = "path") -> list[str]:
    """The files of a path, a list of paths, or glob patterns (each sorted), in order.

    Args:
        spec: a path or a sequence of paths / patterns.
        key: the config key named when a pattern matches nothing.
    """
    items = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    paths = []
    for item in map(str, items):
        found = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not found:
            raise FileNotFoundError(f"{key}: no file matches {item}")
        paths += found
    return paths


def open_array(path, what: str = "measurement") -> np.ndarray:
    """Memory-map a .npy or .mrc file read-only, of any shape: nothing is read until it is sliced.

    Args:
        what: what the file should hold, for the error messages.

    Returns:
        read-only ``numpy.memmap`` (an MRC file stays open while it is referenced).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file at {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, EOFError, OSError) as e:  # empty, truncated or not a .npy file
            raise ValueError(
                f"{path} is not a readable .npy file ({type(e).__name__}: {e})"
            ) from e
    if suffix in MRC_SUFFIXES:
        import mrcfile

        try:
            mrc = mrcfile.mmap(path, mode="r", permissive=True)
        except ValueError as e:
            raise ValueError(f"{path} is not a readable MRC file ({e})") from e
        if mrc.data is None:
            raise ValueError(f"{path} is not a readable MRC file")
        return mrc.data
    raise ValueError(f"unknown {what} format {suffix!r} of {path}: use .npy or .mrc")


def open_micrograph(path) -> np.ndarray:
    """Memory-map a 2-D .npy or .mrc measurement read-only: nothing is read until it is sliced.

    The checks of ``read_micrograph`` that need no pass over the data (2-D, real numbers) are done
    here; non-finite values are found when the patches are streamed (``mtd.PatchSource``).

    Returns:
        (N0, N1) read-only ``numpy.memmap`` (an MRC file stays open while it is referenced).
    """
    array = open_array(path)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"{path} holds an array of shape {array.shape}; a measurement is 2-D")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ValueError(f"{path} holds dtype {array.dtype}; a measurement holds real numbers")
    return array


def read_micrograph(path) -> torch.Tensor:
    """Read a 2-D measurement from .npy or .mrc (.mrcs, .map).

    Returns:
        (N0, N1) tensor in the file's floating dtype (float32 for MRC).
    """
    array = np.array(open_micrograph(path))  # the checks of the file, then one read
    if not np.isfinite(array).all():
        raise ValueError(f"{path} has {int((~np.isfinite(array)).sum())} non-finite values")
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(array))


def read_images(path) -> torch.Tensor:
    """(n, L, L) float64 images from a .npy / .mrc holding one (L, L) image or an (n, L, L) stack.

    Raises:
        ValueError: another shape, or non-finite values (the message names the file).
    """
    array = open_array(path, what="image")
    if array.size == 0:
        raise ValueError(f"{path} holds no values (shape {array.shape})")
    array = np.array(array)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1] != array.shape[2]:
        raise ValueError(f"{path} holds shape {array.shape}; expected (L, L) or (n, L, L) images")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ValueError(f"{path} holds dtype {array.dtype}; images hold real numbers")
    if not np.isfinite(array).all():
        raise ValueError(f"{path} has non-finite values")
    return torch.from_numpy(array.astype(np.float64))


def write_micrograph(path, data, voxel_size: float = 1.0) -> Path:
    """Write a 2-D measurement as .npy (its dtype) or .mrc (float32), atomically.

    The file appears whole or not at all: it is written next to ``path`` and renamed.
    """
    path = Path(path)
    array = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if array.ndim != 2:
        raise ValueError(f"a measurement is 2-D, got shape {array.shape}")
    suffix = path.suffix.lower()
    if suffix not in (".npy", *MRC_SUFFIXES):
        raise ValueError(f"unknown measurement format {suffix!r} of {path}: use .npy or .mrc")

    _write_array(path, array, voxel_size)
    return path


def _write_array(path: Path, array: np.ndarray, voxel_size: float) -> None:
    """The one writer of arrays: .npy (the array's dtype) or MRC (float32, ``voxel_size`` in the
    header), atomically."""

    def write_mrc(tmp: Path) -> None:
        import mrcfile

        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(array.astype(np.float32))
            mrc.voxel_size = float(voxel_size)
            # mrcfile labels new files with the time; a fixed label keeps runs byte-identical.
            mrc.header.label[0] = b"written by mtd"
            mrc.header.nlabl = 1

    suffix = path.suffix.lower()
    atomic_write(path, (lambda tmp: np.save(tmp, array)) if suffix == ".npy" else write_mrc)


def atomic_write(path, write) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename: whole or absent.

    The temporary file is opened plainly (not by mkstemp, which makes 0600 files), so the file gets
    the user's umask; its suffix stays last because np.save appends .npy to any other name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_summary(path, summary: dict) -> None:
    """A run's summary as indented JSON (anything not JSON as its str), written whole."""
    text = json.dumps(summary, indent=2, default=str)
    atomic_write(path, lambda p: p.write_text(text))


VOLUME_SUFFIXES = (".npy", *MRC_SUFFIXES)


def volume_array(V, name: str = "volume") -> np.ndarray:
    """``V`` as a float64 cubic (L, L, L) array, or an error naming it."""
    V = V.detach().double().cpu().numpy() if torch.is_tensor(V) else np.asarray(V, np.float64)
    if V.ndim != 3 or len(set(V.shape)) != 1:
        raise ValueError(f"{name} must be a cubic (L, L, L) volume, got shape {V.shape}")
    return V


def write_volume(path, V, voxel_size: float = 1.0) -> None:
    """Write an (L, L, L) volume as .mrc / .mrcs / .map (float32, with ``voxel_size``) or .npy
    (float64), atomically.

    Args:
        path: the file; its suffix chooses the format.
        V: (L, L, L) tensor or array.
        voxel_size: Angstrom per voxel (> 0), the MRC header's voxel size (unused for .npy).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VOLUME_SUFFIXES:
        raise ValueError(f"unknown volume format {suffix!r} of {path}: use .npy or .mrc")
    if not (isinstance(voxel_size, int | float) and math.isfinite(voxel_size) and voxel_size > 0):
        raise ValueError(f"voxel_size must be a finite number > 0 (Angstrom), got {voxel_size!r}")
    _write_array(path, volume_array(V), voxel_size)


def read_volume(path) -> tuple[np.ndarray, float | None]:
    """Read an (L, L, L) volume from .npy or .mrc.

    Returns:
        (volume as float64, voxel size in Angstrom: the MRC header's x spacing, None for .npy
        or an MRC file whose header holds 0).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VOLUME_SUFFIXES:
        raise ValueError(f"unknown volume format {suffix!r} of {path}: use .npy or .mrc")
    if suffix == ".npy":
        return volume_array(np.load(path), f"the volume in {path}"), None
    import mrcfile

    with mrcfile.open(path, mode="r", permissive=True) as mrc:
        if mrc.data is None:
            raise ValueError(f"{path} holds no data")
        V = volume_array(np.array(mrc.data), f"the volume in {path}")
        size = float(mrc.voxel_size.x)
    return V, (size if size > 0 else None)
