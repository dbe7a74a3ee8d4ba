"""Cut a measurement into non-overlapping L x L patches (DESIGN section 4)."""

from __future__ import annotations

import torch


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
