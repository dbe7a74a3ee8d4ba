"""Rotations done exactly: a steerable Fourier-Bessel basis on the disk (approximate-EM paper,
eqs. 2-3).

The basis functions are the Dirichlet-Laplacian eigenfunctions of the disk of radius R (L / 2 by
default; the approximate-EM paper's code uses L // 2 + 1) about the image centre
((L-1)/2, (L-1)/2),

    psi_{nu,q}(r, theta) = J_nu(lambda_{nu,q} r) e^{i nu theta},   r in [0, 1] (radius R),

with lambda_{nu,q} the q-th positive zero of J_nu, zero outside the disk. Real images are kept
real: nu = 0 gives J_0(lambda r), nu > 0 the pair J_nu(lambda r) cos(nu theta), J_nu(lambda r)
sin(nu theta) (the real and imaginary parts of the +-nu coefficients, which real images pair by
conjugate symmetry). theta = atan2(-(i - c), j - c) is the counter-clockwise angle with the row
axis pointing down, so a rotation by phi, counter-clockwise like ``torch.rot90``, is
f(r, theta - phi): on each pair (a, b) it is the plane rotation

    a' = a cos(nu phi) - b sin(nu phi),    b' = a sin(nu phi) + b cos(nu phi)

(eq. 3, alpha_{nu,q} e^{-i nu phi} in the paper's complex form), exact for every angle.

For the sizes this project uses (L <= 32) the basis is one dense (L^2, n) matrix, as the fast FB
libraries themselves use below L = 16. ``Steerable`` is the ``TransformSet`` whose unknown is the
n real coefficients and whose K templates are evaluate(rotate(alpha, 2 pi k / K)).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import special

from mtd.groups.base import Poses, TransformSet, solve_normal


def _zeros(nu: int, count: int) -> np.ndarray:
    return special.jn_zeros(nu, count)


def _entries(nu: int, roots) -> list:
    """(lambda, nu, kind) of the functions of order nu at these roots: one each, or a pair."""
    return [
        e for lam in roots for e in ([(lam, nu, 0)] if nu == 0 else [(lam, nu, 1), (lam, nu, 2)])
    ]


def _lambda_table(limit: float) -> list:
    """Every function with lambda <= limit."""
    entries, nu = [], 0
    while True:
        z = _zeros(nu, max(1, int(limit / math.pi) + 2))
        z = z[z <= limit]
        if len(z) == 0:
            return entries
        entries += _entries(nu, z)
        nu += 1


def _paper_table(L: int) -> list:
    """The approximate-EM paper's code's table: Q = #{roots of J_0 <= pi (L // 2)}, the orders nu
    whose first root is below the Q-th root of J_0, and q = 1..Q for each."""
    limit = math.pi * (L // 2)
    Q = max(1, int(np.sum(_zeros(0, int(limit / math.pi) + 2) <= limit + 1e-10)))
    top = _zeros(0, Q)[-1]
    entries, nu = _entries(0, _zeros(0, Q)), 1
    while _zeros(nu, 1)[0] < top:
        entries += _entries(nu, _zeros(nu, Q))
        nu += 1
    return entries


class FBBasis:
    """The real Fourier-Bessel basis of L x L images, ordered by lambda (then cos before sin).

    Args:
        L: image side.
        n: number of real basis functions (the first n by lambda; a cos/sin pair is not split),
            or None for all with lambda <= ``bandlimit``.
        bandlimit: largest lambda kept; None is the Nyquist rule lambda <= pi R for the disk of
            radius R pixels (pi L / 2 for R = L / 2, as ASPIRE-Python's FBBasis2D), used also to
            bound n.
        radius: R, the disk's radius in pixels about the image centre; None is L / 2 (the disk
            inscribed in the square). The approximate-EM paper's code uses L // 2 + 1, a disk that
            holds the whole square (its corners too).
        selection: "lambda" (the functions by lambda, as above) or "paper_code": the table the
            approximate-EM paper's code expands in (its ``expand_fb``): the Q roots of J_0 below
            pi (L // 2), every order nu whose first root is below the Q-th root of J_0, q <= Q for
            each, sorted by root, the first n (for L = 5, n = 10: nu = 0, 1, 2 and q = 1, 2).

    Attributes:
        nu: (n,) int64 angular frequency of every function.
        kind: (n,) int64: 0 for nu = 0, 1 for the cos, 2 for the sin of a pair.
        lam: (n,) float64 lambda_{nu,q}.
        radius: R in pixels.
        matrix: (L*L, n) float64 the functions sampled on the pixel grid (unit norm on the disk).
    """

    def __init__(
        self,
        L: int,
        n: int | None = None,
        bandlimit: float | None = None,
        radius: float | None = None,
        selection: str = "lambda",
    ):
        if int(L) != L or L < 2:
            raise ValueError(f"L must be an integer >= 2, got {L!r}")
        L = int(L)
        R = L / 2 if radius is None else float(radius)
        if not (math.isfinite(R) and R > 0):
            raise ValueError(f"radius must be a number of pixels > 0, got {radius!r}")
        if selection not in ("lambda", "paper_code"):
            raise ValueError(f"selection must be 'lambda' or 'paper_code', got {selection!r}")
        limit = math.pi * R if bandlimit is None else float(bandlimit)
        if not limit > 0:
            raise ValueError(f"bandlimit must be > 0, got {bandlimit!r}")
        entries = _paper_table(L) if selection == "paper_code" else _lambda_table(limit)
        if not entries:
            raise ValueError(
                f"bandlimit {limit:g} leaves no Fourier-Bessel function (the smallest lambda is "
                f"{_zeros(0, 1)[0]:.4f})"
            )
        entries.sort(key=lambda e: (e[0], e[2]))
        if n is not None:
            resolved = f"the functions with lambda <= {limit:g} that a {L} x {L} grid resolves"
            if selection == "paper_code":
                resolved = f"the paper code's table for L = {L}"
            if int(n) != n or not 1 <= n <= len(entries):
                raise ValueError(
                    f"n must be an integer in 1..{len(entries)} ({resolved}), got {n!r}"
                )
            n = int(n)
            if entries[n - 1][2] == 1:
                raise ValueError(
                    f"n = {n} splits the cos/sin pair of nu = {entries[n - 1][1]}: use {n - 1} or "
                    f"{n + 1}"
                )
            entries = entries[:n]
        self.L, self.n, self.radius = L, len(entries), R
        self.lam = np.array([e[0] for e in entries])
        self.nu = np.array([e[1] for e in entries], dtype=np.int64)
        self.kind = np.array([e[2] for e in entries], dtype=np.int64)
        self.matrix = torch.from_numpy(self.sample(0.0))  # (L^2, n)
        self._pinv = torch.linalg.pinv(self.matrix)

    def sample(self, phi: float) -> np.ndarray:
        """The functions sampled at the grid rotated by phi: psi(r, theta - phi), (L*L, n).

        This is the analytic rotation of the basis; ``sample(0)`` is the basis matrix.
        """
        L = self.L
        c, R = (L - 1) / 2, self.radius
        i, j = np.meshgrid(np.arange(L), np.arange(L), indexing="ij")
        y, x = (i - c).ravel(), (j - c).ravel()
        r = np.hypot(x, y) / R
        theta = np.arctan2(-y, x) - phi
        out = np.zeros((L * L, self.n))
        for m, (lam, nu, kind) in enumerate(zip(self.lam, self.nu, self.kind, strict=True)):
            radial = special.jv(nu, lam * r) * (r <= 1)
            # Unit norm on the disk of radius R: int_0^1 J_nu(lam r)^2 r dr = J_{nu+1}(lam)^2 / 2.
            norm = R * abs(special.jv(nu + 1, lam)) * math.sqrt(math.pi * (1 if nu == 0 else 0.5))
            angular = (
                1.0 if kind == 0 else (np.cos(nu * theta) if kind == 1 else np.sin(nu * theta))
            )
            out[:, m] = radial * angular / norm
        return out

    def evaluate(self, coef: torch.Tensor) -> torch.Tensor:
        """Images from coefficients: (..., n) -> (..., L, L)."""
        B = self.matrix.to(coef)
        return (coef @ B.T).reshape(*coef.shape[:-1], self.L, self.L)

    def expand(self, image: torch.Tensor) -> torch.Tensor:
        """Least-squares coefficients of images (the pseudo-inverse): (..., L, L) -> (..., n)."""
        image = torch.as_tensor(image)
        if tuple(image.shape[-2:]) != (self.L, self.L):
            raise ValueError(
                f"images must be {self.L} x {self.L} for this basis, got {tuple(image.shape)}"
            )
        P = self._pinv.to(image)
        return image.reshape(*image.shape[:-2], -1) @ P.T

    def rotation(self, phi) -> torch.Tensor:
        """(A, n, n) float64 matrices of the rotations by the angles phi (A,) on coefficients."""
        phi = torch.as_tensor(phi, dtype=torch.float64).reshape(-1)
        nu = torch.from_numpy(self.nu).double()
        cos, sin = torch.cos(phi[:, None] * nu), torch.sin(phi[:, None] * nu)  # (A, n)
        out = torch.zeros(len(phi), self.n, self.n, dtype=torch.float64)
        idx = torch.arange(self.n)
        out[:, idx, idx] = cos
        sin_rows = torch.from_numpy(np.flatnonzero(self.kind == 2))
        cos_rows = sin_rows - 1  # a pair is (cos, sin), adjacent
        out[:, cos_rows, sin_rows] = -sin[:, sin_rows]  # a' = a cos - b sin
        out[:, sin_rows, cos_rows] = sin[:, sin_rows]  # b' = a sin + b cos
        zero = torch.from_numpy(np.flatnonzero(self.kind == 0))
        out[:, zero, zero] = 1.0
        return out

    def rotate(self, coef: torch.Tensor, phi: float) -> torch.Tensor:
        """Coefficients of the image rotated by phi (counter-clockwise): (..., n) -> (..., n)."""
        return coef @ self.rotation(phi)[0].to(coef).T

    def rotations_of(self, coef: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """Coefficients (n,) rotated by every angle of phi (A,): (A, n), in O(A n)."""
        nu = torch.from_numpy(self.nu).to(coef)
        arg = phi.to(coef)[:, None] * nu
        cos, sin = torch.cos(arg), torch.sin(arg)
        out = coef * cos  # nu = 0: cos = 1
        sin_rows = torch.from_numpy(np.flatnonzero(self.kind == 2)).to(coef.device)
        a, b = coef[sin_rows - 1], coef[sin_rows]
        out[:, sin_rows - 1] -= b * sin[:, sin_rows]  # a' = a cos - b sin
        out[:, sin_rows] += a * sin[:, sin_rows]  # b' = a sin + b cos
        return out


class Steerable(TransformSet):
    """K exact rotations of a band-limited image, the unknown its n real FB coefficients.

    Template k is evaluate(rotate(alpha, 2 pi k / K)); the closed-form M-step is the n x n system
    of eq. (16) of the approximate-EM paper in the coefficients, assembled from the same
    sufficient statistics (the coverage and back-projections of the K templates).

    Args:
        basis: an ``FBBasis``.
        K: number of rotations searched.
        orbit_angles: angles of the rotation grid the error is minimised over (eq. 19).
    """

    def __init__(self, basis: FBBasis, K: int = 8, orbit_angles: int = 720):
        super().__init__()
        if int(K) != K or K < 1:
            raise ValueError(f"K must be an integer >= 1, got {K!r}")
        self.basis, self.L, self.K, self.shape = basis, basis.L, int(K), (basis.n,)
        angles = torch.arange(self.K, dtype=torch.float64) * (2 * math.pi / self.K)
        # M_k = B R(phi_k): (K, L^2, n), the template of coefficients alpha is M_k alpha.
        self.register_buffer("maps", basis.matrix @ basis.rotation(angles))
        fine = torch.arange(orbit_angles, dtype=torch.float64) * (2 * math.pi / orbit_angles)
        self.register_buffer("orbit_angles", fine)

    def templates(self, x: torch.Tensor, block: slice | None = None) -> torch.Tensor:
        M = self.maps[block or slice(None)]
        return (M @ x).reshape(len(M), self.L, self.L)

    def adjoint(self, images: torch.Tensor, block: slice | None = None) -> torch.Tensor:
        M = self.maps[block or slice(None)]
        return torch.einsum("kpn,kp->n", M, images.reshape(len(M), -1))

    def normal_solve(self, c: torch.Tensor, rhs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        A = torch.einsum("kpi,kp,kpj->ij", self.maps, c.reshape(self.K, -1), self.maps)
        return solve_normal(A, rhs, x)

    def orbit(self, x: torch.Tensor) -> torch.Tensor:
        return self.basis.rotations_of(x, self.orbit_angles)

    def nearest(self, truth: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x rotated by the angle closest to ``truth`` (eq. 19): the grid, then Newton in phi.

        <R(phi) x, truth> = c_0 + sum_pairs A_nu cos(nu phi) + B_nu sin(nu phi) is a
        trigonometric polynomial, so its maximum is found on ``orbit_angles`` (at least 8 per
        period of the highest nu) and refined by Newton steps on its derivative, each kept only
        where it raises the correlation: exact to rounding at any angle, not the grid's spacing.
        """
        nu = torch.from_numpy(self.basis.nu).to(x)
        sin_rows = torch.from_numpy(np.flatnonzero(self.basis.kind == 2)).to(x.device)
        a, b = x[sin_rows - 1], x[sin_rows]
        ta, tb = truth[sin_rows - 1], truth[sin_rows]
        A, B, w = a * ta + b * tb, a * tb - b * ta, nu[sin_rows]

        def corr(phi):  # (A,) -> (A,) the phi-dependent part of <R(phi) x, truth>
            arg = phi[:, None] * w
            return (torch.cos(arg) * A + torch.sin(arg) * B).sum(1)

        count = max(len(self.orbit_angles), 8 * int(w.max()) if len(w) else 1)
        grid = torch.arange(count, dtype=x.dtype, device=x.device) * (2 * math.pi / count)
        phi = grid[corr(grid).argmax()].reshape(1)
        for _ in range(20):
            arg = phi[:, None] * w
            d1 = (w * (B * torch.cos(arg) - A * torch.sin(arg))).sum(1)
            d2 = -(w * w * (A * torch.cos(arg) + B * torch.sin(arg))).sum(1)
            if not bool(d2 < 0):
                break
            step = phi - d1 / d2
            if not bool(corr(step) >= corr(phi)):
                break
            phi = step
        return self.basis.rotations_of(x, phi)[0]

    def to_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.basis.evaluate(x)

    def from_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.basis.expand(image)

    def poses(self) -> Poses:
        return Poses(
            angles=2 * math.pi * np.arange(self.K) / self.K, mirrored=np.zeros(self.K, bool)
        )

    @property
    def steerable_basis(self) -> FBBasis:
        return self.basis


def steerable(
    L: int,
    K: int = 8,
    n: int | None = None,
    bandlimit: float | None = None,
    radius: float | None = None,
    selection: str = "lambda",
) -> Steerable:
    """``Steerable(FBBasis(L, n, bandlimit, radius, selection), K)``: the group of config
    ``em/group=steerable``; ``radius="square"`` is L // 2 + 1, the disk that holds the whole
    square (the approximate-EM paper's code)."""
    if radius == "square":
        radius = L // 2 + 1
    basis = FBBasis(L, n=n, bandlimit=bandlimit, radius=radius, selection=selection)
    return Steerable(basis, K)
