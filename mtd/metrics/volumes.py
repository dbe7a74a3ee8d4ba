"""Measuring a volume: alignment to the truth over SO(3), mirror and shifts; error; FSC.

A volume estimated from projections is known only up to a rotation, a reflection and a small
translation (the stochastic-EM paper, Sec. II: "it is possible to reconstruct the target volume
only up to a 3-D rotation, a 3-D translation, and a reflection"). ``align_volume`` finds the
version of the estimate nearest the truth,

    aligned(p) = E_m(R^T (p - s)),   E_m(q) = E(-q) if mirror else E(q),

in the conventions of ``mtd.so3`` (voxel [i0, i1, i2] sits at p = i - (L - 1) / 2; (R . V)(p) =
V(R^T p)): a grid search over an SO(3) grid x {identity, inversion} x shifts on a half-voxel
lattice (every shift at once from FFT correlations), then a local refinement of (R, s) by L-BFGS
on an axis-angle parametrisation, with cubic B-spline resampling. The error is
||M (aligned - truth)|| / ||M truth||, M the ball |p| <= L / 2 (the support of a volume here).

``fsc`` is the paper's eq. (38), the Fourier shell correlation, on shells of width one index unit
up to the largest shell inside the cube (floor(L / 2); Nyquist for even L), with the 0.5 (the
paper's cutoff) and 0.143 crossings interpolated linearly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from mtd.so3 import ball_mask, grid_points, hopf_grid, trilinear_table

# --------------------------------------------------------------------------------------------
# Inputs and masks


def as_volume(V, name: str = "volume", like: torch.Tensor | None = None) -> torch.Tensor:
    """``V`` as a float64 (L, L, L) tensor (on ``like``'s device if given), checked.

    Raises:
        ValueError: if ``V`` is not a cubic 3-D array with finite values.
    """
    device = like.device if like is not None else (V.device if torch.is_tensor(V) else "cpu")
    V = torch.as_tensor(np.asarray(V) if not torch.is_tensor(V) else V)
    V = V.to(device=device, dtype=torch.float64)
    if V.ndim != 3 or len(set(V.shape)) != 1 or V.shape[0] < 2:
        raise ValueError(
            f"{name} must be a cubic (L, L, L) volume with L >= 2, got {tuple(V.shape)}"
        )
    if like is not None and V.shape != like.shape:
        raise ValueError(
            f"{name} must have the truth's shape {tuple(like.shape)}, got {tuple(V.shape)}"
        )
    if not bool(torch.isfinite(V).all()):
        raise ValueError(f"{name} has non-finite values (NaN or inf)")
    return V


# --------------------------------------------------------------------------------------------
# Transforming a volume


def mirror_volume(V: torch.Tensor) -> torch.Tensor:
    """V(-p): the inversion through the centre, exact on the grid (index i -> L - 1 - i)."""
    return torch.flip(V, dims=(-3, -2, -1))


def _bspline_weights(t: torch.Tensor, order: int) -> torch.Tensor:
    """(..., order + 1) weights of the B-spline of ``order`` (1 or 3) at the offsets
    -(order // 2) .. order - order // 2 from floor(q), t = q - floor(q) in [0, 1)."""
    if order == 1:
        return torch.stack([1 - t, t], -1)
    t2, t3 = t * t, t * t * t
    return (
        torch.stack([(1 - t) ** 3, 3 * t3 - 6 * t2 + 4, -3 * t3 + 3 * t2 + 3 * t + 1, t3], -1) / 6
    )


SPLINE_PAD = 6  # zero voxels around a volume before its cubic prefilter (see spline_coefficients)


def spline_coefficients(V: torch.Tensor, pad: int = SPLINE_PAD) -> torch.Tensor:
    """Cubic B-spline coefficients of V zero-padded by ``pad`` voxels on every side.

    The coefficients c solve (c[i-1] + 4 c[i] + c[i+1]) / 6 = V[i] on each axis of the padded
    grid (c = 0 beyond it), so that the spline interpolates V at every voxel; the zero border lets
    the spline fall to zero outside the cube (the filter's pole, 2 - sqrt(3) = 0.27, decays to 4e-4
    over 6 voxels).

    Args:
        V: (L, L, L) volume.
        pad: zero voxels added on each side.

    Returns:
        (L + 2 pad,)^3 coefficients, V's dtype and device.
    """
    n = V.shape[-1] + 2 * pad
    A = torch.eye(n, dtype=V.dtype, device=V.device) * (4 / 6)
    i = torch.arange(n - 1, device=V.device)
    A[i, i + 1] = A[i + 1, i] = 1 / 6
    Ainv = torch.linalg.inv(A)
    Vp = F.pad(V, (pad,) * 6)
    # one axis at a time (a single four-operand einsum may form an n^6 intermediate)
    c = torch.einsum("ai,ijk->ajk", Ainv, Vp)
    c = torch.einsum("bj,ajk->abk", Ainv, c)
    return torch.einsum("ck,abk->abc", Ainv, c)


def transform_volume(
    V: torch.Tensor, R: torch.Tensor, shift=None, order: int = 3, coefficients=None
) -> torch.Tensor:
    """V(R^T (p - s)) by a B-spline of ``order`` (3: cubic, 1: trilinear), zero outside.

    ``mtd.so3.rotate_volume`` is the trilinear rotation (s = 0) the grid search uses; this adds the
    sub-voxel translation the refinement needs in the same interpolation (a rotation and then a
    shift, each interpolated, would blur twice) and the cubic spline, whose interpolation error on
    a smooth volume is an order of magnitude below the trilinear one (measured: 1-3 % against
    11 % on Gaussian blobs of s.d. 1.1 voxels, tests/engine/test_volume_metrics.py), so the error
    after alignment is the estimate's and not the resampling's. Differentiable in R and s
    (autograd).

    Args:
        V: (L, L, L) volume.
        R: (3, 3) rotation.
        shift: (3,) translation in voxels (axis order 0, 1, 2), or None (zero).
        order: 3 (cubic B-spline, prefiltered: ``spline_coefficients``) or 1 (trilinear).
        coefficients: ``spline_coefficients(V)`` if already at hand (order 3; the refinement
            samples one volume many times), or None.

    Returns:
        (L, L, L) in V's dtype and device.
    """
    if order not in (1, 3):
        raise ValueError(f"order must be 1 (trilinear) or 3 (cubic B-spline), got {order!r}")
    L = V.shape[-1]
    pad = SPLINE_PAD if order == 3 else 1
    if order == 1:
        c = F.pad(V, (pad,) * 6)
    else:
        c = spline_coefficients(V, pad) if coefficients is None else coefficients
    n = c.shape[-1]
    R = torch.as_tensor(R).to(device=V.device, dtype=V.dtype)
    p = grid_points(L).to(device=V.device, dtype=V.dtype)
    if shift is not None:
        p = p - torch.as_tensor(shift, device=V.device, dtype=V.dtype).reshape(1, 3)
    q = p @ R + ((L - 1) / 2 + pad)  # rows (R^T (p - s))^T, in padded index units
    q0 = q.detach().floor()
    w = _bspline_weights(q - q0, order)  # (L^3, 3, K)
    offsets = torch.arange(order + 1, device=V.device) - order // 2
    idx = q0.long()[..., None] + offsets  # (L^3, 3, K)
    valid = (idx >= 0) & (idx < n)
    w = w * valid
    idx = idx.clamp(0, n - 1)
    flat = (idx[:, 0, :, None, None] * n + idx[:, 1, None, :, None]) * n + idx[:, 2, None, None, :]
    weight = w[:, 0, :, None, None] * w[:, 1, None, :, None] * w[:, 2, None, None, :]
    return (c.reshape(-1)[flat] * weight).sum((1, 2, 3)).reshape(L, L, L)


def axis_angle_to_matrix(w: torch.Tensor) -> torch.Tensor:
    """(3, 3) rotation exp([w]_x) of the rotation vector w (angle |w| about w / |w|)."""
    z = torch.zeros((), dtype=w.dtype, device=w.device)
    K = torch.stack(
        [
            torch.stack([z, -w[2], w[1]]),
            torch.stack([w[2], z, -w[0]]),
            torch.stack([-w[1], w[0], z]),
        ]
    )
    return torch.linalg.matrix_exp(K)


# --------------------------------------------------------------------------------------------
# Alignment


@dataclass
class VolumeAlignment:
    """The estimate nearest the truth: aligned(p) = E_m(R^T (p - shift)), E_m = E(-.) if mirror.

    Attributes:
        aligned: (L, L, L) float64 aligned estimate (not masked).
        rotation: (3, 3) float64 R.
        mirror: whether the estimate was inverted (E(-q)) before rotating.
        shift: (3,) translation in voxels, axis order (0, 1, 2).
        error: ||M (aligned - truth)|| / ||M truth|| after refinement, M the ``mask``.
        grid_error: the grid search's best error (trilinear, on the blurred volumes, before
            refinement); None when the alignment started from a previous one.
        mask: description of M.
    """

    aligned: torch.Tensor
    rotation: torch.Tensor
    mirror: bool
    shift: tuple[float, float, float]
    error: float
    grid_error: float | None
    mask: str = "ball |p| <= L/2"
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain values for summary.json (no tensors)."""
        return {
            "error": self.error,
            "grid_error": self.grid_error,
            "rotation": self.rotation.cpu().tolist(),
            "mirror": self.mirror,
            "shift": list(self.shift),
            "mask": self.mask,
            **self.info,
        }


def gaussian_blur(V: torch.Tensor, sd: float) -> torch.Tensor:
    """V convolved with an isotropic Gaussian of s.d. ``sd`` voxels (zero-padded by 4 sd on each
    side, so nothing wraps round), by FFT: the transfer function exp(-2 pi^2 sd^2 |xi|^2)."""
    if sd == 0:
        return V
    L, pad = V.shape[-1], math.ceil(4 * sd)
    n = L + 2 * pad
    xi = torch.fft.fftfreq(n, device=V.device, dtype=torch.float64)
    x0, x1, x2 = torch.meshgrid(xi, xi, xi, indexing="ij")
    G = torch.exp(-2 * math.pi**2 * sd**2 * (x0**2 + x1**2 + x2**2))
    out = torch.fft.ifftn(torch.fft.fftn(F.pad(V, (pad,) * 6)) * G).real
    return out[pad : pad + L, pad : pad + L, pad : pad + L].to(V.dtype)


def _padded_size(L: int, max_shift: int) -> int:
    """The FFT side for shifts up to ``max_shift``: at least L + max_shift, so that no shift of
    interest wraps around, and odd, so that no Nyquist term breaks the real interpolation."""
    n = L + max_shift
    return n + 1 - n % 2


def _shift_errors(truth_wf, weight_f, truth_sq, C, lags):
    """Squared weighted errors sum W (t - S_s C)^2 at every shift s in lags^3.

    With W = M^2 and S_s C(p) = C(p - s): sum W t^2 - 2 sum (W t)(S_s C) + sum W (S_s C)^2. The
    two correlations h(s) = sum_q c(q) a(q + s) = ifft(A conj(C))[s] (C zero-padded to N, the
    ``_padded_size``) are evaluated at fractional lags too, as the trigonometric interpolant
    (1 / N^3) sum_k A(k) conj(C(k)) exp(2 pi i k . s / N), one small matrix per axis: exact at
    integer lags (zero-filled shifts), and the band-limited shift between them; for the energy
    term sum W (S_s C)^2 the interpolant of the integer-lag values is used, an approximation
    between integers (the search only needs to land in the refinement's basin).

    Args:
        truth_wf: (N, N, N) fftn of W t, padded.
        weight_f: (N, N, N) fftn of W, padded.
        truth_sq: sum W t^2.
        C: (B, L, L, L) candidates.
        lags: (n,) float64 lags searched on each axis.

    Returns:
        (B, n, n, n) squared errors, index (a, b, c) the shift (lags[a], lags[b], lags[c]).
    """
    N = truth_wf.shape[-1]
    k = torch.fft.fftfreq(N, d=1.0 / N, device=C.device, dtype=torch.float64)
    E = torch.exp(2j * math.pi * lags[:, None] * k[None, :] / N)  # (n, N)
    X1 = truth_wf * torch.fft.fftn(C, s=(N, N, N)).conj()
    X2 = weight_f * torch.fft.fftn(C * C, s=(N, N, N)).conj()
    X = 2 * X1 - X2  # one contraction for both correlations
    h = torch.einsum("bijk,ck->bijc", X, E)
    h = torch.einsum("bijc,yj->biyc", h, E)
    h = torch.einsum("biyc,xi->bxyc", h, E)
    return truth_sq - h.real / N**3


def align_volume(
    truth,
    estimate,
    rotations=None,
    grid_resolution: int = 1,
    max_shift: int = 2,
    shift_steps: int = 2,
    mirror: bool = True,
    refine: bool = True,
    n_starts: int = 2,
    order: int = 3,
    blur: float = 1.0,
    mask_radius: float | None = None,
    chunk: int = 256,
    start: VolumeAlignment | None = None,
) -> VolumeAlignment:
    """Align ``estimate`` to ``truth`` over SO(3), the mirror image and small translations.

    1. Grid search on the volumes blurred by ``blur``: for every rotation R of the grid and m in
       {identity, inversion}, the candidate rotate_volume(E_m, R) (trilinear, ``mtd.so3``'s
       tables) and all its shifts |s_i| <= max_shift in steps of 1 / shift_steps at once (FFT
       correlations, ``_shift_errors``); the measure is the masked squared error, i.e. the
       correlation -2 <M t, S_s C> plus the candidate's own masked energy (which moves with the
       shift and the interpolation, so it is kept, not assumed constant).
    2. Refinement from the ``n_starts`` best (rotation, shift) of each hand: L-BFGS over
       (w, s), R = exp([w]_x) R0, of ||M (transform_volume(E_m, R, s, order) - t)||^2 with
       autograd gradients, first on the blurred volumes, then on the volumes as they are; the
       best is kept, never one worse than its start.

    Cost at L = 11 (576 rotations, 2 hands, 9^3 shifts, 2 x 2 refinements): about 4 s on one
    loaded CPU core. The grid search holds, per batch of ``chunk`` rotations, the trilinear tables
    (128 L^3 bytes a rotation) and five complex spectra (80 N^3 bytes a rotation and hand, N =
    L + max_shift rounded up to odd): about 90 MB at the defaults and L = 11 (measured peak, with
    the tables' temporaries and scipy's import: 170 MB above the process).

    Args:
        truth: (L, L, L) true volume (tensor or array); its device is used.
        estimate: (L, L, L) estimate.
        rotations: (n, 3, 3) grid to search, or None for ``mtd.so3.hopf_grid(grid_resolution)``
            (72 * 8^r rotations; r = 1: 576, about 15 degrees apart).
        grid_resolution: the grid's resolution when ``rotations`` is None.
        max_shift: largest translation searched, voxels per axis (>= 0, < L).
        shift_steps: grid-search shifts per voxel (1: integers; 2: half voxels, ...): a smooth
            volume a half voxel off reads as far as one a large rotation off, so the search
            needs sub-voxel shifts to land in the right basin.
        mirror: also search the inverted estimate E(-p).
        refine: run the local refinement (else the grid's best is returned).
        n_starts: number of best grid points refined for each hand (>= 1).
        order: interpolation of the refinement and of the returned volume, 3 (cubic B-spline)
            or 1 (trilinear); see ``transform_volume``.
        blur: s.d. in voxels of the Gaussian both volumes are blurred by for the grid search and a
            first refinement (0: none). A sharp volume such as the Shepp-Logan phantom at 11^3
            (its skull is a sub-voxel shell) is as far from itself a grid cell off as from
            anything: blurred, the measure is smooth over a grid cell, and the second refinement
            on the volumes as they are starts in its basin.
        mask_radius: radius of the hard ball M in voxels; None is L / 2.
        chunk: rotations per batch in the grid search (the memory bound above).
        start: a previous alignment of this truth (e.g. of the last EM iteration's estimate):
            no grid search and no blurred stage, only the refinement from its (rotation, mirror,
            shift), a fraction of the cost, for a curve per iteration; ``grid_error`` is then
            None. A start far from the optimum stays in its own basin.

    Returns:
        A ``VolumeAlignment``.
    """
    t = as_volume(truth, "truth")
    E = as_volume(estimate, "estimate", like=t)
    L = t.shape[0]
    _check_alignment(L, max_shift, shift_steps, n_starts, order, chunk, blur)
    if rotations is None:
        rotations = hopf_grid(grid_resolution)[0]
    rotations = torch.as_tensor(rotations).to(device=t.device, dtype=torch.float64)
    if rotations.ndim != 3 or rotations.shape[1:] != (3, 3) or rotations.shape[0] == 0:
        raise ValueError(f"rotations must be (n, 3, 3) with n >= 1, got {tuple(rotations.shape)}")
    M = ball_mask(L, mask_radius, device=t.device)
    W = M * M
    truth_sq = float((W * t * t).sum())
    if truth_sq == 0:
        raise ValueError("truth is zero inside the mask: the relative error is undefined")
    tb, Eb = gaussian_blur(t, blur), gaussian_blur(E, blur)  # the coarse stage's volumes
    tb_sq = float((W * tb * tb).sum())
    flips = (False, True) if mirror else (False,)
    if start is None:  # 1. the grid search on the blurred volumes
        search = (tb, Eb, W, tb_sq, rotations, flips, max_shift, shift_steps, n_starts, chunk)
        grid_sq, best = _grid_search(*search)
    else:
        grid_sq, flips = None, (bool(start.mirror),)
        R_start = torch.as_tensor(start.rotation).to(device=t.device, dtype=torch.float64)
        best = [(None, bool(start.mirror), R_start, tuple(float(v) for v in start.shift))]
    # 2. the local refinement of each start
    coarse = blur > 0 and start is None
    flip, R, s = _refine(t, E, tb, Eb, W, best, flips, coarse, order, max_shift, refine)
    aligned = transform_volume(mirror_volume(E) if flip else E, R, s, order)
    # the reported error is recomputed from the returned volume, not taken from the search
    err = float(torch.sqrt((W * (aligned - t) ** 2).sum() / truth_sq))
    radius = L / 2 if mask_radius is None else mask_radius
    info = {"n_rotations": len(rotations), "max_shift": max_shift, "blur": blur, "order": order}
    return VolumeAlignment(
        aligned=aligned,
        rotation=R,
        mirror=bool(flip),
        shift=tuple(float(v) for v in s),
        error=err,
        grid_error=None if grid_sq is None else math.sqrt(max(grid_sq, 0.0) / tb_sq),
        mask=f"ball |p| <= {radius:g} voxels",
        info=info,
    )


def _check_alignment(L, max_shift, shift_steps, n_starts, order, chunk, blur) -> None:
    if not isinstance(max_shift, int) or not 0 <= max_shift < L:
        raise ValueError(f"max_shift must be an integer in [0, L) = [0, {L}), got {max_shift!r}")
    if not isinstance(shift_steps, int) or shift_steps < 1:
        raise ValueError(f"shift_steps must be an integer >= 1, got {shift_steps!r}")
    if not isinstance(n_starts, int) or n_starts < 1:
        raise ValueError(f"n_starts must be an integer >= 1, got {n_starts!r}")
    if order not in (1, 3):
        raise ValueError(f"order must be 1 (trilinear) or 3 (cubic B-spline), got {order!r}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    if not (isinstance(blur, int | float) and 0 <= blur <= L):
        raise ValueError(f"blur must be a number in [0, L] (voxels), got {blur!r}")


def _grid_search(tb, Eb, W, tb_sq, rotations, flips, m, shift_steps, n_starts, chunk):
    """The best shift of every (mirror, grid rotation) of the blurred volumes, by FFT
    correlations (``_shift_errors``).

    Returns:
        (the best squared error, the ``n_starts`` best (error, mirror, R, shift) of each hand).
    """
    L = tb.shape[0]
    N = _padded_size(L, m)
    truth_wf = torch.fft.fftn(W * tb, s=(N, N, N))
    weight_f = torch.fft.fftn(W, s=(N, N, N))
    n_lag = 2 * m * shift_steps + 1
    lags = torch.linspace(-m, m, n_lag, dtype=torch.float64, device=tb.device)
    best = []  # (squared error, mirror, rotation, shift)
    volumes = [mirror_volume(Eb) if flip else Eb for flip in flips]
    for first in range(0, len(rotations), chunk):
        # mtd.so3.rotate_volume's trilinear tables, built once for both the estimate and its mirror
        index, weight = trilinear_table(L, rotations[first : first + chunk].cpu())
        index, weight = index.to(tb.device), weight.to(tb.device)
        for flip, Em in zip(flips, volumes, strict=True):
            C = (Em.reshape(-1)[index] * weight).sum(-1).reshape(-1, L, L, L)
            err = _shift_errors(truth_wf, weight_f, tb_sq, C, lags).reshape(len(C), -1)
            e, j = err.min(dim=1)
            for k in torch.argsort(e)[:n_starts].tolist():
                s = np.unravel_index(int(j[k]), (n_lag,) * 3)
                shift = tuple(float(lags[v]) for v in s)
                best.append((float(e[k]), flip, rotations[first + k], shift))
    # the n_starts best of each hand: a volume near a mirror symmetry (the Shepp-Logan phantom is
    # one up to its small features) looks alike in both once blurred, and the sharp refinement
    # tells them apart only if both are refined
    best.sort(key=lambda b: b[0])
    return best[0][0], [b for flip in flips for b in [b for b in best if b[1] == flip][:n_starts]]


def _refine(t, E, tb, Eb, W, best, flips, coarse, order, m, refine):
    """The local refinement of (w, s), R = exp([w]_x) R0, from each start: first on the blurred
    volumes (``coarse``), then on the volumes as they are; the objective is the masked squared
    error of the ``order`` interpolation, and a start's refined point is kept only when it beats
    the start itself on the sharp measure.

    Returns:
        (mirror, R, s) of the best.
    """
    from scipy.optimize import minimize

    def objective(x, Em, R0, target, coef):
        x = torch.tensor(x, dtype=torch.float64, device=t.device, requires_grad=True)
        R = axis_angle_to_matrix(x[:3]) @ R0
        f = (W * (transform_volume(Em, R, x[3:], order, coef) - target) ** 2).sum()
        (g,) = torch.autograd.grad(f, x)
        return float(f.detach()), g.cpu().numpy()

    def stage(target, vol, flip):
        vol = mirror_volume(vol) if flip else vol
        return vol, target, (spline_coefficients(vol) if order == 3 else None)

    stages = {
        flip: ([stage(tb, Eb, flip)] if coarse else []) + [stage(t, E, flip)] for flip in flips
    }
    bounds = [(None, None)] * 3 + [(-m - 0.5, m + 0.5)] * 3
    result = None  # (squared error, mirror, R, s)
    for _, flip_b, R0, s_b in best:
        x0 = np.concatenate([np.zeros(3), np.asarray(s_b, dtype=np.float64)])
        vol, target, coef = stages[flip_b][-1]
        sharp = (vol, R0, target, coef)
        f0, x = objective(x0, *sharp)[0], x0
        if refine:
            for vol, target, coef in stages[flip_b]:
                args = (vol, R0, target, coef)
                x = minimize(objective, x, args, jac=True, method="L-BFGS-B", bounds=bounds).x
            f1 = objective(x, *sharp)[0]
            f0, x = (f1, x) if f1 < f0 else (f0, x0)
        if result is None or f0 < result[0]:
            x = torch.tensor(x, dtype=torch.float64, device=t.device)
            result = (f0, flip_b, axis_angle_to_matrix(x[:3]) @ R0, x[3:])
    return result[1:]


def volume_error(truth, estimate, mask_radius: float | None = None) -> float:
    """||M (estimate - truth)|| / ||M truth|| with M the ball |p| <= mask_radius (None: L / 2),
    as it stands (no alignment: use ``align_volume`` first)."""
    t = as_volume(truth, "truth")
    E = as_volume(estimate, "estimate", like=t)
    M = ball_mask(t.shape[0], mask_radius, device=t.device)
    den = torch.linalg.vector_norm(M * t)
    if den == 0:
        raise ValueError("truth is zero inside the mask: the relative error is undefined")
    return float(torch.linalg.vector_norm(M * (E - t)) / den)


# --------------------------------------------------------------------------------------------
# Fourier shell correlation
