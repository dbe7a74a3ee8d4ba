"""The steerable Fourier-Bessel basis and the E-step over its exact rotations
(mtd.groups.fourier_bessel)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special

import mtd
from tests.reference import equations as ref


@pytest.mark.parametrize("L", [5, 6, 11])
def test_rotation_of_coefficients_is_the_analytic_rotation_at_every_angle(L):
    # Evaluating rotate(alpha, phi) equals the band-limited image's functions sampled at the
    # rotated grid, for angles that are not multiples of pi/2.
    basis = mtd.FBBasis(L)
    alpha = torch.randn(basis.n, generator=torch.Generator().manual_seed(L), dtype=torch.float64)
    for phi in (0.3, 1.0, 2.5, -4.0):
        rotated = basis.evaluate(basis.rotate(alpha, phi)).reshape(-1)
        analytic = torch.from_numpy(basis.sample(phi)) @ alpha
        torch.testing.assert_close(rotated, analytic, rtol=0, atol=1e-10)


@pytest.mark.parametrize("L", [5, 6, 28])
def test_quarter_turn_is_torch_rot90_for_odd_and_even_sizes(L):
    basis = mtd.FBBasis(L)
    alpha = torch.randn(basis.n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    image = basis.evaluate(alpha)
    for k in (1, 2, 3):
        turned = basis.evaluate(basis.rotate(alpha, k * math.pi / 2))
        torch.testing.assert_close(turned, torch.rot90(image, k), rtol=0, atol=1e-10)


def test_basis_functions_are_bessel_modes_ordered_by_lambda():
    # L = 5: the paper's first 10 coefficients are J0 z1, J1 z1 (pair), J2 z1 (pair), J0 z2,
    # J3 z1 (pair), J1 z2 (pair); the Nyquist rule lambda <= 5 pi / 2 adds J4 z1 (pair).
    basis = mtd.FBBasis(5, n=10)
    assert basis.nu.tolist() == [0, 1, 1, 2, 2, 0, 3, 3, 1, 1]
    zeros = [special.jn_zeros(nu, 2) for nu in range(4)]
    expected = [zeros[0][0], zeros[1][0], zeros[2][0], zeros[0][1], zeros[3][0], zeros[1][1]]
    np.testing.assert_allclose(np.unique(basis.lam), sorted(expected), rtol=1e-12)
    assert mtd.FBBasis(5).n == 12
    # The J0 function is the radial profile J0(lambda r) outside-zeroed, r in units of L / 2.
    i, j = np.meshgrid(np.arange(5), np.arange(5), indexing="ij")
    r = np.hypot(i - 2, j - 2) / 2.5
    f = special.j0(zeros[0][0] * r) * (r <= 1)
    col = basis.matrix[:, 0].numpy()
    np.testing.assert_allclose(col / col[12], f.ravel() / f[2, 2], rtol=1e-12)


def test_expand_recovers_band_limited_images():
    basis = mtd.FBBasis(11)
    alpha = torch.randn(basis.n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(basis.expand(basis.evaluate(alpha)), alpha, rtol=0, atol=1e-10)


def test_bad_basis_input_is_refused():
    with pytest.raises(ValueError, match="n must be an integer in 1..12"):
        mtd.FBBasis(5, n=13)
    with pytest.raises(ValueError, match="splits the cos/sin pair"):
        mtd.FBBasis(5, n=2)
    with pytest.raises(ValueError, match="leaves no Fourier-Bessel function"):
        mtd.FBBasis(5, bandlimit=1.0)
    with pytest.raises(ValueError, match="K must be an integer >= 1"):
        mtd.Steerable(mtd.FBBasis(5), K=0)
    with pytest.raises(ValueError, match="images must be 5 x 5"):
        mtd.FBBasis(5).expand(torch.zeros(4, 4))


def _steerable_case(rng, L=5, n=10, K=6):
    """A measurement of exactly rotated band-limited copies, planted by hand (no simulator)."""
    basis = mtd.FBBasis(L, n=n)
    alpha = rng.standard_normal(n)
    group = mtd.Steerable(basis, K)
    copies = group.templates(torch.from_numpy(alpha)).numpy()  # the K grid rotations
    data = 0.3 * rng.standard_normal((3 * L, 3 * L))
    data[1 : 1 + L, 2 : 2 + L] += copies[1]  # cut by the patch grid: spans two patches
    data[2 * L : 3 * L, 0:L] += copies[4]
    return basis, group, alpha, data, 0.3


@pytest.mark.parametrize("method", ["fft", "gemm"])
def test_steerable_e_step_and_m_step_equal_brute_force(method, rng):
    basis, group, alpha, data, sigma = _steerable_case(rng)
    L, K = basis.L, group.K
    x = torch.from_numpy(alpha + 0.2 * rng.standard_normal(basis.n))
    em = mtd.ApproximateEM(group, compute=mtd.Compute(method=method), dtype=torch.float64)
    rho = rng.uniform(0.5, 1.5, (2 * L, 2 * L))
    rho /= rho.sum()
    stats = em.e_step(em.prepare(data), x, torch.from_numpy(np.log(rho)), sigma**2)
    # The reference's templates: the basis functions sampled at each rotated grid (analytic).
    samples = [torch.from_numpy(basis.sample(2 * math.pi * k / K)) for k in range(K)]

    def templates(F, _):
        return [(S @ x).reshape(L, L).numpy() for S in samples]

    patch_list = ref.patches(data, L)
    w, loglik = ref.e_step(patch_list, np.zeros((L, L)), rho, sigma, K, templates)
    omega, b, c = ref.statistics(w, patch_list, K)
    np.testing.assert_allclose(stats.omega.numpy(), omega, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats.b.numpy(), b, rtol=1e-9, atol=1e-12)
    assert float(stats.loglik) == pytest.approx(loglik, rel=1e-10)
    # The M-step: argmax of Q (eq. 16) in the coefficients, by autograd and a linear solve.
    a = torch.zeros(basis.n, dtype=torch.float64, requires_grad=True)
    T = torch.stack([(S @ a).reshape(L, L) for S in samples])
    q = -(stats.energy - 2 * (stats.b * T).sum() + (stats.c * T * T).sum())
    (g,) = torch.autograd.grad(q, a, create_graph=True)
    H = torch.stack([torch.autograd.grad(g[i], a, retain_graph=True)[0] for i in range(len(g))])
    expected = torch.linalg.solve(-H, g.detach())  # Q is quadratic: one Newton step from 0
    torch.testing.assert_close(em.closed_form(stats, x), expected, rtol=1e-8, atol=1e-10)


def test_steerable_em_recovers_continuously_rotated_copies():
    # Copies at uniform angles on [0, 2 pi), planted exactly rotated (by hand, no simulator); EM
    # with K = 16 exact rotations of the coefficients from two random starts. The error is
    # eq. (19): coefficients, minimised over the angle. (From some random starts EM ends in a
    # local optimum: seed 2 of this setting does, with both of its two starts.)
    L, n = 5, 10
    basis = mtd.FBBasis(L, n=n)
    rng = np.random.default_rng(0)
    alpha = torch.from_numpy(rng.standard_normal(n))
    alpha *= 10 / float(alpha.norm())  # ||F|| = 10, the paper's setting
    N, p = 300, 300
    data = torch.zeros(N, N, dtype=torch.float64)
    grid = [(r, c) for r in range(0, N - L, 2 * L) for c in range(0, N - L, 2 * L)]
    for r, c in [grid[i] for i in rng.choice(len(grid), size=p, replace=False)]:
        phi = rng.uniform(0, 2 * math.pi)
        data[r : r + L, c : c + L] += basis.evaluate(basis.rotate(alpha, phi))
    sigma = float(basis.evaluate(alpha).norm()) / L / math.sqrt(5.0)  # SNR 5
    data += sigma * torch.from_numpy(rng.standard_normal((N, N)))
    group = mtd.Steerable(basis, K=16)
    em = mtd.ApproximateEM(group, sigma=sigma, iterations=100, tol=1e-5, dtype=torch.float64)
    init = torch.from_numpy(rng.standard_normal((2, n)))
    res = em.fit(data, init)
    error = mtd.relative_error(alpha, res.estimate, group=group)
    assert error < 0.05, error  # 0.030 measured
    assert min(mtd.relative_error(alpha, x, group=group) for x in init) > 0.8


def test_simulator_plants_band_limited_copies_rotated_exactly():
    # The approximate-EM paper's forward model: the image's band-limited expansion, every copy
    # that image rotated by its continuous angle (checked against the basis sampled at the
    # rotated grid, not against the simulator's own rotation).
    L = 5
    basis = mtd.FBBasis(L, n=10)
    image = torch.from_numpy(np.random.default_rng(1).uniform(0, 1, (L, L)))
    meas = mtd.simulate(image, 100, density=0.04, snr=float("inf"), rotation="continuous",
                        basis=basis, seed=2)  # fmt: skip
    torch.testing.assert_close(meas.image, basis.evaluate(basis.expand(image)))
    coef = meas.coefficients
    for (r, c), phi in zip(meas.positions.tolist(), meas.angles.tolist(), strict=True):
        copy = (torch.from_numpy(basis.sample(phi)) @ coef).reshape(L, L)
        torch.testing.assert_close(meas.data[r : r + L, c : c + L], copy, rtol=0, atol=1e-12)
    torch.testing.assert_close(meas.clean(), meas.data, rtol=0, atol=1e-12)
    # SNR of the planted band-limited image, or (the paper's code) of the raw image.
    planted = mtd.simulate(image, 100, snr=2.0, basis=basis, seed=2)
    raw = mtd.simulate(image, 100, snr=2.0, basis=basis, seed=2, snr_of="raw")
    assert planted.sigma**2 == pytest.approx(float(meas.image.square().sum()) / (2.0 * L * L))
    assert raw.sigma**2 == pytest.approx(float(image.square().sum()) / (2.0 * L * L))
    with pytest.raises(ValueError, match="snr_of must be"):
        mtd.simulate(image, 100, basis=basis, snr_of="clean")
    with pytest.raises(ValueError, match="basis is for 6 x 6 images"):
        mtd.simulate(image, 100, basis=mtd.FBBasis(6))


def test_orbit_is_the_coefficients_rotated_by_each_grid_angle():
    basis = mtd.FBBasis(11)
    group = mtd.Steerable(basis, K=4, orbit_angles=12)
    alpha = torch.randn(basis.n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    orbit = group.orbit(alpha)
    for a, phi in enumerate(torch.arange(12, dtype=torch.float64) * (2 * math.pi / 12)):
        torch.testing.assert_close(orbit[a], basis.rotate(alpha, float(phi)), rtol=0, atol=1e-12)


def test_eq19_error_is_minimised_over_every_angle_not_the_grid():
    # Eq. (19) minimises over a continuous angle: at L = 28 (nu up to 40) a 720-angle grid alone
    # would leave an error of order nu * pi / 720 ~ 0.17 on an exactly rotated copy.
    basis = mtd.FBBasis(28)
    group = mtd.Steerable(basis, 8)
    g = torch.Generator().manual_seed(3)
    truth = torch.randn(basis.n, generator=g, dtype=torch.float64)
    for phi in (0.001234, 1.2345678, 4.0004):
        rotated = basis.rotate(truth, -phi)
        assert mtd.relative_error(truth, rotated, group=group) < 1e-9
    # With noise the minimum equals a brute-force scan of 200,000 angles (to the scan's spacing).
    noise = torch.randn(basis.n, generator=g, dtype=torch.float64)
    noisy = basis.rotate(truth, -2.5) + 0.05 * noise
    scan = basis.rotations_of(noisy, torch.linspace(0, 2 * math.pi, 200_001, dtype=torch.float64))
    brute = float(((scan - truth).norm(dim=1) / truth.norm()).min())
    ours = mtd.relative_error(truth, noisy, group=group)
    assert ours <= brute + 1e-12 and ours > brute - 1e-6


def test_the_paper_codes_basis_is_its_table_on_the_disk_that_holds_the_square():
    # The approximate-EM paper's code expands its L = 5 images in J_nu(lambda r / 3) cos/sin(nu
    # theta) for nu = 0, 1, 2 and the first two roots of each, on the disk of radius L // 2 + 1 = 3
    # (all 25 pixels inside). Our basis with radius=3, selection="paper_code" must span exactly
    # those functions, or EM on its data starts from an error floor (0.29 measured with radius
    # 2.5 and the functions ordered by lambda).
    basis = mtd.FBBasis(5, n=10, radius=3, selection="paper_code")
    roots = [2.404826, 3.831706, 3.831706, 5.135622, 5.135622, 5.520078, 7.015587, 7.015587]
    np.testing.assert_allclose(basis.lam, roots + [8.417244, 8.417244], atol=1e-6)
    np.testing.assert_array_equal(basis.nu, [0, 1, 1, 2, 2, 0, 1, 1, 2, 2])
    i, j = np.meshgrid(np.arange(5) - 2.0, np.arange(5) - 2.0, indexing="ij")
    r, theta = np.hypot(i, j) / 3, np.arctan2(i, j)  # any angle sign: the span is the same
    cols = []
    for nu in (0, 1, 2):
        for lam in special.jn_zeros(nu, 2):
            cols.append(special.jv(nu, lam * r) * np.cos(nu * theta))
            if nu:
                cols.append(special.jv(nu, lam * r) * np.sin(nu * theta))
    theirs = torch.from_numpy(np.stack([c.ravel() for c in cols], 1))
    ours = basis.matrix
    residual = theirs - ours @ torch.linalg.lstsq(ours, theirs).solution
    assert float(residual.norm() / theirs.norm()) < 1e-12
    # The default basis (radius 2.5, by lambda) does not span them: the floor the option removes.
    default = mtd.FBBasis(5, n=10).matrix
    floor = theirs - default @ torch.linalg.lstsq(default, theirs).solution
    assert float(floor.norm() / theirs.norm()) > 0.1


def test_bad_radius_and_selection_are_refused():
    with pytest.raises(ValueError, match="radius must be a number of pixels > 0, got 0"):
        mtd.FBBasis(5, radius=0)
    with pytest.raises(ValueError, match="selection must be 'lambda' or 'paper_code', got 'x'"):
        mtd.FBBasis(5, selection="x")
    with pytest.raises(ValueError, match=r"n must be an integer in 1\.\.10 \(the paper code"):
        mtd.FBBasis(5, n=12, selection="paper_code")
