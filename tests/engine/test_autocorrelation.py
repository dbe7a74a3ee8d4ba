"""Autocorrelation analysis (mtd.autocorrelation): the measured moments against brute force, the
noise bias against its closed form, the exact rotation average, the well-separated identity, and
the fit on the approximate-EM paper's image model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mtd
from mtd import autocorrelation as ac


def _direct(micrographs, L):
    """a1, a2, a3 by a plain loop over pixels, shifts and pairs (zero outside each micrograph)."""
    H, pairs = ac._layout(L)
    total, s1 = 0, 0.0
    s2 = np.zeros(len(H))
    s3 = np.zeros(len(pairs))
    for M in micrographs:
        M = np.asarray(M, dtype=np.float64)
        N0, N1 = M.shape
        total += N0 * N1
        P = np.zeros((N0 + 2 * L, N1 + 2 * L))
        P[L : L + N0, L : L + N1] = M

        def at(i, j, l, P=P):
            return P[L + i + l[0], L + j + l[1]]

        for i in range(N0):
            for j in range(N1):
                s1 += M[i, j]
                for h, l in enumerate(H.tolist()):
                    s2[h] += M[i, j] * at(i, j, l)
                for p, (a, b) in enumerate(pairs.tolist()):
                    s3[p] += M[i, j] * at(i, j, H[a].tolist()) * at(i, j, H[b].tolist())
    return s1 / total, s2 / total, s3 / total


def test_layout_keeps_every_triple_of_pixels_once():
    # Every set {0, l1, l2} of three pixel offsets (with repeats) that fits an L x L box, taken
    # up to translation, appears exactly once among the pairs; the shifts are a half-plane.
    L = 4
    H, pairs = ac._layout(L)
    assert len(H) == (2 * L * L - 2 * L + 1) and H[0].tolist() == [0, 0]
    box = [(r, c) for r in range(L) for c in range(L)]
    canon = set()
    for p in box:
        for q in box:
            for s in box:
                pts = sorted([p, q, s])
                canon.add(tuple((x[0] - pts[0][0], x[1] - pts[0][1]) for x in pts))
    got = {((0, 0), tuple(H[a].tolist()), tuple(H[b].tolist())) for a, b in pairs.tolist()}
    assert got == canon and len(pairs) == len(canon)


def test_autocorrelations_equal_a_direct_loop_over_a_list_of_micrographs(tmp_path):
    gen = torch.Generator().manual_seed(0)
    Ms = [
        torch.randn(12, 12, generator=gen, dtype=torch.float64) + 0.5,
        torch.randn(9, 11, generator=gen, dtype=torch.float64).numpy(),
    ]
    a1, a2, a3 = _direct(Ms, 3)
    np.save(tmp_path / "m.npy", Ms[1])
    mapped = [Ms[0], tmp_path / "m.npy"]  # a path: read as a read-only memory map
    for rows in (None, 1, 5):  # bands of every size give the same sums
        got = ac.autocorrelations(mapped if rows == 5 else Ms, 3, rows=rows)
        assert got.pixels == 12 * 12 + 9 * 11
        np.testing.assert_allclose(float(got.a1), a1, rtol=0, atol=1e-13)
        np.testing.assert_allclose(got.a2.numpy(), a2, rtol=0, atol=1e-13)
        np.testing.assert_allclose(got.a3.numpy(), a3, rtol=0, atol=1e-13)


def test_noise_bias_coefficients_are_the_window_means_of_a_direct_loop():
    # bias3 at l1 = 0 is the mean of M over the pixels j with j - l2 inside, at l1 = l2 over the
    # pixels i with i + l1 inside, 3 a1 at l1 = l2 = 0, else 0; bias2 is one at l = 0 only.
    L, M = 3, torch.randn(7, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = ac.autocorrelations(M, L, rows=2)
    N0, N1 = M.shape
    inside = lambda i, j: 0 <= i < N0 and 0 <= j < N1  # noqa: E731
    for p, (a, b) in enumerate(got.pairs.tolist()):
        (r1, c1), (r2, c2) = got.shifts[a].tolist(), got.shifts[b].tolist()
        want = 0.0
        for i in range(N0):
            for j in range(N1):
                if (r1, c1) == (0, 0) and inside(i + r2, j + c2):
                    want += M[i + r2, j + c2]
                if (r2, c2) == (0, 0) and inside(i + r1, j + c1):
                    want += M[i + r1, j + c1]
                if (r1, c1) == (r2, c2) and inside(i + r1, j + c1):
                    want += M[i, j]
        assert abs(float(got.bias3[p]) - want / M.numel()) < 1e-14
    assert got.bias2.tolist() == [1.0] + [0.0] * (len(got.shifts) - 1)


def test_corrected_moments_of_pure_noise_have_their_closed_form_distribution():
    # On white noise the corrected a2, a3 have mean 0 and closed-form variances: sum over the n
    # overlapping pixels of products of independent noise, sigma^4 n / |M|^2 for a2(l != 0),
    # 2 sigma^4 / |M| at l = 0, sigma^6 n / |M|^2 for three distinct pixels, 2 sigma^6 n / |M|^2
    # for two ((e^2 - sigma^2) e), 6 sigma^6 / |M| for one (e^3 - 3 sigma^2 e). Without the
    # correction a2(0) sits sigma^2 away, hundreds of standard deviations.
    L, N, sigma = 5, 300, 1.7
    M = sigma * torch.randn(N, N, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got = ac.autocorrelations(M, L)
    _, a2, a3 = got.corrected(sigma)
    H, pairs = got.shifts, got.pairs
    n = lambda l: (N - l[:, 0].abs()) * (N - l[:, 1].abs())  # noqa: E731
    var2 = sigma**4 * n(H).double() / N**4
    var2[0] = 2 * sigma**4 / N**2
    la, lb = H[pairs[:, 0]], H[pairs[:, 1]]
    span = torch.stack(
        [torch.stack([la[:, k], lb[:, k], torch.zeros_like(la[:, k])]) for k in range(2)]
    )  # (2, 3, P): the three offsets per axis
    width = span.amax(1) - span.amin(1)  # (2, P)
    count = ((N - width[0]) * (N - width[1])).double()
    distinct = 3 - (pairs[:, 0] == 0).long() - (pairs[:, 0] == pairs[:, 1]).long()
    distinct[(pairs[:, 0] == 0) & (pairs[:, 1] == 0)] = 1
    factor = torch.tensor([0.0, 6.0, 2.0, 1.0], dtype=torch.float64)[distinct]
    var3 = factor * sigma**6 * count / N**4
    z = torch.cat([a2 / var2.sqrt(), a3 / var3.sqrt()])
    assert abs(float(z.mean())) < 4 / math.sqrt(len(z))
    assert 0.9 < float(z.std()) < 1.1
    assert float(z.abs().max()) < 5.5
    assert float(got.a2[0]) / math.sqrt(float(var2[0])) > 100  # the raw a2(0) is biased


def test_bias_correction_is_unbiased_with_signal_present():
    # With a fixed clean measurement S, the mean over noise draws of the corrected moments is
    # the clean moments (the sigma^2 W terms); uncorrected, the l1 = 0 and l1 = l2 entries of a3
    # are off by many standard errors.
    basis = mtd.FBBasis(5, n=10)
    image = torch.from_numpy(np.random.default_rng(0).uniform(size=(5, 5)))
    clean = mtd.simulate(
        image, 60, density=0.04, snr=math.inf, rotation="continuous", basis=basis, seed=1
    ).data
    clean_ac = ac.autocorrelations(clean, 5)
    sigma, draws = 0.5, 120
    gen = torch.Generator().manual_seed(2)
    stats = [
        ac.autocorrelations(
            clean + sigma * torch.randn(clean.shape, generator=gen, dtype=torch.float64), 5
        )
        for _ in range(draws)
    ]
    for corrected, worst in ((True, 5.0), (False, None)):
        a3 = torch.stack([s.corrected(sigma)[2] if corrected else s.a3 for s in stats])
        z = (a3.mean(0) - clean_ac.a3) / (a3.std(0) / math.sqrt(draws))
        if worst is not None:
            assert float(z.abs().max()) < worst
        else:
            assert float(z.abs().max()) > 10
    a2 = torch.stack([s.corrected(sigma)[1] for s in stats])
    z2 = (a2.mean(0) - clean_ac.a2) / (a2.std(0) / math.sqrt(draws))
    assert float(z2.abs().max()) < 5.0


def test_rotation_average_with_3_nu_max_plus_1_angles_is_exact():
    # a3 of the rotated image is a trigonometric polynomial of degree <= 3 nu_max: Q = 3 nu_max
    # + 1 equispaced angles average it exactly (a 2000-angle average agrees to rounding); one
    # angle fewer aliases the top frequency into the mean.
    basis = mtd.FBBasis(5, n=10)
    alpha = torch.randn(10, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    Q = 3 * int(basis.nu.max()) + 1
    assert len(ac.rotation_angles(basis)) == Q
    exact = ac.model(alpha, 0.04, basis)
    fine = ac.model(alpha, 0.04, basis, angles=2000)
    for x, y in zip(exact, fine, strict=True):
        assert float((x - y).abs().max()) <= 1e-12 * float(y.abs().max())
    coarse = ac.model(alpha, 0.04, basis, angles=Q - 1)
    assert float((coarse[2] - fine[2]).abs().max()) > 1e-6 * float(fine[2].abs().max())


@pytest.mark.parametrize("tensor_limit", [0, 1 << 23])
def test_moment_map_of_the_fit_is_the_model(tensor_limit):
    # The fit's model (the precomputed cubic form, or the rotated images every step) is
    # ``model`` at gamma = 1, values and gradients.
    basis = mtd.FBBasis(5, n=10)
    alpha = torch.randn(10, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    alpha.requires_grad_(True)
    moments, moments_vjp = ac.moment_map(basis, tensor_limit=tensor_limit)
    want = ac.model(alpha, 1.0, basis)
    got, vjp = moments_vjp(alpha.detach())
    r = [torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape) for y in want]
    (grad,) = torch.autograd.grad(
        sum((y * rk).sum() for y, rk in zip(want, r, strict=True)), alpha
    )
    torch.testing.assert_close(vjp([rk.reshape(-1) for rk in r]), grad, rtol=1e-10, atol=1e-12)
    for x, x2, y in zip(got, moments(alpha.detach()), want, strict=True):
        torch.testing.assert_close(x.reshape(y.shape), y.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(x2, x, rtol=0, atol=0)


def _grid_measurement(basis, alpha, N, repeats, seed=0):
    """A noiseless well-separated measurement whose copies' angles are the exact-average grid,
    each used ``repeats`` times, corners on a lattice of step 2L - 1 that reaches both borders."""
    L = basis.L
    phi = ac.rotation_angles(basis).repeat(repeats)
    step = 2 * L - 1
    assert (N - L) % step == 0, "the lattice must reach the far border"
    corners = [(r, c) for r in range(0, N - L + 1, step) for c in range(0, N - L + 1, step)]
    rng = np.random.default_rng(seed)
    rest = rng.choice(np.arange(1, len(corners) - 1), size=len(phi) - 2, replace=False)
    chosen = np.concatenate([[0, len(corners) - 1], rest])  # both far corners are used
    M = torch.zeros(N, N, dtype=torch.float64)
    copies = basis.evaluate(basis.rotation(phi) @ alpha)
    for k, idx in enumerate(chosen.tolist()):
        r, c = corners[idx]
        M[r : r + L, c : c + L] += copies[k]
    return M, len(phi) * L * L / (N * N)


def test_noiseless_well_separated_measurement_equals_the_model():
    # Copies at least 2L - 1 apart in row or column share no product over shifts within the box,
    # and copies touching the border lose nothing (zero padding): the measured moments are the
    # model's exactly, with the exact-average angles, and with simulate's own angles.
    basis = mtd.FBBasis(5, n=10)
    alpha = basis.expand(torch.from_numpy(np.random.default_rng(5).uniform(size=(5, 5))))
    M, gamma = _grid_measurement(basis, alpha, 95, repeats=3)
    got = ac.autocorrelations(M, 5)
    for x, y in zip((got.a1, got.a2, got.a3), ac.model(alpha, gamma, basis), strict=True):
        assert float((x - y).abs().max()) <= 1e-12 * float(y.abs().max())
    image = torch.from_numpy(np.random.default_rng(6).uniform(size=(5, 5)))
    m = mtd.simulate(
        image, 120, density=0.04, snr=math.inf, rotation="continuous", basis=basis, seed=3
    )
    got = ac.autocorrelations(m.data, 5)
    gamma = len(m.angles) * 25 / 120**2
    want = ac.model(m.coefficients, gamma, basis, angles=m.angles)
    for x, y in zip((got.a1, got.a2, got.a3), want, strict=True):
        assert float((x - y).abs().max()) <= 1e-12 * float(y.abs().max())


def test_fit_recovers_the_truth_from_exact_moments_up_to_rotation():
    # Exact moments (the grid measurement): the fit finds the coefficients up to a rotation (not
    # the mirror image: a3 tells them apart) and the density, from the paper's random starts.
    basis = mtd.FBBasis(5, n=10)
    raw = np.random.default_rng(8).uniform(size=(5, 5))
    alpha = basis.expand(torch.from_numpy(10 * raw / np.linalg.norm(raw)))
    M, gamma = _grid_measurement(basis, alpha, 122, repeats=4)
    result = ac.fit(M, basis, sigma=1e-9, starts=3, seed=0)
    err = mtd.relative_error(alpha, result.coefficients, group=mtd.Steerable(basis, 8))
    assert err < 1e-3 and abs(result.gamma - gamma) < 1e-3 * gamma
    assert result.starts == 3 and len(result.misfits) == 3
    assert result.misfit == float(result.misfits.min()) and result.seconds > 0
    mirror = alpha * torch.from_numpy(np.where(basis.kind == 2, -1.0, 1.0))
    assert mtd.relative_error(alpha, mirror, group=mtd.Steerable(basis, 8)) > 0.1


def test_fit_on_a_high_snr_simulated_measurement_with_sigma_fitted():
    # The paper's image model (entries U[0, 1], ||F|| = 10, 10 coefficients, density 0.04):
    # at SNR 50 the estimate is close and sigma is found within a few percent.
    basis = mtd.FBBasis(5, n=10)
    raw = np.random.default_rng(9).uniform(size=(5, 5))
    image = torch.from_numpy(10 * raw / np.linalg.norm(raw))
    m = mtd.simulate(
        image, 500, density=0.04, snr=50, rotation="continuous", basis=basis, seed=9, snr_of="raw"
    )
    result = ac.fit(m.data, basis, starts=3, seed=1)
    err = mtd.relative_error(m.coefficients, result.coefficients, group=mtd.Steerable(basis, 8))
    assert err < 0.08
    assert abs(result.sigma - m.sigma) < 0.05 * m.sigma
    assert abs(result.gamma - 0.04) < 0.1 * 0.04


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda b: ac.autocorrelations(torch.zeros(4, 4, 4), 5), "2-D"),
        (lambda b: ac.autocorrelations(torch.zeros(4, 8), 5), "L = 5 is larger"),
        (lambda b: ac.autocorrelations([], 5), "empty"),
        (lambda b: ac.fit(torch.zeros(20, 20), b, sigma=0.0), "sigma must be"),
        (lambda b: ac.fit(torch.zeros(20, 20), b, sigma=-1.0), "sigma must be"),
        (lambda b: ac.fit(torch.zeros(20, 20), b, starts=0), "starts must be"),
        (lambda b: ac.fit(torch.zeros(20, 20), b, iterations=0), "iterations must be"),
        (lambda b: ac.fit(torch.zeros(20, 20), b, weights="equal"), "weights must be"),
        (lambda b: ac.fit(torch.zeros(20, 20), b, weights=(1, 2)), "weights must be"),
        (lambda b: ac.model(torch.zeros(10), 0.1, b, angles=0), "angles must be"),
        (lambda b: ac.fit(ac.autocorrelations(torch.zeros(9, 9), 3), b), "L = 3"),
    ],
)
def test_bad_input_is_one_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(mtd.FBBasis(5, n=10))
