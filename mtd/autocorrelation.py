"""Autocorrelation analysis: the approximate-EM paper's baseline (its refs. 3-5) for continuous
rotations in a steerable basis.

The first three autocorrelations of a measurement M (N0 x N1, zero outside) are

    a1        = (1/|M|) sum_i M(i),
    a2(l)     = (1/|M|) sum_i M(i) M(i + l),
    a3(l1, l2) = (1/|M|) sum_i M(i) M(i + l1) M(i + l2),

|M| the pixel count, summed over all micrographs first and then divided by the total pixel count.
They are kept only where they are distinct and carry signal: a2(l) = a2(-l), so l runs over the
half-plane H = {(r, c): r > 0, |c| <= L-1} u {(0, c): 0 <= c <= L-1} (r, c the row and column
offsets, |r| <= L-1); a3 is the same for the six orderings of the triple {i, i + l1, i + l2} and
is zero for an L x L image unless all three points fit in an L x L box, so it is kept for the
pairs 0 <= l1 <= l2 (lexicographic order of (r, c), both in H) with l2 - l1 in the box as well:
each triple of pixels up to translation exactly once (661 a3 values for L = 5, 41 a2 values).

Noise bias (white Gaussian noise of variance sigma^2, M = S + eps): E[eps(i) eps(j)] = sigma^2
[i = j] and E[eps^3] = 0, so

    E a2(l)      = S2(l) + sigma^2 [l = 0],
    E a3(l1, l2) = S3(l1, l2) + sigma^2 ([l1 = 0] W(l2) + [l2 = 0] W(l1) + [l1 = l2] W'(l1)),

with W(l) = (1/|M|) sum_{j, j - l in M} S(j) and W'(l) = (1/|M|) sum_{i, i + l in M} S(i): the
signal's mean over the pixels the product does not cut off at the border, estimated without bias
by the same sums of M (at l = 0 both are a1, the refs' sigma^2 a1 terms; at l1 = l2 = 0 the bias
is 3 sigma^2 a1). The corrected autocorrelations are a - sigma^2 b, b these coefficients.

Model (the well-separated regime, eq. 4 of the approximate-EM paper: no pixel product over shifts
within the box touches two copies, and every copy lies inside M): each copy contributes its own
autocorrelation sums, so with p copies, gamma = p L^2 / |M| and the angles uniform,

    E a_k = (gamma / L^2) E_phi A_k[F_phi],    A_k the plain sums over the image's pixels,

F_phi = evaluate(R(phi) alpha). Each pixel of F_phi is a trigonometric polynomial of degree
nu_max in phi, so A_k[F_phi] has degree <= k nu_max and its mean over phi uniform on [0, 2 pi) is
exactly the mean over Q >= 3 nu_max + 1 equispaced angles (the default).

The fit minimises sum_k w_k ||a_k (corrected) - gamma m_k(alpha)||^2 over (alpha, gamma) (and
sigma^2 when it is not given: the bias terms sigma^2 b enter the model instead of the data) by
scipy's L-BFGS-B in float64, the gradient through the moments' adjoint (the moments are a cubic
form in alpha, precomputed), from several seeded random starts, the best misfit kept.

Cost: the pass over the data is 2 S^2 flops a pixel (S = 41 for L = 5), the fit is independent
of the data's size; all pairs within the box make a3 grow as L^4, so this is for small images
(L <~ 10), as in the refs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy import optimize

from mtd.io.source import MicrographSource


def _layout(L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shifts H (S, 2) int64 in lexicographic order ((0, 0) first) and the a3 pairs (P, 2)
    int64 indices (a, b) into H with a <= b and H[b] - H[a] inside the box |r|, |c| <= L - 1."""
    shifts = [(0, c) for c in range(L)] + [(r, c) for r in range(1, L) for c in range(-(L - 1), L)]
    H = torch.tensor(shifts, dtype=torch.int64)
    a, b = torch.triu_indices(len(H), len(H))
    d = H[b] - H[a]
    keep = (d[:, 1].abs() <= L - 1) & (d[:, 0].abs() <= L - 1)
    return H, torch.stack([a[keep], b[keep]], 1)


