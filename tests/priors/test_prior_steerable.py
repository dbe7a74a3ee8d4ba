"""A pixel-space prior in the M-step of an unknown that is not an image (mtd.Steerable).

The image of the coefficients alpha is B alpha (``to_image``), the unknown of an image y is
B^+ y (``from_image``); the M-steps of ``mtd.em.msteps`` use the prior through these only.
"""

from __future__ import annotations

import math

import hydra
import numpy as np
import pytest
import torch

import mtd
from priors.prior import AnalyticGaussianPrior

DT = torch.float64


def _stats(K: int, L: int, seed: int, uniform: float | None = None) -> mtd.Statistics:
    """E-step statistics with random back-projections and coverage (uniform if given)."""
    g = torch.Generator().manual_seed(seed)
    c = (
        torch.full((K, L, L), uniform, dtype=DT)
        if uniform is not None
        else 0.5 + 3 * torch.rand(K, L, L, generator=g, dtype=DT)
    )
    return mtd.Statistics(
        omega=torch.zeros(K, 2 * L, 2 * L, dtype=DT),
        b=3 * torch.randn(K, L, L, generator=g, dtype=DT),
        c=c,
        loglik=torch.zeros((), dtype=DT),
        energy=torch.tensor(50.0, dtype=DT),
        D=9,
    )


def _q(group, stats, alpha, sigma2):
    """Q(alpha) from the templates T: -(E - 2 <b, T> + <c, T^2>) / (2 sigma^2)."""
    T = group.templates(alpha)
    return -(stats.energy - 2 * (stats.b * T).sum() + (stats.c * T * T).sum()) / (2 * sigma2)


def _image(L: int, seed: int) -> torch.Tensor:
    return torch.randn(L, L, generator=torch.Generator().manual_seed(seed), dtype=DT)


@pytest.mark.parametrize("L", [6, 7])
def test_projected_denoise_step_is_the_map_step_in_the_coefficients(L):
    # For a Gaussian prior N(mu, I) on pixels, uniform coverage and K = 4 (the quarter turns map
    # the grid onto itself, so B^T B commutes with the rotations), denoising B alpha_ml in pixels
    # and projecting with B^+ is argmax_alpha Q(alpha) + log p(B alpha): the maximiser of this
    # quadratic is found here by one Newton step from autograd, not from the M-step's algebra.
    group = mtd.Steerable(mtd.FBBasis(L), 4)
    B = group.basis.matrix
    assert (B.T @ B - torch.eye(group.basis.n, dtype=DT)).abs().max() > 0.1  # B^+ is not B^T
    stats, sigma2 = _stats(4, L, seed=L, uniform=2.5), 0.7
    mu = 2 * _image(L, 1)  # not band-limited
    prior = AnalyticGaussianPrior(mu)

    def objective(alpha):
        image = group.to_image(alpha)
        return _q(group, stats, alpha, sigma2) - 0.5 * (image - mu).square().sum()

    a0 = torch.zeros(group.basis.n, dtype=DT)
    grad = torch.autograd.functional.jacobian(objective, a0)
    hess = torch.autograd.functional.hessian(objective, a0)
    expected = a0 - torch.linalg.solve(hess, grad)
    step, info = mtd.Denoise().step(group, stats, a0, sigma2, 0, 1, prior)
    torch.testing.assert_close(step, expected, rtol=0, atol=1e-9)
    # The noise level handed to the denoiser is sigma / sqrt(mean coverage K c).
    assert info["noise"] == pytest.approx(math.sqrt(sigma2 / (4 * 2.5)), rel=1e-12)
    # gamma blends the closed form in the coefficients with the projected denoised image.
    half, _ = mtd.Denoise(mtd.ConstantGamma(0.5)).step(group, stats, a0, sigma2, 0, 1, prior)
    ml = mtd.em.msteps.closed_form(group, stats, a0)
    q_grad = torch.autograd.functional.jacobian(lambda a: _q(group, stats, a, sigma2), ml)
    assert q_grad.abs().max() < 1e-9  # the closed form is argmax Q in the coefficients
    torch.testing.assert_close(half, 0.5 * (expected + ml), rtol=0, atol=1e-9)


