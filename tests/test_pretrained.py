"""The priors shipped in priors/pretrained/: they load alone and are as good as the README says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from priors.prior import AnalyticGaussianPrior, ScorePrior, score_error

PRETRAINED = Path(__file__).resolve().parents[1] / "priors" / "pretrained"


# The bounds are the priors issue's goal, 5%; the README gives the measured figures.
@pytest.mark.parametrize(
    "name,bounds",
    [
        ("gaussian_ism.ckpt", {0.0: 0.05}),
        (
            "gaussian_dsm.ckpt",
            {0.01: 0.05, 0.05: 0.05, 0.1: 0.05, 0.3: 0.05, 0.6: 0.05, 1.0: 0.05},
        ),
    ],
)
def test_shipped_gaussian_priors_match_the_analytic_score(name, bounds):
    path = PRETRAINED / name
    assert path.stat().st_size < 20e6
    raw = torch.load(path, weights_only=True)
    assert all(k.startswith("ema.") or k == "held_out" for k in raw["state_dict"])  # EMA only
    prior = ScorePrior.from_checkpoint(path)
    mu = torch.tensor(prior.meta["mu"]).reshape(5, 5)
    truth = AnalyticGaussianPrior(mu, prior.sde)

    def draw(n, g):  # the data distribution N(mu, I)
        return mu + torch.randn((n, 1, 5, 5), generator=g)

    for t, bound in bounds.items():
        err = score_error(prior, truth, draw, t)
        assert err < bound, (t, err)


def test_shipped_mnist_prior_denoises_held_out_digits():
    path = PRETRAINED / "mnist.ckpt"
    assert path.stat().st_size < 20e6
    prior = ScorePrior.from_checkpoint(path)
    x0 = prior.held_out[:, None]  # the ten reconstruction targets, never seen in training
    assert x0.shape == (10, 1, 28, 28) and len(prior.meta["held_out"]) == 10
    g = torch.Generator().manual_seed(0)
    for t in (0.05, 0.2):
        a, s = float(prior.sde.alpha(t)), float(prior.sde.sigma(t))
        noisy = a * x0 + s * torch.randn(x0.shape, generator=g)
        before = (noisy / a - x0).norm()
        after = (prior.denoise(noisy, t) - x0).norm()
        assert after < 0.5 * before, (t, float(after / before))
