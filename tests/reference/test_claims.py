"""What the README and DESIGN claim of the engine and the priors, each against a value that a
correct implementation gives and a wrong one does not (issue 16).

Expected values come from closed forms (a blank patch, a Gaussian prior, an analytic blob), from
the loops of tests/reference/equations.py, or from the definitions the docs state; never from the
function under test.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mtd
from priors.losses import ism_loss
from priors.prior import AnalyticGaussianPrior, ScorePrior
from priors.sde import VPSDE, sample
from tests.helpers import gaussian_image
from tests.reference import equations as ref

ROOT = Path(__file__).resolve().parents[2]
PRETRAINED = ROOT / "priors" / "pretrained"


# ------------------------------------------------------------------------------------------------
# Rotations: the centre and the direction, pinned by an analytic image
# ------------------------------------------------------------------------------------------------
def blob(L: int, y: float, x: float, width: float = 1.6) -> np.ndarray:
    """A Gaussian blob centred (y, x) pixels from the image centre ((L-1)/2, (L-1)/2), row down."""
    c = (L - 1) / 2
    i, j = np.meshgrid(np.arange(L) - c, np.arange(L) - c, indexing="ij")
    return np.exp(-((i - y) ** 2 + (j - x) ** 2) / (2 * width**2))


def centroid(image: np.ndarray) -> tuple[float, float]:
    L = image.shape[0]
    c = (L - 1) / 2
    i, j = np.meshgrid(np.arange(L) - c, np.arange(L) - c, indexing="ij")
    return float((i * image).sum() / image.sum()), float((j * image).sum() / image.sum())


@pytest.mark.parametrize("degrees", [30.0, 90.0, 135.0, 200.0, 315.0])
def test_rotation_turns_about_the_centre_counter_clockwise(degrees):
    # Counter-clockwise as displayed (row axis down): a point (y, x) from the centre moves to
    # (y cos t - x sin t, x cos t + y sin t); at 90 degrees (y, x) -> (-x, y), which is
    # np.rot90. The blob lies off centre, so a wrong centre or a wrong direction moves it by
    # pixels (its values then miss by ~1); bilinear interpolation of a blob 1.6 pixels wide
    # moves its centroid by < 0.05 pixel and its values by < 0.08 (measured: 0.07).
    L, y, x = 21, -5.0, 3.0
    t = math.radians(degrees)
    image = blob(L, y, x)
    ty, tx = y * math.cos(t) - x * math.sin(t), x * math.cos(t) + y * math.sin(t)
    expected = blob(L, ty, tx)
    engine = mtd.rotate(torch.from_numpy(image), t).numpy()
    table = mtd.Rotations(L, 360).templates(torch.from_numpy(image))[round(degrees)].numpy()
    for name, turned in (
        ("mtd.rotate", engine),
        ("Rotations", table),
        ("ref", ref.rotate(image, t)),
    ):
        cy, cx = centroid(turned)
        assert abs(cy - ty) < 0.05 and abs(cx - tx) < 0.05, (name, (cy, cx), (ty, tx))
        assert np.abs(turned - expected).max() < 0.1, name
    if degrees == 90.0:
        np.testing.assert_allclose(engine, np.rot90(image), atol=1e-12)


# ------------------------------------------------------------------------------------------------
# The empty mass: the posterior (and rho) on shifts with l_x = L or l_y = L
# ------------------------------------------------------------------------------------------------
def test_empty_mass_is_one_on_blank_patches_and_zero_on_patches_holding_a_copy():
    # A hand-made measurement at high SNR: an image with no zero pixel, copies inside patches
    # (1, 1) and (2, 3); every other patch is noise. A blank patch is explained by the empty
    # shifts only (any other shift puts template pixels on it), a patch holding a whole copy by
    # a non-empty shift only.
    L, n = 5, 4
    rng = np.random.default_rng(0)
    image = rng.uniform(1, 2, (L, L))
    data = 0.05 * rng.standard_normal((n * L, n * L))
    data[L : 2 * L, L : 2 * L] += image
    data[2 * L : 3 * L, 3 * L : 4 * L] += np.rot90(image)
    F = torch.from_numpy(image)
    log_rho = torch.full((2 * L, 2 * L), -math.log(4 * L * L), dtype=torch.float64)
    for method in ("fft", "gemm"):
        em = mtd.ApproximateEM(
            mtd.Rotations(L, 4), compute=mtd.Compute(method=method), dtype=torch.float64
        )
        s = em.summaries(data, F, log_rho, 0.05**2)
        empty = s.empty.reshape(n, n).numpy()
        holding = np.zeros((n, n), dtype=bool)
        holding[1, 1] = holding[2, 3] = True
        np.testing.assert_allclose(empty[~holding], 1.0, atol=1e-9)
        np.testing.assert_allclose(empty[holding], 0.0, atol=1e-9)
    # rho estimated from these posteriors (eq. 18): 14 of 16 patches empty.
    em = mtd.ApproximateEM(mtd.Rotations(L, 4), sigma=0.05, iterations=1, dtype=torch.float64)
    res = em.fit(data, F)
    assert res.history[0]["empty_mass"] == pytest.approx(14 / 16, abs=1e-9)


def test_empty_mass_of_a_blank_measurement_is_one():
    L = 4
    em = mtd.ApproximateEM(mtd.Rotations(L, 4), sigma=0.1, iterations=1, dtype=torch.float64)
    image = torch.rand(L, L, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 1
    res = em.fit(torch.zeros(6 * L, 6 * L, dtype=torch.float64), image)
    assert res.history[0]["empty_mass"] == pytest.approx(1.0, abs=1e-12)


# ------------------------------------------------------------------------------------------------
# sigma estimation (sigma=None): close to the truth on data at several SNRs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("snr", [0.5, 2.0, 20.0])
def test_estimated_sigma_is_the_noise_level_of_the_data(snr):
    # From the prior mean, EM with sigma estimated ends within 3% of the simulated sigma (the
    # residual of the patches, most of them pure noise, is the noise power).
    image, mu = gaussian_image(4)
    meas = mtd.simulate(image, 220, snr=snr, seed=8)
    em = mtd.ApproximateEM(mtd.Rotations(5, 4), sigma=None, iterations=60, dtype=torch.float64)
    res = em.fit(meas.data, mu)
    assert res.sigma == pytest.approx(meas.sigma, rel=0.03)


# ------------------------------------------------------------------------------------------------
# Restarts ranked with a prior: log-likelihood + gamma log p
# ------------------------------------------------------------------------------------------------
def test_restarts_with_a_prior_rank_by_loglik_plus_gamma_log_prior():
    # Two initial guesses related by a rotation have the same log-likelihood (the model cannot
    # tell them apart); the Gaussian prior N(mu, I) can: the one near mu must win, and every
    # score is the log-likelihood plus gamma (log p(x) - log p(0)) in closed form.
    image, mu = gaussian_image(6)
    meas = mtd.simulate(image, 110, snr=5.0, seed=3)
    near = mu + 0.3 * torch.randn(5, 5, generator=torch.Generator().manual_seed(2)).double()
    inits = torch.stack([torch.rot90(near, 1), near])
    gamma = 0.8
    em = mtd.ApproximateEM(
        mtd.Rotations(5, 4),
        mtd.Gradient(lr=1e-12, gamma=mtd.ConstantGamma(gamma)),  # estimates stay at the inits
        sigma=meas.sigma,
        iterations=1,
        dtype=torch.float64,
    )
    prior = lambda x, t: -(x - mu)  # noqa: E731
    res = em.fit(meas.data, inits, prior=prior)
    logliks = [float(em.fit(meas.data, x, prior=prior).loglik[-1]) for x in inits]
    assert logliks[0] == pytest.approx(logliks[1], rel=1e-12)
    log_p = [-0.5 * float((x - mu).square().sum() - mu.square().sum()) for x in inits]
    expected = [ll + gamma * lp for ll, lp in zip(logliks, log_p, strict=True)]
    assert res.scores.tolist() == pytest.approx(expected, rel=1e-9)
    assert res.restart == 1 and log_p[1] > log_p[0] + 10


# ------------------------------------------------------------------------------------------------
# The denoising M-step's noise level and its annealing (noise_scale, anneal_from,
# anneal_iterations)
# ------------------------------------------------------------------------------------------------
def uniform_statistics(K=4, L=5, coverage=2.5):
    zero = torch.zeros((), dtype=torch.float64)
    return mtd.Statistics(
        omega=torch.zeros(K, 2 * L, 2 * L, dtype=torch.float64),
        b=torch.zeros(K, L, L, dtype=torch.float64),
        c=torch.full((K, L, L), coverage, dtype=torch.float64),
        loglik=zero,
        energy=zero,
        D=9,
    )


def test_denoiser_noise_is_sigma_over_root_coverage_annealed_geometrically_from_above():
    # Coverage 2.5 per template pixel, 4 templates: the curvature of Q is 10 / sigma^2 at every
    # pixel (the diagonal of the normal matrix), so the closed-form estimate carries noise of
    # standard deviation sigma / sqrt(10) = 0.3 for sigma^2 = 0.9.
    stats, sigma2 = uniform_statistics(), 0.9
    curvature = float(mtd.Rotations(5, 4).normal_matrix(stats.c).diagonal().mean())
    assert curvature == pytest.approx(10.0)
    plain = mtd.Denoise()
    assert plain.noise(stats, sigma2, 0) == pytest.approx(0.3)
    assert mtd.Denoise(noise_scale=2.0).noise(stats, sigma2, 7) == pytest.approx(0.6)
    assert plain.noise(uniform_statistics(coverage=10.0), sigma2, 0) == pytest.approx(0.15)
    # From anneal_from = 1.5 at the first iteration down to the level 0.6 at iteration 4,
    # geometrically (coarse to fine), then the level.
    annealed = mtd.Denoise(noise_scale=2.0, anneal_from=1.5, anneal_iterations=4)
    levels = [annealed.noise(stats, sigma2, tau) for tau in range(7)]
    expected = [1.5 * (0.6 / 1.5) ** (tau / 4) for tau in range(5)] + [0.6, 0.6]
    assert levels == pytest.approx(expected)
    # Never below the level: annealing from below it is no annealing.
    low = mtd.Denoise(noise_scale=2.0, anneal_from=0.1, anneal_iterations=4)
    assert [low.noise(stats, sigma2, tau) for tau in range(5)] == pytest.approx([0.6] * 5)


def test_the_history_records_the_annealed_noise():
    image, mu = gaussian_image(7)
    meas = mtd.simulate(image, 55, snr=5.0, seed=1)
    m_step = mtd.Denoise(anneal_from=2.0, anneal_iterations=3)
    em = mtd.ApproximateEM(mtd.Rotations(5, 4), m_step, iterations=5, tol=0, dtype=torch.float64)
    res = em.fit(meas.data, mu, prior=AnalyticGaussianPrior(mu))
    noise = [h["noise"] for h in res.history]
    assert noise[0] == pytest.approx(2.0)
    assert all(a > b for a, b in zip(noise[:3], noise[1:4], strict=True))  # decreasing
    assert noise[3] < 0.5 and noise[4] < 0.5  # the estimated level, far below anneal_from


# ------------------------------------------------------------------------------------------------
# Priors: Hutchinson's trace, the sampler's corrector and the probability-flow ODE
# ------------------------------------------------------------------------------------------------
def test_hutchinson_ism_is_an_unbiased_estimate_of_the_exact_loss():
    # s(x) = A x with A not symmetric: tr(dS/dx) = tr(A); Hutchinson's v^T A v has mean tr(A)
    # and, for this A, a standard deviation about 5 per sample, so over 20,000 samples the mean
    # lies within 4 standard errors (0.15) of the exact loss.
    d = 9
    g = torch.Generator().manual_seed(0)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)

    def score(y, t):
        return (y.flatten(1) @ A.T).view_as(y)

    x = torch.randn(20000, 1, 3, 3, generator=g, dtype=torch.float64)
    exact = float(ism_loss(score, x).detach())
    assert exact == pytest.approx(
        float(0.5 * (x.flatten(1) @ A.T).square().sum(1).mean() + torch.trace(A)), rel=1e-12
    )
    hutch = float(ism_loss(score, x, hutchinson=True, generator=g).detach())
    assert hutch != exact and abs(hutch - exact) < 0.15
    # For a diagonal Jacobian v^T A v = tr(A) for every Rademacher v: exact sample by sample.
    D = torch.diag(torch.randn(d, generator=g, dtype=torch.float64))

    def diagonal(y, t):
        return (y.flatten(1) @ D).view_as(y)

    hutch = float(ism_loss(diagonal, x[:10], True, g).detach())
    assert hutch == pytest.approx(float(ism_loss(diagonal, x[:10]).detach()), rel=1e-12)


@pytest.mark.parametrize("corrector_steps", [0, 1])
def test_reverse_sampler_with_a_corrector_draws_the_data_distribution(corrector_steps):
    # 16 x 16 images: the corrector's step takes the norms of each sample's noise and score,
    # which concentrate in 256 dimensions (in 4 they do not, and the corrector inflates the
    # variance: std 1.5 at 2 x 2, 1.09 at 5 x 5, 1.018 here). Over 1,000 samples the pooled std
    # is known to 0.002; the bounds leave room for the sampler's own discretisation (1.003 without
    # corrector).
    sde = VPSDE()
    mu = torch.arange(256, dtype=torch.float32).reshape(16, 16) % 5
    prior = AnalyticGaussianPrior(mu, sde)
    shape = (1000, 1, 16, 16)
    g = torch.Generator().manual_seed(4)
    x = sample(sde, prior, shape, steps=200, corrector_steps=corrector_steps, generator=g)
    assert float((x.mean(0)[0] - mu).abs().max()) < 0.12
    assert float((x - x.mean(0)).std()) == pytest.approx(1.0, abs=0.03)
    if corrector_steps:  # the corrector did run: other draws from the same generator seed
        plain = sample(sde, prior, shape, steps=200, generator=torch.Generator().manual_seed(4))
        assert not torch.allclose(plain, x)


@pytest.mark.parametrize("probability_flow", [False, True])
def test_reverse_sde_and_probability_flow_ode_carry_noise_to_the_data(probability_flow):
    # Integrating the reverse SDE (Euler-Maruyama) or the probability-flow ODE (Euler, no noise)
    # from x_1 ~ N(0, I) to t = 1e-3 with the exact score of N(mu, I) gives N(alpha_t mu, I).
    sde = VPSDE(N=500)
    mu = torch.tensor([[0.0, 3.0], [-2.0, 4.0]], dtype=torch.float64)
    rsde = sde.reverse(AnalyticGaussianPrior(mu, sde), probability_flow=probability_flow)
    g = torch.Generator().manual_seed(5)
    x = sde.prior_sampling((4000, 1, 2, 2), g, dtype=torch.float64)
    for t in torch.linspace(1.0, 1e-3, sde.N, dtype=torch.float64):
        f, G = rsde.discretize(x, t.expand(len(x)))
        x = x - f + G * torch.randn(x.shape, generator=g, dtype=x.dtype)
        assert bool((G == 0).all()) == probability_flow
    assert torch.allclose(x.mean(0)[0], mu * float(sde.alpha(1e-3)), atol=0.08)
    assert torch.allclose(x.std(0)[0], torch.ones(2, 2, dtype=torch.float64), atol=0.08)


def test_a_prior_in_other_units_has_the_score_of_the_rescaled_density():
    # Data y = u x in measurement units: p_y(y) = p_x(y / u) / u^d, so the score in measurement
    # units is s_y(y) = s_x(y / u) / u (and Tweedie's posterior mean scales by u). The shipped
    # DSM prior read with units u = 2 against the same network in units 1.
    ckpt = torch.load(PRETRAINED / "gaussian_dsm.ckpt", weights_only=True)
    one = ScorePrior.from_checkpoint(PRETRAINED / "gaussian_dsm.ckpt", dtype=torch.float64)
    meta = {**one.meta, "units": 2.0}
    two = ScorePrior(one.net.net, one.sde, meta, None)
    assert ckpt["hyper_parameters"]["data_meta"].get("units", 1.0) == 1.0
    x = torch.randn(3, 1, 5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for t in (0.01, 0.3):
        torch.testing.assert_close(two(2 * x, t), one(x, t) / 2, rtol=1e-12, atol=1e-12)


class ExactGaussianNet(torch.nn.Module):
    """A 'network' whose output is the exact score -(x - alpha_t mu) of N(mu, I) data."""

    output = "score"

    def __init__(self, mu: torch.Tensor, sde: VPSDE):
        super().__init__()
        self.mu, self.sde = mu, sde
        self.unused = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, x, t):
        alpha = self.sde.alpha(t).to(x).view(-1, 1, 1, 1)
        return -(x - alpha * self.mu)


@pytest.mark.parametrize(
    "units",
    [
        1.0,
        2.0,
    ],
)
def test_posterior_mean_in_measurement_units_is_the_gaussian_closed_form(units):
    # Data y0 = u x0, x0 ~ N(mu, I), so y0 ~ N(u mu, u^2 I); for y = y0 + s z the posterior mean
    # is (u^2 y + s^2 u mu) / (u^2 + s^2), whatever the units. The prior's network is exact.
    sde = VPSDE()
    mu = torch.arange(9, dtype=torch.float64).reshape(3, 3) % 4
    meta = {"name": "gaussian", "image_size": 3, "units": units, "mu": mu.flatten().tolist()}
    prior = ScorePrior(ExactGaussianNet(mu, sde), sde, meta, None)
    g = torch.Generator().manual_seed(0)
    y = units * (mu + torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64))
    for s in (0.2, 0.5, 2.0):
        expected = (units**2 * y + s**2 * units * mu) / (units**2 + s**2)
        torch.testing.assert_close(prior.posterior_mean(y, s), expected, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# The command lines: python -m priors export, python -m mtd
# ------------------------------------------------------------------------------------------------
def run_module(*args, cwd=ROOT, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_priors_export_keeps_the_ema_weights_only(tmp_path):
    # A trained checkpoint holds raw weights (net.*), EMA weights (ema.*) and optimizer state;
    # the export keeps the EMA weights, the hyperparameters and the held-out targets.
    shipped = PRETRAINED / "gaussian_dsm.ckpt"
    ckpt = torch.load(shipped, weights_only=True)
    state = ckpt["state_dict"]
    for k in [k for k in state if k.startswith("ema.")]:
        state["net." + k[4:]] = state[k] + 1.0  # raw weights, unlike the EMA's
    ckpt["optimizer_states"] = [{"state": {}, "param_groups": [{"lr": 1e-3}]}]
    trained = tmp_path / "trained.ckpt"
    torch.save(ckpt, trained)
    out = tmp_path / "slim" / "mine.ckpt"
    proc = run_module("priors", "export", str(trained), str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and "gaussian prior" in proc.stdout
    slim = torch.load(out, weights_only=True)
    assert "optimizer_states" not in slim
    assert slim["state_dict"].keys() == {k for k in state if not k.startswith("net.")}
    x = torch.randn(4, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    exported, original = ScorePrior.from_checkpoint(out), ScorePrior.from_checkpoint(shipped)
    assert torch.equal(exported(x, 0.1), original(x, 0.1))
    assert out.stat().st_size < trained.stat().st_size


def test_python_m_mtd_recovers_a_digit_and_writes_its_outputs(tmp_path):
    # The default measurement (N = 11 L = 308) at SNR 50: 15 closed-form iterations from the mean
    # of ten other digits bring the error from 0.73 to 0.05, with sigma estimated to 1%.
    proc = run_module("mtd", "--snr", "50", "--iterations", "15", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "measurement 308 x 308" in out and "K = 4" in out
    true_sigma = float(out.split("(sigma ")[1].split(")")[0])
    errors = out.split("relative error: init ")[1].split(" (up to translation: ")
    init, estimate = (float(v) for v in errors[0].split(" -> estimate "))
    shifted = float(errors[1].split(")")[0])
    sigma = float(out.rsplit("sigma ", 1)[1].split()[0])
    assert init > 0.5 and estimate < 0.1 and shifted <= estimate
    assert sigma == pytest.approx(true_sigma, rel=0.02)
    written = np.load(tmp_path / "estimate.npy")
    assert written.shape == (28, 28)
    assert mtd.read_micrograph(tmp_path / "measurement.mrc").shape == (308, 308)


def test_python_m_mtd_help_names_its_options(capsys):
    from mtd.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(opt in out for opt in ("--snr", "--K", "--N", "--out"))
    with pytest.raises(SystemExit) as exit_:
        main(["--digit", "20"])
    assert exit_.value.code == 2 and "--digit must be in 0..19, got 20" in capsys.readouterr().err
