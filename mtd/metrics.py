"""Errors that respect the rotational symmetry of MTD."""

from __future__ import annotations

import torch

from mtd.rotations import Rotations


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate (..., L, L) images by (dy, dx) pixels, filling with zeros (no wrap-around)."""
    out = torch.zeros_like(x)
    L0, L1 = x.shape[-2:]
    out[..., max(dy, 0) : L0 + min(dy, 0), max(dx, 0) : L1 + min(dx, 0)] = x[
        ..., max(-dy, 0) : L0 + min(-dy, 0), max(-dx, 0) : L1 + min(-dx, 0)
    ]
    return out


def relative_error(truth, estimate, K: int = 4, max_shift: int = 0) -> float:
    """min_k ||truth - R_k estimate|| / ||truth|| over the K rotations by k * 2*pi/K.

    Eq. (19) of the approximate-EM paper, with the rotation set of the EM (exact rot90 for K = 4).
    An image with an empty (zero) border, such as an MNIST digit, is identifiable from MTD data
    only up to a translation inside its L x L frame: every patch is explained equally well by the
    shifted image. ``max_shift > 0`` also minimises over translations of the estimate by up to that
    many pixels.

    Args:
        truth: (L, L) tensor or array.
        estimate: (L, L) tensor or array.
        K: number of rotations to minimise over.
        max_shift: largest translation (pixels, each axis) to minimise over; 0 is the paper's
        error.

    Returns:
        The relative error as a Python float.
    """
    device = truth.device if isinstance(truth, torch.Tensor) else "cpu"
    truth = torch.as_tensor(truth, dtype=torch.float64, device=device)
    estimate = torch.as_tensor(estimate, dtype=torch.float64, device=truth.device)
    if truth.ndim != 2 or truth.shape != estimate.shape or truth.shape[0] != truth.shape[1]:
        raise ValueError(
            f"truth and estimate must be square images of one shape, got {tuple(truth.shape)} "
            f"and {tuple(estimate.shape)}"
        )
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    rotated = Rotations(truth.shape[-1], K, truth.device)(estimate)
    r = range(-max_shift, max_shift + 1)
    candidates = torch.cat([_shift(rotated, dy, dx) for dy in r for dx in r])
    diff = torch.linalg.vector_norm((candidates - truth).reshape(len(candidates), -1), dim=1)
    return float(diff.min() / torch.linalg.vector_norm(truth))