@dataclass
class Autocorrelations:
    """The measured autocorrelations and the coefficients of their noise bias.

    Attributes:
        L: image side the shifts were taken for.
        shifts: (S, 2) int64 the shifts l = (row, column) of a2 (H, (0, 0) first).
        pairs: (P, 2) int64 indices (a, b) into ``shifts``: a3 entry j is a3(shifts[a], shifts[b]).
        a1: () float64 the raw first autocorrelation (the mean).
        a2: (S,) float64 the raw second autocorrelation.
        a3: (P,) float64 the raw third autocorrelation.
        bias2: (S,) float64 E a2 - S2 = sigma^2 bias2 (one at l = 0).
        bias3: (P,) float64 E a3 - S3 = sigma^2 bias3 (the window means W, W' of the module doc).
        pixels: total pixel count the sums were divided by.
    """

    L: int
    shifts: torch.Tensor
    pairs: torch.Tensor
    a1: torch.Tensor
    a2: torch.Tensor
    a3: torch.Tensor
    bias2: torch.Tensor
    bias3: torch.Tensor
    pixels: int

    def corrected(self, sigma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a1, a2 - sigma^2 bias2, a3 - sigma^2 bias3): unbiased for the signal's."""
        s2 = float(sigma) ** 2
        return self.a1, self.a2 - s2 * self.bias2, self.a3 - s2 * self.bias3