class _Recorder:
    """A prior whose denoiser is the identity, recording every image handed to it."""

    def __init__(self):
        self.seen, self.calls = [], 0

    def posterior_mean(self, y, noise):
        self.calls += 1
        self.seen += list(y.reshape(-1, *y.shape[-2:]).clone())
        return y


def test_completed_basis_image_is_the_image_plus_white_noise_at_the_level():
    # The closed-form estimate's image z = P(x + n') (P: the projector onto the basis's span) has
    # noise v^2 P: none outside the span. The completions z + (I - P) n_d keep z's projection and
    # add exactly the missing v^2 (I - P), so that in all they are x + white noise at the level,
    # the input the denoiser is trained on.
    L, v, draws = 7, 0.3, 4000
    group = mtd.Steerable(mtd.FBBasis(L), 4)
    z = group.to_image(group.from_image(_image(L, 1)))
    m_step, prior = mtd.Denoise(complete_draws=draws, seed=5), _Recorder()
    out = m_step.denoise_span(group, prior, z, v, 0)
    assert prior.calls == 1 and len(prior.seen) == draws  # one batch
    added = torch.stack(prior.seen) - z
    torch.testing.assert_close(
        group.from_image(added), torch.zeros(draws, group.basis.n, dtype=DT)
    )
    cov = (added.reshape(draws, -1).T @ added.reshape(draws, -1)) / draws / v**2
    eye = torch.eye(L * L, dtype=DT)
    P = group.to_image(group.from_image(eye.reshape(-1, L, L))).reshape(L * L, L * L)
    assert group.basis.n < 0.8 * L * L  # the span misses a fifth of the directions
    torch.testing.assert_close(cov + P, eye, rtol=0, atol=0.1)
    torch.testing.assert_close(out, z + added.mean(0))  # the identity denoiser's mean

    # The same (seed, iteration) draws the same completions; another seed or iteration does not.
    def completed(seed, tau):
        return mtd.Denoise(complete_draws=3, seed=seed).denoise_span(group, prior, z, v, tau)

    assert torch.equal(completed(5, 7), completed(5, 7))
    assert not torch.equal(completed(6, 7), completed(5, 7))
    assert not torch.equal(completed(5, 8), completed(5, 7))
    assert torch.isfinite(completed(-1, 7)).all()  # any integer seed (reconstruct.py seed=-1)


def test_completion_averages_the_denoiser_over_draws_and_leaves_image_unknowns_alone():
    # D draws: the mean of the denoiser's outputs on the D completed images (a denoiser that is
    # not linear, so the mean is not the denoiser of the mean), and Denoise.step uses it at its
    # own iteration. For an image unknown P is the identity: nothing is drawn (one denoiser call
    # on the image itself), the step is the one without completion.
    L, v = 6, 0.4
    group = mtd.Steerable(mtd.FBBasis(L), 4)
    z = group.to_image(group.from_image(_image(L, 3)))

    class Tanh(_Recorder):
        def posterior_mean(self, y, noise):
            super().posterior_mean(y, noise)
            return torch.tanh(y) * noise

    prior = Tanh()
    out = mtd.Denoise(complete_draws=5, seed=1).denoise_span(group, prior, z, v, 2)
    assert len(prior.seen) == 5
    torch.testing.assert_close(out, sum(torch.tanh(y) * v for y in prior.seen) / 5)
    stats, sigma2 = _stats(4, L, seed=4), 0.5
    a0 = group.from_image(_image(L, 5))
    m_step = mtd.Denoise(complete_draws=2, seed=3)
    step, info = m_step.step(group, stats, a0, sigma2, 6, 10, prior)
    ml = mtd.em.msteps.closed_form(group, stats, a0)
    span = m_step.denoise_span(group, prior, group.to_image(ml), info["noise"], 6)
    torch.testing.assert_close(step, group.from_image(span), rtol=0, atol=1e-12)
    plain, _ = mtd.Denoise().step(group, stats, a0, sigma2, 6, 10, prior)
    assert (plain - step).abs().max() > 1e-3
    pixels, gauss = mtd.Rotations(L, 4), AnalyticGaussianPrior(_image(L, 6))
    x0 = _image(L, 5)
    counted = _Recorder()
    mtd.Denoise(complete_draws=4).step(pixels, stats, x0, sigma2, 0, 1, counted)
    assert counted.calls == 1 and len(counted.seen) == 1
    plain, _ = mtd.Denoise().step(pixels, stats, x0, sigma2, 0, 1, gauss)
    completed, _ = mtd.Denoise(complete_draws=4).step(pixels, stats, x0, sigma2, 0, 1, gauss)
    assert torch.equal(plain, completed)
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match=f"complete_draws must be an integer >= 0, got {bad}"):
            mtd.Denoise(complete_draws=bad)
    with pytest.raises(ValueError, match="seed must be an integer, got 0.5"):
        mtd.Denoise(seed=0.5)


