"""Tomographic projections of a volume at the rotations of an SO(3) grid: the ``TransformSet`` of
the stochastic-EM paper's model (eqs. 1 and 18), and its band-limited subspace for frequency
marching (Section III-D).

Projection (conventions in ``mtd.so3``): (P_R V)[i1, i2] = sum_{i0} (R . V)[i0, i1, i2], the line
integral along axis 0 of the rotated volume sampled at unit steps, with (R . V)(p) = V(R^T p)
trilinear (zero outside the cube). For every rotation the map is a gather table: output pixel q
reads the 8 trilinear neighbours of each of the L samples of its ray, 8 L (index, weight) pairs;
the back-projection P_R^T is the matching scatter-add, so the adjoint is the transpose to rounding
(<P V, Y> = <V, P^T Y>, tests/engine/test_volume.py). Tables are built once per rotation and
cached while they fit ``cache_bytes``; beyond that they are rebuilt per block of rotations from
the (K, 3, 3) rotations (the same numbers, so the adjoint stays exact).

The unknown (``Projections``): an (L, L, L) volume in a subspace U with orthogonal projector Pi:

- ``bandlimit=None``: U = volumes supported in the ball |p| <= L / 2 (Pi is the ball's mask);
- ``bandlimit=lmax``: U = span of the 3-D Fourier-Bessel functions of the ball of radius L / 2,
  j_l(u_{l,s} r / (L/2)) Y_l^m(theta, phi) with l <= lmax and u_{l,s} <= ``radial`` (default the
  Nyquist rule pi L / 2, as the 2-D ``mtd.FBBasis``), sampled on the voxels and orthonormalised
  (Pi = Q Q^T). These are the Dirichlet eigenfunctions of the ball: the real-space counterpart of
  the paper's expansion (6), which expands the volume's Fourier transform in spherical Bessel
  functions times spherical harmonics with l <= lmax. lmax is the paper's l_max: its frequency
  marching 6 -> 8 -> 10 is ``bandlimit`` 6 -> 8 -> 10 here (``schedule``), and the subspaces are
  nested, so an estimate of one stage is a valid start of the next.

Templates T_k(V) = P_{R_k} Pi V, the adjoint Pi sum_k P_k^T Y_k, and the closed-form M-step (eq.
29, the normal equations sum_k Pi P_k^T diag(c_k) P_k Pi V = Pi sum_k P_k^T b_k) is solved by
conjugate gradients inside U, warm-started from Pi x: CG on a symmetric positive semi-definite
system moves only within the Krylov space of its residual, so the components of U the coverage
does not reach keep their value in Pi x, and the estimate stays in U (components outside U are
dropped: a random N(0, 1) start is projected onto U at the first M-step).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import optimize, special

from mtd.groups.base import Poses, TransformSet
from mtd.parallel import ordered_map, sum_in_order
from mtd.so3 import ball_mask, grid_points, hopf_grid, rotate_volume, trilinear_table

_TABLE_BYTES_PER_ENTRY = 16  # an int64 index and a float64 weight


def ray_table(L: int, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather tables of the projections at rotations R.

    Args:
        L: volume side.
        R: (n, 3, 3) rotations.

    Returns:
        index (n, L^2, 8 L) int64 into the flattened volume, weight (n, L^2, 8 L) float64: pixel
        q = i1 * L + i2 of projection k is sum_j weight[k, q, j] V.flat[index[k, q, j]].
    """
    index, weight = trilinear_table(L, R)  # (n, L^3, 8), voxels in C order (i0 slowest)
    n = index.shape[0]

    def rays(t):  # (n, L, L^2, 8) -> (n, L^2, L * 8): the L samples of every pixel's ray
        return t.reshape(n, L, L * L, 8).permute(0, 2, 1, 3).reshape(n, L * L, 8 * L)

    return rays(index).contiguous(), rays(weight).contiguous()


