"""Errors that respect the symmetry of MTD: the estimate is known up to the group's action."""

from __future__ import annotations

import torch

from mtd.groups.rotations import Rotations


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate (..., L, L) images by (dy, dx) pixels, filling with zeros (no wrap-around)."""
    out = torch.zeros_like(x)
    L0, L1 = x.shape[-2:]
    out[..., max(dy, 0) : L0 + min(dy, 0), max(dx, 0) : L1 + min(dx, 0)] = x[
        ..., max(-dy, 0) : L0 + min(-dy, 0), max(-dx, 0) : L1 + min(-dx, 0)
    ]
    return out


def _candidates(truth, estimate, K: int, max_shift: int, group):
    """truth float64 and every version of the estimate the error minimises over.

    Images (L, L) by default; with a ``group`` whose unknown is not an image (coefficients of a
    steerable basis, say), vectors of its shape, and no translations.
    """
    device = truth.device if isinstance(truth, torch.Tensor) else "cpu"
    truth = torch.as_tensor(truth, dtype=torch.float64, device=device)
    estimate = torch.as_tensor(estimate, dtype=torch.float64, device=truth.device)
    image = group is None or len(group.shape) == 2
    shape_ok = group is None or tuple(truth.shape) == tuple(group.shape)
    if (
        not shape_ok
        or truth.shape != estimate.shape
        or (image and (truth.ndim != 2 or truth.shape[0] != truth.shape[1]))
    ):
        raise ValueError(
            f"truth and estimate must be {'square images' if image else 'unknowns'} of one "
            f"shape, got {tuple(truth.shape)} and {tuple(estimate.shape)}"
        )
    if max_shift < 0 or (max_shift and not image):
        raise ValueError(
            f"max_shift must be >= 0 (0 for an unknown not an image), got {max_shift}"
        )
    if group is None:
        group = Rotations(truth.shape[-1], K).to(device=truth.device, dtype=torch.float64)
    # The group as it is (an engine's may be float32 or on a GPU: its tables are already rounded
    # to its dtype, so a float64 copy would gain nothing), the orbit back in float64.
    estimate = group.on_tables(estimate)
    if not image:  # a continuous group's orbit is a grid: its own refinement (eq. 19)
        nearest = group.nearest(group.on_tables(truth), estimate)
        return truth, nearest.to(device=truth.device, dtype=torch.float64)[None]
    orbit = group.orbit(estimate).to(device=truth.device, dtype=torch.float64)
    r = range(-max_shift, max_shift + 1)
    return truth, torch.cat([_shift(orbit, dy, dx) for dy in r for dx in r])


def _errors(truth, candidates) -> torch.Tensor:
    diff = (candidates - truth).reshape(len(candidates), -1)
    return torch.linalg.vector_norm(diff, dim=1) / torch.linalg.vector_norm(truth)


def relative_error(truth, estimate, K: int = 4, max_shift: int = 0, group=None) -> float:
    """min_g ||truth - g estimate|| / ||truth|| over the group: by default the K rotations.

    Eq. (19) of the approximate-EM paper, with the rotation set of the EM (exact rot90 for K = 4).
    An image with an empty (zero) border, such as an MNIST digit, is identifiable from MTD data
    only up to a translation inside its L x L frame: every patch is explained equally well by the
    shifted image. ``max_shift > 0`` also minimises over translations of the estimate by up to that
    many pixels.

    Args:
        truth: (L, L) tensor or array.
        estimate: (L, L) tensor or array.
        K: number of rotations to minimise over (when ``group`` is None).
        max_shift: largest translation (pixels, each axis) to minimise over; 0 is the paper's
            error.
        group: a ``TransformSet`` whose ``orbit`` is minimised over (e.g. ``mtd.Dihedral`` for
            mirror images too; ``K`` is then unused); None is ``mtd.Rotations(L, K)``. truth and
            estimate have its ``shape``.

    Returns:
        The relative error as a Python float.
    """
    truth, candidates = _candidates(truth, estimate, K, max_shift, group)
    return float(_errors(truth, candidates).min())


def align(truth, estimate, K: int = 4, max_shift: int = 0, group=None) -> torch.Tensor:
    """The version of ``estimate`` that ``relative_error`` measures: (L, L) float64.

    Same arguments as ``relative_error``.
    """
    truth, candidates = _candidates(truth, estimate, K, max_shift, group)
    return candidates[int(_errors(truth, candidates).argmin())]
