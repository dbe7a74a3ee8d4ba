"""Where micrographs come from: one object for an in-memory array, a file, a list or a glob.

Every reader of micrographs (the patches of the E-step, posterior picking, template matching,
the autocorrelations, the figures, the run's checks) takes a ``MicrographSource``: the union
"tensor | path | list of paths | glob" is resolved here, once. Files are memory-mapped, so only
what a caller slices is ever read, and each micrograph carries its metadata (``Micrograph``:
name, shape, pixel size; a CTF and a noise spectrum are the next fields it will carry).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mtd.io.files import MRC_SUFFIXES, expand_paths, open_micrograph


@dataclass(frozen=True)
class Micrograph:
    """What is known of one micrograph without reading its pixels.

    Attributes:
        name: its path for a file, ``micrograph <i>`` for an array.
        shape: (N0, N1).
        pixel_size: Angstrom per pixel (an MRC header's voxel size, or the one given), or None.
        path: the file, or None for an array in memory.
    """

    name: str
    shape: tuple[int, int]
    pixel_size: float | None = None
    path: str | None = None


def _mrc_pixel_size(path: str) -> float | None:
    """The MRC header's x spacing in Angstrom (None where it holds 0)."""
    import mrcfile

    with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
        size = float(mrc.voxel_size.x)
    return size if size > 0 else None


def _check_array(array, name: str):
    """A 2-D real array, kept where it is (no copy to a default device: callers move slices)."""
    array = array if torch.is_tensor(array) else torch.from_numpy(np.asarray(array))
    if array.ndim != 2:
        raise ValueError(f"the measurement must be a 2-D array, got shape {tuple(array.shape)}")
    if array.is_complex() or array.dtype == torch.bool:
        raise ValueError(f"the measurement must hold real numbers, got dtype {array.dtype}")
    return array


class MicrographSource:
    """One data set of micrographs, in order.

    Args:
        data: an (N0, N1) tensor or array, the path of a 2-D .npy / .mrc file, a glob pattern
            (sorted), or a list of these; or a ``MicrographSource`` (taken as it is by ``of``).
        pixel_size: Angstrom per pixel of every micrograph whose file does not say (None: unknown).
        key: the config key named when a pattern matches nothing.

    Attributes:
        arrays: the micrographs, (N0, N1) tensors or read-only memory maps.
        micrographs: their ``Micrograph`` metadata.
    """

    def __init__(self, data, pixel_size: float | None = None, key: str = "micrographs"):
        items = list(data) if isinstance(data, list | tuple) else [data]
        if not items:
            raise ValueError(f"{key}: an empty list, no micrographs given")
        self.arrays, self.micrographs = [], []
        for item in items:
            if isinstance(item, str | os.PathLike):
                for path in expand_paths(item, key):
                    array = open_micrograph(path)
                    size = (
                        _mrc_pixel_size(path)
                        if Path(path).suffix.lower() in MRC_SUFFIXES
                        else None
                    )
                    self._add(array, path, size or pixel_size, path)
            else:
                name = f"micrograph {len(self.arrays)}"
                self._add(_check_array(item, name), name, pixel_size, None)

    def _add(self, array, name: str, pixel_size, path) -> None:
        self.arrays.append(array)
        shape = (int(array.shape[0]), int(array.shape[1]))
        self.micrographs.append(Micrograph(str(name), shape, pixel_size, path))

    @classmethod
    def of(cls, data, key: str = "micrographs") -> MicrographSource:
        """``data`` as a source (itself if it is one)."""
        return data if isinstance(data, MicrographSource) else cls(data, key=key)

    def __len__(self) -> int:
        return len(self.arrays)

    def __iter__(self) -> Iterator:
        return iter(self.arrays)

    def __getitem__(self, i: int):
        """Micrograph i as stored: an (N0, N1) tensor or a read-only memory map."""
        return self.arrays[i]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.micrographs]

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [m.shape for m in self.micrographs]

    @property
    def on_disk(self) -> bool:
        """Some micrograph is a file (then the E-step streams the patches by default)."""
        return any(m.path is not None for m in self.micrographs)

    def tensor(self, i: int, dtype=None, device=None) -> torch.Tensor:
        """Micrograph i read whole as a tensor (in ``dtype`` on ``device`` when given)."""
        array = self.arrays[i]
        t = array if torch.is_tensor(array) else torch.from_numpy(np.array(array))
        return t if dtype is None and device is None else t.to(device=device, dtype=dtype)

    def tensors(self, dtype=None, device=None) -> Iterator[torch.Tensor]:
        """Every micrograph read whole, one at a time (``tensor``)."""
        for i in range(len(self)):
            yield self.tensor(i, dtype, device)

    def mean_shape(self) -> tuple[int, int]:
        """The micrographs' mean shape, rounded (the size of noise micrographs of a threshold)."""
        return tuple(round(float(np.mean([s[i] for s in self.shapes]))) for i in (0, 1))