def project(V: torch.Tensor, R) -> torch.Tensor:
    """Tomographic projections of V at rotations R: (L, L, L), (n, 3, 3) -> (n, L, L).

    The forward model of eq. (1) on the voxel grid (the simulator's and the EM's operator).
    """
    V = torch.as_tensor(V)
    _check_volume(V)
    L = V.shape[0]
    R = torch.as_tensor(R, dtype=torch.float64).reshape(-1, 3, 3).cpu()
    out = []
    for s in range(0, len(R), 256):  # bounded table memory
        index, weight = ray_table(L, R[s : s + 256])
        index, weight = index.to(V.device), weight.to(device=V.device, dtype=V.dtype)
        out.append((V.reshape(-1)[index] * weight).sum(-1).reshape(-1, L, L))
    return torch.cat(out) if out else V.new_zeros(0, L, L)


def back_project(images: torch.Tensor, R) -> torch.Tensor:
    """sum_k P_{R_k}^T images_k, the exact adjoint of ``project``: (n, L, L) -> (L, L, L)."""
    L = images.shape[-1]
    R = torch.as_tensor(R, dtype=torch.float64).reshape(-1, 3, 3).cpu()
    out = torch.zeros(L**3, dtype=images.dtype, device=images.device)
    for s in range(0, len(R), 256):
        index, weight = ray_table(L, R[s : s + 256])
        index, weight = index.to(images.device), weight.to(images)
        contrib = images[s : s + 256].reshape(-1, L * L, 1) * weight
        out.index_add_(0, index.reshape(-1), contrib.reshape(-1))
    return out.reshape(L, L, L)


def _check_volume(V: torch.Tensor) -> None:
    if V.ndim != 3 or len(set(V.shape)) != 1:
        raise ValueError(f"a volume must be cubic (L, L, L), got shape {tuple(V.shape)}")


# ------------------------------------------------------------------------------------------------
# The band-limited subspace: 3-D Fourier-Bessel functions of the ball
# ------------------------------------------------------------------------------------------------
def spherical_bessel_zeros(l: int, limit: float) -> np.ndarray:
    """The positive zeros of j_l below ``limit``, ascending (sign changes refined by brentq)."""
    x = np.linspace(1e-6, limit, max(200, int(limit * 50)))
    y = special.spherical_jn(l, x)
    out = []
    for a, b, ya, yb in zip(x[:-1], x[1:], y[:-1], y[1:], strict=True):
        if ya == 0:
            out.append(a)
        elif ya * yb < 0:
            out.append(optimize.brentq(lambda t: special.spherical_jn(l, t), a, b, xtol=1e-14))
    return np.array([z for z in out if z > 1e-3])


def fourier_bessel_functions(L: int, lmax: int, radial: float | None = None) -> np.ndarray:
    """The real 3-D Fourier-Bessel functions of the ball of radius L / 2, sampled on the voxels.

    psi_{l,m,s}(p) = j_l(u_{l,s} |p| / (L/2)) Y_l^m(theta, phi) for l <= lmax, |m| <= l and the
    zeros u_{l,s} <= radial of j_l, zero outside the ball; real harmonics (the real and imaginary
    parts of Y_l^m for m > 0), ordered by l, then s, then m.

    Returns:
        (L^3, n) float64.
    """
    limit = math.pi * L / 2 if radial is None else float(radial)
    p = grid_points(L).numpy()
    r = np.linalg.norm(p, axis=1) / (L / 2)
    theta = np.arccos(np.clip(np.where(r > 0, p[:, 0] / np.maximum(r * L / 2, 1e-300), 1), -1, 1))
    phi = np.arctan2(p[:, 1], p[:, 2])
    inside = r <= 1
    cols = []
    for l in range(lmax + 1):
        for u in spherical_bessel_zeros(l, limit):
            radial_part = special.spherical_jn(l, u * r) * inside
            for m in range(l + 1):
                y = special.sph_harm_y(l, m, theta, phi)
                cols.append(radial_part * y.real)
                if m > 0:
                    cols.append(radial_part * y.imag)
    if not cols:
        return np.zeros((L**3, 0))
    return np.stack(cols, 1)


