"""Where the copies go: random sequential placement under a separation rule, and planting."""

from __future__ import annotations

import numpy as np
import torch


def max_copies(N: int, L: int, gap: int) -> int:
    """How many corners in {0..N-L}^2 fit at pairwise Chebyshev distance >= gap (a lattice)."""
    return ((N - L) // gap + 1) ** 2


def place(N: int, L: int, p: int, gap: int, rng: np.random.Generator) -> np.ndarray:
    """Random sequential placement of p corners whose pairs differ by >= gap in row or in column.

    Candidates are uniform on {0..N-L}^2; a bucket grid of cell side ``gap`` holds at most one
    corner per cell, so a candidate is checked against the 3 x 3 neighbouring cells only. If random
    placement jams, it falls back to a random subset of the densest lattice, shifted at random.
    """
    W = N - L + 1
    cells = (W + gap - 1) // gap
    owner = -np.ones(
        (cells + 2, cells + 2), dtype=np.int64
    )  # one-cell border avoids bounds checks
    pos = np.empty((p, 2), dtype=np.int64)
    n, misses = 0, 0
    max_misses = 200 * max(p, 100)
    while n < p and misses < max_misses:
        for r, c in rng.integers(0, W, size=(4096, 2)):
            cr, cc = r // gap + 1, c // gap + 1
            near = owner[cr - 1 : cr + 2, cc - 1 : cc + 2].ravel()
            near = near[near >= 0]
            if near.size and np.any(
                (np.abs(pos[near, 0] - r) < gap) & (np.abs(pos[near, 1] - c) < gap)
            ):
                misses += 1
                continue
            owner[cr, cc] = n
            pos[n] = r, c
            n += 1
            if n == p:
                break
    if n == p:
        return pos
    per_axis = (N - L) // gap + 1
    cells_idx = rng.choice(per_axis * per_axis, size=p, replace=False)
    slack = (N - L) - (per_axis - 1) * gap
    offset = rng.integers(0, slack + 1, size=2)
    return np.stack([cells_idx // per_axis, cells_idx % per_axis], 1) * gap + offset


def plant(data: torch.Tensor, copies: torch.Tensor, positions: torch.Tensor) -> None:
    L = copies.shape[-1]
    ar = torch.arange(L, device=positions.device)
    rows = (positions[:, 0, None, None] + ar[None, :, None]).expand(-1, L, L)
    cols = (positions[:, 1, None, None] + ar[None, None, :]).expand(-1, L, L)
    data.index_put_((rows, cols), copies, accumulate=True)
