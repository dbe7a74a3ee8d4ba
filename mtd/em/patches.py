"""Cut a measurement into non-overlapping L x L patches (DESIGN section 4)."""

from __future__ import annotations

import numpy as np
import torch

from mtd.io.source import MicrographSource


def extract_patches(data: torch.Tensor, L: int) -> torch.Tensor:
    """The D = (N // L)^2 non-overlapping L x L patches of a measurement, row-major.

    A remainder strip of ``N % L`` rows (and columns) at the bottom (and right) is dropped; the
    caller reports it.

    Args:
        data: (N0, N1) measurement.
        L: patch side.

    Returns:
        (D, L, L) patches (a view-backed copy in the same dtype and device).
    """
    n0, n1 = data.shape[0] // L, data.shape[1] // L
    cropped = data[: n0 * L, : n1 * L]
    return cropped.reshape(n0, L, n1, L).transpose(1, 2).reshape(n0 * n1, L, L)


class PatchSource:
    """The L x L patches of one or more micrographs, read chunk by chunk (DESIGN section 4).

    Micrographs on disk are memory-mapped, so only the rows a chunk needs are ever read and peak
    memory is bounded by the chunk size, not by N. The patches of all micrographs form one data
    set, micrograph after micrograph, each row-major; a remainder strip of each is dropped.

    Args:
        micrographs: a ``MicrographSource``, or what makes one (an (N0, N1) tensor or array, a
            path, a glob, a list of these).
        L: patch side.
        dtype, device: of the patches ``read`` returns.
    """

    def __init__(self, micrographs, L: int, dtype=torch.float64, device="cpu"):
        self.micrographs = MicrographSource.of(micrographs)
        self.L, self.dtype, self.device = L, dtype, torch.device(device)
        self.arrays, self.names = self.micrographs.arrays, self.micrographs.names
        for name, shape in zip(self.names, self.micrographs.shapes, strict=True):
            if min(shape) < L:
                raise ValueError(
                    f"{name}: the measurement {shape} is smaller than the image side L = {L}"
                )
        self.grid = [(n0 // L, n1 // L) for n0, n1 in self.micrographs.shapes]
        self.dropped = [(n0 % L, n1 % L) for n0, n1 in self.micrographs.shapes]
        counts = [r * c for r, c in self.grid]
        self.offsets = np.cumsum([0, *counts])
        self.D = int(self.offsets[-1])

    def _band(self, s: int, r0: int, r1: int) -> torch.Tensor:
        """Patch rows r0..r1-1 of micrograph s as (rows * cols, L, L)."""
        L, (_, nc) = self.L, self.grid[s]
        band = self.arrays[s][r0 * L : r1 * L, : nc * L]
        if isinstance(band, np.ndarray):
            band = torch.from_numpy(np.array(band))  # a copy of just these rows
        if not torch.isfinite(band).all():  # name the file: one bad file of a glob
            bad = int((~torch.isfinite(band)).sum())
            raise ValueError(
                f"{self.names[s]}: the measurement has {bad} non-finite values (NaN or inf) in "
                f"rows {r0 * L}..{r1 * L - 1}"
            )
        return extract_patches(band.to(device=self.device, dtype=self.dtype), L)

    def _run(self, start: int, stop: int) -> torch.Tensor:
        """Patches start..stop-1 (sorted, contiguous): whole patch rows, sliced, no gather."""
        parts = []
        for s in range(len(self.arrays)):
            lo, hi = max(start, int(self.offsets[s])), min(stop, int(self.offsets[s + 1]))
            if lo >= hi:
                continue
            nc, a, b = self.grid[s][1], lo - int(self.offsets[s]), hi - int(self.offsets[s])
            r0 = a // nc
            parts.append(self._band(s, r0, (b - 1) // nc + 1)[a - r0 * nc : b - r0 * nc])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def read(self, index) -> torch.Tensor:
        """The patches at ``index`` (a slice of positions, or a sorted 1-D int64 tensor).

        Returns:
            (B, L, L) in ``dtype`` on ``device``.
        """
        # Positions are worked out on the CPU, where the micrographs are; only patches move.
        if isinstance(index, slice):
            index = torch.arange(*index.indices(self.D), device="cpu")
        index = torch.as_tensor(index, dtype=torch.int64, device="cpu")
        if len(index) and int(index[-1]) - int(index[0]) == len(index) - 1:  # a contiguous run
            return self._run(int(index[0]), int(index[-1]) + 1)
        parts = []
        for s in range(len(self.arrays)):
            lo, hi = int(self.offsets[s]), int(self.offsets[s + 1])
            sel = index[(index >= lo) & (index < hi)] - lo
            if len(sel) == 0:
                continue
            nc = self.grid[s][1]
            r0, r1 = int(sel[0]) // nc, int(sel[-1]) // nc + 1
            parts.append(self._band(s, r0, r1)[(sel - r0 * nc).to(self.device)])
        if not parts:
            return torch.zeros(0, self.L, self.L, dtype=self.dtype, device=self.device)
        return torch.cat(parts)