@pytest.mark.parametrize("steps", [1, 3])
def test_gradient_step_is_autograd_of_q_plus_gamma_log_prior_of_the_image(steps):
    # Eq. (18) in the coefficients: alpha <- alpha + lr grad [Q(alpha) + gamma log p(B alpha)],
    # with a non-Gaussian log-density (log p(x) = -sum log cosh(x - mu), score -tanh(x - mu)) and
    # non-uniform coverage; the expected ascent direction comes from autograd of the scalar.
    L, K, lr, gamma, sigma2 = 7, 5, 2e-3, 0.6, 0.4
    group = mtd.Steerable(mtd.FBBasis(L), K)
    stats = _stats(K, L, seed=3)
    mu = _image(L, 2)
    g = torch.Generator().manual_seed(5)
    alpha = torch.randn(group.basis.n, generator=g, dtype=DT)

    def log_p(image):
        return -torch.log(torch.cosh(image - mu)).sum()

    def score(x, t):
        assert t == 0.02 and x.shape == (1, 1, L, L)
        return -torch.tanh(x - mu)

    expected = alpha.clone()
    for _ in range(steps):
        a = expected.detach().requires_grad_(True)
        total = _q(group, stats, a, sigma2) + gamma * log_p(group.to_image(a))
        (grad,) = torch.autograd.grad(total, a)
        expected = expected + lr * grad
    m_step = mtd.Gradient(steps=steps, lr=lr, gamma=mtd.ConstantGamma(gamma), prior_t=0.02)
    step, info = m_step.step(group, stats, alpha, sigma2, 0, 10, score)
    torch.testing.assert_close(step, expected, rtol=0, atol=1e-10)
    assert info["gamma"] == gamma


class _CopyImages(mtd.Rotations):
    """Rotations whose to_image / from_image return copies: the generic path of the M-steps."""

    def to_image(self, x):
        return x.clone()

    def from_image(self, image):
        return image.clone()


@pytest.mark.parametrize(
    "m_step",
    [
        lambda: mtd.Gradient(steps=2, lr=1e-2, gamma=mtd.LinearGamma(1.0)),
        lambda: mtd.Denoise(anneal_from=1.0, anneal_iterations=3),
    ],
)
def test_image_unknown_results_do_not_depend_on_the_seam_path(m_step):
    # An image unknown takes the shortcut (to_image returns x itself, no arithmetic added); an
    # identity to_image that returns a copy goes through the chain rule / projection. Both fits,
    # restarts ranked by likelihood + log prior, give the same estimate bit for bit.
    L = 6
    truth = _image(L, 4).abs() * 3
    meas = mtd.simulate(truth, 6 * L, density=0.1, snr=2.0, K=4, seed=1)
    prior = AnalyticGaussianPrior(torch.full((L, L), 1.5, dtype=DT))
    init = torch.stack([_image(L, 7).abs(), _image(L, 8).abs()])
    results = []
    for group in (mtd.Rotations(L, 4), _CopyImages(L, 4)):
        em = mtd.ApproximateEM(group, m_step(), sigma=meas.sigma, iterations=4, dtype=DT)
        results.append(em.fit(meas.data, init, prior=prior))
    assert torch.equal(results[0].estimate, results[1].estimate)
    assert torch.equal(results[0].scores, results[1].scores)


