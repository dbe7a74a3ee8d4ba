"""In-plane rotations (and reflections) of L x L images about their centre ((L-1)/2, (L-1)/2).

The first ``TransformSet`` implementations (``mtd.groups.base``): ``Rotations``, the K rotations by
k * 2*pi/K, and ``Dihedral``, the same K rotations of the image and of its mirror image.

One operator serves the simulator and the EM (DESIGN section 3): bilinear interpolation,
counter-clockwise like ``torch.rot90`` (row axis pointing down), zero outside the image. Sample
positions that fall on the pixel grid are snapped to it, so angles that are multiples of pi/2 give
``torch.rot90`` exactly and the operator is then a permutation.

A rotation is stored as a gather table: output pixel ``p`` is ``sum_j weight[p, j] * image[index[p,
j]]`` over the four bilinear neighbours. The adjoint ``R^T`` is the matching scatter-add, so
nothing of size L^2 x L^2 is ever formed except where a dense normal matrix is asked for.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mtd.groups.base import Poses, TransformSet, solve_normal


def _bilinear_table(
    L: int, angles: torch.Tensor, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather tables of the rotations by ``angles``.

    Args:
        L: image side.
        angles: (A,) angles in radians, counter-clockwise.
        device: device of the tables.

    Returns:
        index (A, L*L, 4) int64 into the flattened image, weight (A, L*L, 4) float64.
    """
    angles = angles.to(torch.float64).cpu()
    c = (L - 1) / 2
    i, j = torch.meshgrid(
        torch.arange(L, dtype=torch.float64, device="cpu"),
        torch.arange(L, dtype=torch.float64, device="cpu"),
        indexing="ij",
    )
    y, x = (i - c).reshape(1, -1), (j - c).reshape(1, -1)
    cos, sin = torch.cos(angles)[:, None], torch.sin(angles)[:, None]
    # Output pixel (y, x) reads the input at the inverse rotation of (y, x); theta = pi/2 gives
    # out[i, j] = in[j, L-1-i], which is torch.rot90(in, 1).
    sy = cos * y + sin * x + c
    sx = -sin * y + cos * x + c
    # Snap to the grid what is on it up to rounding, so rot90 angles are exact permutations.
    sy = torch.where((sy - sy.round()).abs() < 1e-9, sy.round(), sy)
    sx = torch.where((sx - sx.round()).abs() < 1e-9, sx.round(), sx)
    y0, x0 = sy.floor(), sx.floor()
    fy, fx = sy - y0, sx - x0
    ys = torch.stack([y0, y0, y0 + 1, y0 + 1], dim=-1)
    xs = torch.stack([x0, x0 + 1, x0, x0 + 1], dim=-1)
    weight = torch.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx], dim=-1)
    inside = (ys >= 0) & (ys <= L - 1) & (xs >= 0) & (xs <= L - 1)
    weight = torch.where(inside, weight, torch.zeros_like(weight))
    index = torch.where(inside, ys * L + xs, torch.zeros_like(ys)).long()
    return index.to(device), weight.to(device)


