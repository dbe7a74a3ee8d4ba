"""In-plane rotations of L x L images about their centre ((L-1)/2, (L-1)/2).

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

import torch


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


class Rotations(torch.nn.Module):
    """The K rotation operators R_k by k * 2*pi/K (eq. 8 of the approximate-EM paper).

    For K in {1, 2, 4} every R_k is a permutation (exact ``torch.rot90``) and ``is_permutation`` is
    true, which makes the closed-form M-step an elementwise division.

    Args:
        L: image side.
        K: number of rotations.
        device: device of the tables.
        dtype: floating dtype of the weights.
    """

    def __init__(self, L: int, K: int, device="cpu", dtype=torch.float64):
        super().__init__()
        self.L, self.K = L, K
        angles = torch.arange(K, dtype=torch.float64, device="cpu") * (2 * math.pi / K)
        index, weight = _bilinear_table(L, angles)
        self.register_buffer("index", index.to(device))
        self.register_buffer("weight", weight.to(device=device, dtype=dtype))
        self.is_permutation = K in (1, 2, 4)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """R_k F for every k.

        Args:
            image: (L, L).

        Returns:
            (K, L, L).
        """
        L = self.L
        return (image.reshape(L * L)[self.index] * self.weight).sum(-1).reshape(self.K, L, L)

    def adjoint(self, images: torch.Tensor) -> torch.Tensor:
        """sum_k R_k^T X_k.

        Args:
            images: (K, L, L), one image per rotation.

        Returns:
            (L, L).
        """
        L = self.L
        contrib = images.reshape(self.K, L * L, 1) * self.weight
        out = torch.zeros(L * L, dtype=images.dtype, device=images.device)
        out.index_add_(0, self.index.reshape(-1), contrib.reshape(-1))
        return out.reshape(L, L)

    def normal_matrix(self, c: torch.Tensor) -> torch.Tensor:
        """The dense matrix sum_k R_k^T diag(c_k) R_k of the closed-form M-step.

        Args:
            c: (K, L, L) coverage weights.

        Returns:
            (L*L, L*L) symmetric matrix.
        """
        L2 = self.L * self.L
        idx, w = self.index, self.weight  # (K, L2, 4)
        vals = c.reshape(self.K, L2, 1, 1) * w[..., :, None] * w[..., None, :]  # (K, L2, 4, 4)
        flat = (idx[..., :, None] * L2 + idx[..., None, :]).reshape(-1)
        A = torch.zeros(L2 * L2, dtype=c.dtype, device=c.device)
        A.index_add_(0, flat, vals.reshape(-1))
        return A.reshape(L2, L2)
