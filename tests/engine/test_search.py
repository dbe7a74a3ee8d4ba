"""The prior run's search (mtd.em.search): every candidate run, the best by its own score."""

from __future__ import annotations

import pytest
import torch

import mtd
from mtd.em.search import anneal_variants, search
from priors.prior import AnalyticGaussianPrior
from tests.helpers import gaussian_image


def test_search_keeps_the_candidate_its_fit_would_rank_first():
    L = 5
    truth, mu = gaussian_image(2, L)
    meas = mtd.simulate(truth, 60, density=0.1, snr=0.5, K=4, seed=3)
    prior = AnalyticGaussianPrior(mu)
    em = mtd.ApproximateEM(
        mtd.Rotations(L, 4), mtd.Denoise(anneal_from=1.0, anneal_iterations=4),
        sigma=meas.sigma, rho="estimate", iterations=6, dtype=torch.float64,
    )  # fmt: skip
    steps = anneal_variants(em.m_step, [None, 1.0, 3.0])
    assert [s.anneal_from for s in steps] == [1.0, None, 3.0]  # the configured one first, once
    g = torch.Generator().manual_seed(1)
    inits = torch.stack([torch.zeros(L, L), torch.rand(L, L, generator=g)]).double()
    start = em.fit(meas.data, inits[0])  # EM without the prior
    engine, best = search(em, meas.data, inits, prior, steps, start=start)
    assert len(best.scores) == 2 * len(steps) + 1
    assert best.restart == int(best.scores.argmax())
    # Each candidate is the fit it would be on its own: the winner's bytes and score.
    i, r = divmod(best.restart, 2)
    alone = mtd.ApproximateEM(
        mtd.Rotations(L, 4), steps[i] if i < len(steps) else steps[0], sigma=meas.sigma,
        rho="estimate", iterations=6, dtype=torch.float64,
    ).fit(meas.data, inits[r] if i < len(steps) else start.estimate, prior,
          rho=None if i < len(steps) else start.rho)  # fmt: skip
    assert torch.equal(alone.estimate, best.estimate)
    assert engine.m_step is (steps[i] if i < len(steps) else steps[0])
    assert em.m_step is steps[0]  # the caller's engine is left as it was


def test_annealing_levels_need_a_denoise_m_step():
    with pytest.raises(ValueError, match="anneal levels .* need a Denoise M-step"):
        anneal_variants(mtd.Gradient(), [None])
    step = mtd.Gradient()
    assert anneal_variants(step, []) == [step]
