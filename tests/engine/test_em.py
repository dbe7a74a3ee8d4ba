"""Behaviour of the EM: monotonicity, precision, recovery, MAP, symmetries, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mtd
from tests.helpers import gaussian_image


@pytest.mark.parametrize("sigma_known", [True, False])
@pytest.mark.parametrize("K", [4, 8])
def test_closed_form_em_never_decreases_loglik(K, sigma_known):
    image, mu = gaussian_image(1)
    meas = mtd.simulate(image, 110, snr=2.0, K=K, seed=5)
    em = mtd.ApproximateEM(
        mtd.Rotations(5, K),
        sigma=meas.sigma if sigma_known else None,
        iterations=30,
        tol=0,
        dtype=torch.float64,
    )
    res = em.fit(meas.data, mu)
    ll = res.loglik.numpy()
    assert len(ll) == 31
    assert np.all(np.diff(ll) >= -1e-9 * np.abs(ll).max()), np.diff(ll).min()
    assert ll[-1] > ll[0] + 1  # it did move


def test_float32_posteriors_close_to_float64(digits):
    image = digits[10]
    meas = mtd.simulate(image, 308, snr=1.0, seed=7)
    F = digits[:10].mean(0)
    post = {}
    for dtype in (torch.float32, torch.float64):
        em = mtd.ApproximateEM(mtd.Rotations(28, 4), dtype=dtype)
        ll = em.log_likelihoods(meas.data, F, meas.sigma).double()
        post[dtype] = torch.softmax(ll.reshape(ll.shape[0], -1), 1)
        # The streamed E-step's occupancy too (it never holds the posteriors).
        corr = em.prepare(meas.data)
        log_rho = torch.full((56, 56), -math.log(56 * 56), dtype=dtype)
        post[(dtype, "omega")] = em.e_step(
            corr, F.to(dtype), log_rho, meas.sigma**2
        ).omega.double()
    tv = 0.5 * (post[torch.float32] - post[torch.float64]).abs().sum(1)
    assert tv.max() < 1e-3, tv.max()
    D = post[torch.float64].shape[0]
    omega_tv = (
        0.5 * (post[(torch.float32, "omega")] - post[(torch.float64, "omega")]).abs().sum() / D
    )
    assert omega_tv < 1e-3


def test_recovers_mnist_digit_at_high_snr(digits):
    image = digits[10]  # a real MNIST "5"; init: the mean of ten other digits (the paper's init)
    init = torch.cat([digits[:10], digits[11:]]).mean(0)
    meas = mtd.simulate(image, 308, snr=100.0, seed=1)
    em = mtd.ApproximateEM(mtd.Rotations(28, 4), dtype=torch.float64)
    res = em.fit(meas.data, init, truth=image)
    assert res.history[-1]["error"] < 0.05
    assert res.history[0]["error"] > 0.3  # the error fell because of EM, not the init


def test_recovers_gaussian_image_at_high_snr():
    image, mu = gaussian_image(0)
    meas = mtd.simulate(image, 220, snr=100.0, seed=2)
    em = mtd.ApproximateEM(mtd.Rotations(5, 4), iterations=200, dtype=torch.float64)
    res = em.fit(meas.data, mu)
    assert mtd.relative_error(image, res.estimate) < 0.05
    assert mtd.relative_error(image, mu) > 0.1


def map_solution(em, stats, sigma2, mu, gamma):
    """argmax_F Q + gamma log N(F; mu, I): (A / sigma^2 + gamma I) F = rhs / sigma^2 + gamma mu."""
    A = em.group.normal_matrix(stats.c) / sigma2 + gamma * torch.eye(mu.numel(), dtype=mu.dtype)
    rhs = em.group.adjoint(stats.b).reshape(-1) / sigma2 + gamma * mu.reshape(-1)
    return torch.linalg.solve(A, rhs).reshape(mu.shape)


def test_gradient_m_step_with_gaussian_score_converges_to_map():
    image, mu = gaussian_image(3)
    meas = mtd.simulate(image, 110, snr=1.0, seed=4)
    prior = lambda x, t: -(x - mu)  # noqa: E731  the exact score of N(mu, I)
    sigma2 = meas.sigma**2
    m_step = mtd.Gradient(steps=3000, gamma=mtd.ConstantGamma(2.0))
    em = mtd.ApproximateEM(
        mtd.Rotations(5, 4), m_step, sigma=meas.sigma, iterations=1, dtype=torch.float64
    )
    # Within one M-step: the ascent reaches the maximiser of Q + gamma log p for the E-step's
    # statistics.
    F0 = mu + 0.5
    stats = em.e_step(em.prepare(meas.data), F0, torch.full((10, 10), 0.01).log(), sigma2)
    m_step.lr = 1 / (float(em.group.adjoint(stats.c).max()) / sigma2 + 2.0)  # 1 / curvature
    res = em.fit(meas.data, F0, prior=prior)
    # The fit used rho estimated from the same uniform start, so its E-step is the one above.
    expected = map_solution(em, stats, sigma2, mu, 2.0)
    assert torch.allclose(res.estimate, expected, atol=1e-8), (res.estimate - expected).abs().max()
    # Across EM: iterating to convergence reaches the fixed point of MAP-EM computed in closed
    # form.
    m_step.steps, em.iterations, em.tol = 200, 400, 1e-11
    res = em.fit(meas.data, F0, prior=prior)
    corr, F = em.prepare(meas.data), F0
    log_rho = torch.full((10, 10), 0.01).log()
    for _ in range(400):
        stats = em.e_step(corr, F, log_rho, sigma2)
        F_new = map_solution(em, stats, sigma2, mu, 2.0)
        log_rho = (stats.omega.sum(0) / stats.D).log()
        if (F_new - F).norm() < 1e-11:
            break
        F = F_new
    assert torch.allclose(res.estimate, F_new, atol=1e-6), (res.estimate - F_new).abs().max()


@pytest.mark.parametrize(
    "symmetry",
    [lambda x: torch.rot90(x, 1, (-2, -1)), lambda x: x.transpose(-2, -1), lambda x: x.flip(-1)],
    ids=["rot90", "transpose", "mirror"],
)
def test_symmetric_measurement_gives_symmetric_estimate(symmetry):
    image, mu = gaussian_image(5)
    meas = mtd.simulate(
        image, 100, snr=5.0, seed=6
    )  # N a multiple of L: the patch grid maps to itself
    em = mtd.ApproximateEM(mtd.Rotations(5, 4), iterations=15, dtype=torch.float64)
    plain = em.fit(meas.data, mu)
    moved = em.fit(symmetry(meas.data), symmetry(mu))
    assert torch.allclose(moved.estimate, symmetry(plain.estimate), atol=1e-9)
    assert torch.allclose(moved.loglik, plain.loglik, rtol=1e-12)


def test_restarts_keep_the_best_loglik():
    image, mu = gaussian_image(0)
    meas = mtd.simulate(image, 110, snr=20.0, seed=2)
    g = torch.Generator().manual_seed(0)
    inits = torch.stack(
        [torch.rand(5, 5, generator=g, dtype=torch.float64) * 4 for _ in range(3)] + [mu]
    )
    em = mtd.ApproximateEM(mtd.Rotations(5, 4), iterations=50, dtype=torch.float64)
    res = em.fit(meas.data, inits)
    singles = [float(em.fit(meas.data, x).loglik[-1]) for x in inits]
    assert res.restart == int(np.argmax(singles))
    assert float(res.loglik[-1]) == pytest.approx(max(singles))
    assert res.scores.tolist() == pytest.approx(singles)


def test_history_and_callback():
    image, mu = gaussian_image(0)
    meas = mtd.simulate(image, 55, snr=5.0, seed=2)
    seen = []
    em = mtd.ApproximateEM(mtd.Rotations(5, 4), iterations=5, tol=0, dtype=torch.float64)
    res = em.fit(meas.data, mu, truth=image, callback=seen.append)
    estimates = [entry.pop("estimate") for entry in seen]
    assert seen == res.history and len(seen) == 5
    assert torch.equal(estimates[-1], res.estimate)  # the callback sees each new iterate
    assert {"loglik", "delta", "error", "empty_mass", "sigma", "iteration"} <= set(seen[0])
    assert seen[-1]["error"] == pytest.approx(mtd.relative_error(image, res.estimate))
    assert 0 <= seen[-1]["empty_mass"] <= 1 and seen[0]["empty_mass"] > 0
    assert res.rho.sum().item() == pytest.approx(1.0)


def test_uniform_rho_stays_uniform_and_gamma_schedules():
    em = mtd.ApproximateEM(
        mtd.Rotations(5), rho="uniform", iterations=5, tol=0, dtype=torch.float64
    )
    image, mu = gaussian_image(0)
    res = em.fit(mtd.simulate(image, 55, snr=5.0).data, mu)
    assert torch.allclose(res.rho, torch.full((10, 10), 0.01, dtype=torch.float64))
    lin = mtd.Gradient(gamma=mtd.LinearGamma(2.0))
    assert [lin.gamma(t, 5) for t in range(5)] == pytest.approx([0, 0.5, 1.0, 1.5, 2.0])
    assert mtd.Gradient(gamma=mtd.ConstantGamma(2.0)).gamma(3, 5) == 2.0


def test_stops_when_the_update_is_small():
    image, mu = gaussian_image(0)
    meas = mtd.simulate(image, 110, snr=1000.0, seed=2)
    em = mtd.ApproximateEM(mtd.Rotations(5, 4), iterations=100, tol=1e-6, dtype=torch.float64)
    res = em.fit(meas.data, mu)
    assert res.converged and len(res.history) < 100
    assert res.history[-1]["delta"] < 1e-6 <= res.history[-2]["delta"]


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error before any work, one test per case (DESIGN section 7).
# ------------------------------------------------------------------------------------------------
def test_non_finite_measurement_is_refused():
    data = torch.zeros(20, 20)
    data[3, 4] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        mtd.ApproximateEM(mtd.Rotations(5)).fit(data, torch.zeros(5, 5))


def test_non_2d_measurement_is_refused():
    with pytest.raises(ValueError, match="2-D"):
        mtd.ApproximateEM(mtd.Rotations(5)).fit(torch.zeros(2, 20, 20), torch.zeros(5, 5))


def test_measurement_smaller_than_image_is_refused():
    with pytest.raises(ValueError, match="smaller than the image side L = 5"):
        mtd.ApproximateEM(mtd.Rotations(5)).fit(torch.zeros(4, 4), torch.zeros(5, 5))


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan")])
def test_non_positive_sigma_is_refused(sigma):
    with pytest.raises(ValueError, match="sigma must be > 0"):
        mtd.ApproximateEM(mtd.Rotations(5), sigma=sigma)


def test_k_below_one_is_refused():
    with pytest.raises(ValueError, match="K must be an integer >= 1, got 0"):
        mtd.Rotations(5, K=0)
    with pytest.raises(ValueError, match="K must be an integer >= 1"):
        mtd.simulate(torch.ones(3, 3), 30, K=0)


def test_init_of_wrong_size_is_refused():
    with pytest.raises(ValueError, match=r"init must be \(5, 5\) images"):
        mtd.ApproximateEM(mtd.Rotations(5)).fit(torch.zeros(20, 20), torch.zeros(4, 4))


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match="m_step must be an mtd M-step"):
        mtd.ApproximateEM(mtd.Rotations(5), m_step="newton")
    with pytest.raises(ValueError, match="rho must be one of"):
        mtd.ApproximateEM(mtd.Rotations(5), rho="learned")
    with pytest.raises(ValueError, match="group must be an mtd TransformSet"):
        mtd.ApproximateEM(5)
    with pytest.raises(ValueError, match="method must be one of"):
        mtd.Compute(method="dft")


def test_denoise_m_step_is_the_map_step_for_a_gaussian_prior_with_uniform_coverage():
    from priors.prior import AnalyticGaussianPrior

    _, mu = gaussian_image(5)
    g = torch.Generator().manual_seed(2)
    em = mtd.ApproximateEM(mtd.Rotations(5, 4), mtd.Denoise(), dtype=torch.float64)
    sigma2 = 0.7
    stats = mtd.Statistics(
        omega=torch.zeros(4, 10, 10, dtype=torch.float64),
        b=torch.randn(4, 5, 5, generator=g, dtype=torch.float64) * 3,
        c=torch.full((4, 5, 5), 2.5, dtype=torch.float64),
        loglik=torch.zeros((), dtype=torch.float64),
        energy=torch.zeros((), dtype=torch.float64),
        D=9,
    )
    prior = AnalyticGaussianPrior(mu)
    F, _ = em.m_step.step(em.group, stats, mu, sigma2, 0, 1, prior)
    expected = map_solution(em, stats, sigma2, mu, 1.0)
    assert torch.allclose(F, expected, atol=1e-10), (F - expected).abs().max()
    # gamma blends the closed-form step and the denoised one.
    half, _ = mtd.Denoise(mtd.ConstantGamma(0.5)).step(em.group, stats, mu, sigma2, 0, 1, prior)
    assert torch.allclose(half, 0.5 * (expected + em.closed_form(stats, mu)), atol=1e-10)


def test_denoise_m_step_needs_a_posterior_mean():
    em = mtd.ApproximateEM(mtd.Rotations(5), mtd.Denoise())
    with pytest.raises(ValueError, match="posterior_mean"):
        em.fit(torch.randn(20, 20), torch.zeros(5, 5), prior=lambda x, t: -x)


def test_prior_with_closed_form_is_refused():
    with pytest.raises(ValueError, match="a prior needs a Gradient or Denoise M-step"):
        em = mtd.ApproximateEM(mtd.Rotations(5))
        em.fit(torch.zeros(20, 20), torch.zeros(5, 5), prior=lambda x, t: x)


def test_prior_of_wrong_shape_is_refused():
    em = mtd.ApproximateEM(mtd.Rotations(5), mtd.Gradient())
    with pytest.raises(ValueError, match="must map"):
        em.fit(torch.randn(20, 20), torch.zeros(5, 5), prior=lambda x, t: x.reshape(-1))


def test_remainder_strip_is_reported():
    image, mu = gaussian_image(0)
    with pytest.warns(UserWarning, match="last 3 rows and 3 columns"):
        em = mtd.ApproximateEM(mtd.Rotations(5), iterations=1)
        res = em.fit(mtd.simulate(image, 58, snr=5.0).data, mu)
    assert res.dropped == (3, 3)


def test_log_prior_integrates_the_score():
    # For N(mu, I) the line integral of the score from 0 to F is log p(F) - log p(0), exactly.
    _, mu = gaussian_image(2)
    F = mu + torch.randn(5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    em = mtd.ApproximateEM(mtd.Rotations(5), mtd.Gradient(), dtype=torch.float64)
    exact = -0.5 * ((F - mu).square().sum() - mu.square().sum())
    assert em.log_prior(lambda x, t: -(x - mu), F) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize(
    "options",
    [
        {"compute": mtd.Compute(method="gemm")},
        {"compute": mtd.Compute(method="fft"), "K": 6},
        {
            "compute": mtd.Compute(stream=True, chunk_size=7),
            "stochastic": mtd.Stochastic(0.5, polish=1),
            "m_step": mtd.Gradient(),
        },
        {"compute": mtd.Compute(method="fft"), "K": 6, "dihedral": True},
    ],
)
def test_no_tensor_lands_on_the_default_device(tmp_path, options):
    """Every tensor is made on the engine's device (or on the CPU where the data lies), never on
    torch's default device: a user with ``torch.set_default_device("cuda")`` and an engine on
    another device must not get mixed devices. The "meta" default device has no data, so any
    tensor made there fails the run."""
    image = torch.rand(5, 5, dtype=torch.float64)
    options = dict(options)
    K = options.pop("K", 4)
    group = mtd.Dihedral(5, K) if options.pop("dihedral", False) else mtd.Rotations(5, K)
    em = mtd.ApproximateEM(group, iterations=2, dtype=torch.float64, **options)
    torch.set_default_device("meta")
    try:
        meas = mtd.simulate(image, 60, snr=5, K=K, rotation="continuous", seed=0, reflect=True)
        path = mtd.write_micrograph(tmp_path / "m.mrc", meas.data)
        res = em.fit(path, image + 0.1, truth=image)
        error = mtd.relative_error(image, res.estimate, max_shift=1, group=group)
        summaries = em.summaries(path, res.estimate, res.rho.log(), res.sigma**2)
    finally:
        torch.set_default_device(None)
    assert res.estimate.device.type == "cpu" and math.isfinite(error)
    assert summaries.empty.device.type == "cpu"


@pytest.mark.parametrize("K", [4, 6])
def test_closed_form_keeps_f_where_the_coverage_vanishes(K):
    """b / c at a pixel covered by 1e-20 of the largest coverage is rounding noise: F stays."""
    L = 5
    g = torch.Generator().manual_seed(0)
    em = mtd.ApproximateEM(mtd.Rotations(L, K), dtype=torch.float64)
    c = torch.rand(K, L, L, generator=g, dtype=torch.float64) + 0.5
    pixel = torch.zeros(L, L, dtype=torch.float64)
    pixel[1, 3] = 1
    c[em.group(pixel) != 0] = 1e-20  # every (rotation, position) that reads pixel (1, 3)
    F_true = torch.rand(L, L, generator=g, dtype=torch.float64)
    b = c * em.group(F_true) + 1e-13 * torch.randn(K, L, L, generator=g, dtype=torch.float64)
    zero = b.new_zeros(())
    stats = mtd.Statistics(b.new_zeros(K, 2 * L, 2 * L), b, c, zero, zero, 1)
    F = torch.full((L, L), 7.0, dtype=torch.float64)
    new = em.closed_form(stats, F)
    assert new[1, 3] == 7.0
    if K == 4:  # a permutation: every other pixel is b / c, the truth up to the noise
        torch.testing.assert_close(new[pixel == 0], F_true[pixel == 0], rtol=0, atol=1e-10)
    assert torch.isfinite(new).all() and new.abs().max() < 10


def test_stochastic_em_fft_and_gemm_agree_on_a_digit(digits):
    """A stochastic E-step on 12 of 121 patches leaves pixels with almost no coverage; the FFT
    back-projection's rounding there once blew the estimate up, where the GEMM's exact zeros
    did not."""
    meas = mtd.simulate(digits[3], 308, snr=1.0, seed=1)
    init = torch.full((28, 28), float(digits[3].mean()), dtype=torch.float64)
    kw = {"iterations": 4, "tol": 0, "dtype": torch.float64, "stochastic": mtd.Stochastic(0.1)}
    R = mtd.Rotations(28, 4)
    fft = mtd.ApproximateEM(R, compute=mtd.Compute(method="fft"), **kw).fit(meas.data, init)
    gemm = mtd.ApproximateEM(R, compute=mtd.Compute(method="gemm"), **kw).fit(meas.data, init)
    torch.testing.assert_close(fft.estimate, gemm.estimate, rtol=0, atol=1e-8)


def test_continued_m_step_runs_past_its_schedule():
    """mtd.Continued: iteration tau of a further stage is iteration after + tau of the run it
    continues, so an annealed prior step keeps its final weight and noise level instead of
    starting its schedule over (em.refine_K's refinement)."""
    seen = []

    class Recorder(mtd.MStep):
        uses_prior = True

        def gamma(self, tau, T):
            return mtd.LinearGamma()(tau, T)

        def step(self, group, stats, x, sigma2, tau, T, prior):
            seen.append((tau, T))
            return x, {}

    step = mtd.Continued(Recorder(), after=40)
    assert step.uses_prior
    assert step.gamma(0, 7) == 1.0 and Recorder().gamma(0, 40) == 0.0
    step.step(None, None, torch.zeros(2), 1.0, 3, 7, None)
    assert seen == [(43, 40)]
    denoise = mtd.Denoise(gamma=mtd.LinearGamma(), anneal_from=5.0, anneal_iterations=32)
    assert denoise.gamma(0, 10) == 0.0 and mtd.Continued(denoise, 40).gamma(0, 10) == 1.0
    assert mtd.Continued(denoise, 40).prior_t == denoise.prior_t  # what ranks restarts
    with pytest.raises(ValueError, match="after must be"):
        mtd.Continued(Recorder(), after=0)


def test_fit_continues_from_a_given_rho_and_sigma():
    """fit(rho=, sigma=): the first E-step is at that shift distribution and noise level (an
    earlier fit's, continued), not at the uniform rho and the patches' mean power."""
    rng = np.random.default_rng(2)
    F = torch.from_numpy(0.5 + rng.uniform(0, 1, (4, 4)))
    meas = mtd.simulate(F, 48, density=0.2, snr=5, K=4, seed=3)
    em = mtd.ApproximateEM(mtd.Rotations(4, 4), rho="estimate", iterations=1, dtype=torch.float64)
    data = em.prepare(meas.data)
    rho = torch.rand(8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rho /= rho.sum()
    res = em.fit(data, F, rho=rho, sigma=0.7)
    want = em.e_step(data, F, rho.log(), 0.7**2).loglik
    assert res.history[0]["loglik"] == pytest.approx(float(want), rel=1e-12)
    default = em.fit(data, F).history[0]["loglik"]
    assert default != pytest.approx(res.history[0]["loglik"], rel=1e-6)
    with pytest.raises(ValueError, match="rho must be"):
        em.fit(data, F, rho=torch.ones(4, 4))