def orthonormal_basis(B: np.ndarray, rtol: float = 1e-8) -> np.ndarray:
    """Orthonormal columns spanning the columns of B (Gram-Schmidt order, dependent ones dropped).

    Householder QR of the column-normalised B; a column whose new direction is below ``rtol`` of
    its norm adds nothing and is left out, so span(first k columns) is kept nested.
    """
    B = B / np.maximum(np.linalg.norm(B, axis=0, keepdims=True), 1e-300)
    Q, Rm = np.linalg.qr(B)
    keep = np.abs(np.diag(Rm)) > rtol
    return Q[:, keep]


# ------------------------------------------------------------------------------------------------
# The TransformSet
# ------------------------------------------------------------------------------------------------
class Projections(TransformSet):
    """K tomographic projections of a volume: T_k(V) = P_{R_k} Pi V (the module docstring).

    Args:
        L: volume and image side.
        rotations: (K, 3, 3) rotations (``mtd.so3.hopf_grid``), K >= 1.
        weights: (K,) quadrature weights of the grid (the prior of each rotation); None is uniform.
            Normalised to sum to 1.
        bandlimit: the l_max of the Fourier-Bessel subspace, or None for every volume in the ball.
        radial: the largest zero u_{l,s} kept (None: pi L / 2, Nyquist).
        schedule: frequency marching, a list of (iteration, lmax) pairs: from that iteration on the
            band limit is lmax (``start_iteration``); e.g. [(0, 6), (7, 8), (17, 10)] as the
            paper's Shepp-Logan run. None keeps ``bandlimit``.
        cg_tol: conjugate gradients stop at ||residual|| <= cg_tol ||rhs||.
        cg_iterations: and after at most this many iterations.
        cache_bytes: the projection tables are held while K * 8 L^3 * 16 bytes fit in this.
    """

    def __init__(
        self,
        L: int,
        rotations,
        weights=None,
        bandlimit: int | None = None,
        radial: float | None = None,
        schedule=None,
        cg_tol: float = 1e-6,
        cg_iterations: int = 100,
        cache_bytes: int = 512 << 20,
    ):
        super().__init__()
        if int(L) != L or L < 2:
            raise ValueError(f"L must be an integer >= 2, got {L!r}")
        L = int(L)
        R = torch.as_tensor(rotations, dtype=torch.float64).cpu()
        if R.ndim != 3 or tuple(R.shape[1:]) != (3, 3):
            raise ValueError(f"rotations must be (K, 3, 3), got shape {tuple(R.shape)}")
        if len(R) == 0:
            raise ValueError("rotations holds no rotation (K = 0): the SO(3) grid is empty")
        if not torch.isfinite(R).all():
            raise ValueError("rotations has non-finite entries")
        err = (R.transpose(1, 2) @ R - torch.eye(3, dtype=torch.float64)).abs().max()
        det = torch.linalg.det(R)
        if err > 1e-6 or (det < 0).any():
            raise ValueError(
                f"rotations must be orthogonal with det +1 (max |R^T R - I| = {float(err):.2g}, "
                f"min det = {float(det.min()):.3g})"
            )
        K = len(R)
        if weights is None:
            w = torch.full((K,), 1.0 / K, dtype=torch.float64)
        else:
            w = torch.as_tensor(weights, dtype=torch.float64).cpu().reshape(-1)
            if len(w) != K or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError(
                    f"weights must be {K} finite numbers >= 0 with a positive sum, got shape "
                    f"{tuple(w.shape)}"
                )
            w = w / w.sum()
        if not (math.isfinite(cg_tol) and cg_tol >= 0):
            raise ValueError(f"cg_tol must be a finite number >= 0, got {cg_tol!r}")
        if int(cg_iterations) != cg_iterations or cg_iterations < 1:
            raise ValueError(f"cg_iterations must be an integer >= 1, got {cg_iterations!r}")
        self.L, self.K, self.shape = L, K, (L, L, L)
        self.radial = radial
        self.cg_tol, self.cg_iterations = float(cg_tol), int(cg_iterations)
        self.cg_history: list[int] = []  # CG iterations of every normal_solve, for reports
        self.register_buffer("rotations", R)
        self.register_buffer("log_w", w.log())
        self.register_buffer("mask", ball_mask(L) > 0)
        self.cached = K * 8 * L**3 * _TABLE_BYTES_PER_ENTRY <= cache_bytes
        if self.cached:
            index, weight = ray_table(L, R)
            self.register_buffer("index", index)
            self.register_buffer("weight", weight)
        self.schedule = None if schedule is None else self._check_schedule(schedule)
        self.bandlimit = None
        self.register_buffer("basis", torch.zeros(L**3, 0, dtype=torch.float64))
        first = bandlimit if self.schedule is None else self.schedule[0][1]
        self.set_bandlimit(first)

    # --------------------------------------------------------------------------------------------
    # The subspace
    # --------------------------------------------------------------------------------------------
    @staticmethod
    def _check_schedule(schedule) -> list[tuple[int, int | None]]:
        out = []
        for item in schedule:
            try:
                it, lmax = item
            except (TypeError, ValueError):
                raise ValueError(
                    f"schedule entries must be (iteration, lmax) pairs, got {item!r}"
                ) from None
            if int(it) != it or it < 0:
                raise ValueError(f"schedule iteration must be an integer >= 0, got {it!r}")
            out.append((int(it), None if lmax is None else int(lmax)))
        if not out or out[0][0] != 0:
            raise ValueError(f"schedule must start at iteration 0, got {schedule!r}")
        if any(b[0] <= a[0] for a, b in zip(out[:-1], out[1:], strict=True)):
            raise ValueError(f"schedule iterations must increase, got {schedule!r}")
        return out

    def set_bandlimit(self, lmax: int | None) -> None:
        """Restrict the unknown to the Fourier-Bessel functions with l <= lmax (None: the ball).

        The projector is rebuilt on the tables' device and dtype; the subspaces are nested in lmax.
        """
        if lmax is not None and (int(lmax) != lmax or lmax < 0):
            raise ValueError(f"bandlimit (lmax) must be an integer >= 0 or None, got {lmax!r}")
        if lmax is not None:
            lmax = int(lmax)
        if lmax == self.bandlimit and (lmax is None or self.basis.shape[1] > 0):
            return
        dtype = self.weight.dtype if self.cached else self.log_w.dtype
        if lmax is None:
            Q = torch.zeros(self.L**3, 0, dtype=torch.float64)
        else:
            B = fourier_bessel_functions(self.L, lmax, self.radial)
            if B.shape[1] == 0:
                raise ValueError(
                    f"bandlimit {lmax} with radial {self.radial} leaves no Fourier-Bessel function"
                )
            Q = torch.from_numpy(orthonormal_basis(B))
            Q[~self.mask.reshape(-1).cpu()] = 0  # QR's rounding outside the ball
        self.basis = Q.to(device=self.mask.device, dtype=dtype)
        self.bandlimit = lmax

    def start_iteration(self, tau: int) -> None:
        """Frequency marching: set the band limit of ``schedule`` at EM iteration tau."""
        if self.schedule is None:
            return
        lmax = [lm for it, lm in self.schedule if it <= tau][-1]
        self.set_bandlimit(lmax)

    @property
    def n(self) -> int:
        """Dimension of the unknown's subspace U."""
        return self.basis.shape[1] if self.bandlimit is not None else int(self.mask.sum())

    @property
    def dimension(self) -> int:
        return self.n

    def restrict(self, x: torch.Tensor) -> torch.Tensor:
        """Pi x: the orthogonal projection of volumes (..., L, L, L) onto U."""
        if self.bandlimit is None:
            return x * self.mask.to(x.dtype)
        Q = self.basis.to(x.dtype)
        flat = x.reshape(-1, self.L**3)
        return ((flat @ Q) @ Q.T).reshape(x.shape)

    # --------------------------------------------------------------------------------------------
    # The seam
    # --------------------------------------------------------------------------------------------
    def log_weights(self) -> torch.Tensor:
        return self.log_w.to(torch.float64)

    def _tables(self, block: slice):
        if self.cached:
            return self.index[block], self.weight[block]
        index, weight = ray_table(self.L, self.rotations[block].to("cpu", torch.float64))
        return index.to(self.mask.device), weight.to(
            device=self.mask.device, dtype=self.log_w.dtype
        )

    def _sub_blocks(self, block: slice | None) -> list[slice]:
        start, stop, _ = (block or slice(None)).indices(self.K)
        # At most ~1M table entries per piece: bounded temporaries whatever K, and pieces small
        # enough (~5 ms at L = 11) for the workers to share them out evenly (mtd.parallel).
        step = max(1, (1 << 20) // (8 * self.L**3))
        return [slice(s, min(s + step, stop)) for s in range(start, stop, step)]

    def _project(self, v: torch.Tensor, b: slice) -> torch.Tensor:
        """P_k v for the rotations of block b: (L^3,) -> (k, L^2)."""
        index, weight = self._tables(b)
        return (torch.take(v, index) * weight.to(v.dtype)).sum(-1)

    def _back(self, images: torch.Tensor, b: slice) -> torch.Tensor:
        """sum_k P_k^T images_k over the rotations of block b: (k, L^2) -> (L^3,), unrestricted."""
        index, weight = self._tables(b)
        out = torch.zeros(self.L**3, dtype=images.dtype, device=images.device)
        contrib = images.unsqueeze(-1) * weight.to(images.dtype)
        return out.scatter_add_(0, index.reshape(-1), contrib.reshape(-1))

    def templates(self, x: torch.Tensor, block: slice | None = None) -> torch.Tensor:
        L = self.L
        v = self.restrict(x).reshape(-1)
        parts = list(ordered_map(lambda b: self._project(v, b), self._sub_blocks(block)))
        return torch.cat(parts).reshape(-1, L, L) if parts else v.new_zeros(0, L, L)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """All K templates: (L, L, L) -> (K, L, L)."""
        return self.templates(x)

    def adjoint(self, images: torch.Tensor, block: slice | None = None) -> torch.Tensor:
        L = self.L
        blocks = self._sub_blocks(block)
        if not blocks:
            return images.new_zeros(L, L, L)
        start = blocks[0].start
        flat = images.reshape(len(images), L * L)

        def part(b: slice) -> torch.Tensor:
            return self._back(flat[b.start - start : b.stop - start], b)

        return self.restrict(sum_in_order(ordered_map(part, blocks)).reshape(L, L, L))

    def normal_apply(self, c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """sum_k Pi P_k^T diag(c_k) P_k Pi v: the normal operator of eq. (29).

        Block by block of rotations, each projected and back-projected by one worker (the CG
        of the M-step applies it some 60 times per iteration; ``mtd.parallel``)."""
        L = self.L
        u = self.restrict(v).reshape(-1)
        flat = c.reshape(self.K, L * L)

        def part(b: slice) -> torch.Tensor:
            return self._back(flat[b] * self._project(u, b), b)

        return self.restrict(sum_in_order(ordered_map(part, self._sub_blocks(None))).view(L, L, L))

    def normal_solve(self, c: torch.Tensor, rhs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Conjugate gradients on the normal equations inside U, from Pi x (module docstring).

        Stops at ||r|| <= cg_tol ||rhs|| or after cg_iterations; the count is appended to
        ``cg_history``.
        """
        v = self.restrict(x)
        r = self.restrict(rhs) - self.normal_apply(c, v)
        target = self.cg_tol * float(torch.linalg.vector_norm(rhs))
        p = r.clone()
        rr = float((r * r).sum())
        done = 0
        for done in range(1, self.cg_iterations + 1):  # noqa: B007 (the count is reported)
            if math.sqrt(rr) <= target:
                done -= 1
                break
            Ap = self.normal_apply(c, p)
            pAp = float((p * Ap).sum())
            if not pAp > 0:  # p in the null space: nothing left to reduce
                done -= 1
                break
            alpha = rr / pAp
            v = v + alpha * p
            r = r - alpha * Ap
            rr_new = float((r * r).sum())
            p = r + (rr_new / rr) * p
            rr = rr_new
        self.cg_history.append(done)
        return v

    costly_nearest = True  # an alignment over SO(3), the mirror and shifts: seconds

    def orbit(self, x: torch.Tensor) -> torch.Tensor:
        """x rotated by every rotation of the grid, then its mirror image (p -> -p) rotated
        alike: (2K, L, L, L), trilinear (``mtd.so3.rotate_volume``). Projections cannot tell a
        volume from these (nor from small translations of it)."""
        inverted = torch.flip(x, dims=(-3, -2, -1))
        R = self.rotations.to(device=x.device, dtype=torch.float64)
        return torch.cat([rotate_volume(v, R) for v in (x, inverted)]).to(x.dtype)

    def nearest(self, truth: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x aligned to ``truth`` over SO(3), the mirror image and translations of up to two
        voxels (``mtd.metrics.volumes.align_volume``: the grid search, then a continuous
        refinement)."""
        from mtd.metrics.volumes import align_volume

        return align_volume(truth, x).aligned.to(x)

    def poses(self) -> Poses:
        """No in-plane angle: template k is the projection at the grid's rotation k."""
        return Poses(angles=None, mirrored=np.zeros(self.K, bool), rotations=self.rotations)

    def to_image(self, x: torch.Tensor) -> torch.Tensor:
        """A volume is its own object (there is no image it stands for): x itself."""
        return x

    def from_image(self, image: torch.Tensor) -> torch.Tensor:
        """The unknown nearest a volume (..., L, L, L): Pi of it (least squares in U)."""
        image = torch.as_tensor(image)
        if tuple(image.shape[-3:]) != self.shape:
            raise ValueError(
                f"a volume unknown needs (..., {self.L}, {self.L}, {self.L}) volumes, got shape "
                f"{tuple(image.shape)}"
            )
        return self.restrict(image.to(self.mask.device))

    def extra_repr(self) -> str:
        return f"L={self.L}, K={self.K}, bandlimit={self.bandlimit}, n={self.n}"


def projections(
    L: int,
    resolution: int = 1,
    bandlimit: int | None = None,
    schedule=None,
    radial: float | None = None,
    cg_tol: float = 1e-4,
    cg_iterations: int = 30,
) -> Projections:
    """``Projections`` over the Hopf grid of 72 * 8^resolution rotations (``mtd.so3.hopf_grid``)
    with its quadrature weights: the group of a volume experiment's config.

    Warm-started CG lowers the quadratic -Q monotonically from its start, so a loose ``cg_tol``
    still makes every M-step increase Q (a generalised EM step); the defaults here are the
    Shepp-Logan run's (tests/benchmarks/bench_volume.py).

    Args:
        L: volume side.
        resolution: r >= 0 (K = 72, 576, 4608, ...).
        bandlimit, schedule, radial, cg_tol, cg_iterations: as ``Projections`` (a schedule of
            lists, a config's [[0, 6], [8, 8], [14, 10]], is read as (iteration, lmax) pairs).
    """
    R, w = hopf_grid(resolution)
    return Projections(
        L,
        R,
        w,
        bandlimit=bandlimit,
        radial=radial,
        schedule=schedule,
        cg_tol=cg_tol,
        cg_iterations=cg_iterations,
    )