def rotate(image: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate images by one angle (radians, counter-clockwise) about their centre.

    Args:
        image: (..., L, L).
        angle: the angle in radians.

    Returns:
        (..., L, L) rotated images, same dtype and device.
    """
    L = image.shape[-1]
    index, weight = _bilinear_table(
        L, torch.tensor([float(angle)], dtype=torch.float64), image.device
    )
    flat = image.reshape(*image.shape[:-2], L * L)
    out = (flat[..., index[0]] * weight[0].to(image.dtype)).sum(-1)
    return out.reshape(image.shape)


def mirror(image: torch.Tensor) -> torch.Tensor:
    """The mirror image: columns reversed (reflection across the vertical axis), (..., L, L)."""
    return image.flip(-1)


class GatherTransforms(TransformSet):
    """Templates that gather the image's pixels: T_k(F)[p] = sum_j w[k, p, j] F[i[k, p, j]].

    The adjoint is the matching scatter-add. Where every T_k is a permutation (exact rot90 and
    mirror images) the normal matrix is diagonal and the closed-form M-step an elementwise
    division; otherwise it is the dense L^2 x L^2 matrix, solved by Cholesky.

    Args:
        L: image side.
        index: (K, L*L, J) int64 pixel indices.
        weight: (K, L*L, J) float64 weights.
    """

    def __init__(self, L: int, index: torch.Tensor, weight: torch.Tensor):
        super().__init__()
        self.L, self.K, self.shape = L, index.shape[0], (L, L)
        self.register_buffer("index", index)
        self.register_buffer("weight", weight)
        ones = (weight == 1).sum(-1) == 1
        nonzero = (weight != 0).sum(-1) == 1
        one_hot = bool((ones & nonzero).all())
        # A permutation: every output pixel reads one input pixel, every input pixel is read once.
        hits = torch.zeros(self.K, L * L, dtype=torch.float64)
        read = (weight != 0).double().reshape(self.K, -1)
        hits.scatter_add_(1, index.reshape(self.K, -1), read)
        self.is_permutation = one_hot and bool((hits == 1).all())

    def templates(self, x: torch.Tensor, block: slice | None = None) -> torch.Tensor:
        L, block = self.L, block or slice(None)
        index, weight = self.index[block], self.weight[block]
        return (x.reshape(L * L)[index] * weight).sum(-1).reshape(-1, L, L)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """T_k F for every k: (L, L) -> (K, L, L)."""
        return self.templates(x)

    def adjoint(self, images: torch.Tensor, block: slice | None = None) -> torch.Tensor:
        L, block = self.L, block or slice(None)
        index, weight = self.index[block], self.weight[block]
        contrib = images.reshape(len(index), L * L, 1) * weight
        out = torch.zeros(L * L, dtype=images.dtype, device=images.device)
        out.index_add_(0, index.reshape(-1), contrib.reshape(-1))
        return out.reshape(L, L)

    def normal_matrix(self, c: torch.Tensor) -> torch.Tensor:
        """The dense matrix sum_k T_k^T diag(c_k) T_k of the closed-form M-step.

        Args:
            c: (K, L, L) coverage weights.

        Returns:
            (L*L, L*L) symmetric matrix.
        """
        L2 = self.L * self.L
        idx, w = self.index, self.weight  # (K, L2, J)
        vals = c.reshape(self.K, L2, 1, 1) * w[..., :, None] * w[..., None, :]  # (K, L2, J, J)
        flat = (idx[..., :, None] * L2 + idx[..., None, :]).reshape(-1)
        A = torch.zeros(L2 * L2, dtype=c.dtype, device=c.device)
        A.index_add_(0, flat, vals.reshape(-1))
        return A.reshape(L2, L2)

    def normal_solve(self, c: torch.Tensor, rhs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Pixels that the posteriors (almost) do not cover keep their value from ``x``.

        Below sqrt(eps) of the largest coverage, rhs / c would be the rounding noise of the FFT
        back-projection divided by a vanishing weight (a stochastic E-step on a few patches
        leaves such pixels, and one of them is enough to blow the estimate up).
        """
        floor = torch.finfo(x.dtype).eps ** 0.5
        if self.is_permutation:  # the system is diagonal
            diag = self.adjoint(c)
            covered = diag > floor * diag.max()
            return torch.where(covered, rhs / torch.where(covered, diag, 1), x)
        return solve_normal(self.normal_matrix(c), rhs, x)

    def orbit(self, x: torch.Tensor) -> torch.Tensor:
        return self.templates(x)

    @property
    def n_rotations(self) -> int:
        return self.rotations

    def poses(self) -> Poses:
        """Template k is R_(k mod r) (of the mirror image for k >= r), r = ``rotations``."""
        k, r = np.arange(self.K), self.rotations
        return Poses(angles=2 * math.pi * (k % r) / r, mirrored=k >= r)


def _sizes(L, K) -> tuple[int, int]:
    """L and K as ints, or an error naming the one that is not a positive integer."""
    if int(L) != L or L < 1:
        raise ValueError(f"L must be a positive integer, got {L!r}")
    if int(K) != K or K < 1:
        raise ValueError(f"K must be an integer >= 1, got {K!r}")
    return int(L), int(K)


def _angles(K: int) -> torch.Tensor:
    return torch.arange(K, dtype=torch.float64, device="cpu") * (2 * math.pi / K)


class Rotations(GatherTransforms):
    """The K rotations R_k by k * 2*pi/K (eq. 8 of the approximate-EM paper).

    For K in {1, 2, 4} every R_k is a permutation (exact ``torch.rot90``) and ``is_permutation`` is
    true, which makes the closed-form M-step an elementwise division.

    Args:
        L: image side.
        K: number of rotations.
    """

    def __init__(self, L: int, K: int = 4):
        L, K = _sizes(L, K)
        super().__init__(L, *_bilinear_table(L, _angles(K)))
        self.rotations = K


class Dihedral(GatherTransforms):
    """Rotations with reflections: R_k F for k < K, then R_k mirror(F) (2K templates).

    Mirrored copies are what 2-D classification in cryo-EM searches too (a particle may land on
    either face). Template K + k is ``R_k`` applied to the image with its columns reversed.

    Args:
        L: image side.
        K: number of rotations; the set has 2K elements.
    """

    def __init__(self, L: int, K: int = 4):
        L, K = _sizes(L, K)
        index, weight = _bilinear_table(L, _angles(K))
        col = index % L
        mirrored = index - col + (L - 1 - col)  # the same pixel of the mirror image
        super().__init__(L, torch.cat([index, mirrored]), torch.cat([weight, weight]))
        self.rotations = K