def autocorrelations(
    micrographs,
    L: int,
    rows: int | None = None,
    device=None,
) -> Autocorrelations:
    """The first three autocorrelations of one or several micrographs, float64, streamed.

    Every micrograph is zero-padded (a shift that leaves it reads zeros), summed band by band of
    ``rows`` rows, and the sums of all micrographs are divided by the total pixel count. A band's
    shifted copies X (S, rows * N1) give a2 = X X0 and a3 = (X * X0) X^T in one matrix product,
    the same sums as the zero-padded FFT correlations of the refs, exact, at 2 S^2 N^2 flops
    (S = 2 L^2 - 2 L + 1 = 41 for L = 5).

    Args:
        micrographs: a ``mtd.io.MicrographSource`` or what makes one: an (N0, N1) tensor /
            array (a memory map is read a band at a time), a .npy / .mrc path (memory-mapped),
            a glob, or a list of these (sizes may differ).
        L: image side; shifts run over |r|, |c| <= L - 1.
        rows: rows per band (None: about 1M values of X per band).
        device: where the sums are computed (None: a tensor's own device, else the CPU).

    Returns:
        ``Autocorrelations`` (raw sums and the noise-bias coefficients).
    """
    items = MicrographSource.of(micrographs).arrays
    if int(L) != L or L < 1:
        raise ValueError(f"L must be an integer >= 1, got {L!r}")
    L = int(L)
    for k, m in enumerate(items):
        if L > min(m.shape):
            raise ValueError(
                f"L = {L} is larger than micrographs[{k}] of shape {tuple(m.shape)}: L <= "
                f"{min(m.shape)} allowed"
            )
    if rows is not None and (int(rows) != rows or rows < 1):
        raise ValueError(f"rows must be an integer >= 1 or None, got {rows!r}")
    H, pairs = _layout(L)
    S = len(H)
    if device is None:
        first = items[0]
        device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
    f64 = dict(dtype=torch.float64, device=device)
    s1 = torch.zeros((), **f64)
    s2 = torch.zeros(S, **f64)
    s3 = torch.zeros(S, S, **f64)
    # Window sums of the bias: W(l) sums rows [r, N0), W'(l) rows [0, N0 - r); both over the
    # columns [max(c, 0), N1 + min(c, 0)) (W) or [max(-c, 0), N1 - max(c, 0)) (W').
    w = torch.zeros(S, **f64)
    w_prime = torch.zeros(S, **f64)
    pixels = 0
    # Unfold windows: rows r = 0..L-1, columns c = -(L-1)..L-1; H is a subset of them.
    window = (H[:, 0] * (2 * L - 1) + H[:, 1] + (L - 1)).to(device)
    cols_c = torch.arange(-(L - 1), L)
    for m in items:
        N0, N1 = int(m.shape[0]), int(m.shape[1])
        pixels += N0 * N1
        band = rows or max(1, (1 << 20) // (L * (2 * L - 1) * N1))  # ~8 MB: cache-sized
        col_sums = torch.zeros(N0, 2 * L - 1, **f64)  # row sums over the column range of c
        for r0 in range(0, N0, band):
            r1 = min(N0, r0 + band)
            ext = min(N0, r1 + L - 1)  # the band and the L - 1 rows its shifts read below it
            if isinstance(m, torch.Tensor):
                block = m[r0:ext].to(**f64)
            else:  # a copy of the band: a memory map is read-only and read only here
                block = torch.from_numpy(np.array(m[r0:ext], dtype=np.float64)).to(device)
            if not torch.isfinite(block).all():
                raise ValueError(f"micrograph has non-finite values in rows {r0}..{ext - 1}")
            padded = torch.nn.functional.pad(block, (L - 1, L - 1, 0, (r1 + L - 1) - ext))
            X = torch.nn.functional.unfold(padded[None, None], (L, 2 * L - 1))[0]
            X = X[window]  # (S, (r1 - r0) * N1): X[h, i] = M(i + H[h])
            X0 = X[0]
            s1 += X0.sum()
            s2 += X @ X0
            s3 += (X * X0) @ X.T
            cum = torch.nn.functional.pad(block[: r1 - r0].cumsum(1), (1, 0))  # (rows, N1 + 1)
            lo = cols_c.clamp(min=0)
            hi = N1 + cols_c.clamp(max=0)
            col_sums[r0:r1] = cum[:, hi.to(device)] - cum[:, lo.to(device)]
        tail = torch.nn.functional.pad(col_sums.flip(0).cumsum(0).flip(0), (0, 0, 0, 1))
        head = torch.nn.functional.pad(col_sums.cumsum(0), (0, 0, 1, 0))
        r, c = H[:, 0].to(device), H[:, 1].to(device)
        w += tail[r, c + (L - 1)]  # rows [r, N0), columns of c
        w_prime += head[N0 - r, (L - 1) - c]  # rows [0, N0 - r), columns of -c
    a, b = pairs[:, 0].to(device), pairs[:, 1].to(device)
    bias2 = torch.zeros(S, **f64)
    bias2[0] = 1.0
    l1_zero, same = (a == 0).double(), (a == b).double()
    # [l1 = 0] W(l2) + [l2 = 0] W(l1) + [l1 = l2] W'(l1); l2 = 0 only with l1 = 0 here (a <= b).
    bias3 = l1_zero * w[b] + (b == 0).double() * w[a] + same * w_prime[a]
    return Autocorrelations(
        L,
        H,
        pairs,
        s1 / pixels,
        s2 / pixels,
        s3[a, b] / pixels,
        bias2,
        bias3 / pixels,
        pixels,
    )


def rotation_angles(basis, angles=None, order: int = 3) -> torch.Tensor:
    """Angles whose mean is exactly the mean over phi uniform on [0, 2 pi) for autocorrelations
    up to ``order``: Q = order * nu_max + 1 equispaced (or Q = ``angles`` if an int, or the
    angles given as a tensor, e.g. a measurement's own angles).

    Returns:
        (Q,) float64.
    """
    if angles is None:
        angles = order * int(basis.nu.max()) + 1
    if isinstance(angles, (int, np.integer)):
        if angles < 1:
            raise ValueError(
                f"angles must be an integer >= 1 (or a tensor of angles), got {angles}"
            )
        return torch.arange(int(angles), dtype=torch.float64) * (2 * math.pi / int(angles))
    angles = torch.as_tensor(angles, dtype=torch.float64).reshape(-1)
    if len(angles) == 0 or not torch.isfinite(angles).all():
        raise ValueError("angles must be a non-empty tensor of finite angles")
    return angles


def _gather_index(L: int, shifts: torch.Tensor) -> torch.Tensor:
    """(S, L^2) indices into an L x L image padded by (0, L-1) rows and (L-1, L-1) columns and
    flattened: entry [h, j] is pixel j + shifts[h] (X[h, j] = F(j + H[h])), on shifts' device."""
    ar = torch.arange(L, device=shifts.device)
    i, j = torch.meshgrid(ar, ar, indexing="ij")
    return (i.reshape(1, -1) + shifts[:, :1]) * (3 * L - 2) + (
        j.reshape(1, -1) + (L - 1) + shifts[:, 1:]
    )


def image_autocorrelations(
    images: torch.Tensor, shifts: torch.Tensor, pairs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plain sums A1, A2(l), A3(l1, l2) of L x L images (zero outside), in the layout of
    ``Autocorrelations``: (B, L, L) -> (B,), (B, S), (B, P). Differentiable."""
    B, L = images.shape[0], images.shape[-1]
    padded = torch.nn.functional.pad(images, (L - 1, L - 1, 0, L - 1))  # (B, 2L-1, 3L-2)
    X = padded.reshape(B, -1)[:, _gather_index(L, shifts.to(images.device))]  # (B, S, L^2)
    F = images.reshape(B, -1)
    A1 = F.sum(-1)
    A2 = torch.einsum("bsj,bj->bs", X, F)
    G = torch.einsum("bsj,bj,btj->bst", X, F, X)
    A3 = G[:, pairs[:, 0].to(images.device), pairs[:, 1].to(images.device)]
    return A1, A2, A3


def model(
    alpha: torch.Tensor, gamma, basis, angles=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """E[a1], E[a2], E[a3] of a well-separated measurement of the image with coefficients alpha
    at density gamma: (gamma / L^2) times the rotation-averaged autocorrelation sums (exact with
    the default angles, see ``rotation_angles``). Differentiable in alpha and gamma.

    Args:
        alpha: (n,) coefficients in ``basis`` (an ``mtd.FBBasis``).
        gamma: density p L^2 / |M| (float or () tensor).
        basis: the basis.
        angles: None (exact), an int Q of equispaced angles, or (Q,) angles to average over.

    Returns:
        (m1 (), m2 (S,), m3 (P,)) in the layout of ``autocorrelations(..., basis.L)``.
    """
    L = basis.L
    H, pairs = _layout(L)
    R = basis.rotation(rotation_angles(basis, angles)).to(alpha)  # (Q, n, n), built on the CPU
    images = basis.evaluate(R @ alpha)  # (Q, L, L)
    A1, A2, A3 = image_autocorrelations(images, H.to(alpha.device), pairs)
    scale = gamma / (L * L)
    return scale * A1.mean(0), scale * A2.mean(0), scale * A3.mean(0)


def moment_map(basis, angles=None, tensor_limit: int = 1 << 23, device=None):
    """``moments``: alpha -> [m1 (1,), m2 (S,), m3 (P,)], the model of ``model`` at gamma = 1,
    and ``moments_vjp``: alpha -> (the moments, r -> sum_k J_k^T r_k), their Jacobian's adjoint.

    The moments are polynomials of degree 1, 2, 3 in alpha: when P n^3 <= ``tensor_limit`` their
    coefficients T1 (n,), T2 (S, n, n), T3 (P, n, n, n) are computed once from the rotated basis
    images (a few matrix products) and a step costs three small matrix-vector products; above it
    every step correlates the Q rotated images (``image_autocorrelations``).
    """
    L = basis.L
    device = torch.device("cpu") if device is None else torch.device(device)
    f64 = dict(dtype=torch.float64, device=device)
    phi = rotation_angles(basis, angles)
    R = basis.rotation(phi).to(**f64)  # (Q, n, n), built on the CPU
    B = basis.matrix.to(**f64)  # (L^2, n)
    H, pairs = _layout(L)
    H, pairs = H.to(device), pairs.to(device)
    Q, n, S, P = len(phi), basis.n, len(H), len(pairs)
    scale = 1.0 / (L * L * Q)  # gamma / L^2 times the mean over the angles, at gamma = 1
    if P * n**3 > tensor_limit:

        def moments(alpha):
            images = (B @ (R @ alpha).T).T.reshape(Q, L, L)
            A = image_autocorrelations(images, H, pairs)
            return [scale * A[0].sum(0).reshape(1), scale * A[1].sum(0), scale * A[2].sum(0)]

        def moments_vjp(alpha):
            with torch.enable_grad():
                x = alpha.detach().requires_grad_(True)
                m = moments(x)

            def vjp(r):  # sum_k J_k^T r_k by autograd
                total = sum((mk * rk).sum() for mk, rk in zip(m, r, strict=True))
                return torch.autograd.grad(total, x, retain_graph=True)[0]

            return [mk.detach() for mk in m], vjp

        return moments, moments_vjp
    # G[q, i]: basis function i rotated by phi_q as an image; X[q, i, h, x] = G[q, i](x + H[h]).
    G = (B @ R).permute(0, 2, 1)  # (Q, n, L^2)
    padded = torch.nn.functional.pad(G.reshape(Q * n, L, L), (L - 1, L - 1, 0, L - 1))
    X = padded.reshape(Q * n, -1)[:, _gather_index(L, H)].reshape(Q, n, S, L * L)
    T1 = scale * G.sum((0, 2))
    T2 = scale * torch.einsum("qix,qjsx->sij", G, X)
    T3 = torch.zeros(P, n, n, n, **f64)
    a, b = pairs[:, 0], pairs[:, 1]
    for q in range(Q):  # per angle: (n, L^2) @ (L^2, P n n), bounded memory
        U = X[q][:, a][:, None] * X[q][:, b][None]  # (j, k, P, x): G_j(x + l1) G_k(x + l2)
        U = U.permute(2, 0, 1, 3).reshape(P * n * n, L * L)  # (P, j, k, x)
        T3 += (U @ G[q].T).reshape(P, n, n, n).permute(0, 3, 1, 2)  # (P, i, j, k)
    # Symmetric in the coefficient indices (the same forms), so the gradients are 2 T2(alpha, .)
    # and 3 T3(alpha, alpha, .): no second pass over T3.
    T2 = (T2 + T2.transpose(1, 2)) / 2
    T3 = (
        scale
        / 6
        * (
            T3
            + T3.permute(0, 1, 3, 2)
            + T3.permute(0, 2, 1, 3)
            + T3.permute(0, 2, 3, 1)
            + T3.permute(0, 3, 1, 2)
            + T3.permute(0, 3, 2, 1)
        )
    )
    T3 = T3.reshape(P * n * n, n)

    def moments_vjp(alpha):
        V2 = T2 @ alpha  # (S, n)
        V3 = ((T3 @ alpha).reshape(P * n, n) @ alpha).reshape(P, n)  # T3(., alpha, alpha)
        m = [(T1 @ alpha).reshape(1), V2 @ alpha, V3 @ alpha]

        def vjp(r):
            return r[0] * T1 + 2 * (r[1] @ V2) + 3 * (r[2] @ V3)

        return m, vjp

    def moments(alpha):
        return moments_vjp(alpha)[0]

    return moments, moments_vjp


@dataclass
class FitResult:
    """An autocorrelation-analysis estimate.

    Attributes:
        coefficients: (n,) float64 the estimate (known up to a rotation, eq. 19).
        gamma: estimated density.
        sigma: the noise level used (given) or fitted.
        misfit: the weighted misfit at the estimate, relative to the data's (sum_k w_k ||a_k||^2).
        seconds: wall time of the whole fit (autocorrelations included when computed here).
        starts: number of random starts tried.
        misfits: (starts,) the final misfit of every start.
    """

    coefficients: torch.Tensor
    gamma: float
    sigma: float
    misfit: float
    seconds: float
    starts: int
    misfits: torch.Tensor


def _weights(weights, sizes, power: float) -> torch.Tensor:
    """w_k of the three orders. "entries": 1 / (2 count_k), the refs' w1 = 1/2, w2 = 1/(2 L^2),
    w3 = 1/(2 L^4) (1/2 over their entry counts); "noise": 1 / (count_k power^k), the inverse of
    an entry's variance on noise (power the measurement's mean square) per entry; or 3 floats."""
    counts = torch.tensor(sizes, dtype=torch.float64)
    if weights == "entries":
        return 1 / (2 * counts)
    if weights == "noise":
        return 1 / (counts * power ** torch.arange(1, 4, dtype=torch.float64))
    try:
        w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
    except (TypeError, ValueError):
        w = torch.zeros(0)
    if len(w) != 3 or not torch.isfinite(w).all() or (w < 0).any() or not (w > 0).any():
        raise ValueError(
            f"weights must be 'entries', 'noise' or three finite numbers >= 0 (not all 0), got "
            f"{weights!r}"
        )
    return w


def fit(
    micrographs,
    basis,
    sigma: float | None = None,
    starts: int = 5,
    seed: int = 0,
    iterations: int = 300,
    weights="noise",
    angles=None,
    init_gamma: float = 0.03,
    history_size: int = 50,
    tolerance: float = 1e-12,
    tensor_limit: int = 1 << 23,
    device=None,
) -> FitResult:
    """Autocorrelation analysis: the coefficients and density that best match the measured first
    three autocorrelations (refs. 3-5 of the approximate-EM paper).

    Every start draws an image with entries U[0, 1] (the paper's initialisation), expands it in
    the basis, and scales it and gamma to the data: for each scale s on a log grid the density
    (and sigma^2 when unknown) are the weighted least-squares solution, the best s kept. scipy's
    L-BFGS-B (float64, the exact gradient) then minimises the misfit over (alpha, log gamma
    [, log sigma^2]); the start with the smallest misfit is returned.

    Args:
        micrographs: what ``autocorrelations`` takes, or an ``Autocorrelations`` already computed.
        basis: an ``mtd.FBBasis``; its L is the image side.
        sigma: noise standard deviation, or None to fit sigma^2 with the rest.
        starts: random starts (>= 1).
        seed: seed of the starts.
        iterations: L-BFGS iterations per start (>= 1).
        weights: "noise" (the default: each order by the inverse noise variance of its entries),
            "entries" (the refs': 1/2 over each order's entry count), or three floats.
        angles: rotation average of the model (``rotation_angles``; None is exact).
        init_gamma: density of a start at a scale where the least squares give none > 0 (the
            paper's gamma_init = 0.03).
        history_size: L-BFGS memory.
        tolerance: L-BFGS tolerance on the gradient and on the change of the relative misfit.
        tensor_limit: largest P n^3 for which the model is a precomputed cubic form in the
            coefficients (``moment_map``), else the rotated images are correlated every step.
        device: where the fit runs (None: the autocorrelations' device).

    Returns:
        ``FitResult``.
    """
    t0 = time.perf_counter()
    _check_fit(sigma, starts, iterations, history_size, init_gamma, tolerance, tensor_limit)
    _weights(weights, [1, 1, 1], 1.0)  # checked before the pass over the data
    rotation_angles(basis, angles)
    if isinstance(micrographs, Autocorrelations):
        ac = micrographs
        if ac.L != basis.L:
            raise ValueError(f"the autocorrelations are for L = {ac.L}, the basis for {basis.L}")
    else:
        ac = autocorrelations(micrographs, basis.L, device=device)
    device = ac.a2.device if device is None else torch.device(device)
    f64 = dict(dtype=torch.float64, device=device)
    a, b, w = _fit_data(ac, sigma, weights, f64)
    moments, moments_vjp = moment_map(basis, angles, tensor_limit, device)
    fit_sigma = sigma is None
    n = basis.n
    fun = _misfit(a, b, w, moments_vjp, n, fit_sigma, f64)
    rng = np.random.default_rng(seed)
    grid = torch.logspace(-3, 3, 241, **f64)
    best, results = None, []
    for _ in range(int(starts)):
        u = torch.from_numpy(rng.uniform(size=(basis.L, basis.L))).to(**f64)
        alpha0 = basis.expand(u).to(**f64)
        with torch.no_grad():
            m0 = moments(alpha0)
            g0, s0, s2_0 = _scale_start(m0, a, b, w, grid, fit_sigma, init_gamma)
        # x = (alpha, log gamma [, log sigma^2]): positive density and noise without bounds.
        x0 = [*(alpha0 * s0).tolist(), math.log(g0)] + ([math.log(s2_0)] if fit_sigma else [])
        res = optimize.minimize(
            fun,
            np.array(x0),
            jac=True,
            method="L-BFGS-B",
            options=dict(
                maxiter=int(iterations),
                maxcor=int(history_size),
                ftol=tolerance,
                gtol=tolerance,
            ),
        )
        value = float(res.fun) if math.isfinite(res.fun) else math.inf
        results.append(value)
        if best is None or value < best[0]:
            x = torch.tensor(res.x, **f64)
            s = math.sqrt(math.exp(float(x[n + 1]))) if fit_sigma else float(sigma)
            best = (value, x[:n].clone(), math.exp(float(x[n])), s)
    value, alpha, gamma, s = best
    return FitResult(
        alpha,
        gamma,
        s,
        value,
        time.perf_counter() - t0,
        int(starts),
        torch.tensor(results, dtype=torch.float64),
    )


def _check_fit(sigma, starts, iterations, history_size, init_gamma, tolerance, tensor_limit):
    if sigma is not None and not (
        isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0
    ):
        raise ValueError(f"sigma must be a finite number > 0 (or None to fit it), got {sigma!r}")
    for name, value in (
        ("starts", starts),
        ("iterations", iterations),
        ("history_size", history_size),
    ):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not (math.isfinite(init_gamma) and init_gamma > 0):
        raise ValueError(f"init_gamma must be a finite number > 0, got {init_gamma!r}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    if int(tensor_limit) != tensor_limit or tensor_limit < 0:
        raise ValueError(f"tensor_limit must be an integer >= 0, got {tensor_limit!r}")


def _fit_data(ac: Autocorrelations, sigma, weights, f64: dict):
    """The fit's data a_k (corrected for the noise bias when sigma is given), the bias
    coefficients b_k and the orders' weights w_k, relative to the data's weighted size (so that
    tolerances are dimensionless)."""
    a = [ac.a1.reshape(1).to(**f64), ac.a2.to(**f64), ac.a3.to(**f64)]
    b = [torch.zeros(1, **f64), ac.bias2.to(**f64), ac.bias3.to(**f64)]
    if sigma is not None:  # data corrected for the bias; the model has none
        a = [x - sigma**2 * y for x, y in zip(a, b, strict=True)]
    power = float(ac.a2[0])  # mean square of M: the scale of the noise moments
    w = _weights(weights, [len(x) for x in a], max(power, 1e-300)).to(**f64)
    norm = sum(float(wk * (x * x).sum()) for wk, x in zip(w, a, strict=True)) or 1.0
    return a, b, w / norm


def _misfit(a, b, w, moments_vjp, n: int, fit_sigma: bool, f64: dict):
    """The misfit sum_k w_k ||g m_k(alpha) (+ s2 b_k) - a_k||^2 at x = (alpha, log g
    [, log s2]) and its gradient (the chain rule through the moments' adjoint), for scipy."""

    def fun(x):
        x = torch.as_tensor(x, **f64)
        alpha, g = x[:n], x[n].exp()
        s2 = x[n + 1].exp() if fit_sigma else None
        m, vjp = moments_vjp(alpha)
        r = [
            g * mk + (s2 * bk if fit_sigma else 0.0) - ak
            for mk, ak, bk in zip(m, a, b, strict=True)
        ]
        value = float(sum(wk * rk.square().sum() for wk, rk in zip(w, r, strict=True)))
        if not math.isfinite(value):  # a step too far: L-BFGS-B backtracks
            return math.inf, np.zeros(len(x))
        wr = [2 * wk * rk for wk, rk in zip(w, r, strict=True)]
        grad = [g * vjp(wr), g * sum((mk * q).sum() for mk, q in zip(m, wr, strict=True))[None]]
        if fit_sigma:
            grad.append(s2 * sum((bk * q).sum() for bk, q in zip(b, wr, strict=True))[None])
        return value, torch.cat(grad).cpu().numpy()

    return fun


def _scale_start(m, a, b, w, grid, fit_sigma: bool, init_gamma: float):
    """(gamma, s, sigma^2) of a start: for the shape's moments m_k, the model gamma s^k m_k (+
    sigma^2 b_k) is linear in (gamma, sigma^2) at a fixed scale s; solve that weighted least
    squares (2 x 2 normal equations) for every s of the grid, relative to the scale that matches
    a2(0) at gamma = 1, and keep the best; a density or noise the solution makes <= 0 is replaced
    (init_gamma; the rest of a2(0))."""
    s_ref = math.sqrt(max(float(a[1][0]), 1e-300) / max(float(m[1][0]), 1e-300))
    s = grid * s_ref  # (G,)
    pw = torch.stack([s ** (k + 1) for k in range(3)], 1)  # (G, 3)

    def dot(x, y):  # (3,) the weighted inner products of the orders
        return torch.stack([(wk * xk * yk).sum() for wk, xk, yk in zip(w, x, y, strict=True)])

    mm, ma, mb = dot(m, m), dot(m, a), dot(m, b)
    bb, ba, aa = dot(b, b).sum(), dot(b, a).sum(), dot(a, a).sum()
    c11, c1y = (pw * pw) @ mm, pw @ ma  # |c1|^2, c1 . y, c1 = sum_k s^k sqrt(w_k) m_k
    if fit_sigma:
        c12 = pw @ mb
        det = c11 * bb - c12 * c12
        g = torch.where(det > 0, (c1y * bb - c12 * ba) / det, torch.zeros_like(s))
        s2 = torch.where(det > 0, (c11 * ba - c12 * c1y) / det, torch.zeros_like(s))
    else:
        g, s2, c12 = c1y / c11, torch.zeros_like(s), torch.zeros_like(s)
    g = torch.where(g > 0, g, torch.full_like(g, init_gamma))
    if fit_sigma:
        rest = (a[1][0] - g * s * s * m[1][0]).clamp(min=1e-6 * float(a[1][0].abs()) + 1e-300)
        s2 = torch.where(s2 > 0, s2, rest)
    # ||g c1 + s2 c2 - y||^2 at the (clamped) solution of every s.
    r = g * g * c11 + s2 * s2 * bb + aa + 2 * g * s2 * c12 - 2 * g * c1y - 2 * s2 * ba
    i = int(torch.argmin(torch.where(torch.isfinite(r), r, torch.full_like(r, math.inf))))
    return float(g[i]), float(s[i]), float(s2[i]) if fit_sigma else 1.0
