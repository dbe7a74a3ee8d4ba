"""The prior run's search: several schedules and starts, the best by log-likelihood + log-prior.

At low SNR EM is a local ascent and the basin it ends in depends on where its early iterations
look. The denoising M-step's annealing (``Denoise(anneal_from=1.0)``) hands the first iterations
to the prior at a coarse noise level: at SNR 1 that gives the digit's shape and place (error
0.084 against 0.290 without it on the main job), at SNR 0.05 it hands EM a generic digit that the
aligned noise then confirms ("Einstein from noise"), and the run ends far from the truth-started
basin although the posterior ranks that basin thousands of nats higher (measured at 640 copies:
the annealed run's log-likelihood + log-prior 2,500 nats below the truth-started fit's; without
annealing 97 nats below it, error up to a 3-pixel shift 0.17 against 0.92). No one
schedule suits every SNR, so the search runs the candidates and keeps the one the posterior
prefers: the configured M-step, the same M-step at other starting levels of its annealing, and
the configured M-step started from EM without the prior's estimate and rho (a prior weight
tempered from 0 to 1 in two stages). Each candidate is an ``ApproximateEM.fit`` with its
restarts, ranked as ``fit`` ranks restarts (log-likelihood + gamma * log-prior), so the search is
streamed as every fit is and costs one fit per candidate.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from mtd.em.loop import ApproximateEM, EMResult
from mtd.em.msteps import Denoise, MStep


def anneal_variants(m_step: MStep, levels) -> list[MStep]:
    """``m_step`` and copies of it with ``anneal_from`` set to each of ``levels`` (None: no
    annealing), those equal to the configured level left out.

    Raises:
        ValueError: levels given for an M-step that does not anneal (only ``Denoise`` does).
    """
    levels = list(levels)
    if not levels:
        return [m_step]
    if not isinstance(m_step, Denoise):
        raise ValueError(
            f"anneal levels {levels} need a Denoise M-step (its anneal_from), got "
            f"{type(m_step).__name__}: give no levels"
        )
    steps = [m_step]
    for level in levels:
        if any(s.anneal_from == level for s in steps):
            continue
        other = copy.copy(m_step)
        other.anneal_from = level
        steps.append(other)
    return steps


def search(
    em: ApproximateEM,
    data,
    init,
    prior,
    m_steps: list[MStep],
    start: EMResult | None = None,
    truth=None,
    callback=None,
    comm=None,
) -> tuple[ApproximateEM, EMResult]:
    """EM with ``prior`` from every candidate; the one of highest score.

    Args:
        em: the engine (its M-step is not used: each candidate brings its own).
        data, init, prior, truth, comm: as ``ApproximateEM.fit`` (``init``: the R restarts every
            M-step candidate runs).
        m_steps: the candidate M-steps, the configured one first (``anneal_variants``).
        start: an earlier fit (EM without the prior): one more candidate, the first M-step from
            its estimate, rho and sigma.
        callback: gets every iteration's history entry with ``candidate``, its index.

    Returns:
        (the engine of the best candidate: ``em`` with its M-step, to continue it (``refine``);
        its ``EMResult``, whose ``scores`` hold every candidate's restarts' scores in order (the
        M-steps' R each, then the start's one) and ``restart`` the index of the best among them).
    """
    runs = [(m, init, None, None) for m in m_steps]
    if start is not None:
        runs.append((m_steps[0], start.estimate[None], start.rho, start.sigma))
    best, scores = None, []
    for i, (m_step, x0, rho, sigma) in enumerate(runs):
        engine = copy.copy(em)  # (shares the group and the E-step; its own M-step)
        engine.m_step = m_step
        tagged = None if callback is None else (lambda e, i=i: callback({**e, "candidate": i}))
        res = engine.fit(data, x0, prior, truth, tagged, comm, rho=rho, sigma=sigma)
        offset = len(scores)
        scores.extend(res.scores.tolist())
        if float(res.scores.max()) > max(scores[:offset], default=-float("inf")):
            best = engine, dataclasses.replace(res, restart=offset + res.restart)
    best[1].scores = torch.tensor(scores, dtype=torch.float64)
    return best