def test_log_prior_of_coefficients_is_taken_on_their_image():
    # Restarts are ranked by log p(B alpha) - log p(0), exact for N(mu, I): -||B a - mu||^2 / 2
    # + ||mu||^2 / 2.
    L = 7
    group = mtd.Steerable(mtd.FBBasis(L), 4)
    mu = _image(L, 9)
    alpha = torch.randn(group.basis.n, generator=torch.Generator().manual_seed(2), dtype=DT)
    em = mtd.ApproximateEM(group, mtd.Denoise(), dtype=DT)
    image = group.to_image(alpha)
    exact = -0.5 * ((image - mu).square().sum() - mu.square().sum())
    got = em.log_prior(lambda x, t: -(x - mu), alpha)
    assert got == pytest.approx(float(exact), rel=1e-12)


def test_steerable_em_with_the_oracle_prior_beats_it_without():
    # A band-limited 7 x 7 image planted at continuous angles, exactly rotated; the oracle prior
    # N(truth-ish mean, I) pulls the low-SNR estimate toward it: lower eq. (19) error with it.
    L = 7
    basis = mtd.FBBasis(L, n=10)
    group = mtd.Steerable(basis, 8)
    g = torch.Generator().manual_seed(0)
    mu = basis.evaluate(torch.randn(basis.n, generator=g, dtype=DT)) * 2
    truth = mu + 0.3 * basis.evaluate(torch.randn(basis.n, generator=g, dtype=DT))
    meas = mtd.simulate(
        truth, 20 * L, density=0.05, snr=0.5, rotation="continuous", seed=3, basis=basis
    )
    init = group.from_image(mu + basis.evaluate(torch.randn(basis.n, generator=g, dtype=DT)))
    errors = {}
    for name, prior in (("no_prior", None), ("prior", AnalyticGaussianPrior(mu))):
        em = mtd.ApproximateEM(group, mtd.Denoise(), sigma=meas.sigma, iterations=15, dtype=DT)
        res = em.fit(meas.data, init, prior=prior)
        assert torch.isfinite(res.scores).all()
        errors[name] = mtd.relative_error(meas.coefficients, res.estimate, group=group)
    assert errors["prior"] < errors["no_prior"], errors


def test_prior_for_an_unknown_whose_image_is_not_l_by_l_is_refused():
    class Cropped(mtd.Steerable):
        def to_image(self, x):
            return super().to_image(x)[..., 1:, 1:]

    group = Cropped(mtd.FBBasis(5), 4)
    em = mtd.ApproximateEM(group, mtd.Gradient())
    with pytest.raises(ValueError, match=r"a prior acts on \(5, 5\) objects.*maps to \(4, 4\)"):
        em.fit(torch.randn(20, 20), torch.zeros(group.basis.n), prior=lambda x, t: -x)


@pytest.mark.slow  # ~6 s unloaded: the shipped prior, a 28 x 28 steerable group, two EMs
def test_experiment_mnist_continuous_runs_the_shipped_prior_on_fb_coefficients(tmp_path, compose):
    # reconstruct.py experiment=mnist_continuous: held-out digit at continuous angles, the
    # steerable group at the Nyquist count (462 at L = 28), K = 16, the prior's denoiser on the
    # coefficients' image; em/group=rotations gives today's bilinear rotations of the pixels.
    from tasks.reconstruct import reconstruct

    cfg = compose(
        "reconstruct", "experiment=mnist_continuous", "em.iterations=1", "measurement.N=84",
        root=tmp_path,
    )  # fmt: skip
    bilinear = compose(
        "reconstruct", "experiment=mnist_continuous", "em/group=rotations", bare=True
    )
    assert cfg.measurement.rotation == "continuous" and cfg.em.K == 16
    group = hydra.utils.instantiate(cfg.em.group)(28)
    assert isinstance(group, mtd.Steerable) and group.shape == (462,) and group.K == 16
    assert isinstance(hydra.utils.instantiate(bilinear.em.group)(28), mtd.Rotations)
    metrics = reconstruct(cfg)
    assert {"error/prior", "error/no_prior"} <= set(metrics)
    estimate = np.load(tmp_path / "out" / "estimate_prior.npy")
    assert estimate.shape == (28, 28) and np.isfinite(estimate).all()
