"""Posterior picking (``pick_posterior``): the patches' evidence combined into one score per copy
position (``combine="evidence"``), or Algorithm 2 per patch (``combine="nms"``)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from mtd.em.patches import PatchSource
from mtd.picking.options import PickingOptions
from mtd.picking.picks import (
    Picks,
    _draws_th_largest,
    _noise_micrographs,
    _peak_picks,
    concatenate,
    merge,
)
from mtd.picking.posteriors import (
    PatchPosteriors,
    _inputs,
    _np_dtype,
    copy_offset,
    noise_score,
    patch_origins,
    patch_posteriors,
    shift_of_offset,
)


def corner_log_odds(log_rho, L: int) -> float:
    """log q / (1 - q), q the prior probability that a given pixel is a copy's top-left corner.

    Under the patch model a patch holds a copy whose top-left corner lies inside it, at offset
    o in [0, L)^2 from the patch's, with probability rho(shift_of_offset(o)) (eq. 18 of the
    approximate-EM paper estimates rho); q is the mean of these over the L^2 offsets.
    """
    rho = torch.as_tensor(log_rho, dtype=torch.float64).exp().cpu()
    inside = torch.as_tensor(shift_of_offset(np.arange(L), L))
    q = float(rho[inside][:, inside].sum()) / (L * L)
    q = min(max(q, 1e-300), 1 - 1e-16)
    return math.log(q) - math.log1p(-q)


def copy_evidence(
    grid: torch.Tensor,
    templates: torch.Tensor,
    log_w: torch.Tensor,
    sigma2: float,
    log_odds: float = 0.0,
    block_bytes: int = 1 << 28,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The log posterior odds of "a copy with its top-left corner at c" for every c, from all
    the patches that copy touches.

    A copy of template k at corner c (grid coordinates, in (-L, N)^2) is seen by each patch m it
    touches at the shift l_m = ``shift_of_offset(c - origin_m)``. Patch m's log-likelihood ratio
    of that against a blank patch is, by eq. (10) of the approximate-EM paper,
    (<M_m, C T_l Z T_k x> - ||C T_l Z T_k x||^2 / 2) / sigma^2; the patches are disjoint and the
    noise white, so the patches' joint ratio is the sum over m, which is
    E_k(c) = (<Y, T_k placed at c> - ||the part of T_k inside the grid||^2 / 2) / sigma^2
    (tested against the E-step's own log-likelihoods). Algorithm 2 decides each patch alone, on
    the part of the copy that patch shows (a quarter, where a copy sits on a patch corner); this
    adds the patches' evidence up, a posterior-weighted vote in the log domain. The odds are
    log sum_k pi_k exp(E_k(c)) + ``log_odds`` (``corner_log_odds``). Computed by FFT over the
    zero-padded grid, ``block_bytes`` of spectra at a time.

    Args:
        grid: (N0, N1) the pixels that count: the patch grid (the patches' sum above), or a
            whole micrograph (``evidence_candidates``: its remainder strip too).
        templates: (K, L, L) T_k(x).
        log_w: (K,) log pi_k.
        sigma2: the noise variance.
        log_odds: the prior log odds of a copy's corner at a pixel.

    Returns:
        (score (N0 + L - 1, N1 + L - 1), best template (same shape, int64)): entry (i, j) is the
        corner (i - L + 1, j - L + 1), the centre (i - (L - 1) / 2, j - (L - 1) / 2).
    """
    N0, N1 = grid.shape
    K, L, _ = templates.shape
    P0, P1 = N0 + 2 * (L - 1), N1 + 2 * (L - 1)  # no corner's correlation wraps
    n0, n1 = N0 + L - 1, N1 + L - 1
    padded = torch.zeros(P0, P1, dtype=grid.dtype, device=grid.device)
    padded[L - 1 : L - 1 + N0, L - 1 : L - 1 + N1] = grid
    spectrum = torch.fft.rfft2(padded)
    # The part of the template inside the grid, from prefix sums of T_k^2: rows
    # [max(0, -c), min(L, N - c)) of a copy whose corner row is c.
    sq = torch.nn.functional.pad(templates.square().cumsum(1).cumsum(2), (1, 0, 1, 0))

    def bounds(n, N):
        c = torch.arange(n, device=grid.device) - (L - 1)
        return (-c).clamp(0, L), (N - c).clamp(0, L)

    (r0, r1), (c0, c1) = bounds(n0, N0), bounds(n1, N1)
    # About six arrays of a spectrum's size live per template (its padding, spectrum, product,
    # correlation, visible energy, logits).
    step = max(1, block_bytes // (6 * P0 * (P1 // 2 + 1) * 2 * grid.element_size()))
    top = torch.full((n0, n1), -math.inf, dtype=grid.dtype, device=grid.device)
    total = torch.zeros_like(top)
    best_k = torch.zeros(n0, n1, dtype=torch.int64, device=grid.device)
    for s in range(0, K, step):
        T = templates[s : s + step]
        G = torch.zeros(len(T), P0, P1, dtype=grid.dtype, device=grid.device)
        G[:, :L, :L] = T
        corr = torch.fft.irfft2(spectrum * torch.fft.rfft2(G).conj(), s=(P0, P1))[:, :n0, :n1]
        q = sq[s : s + step]
        seen = q[:, r1][:, :, c1] - q[:, r0][:, :, c1] - q[:, r1][:, :, c0] + q[:, r0][:, :, c0]
        e = (corr - seen / 2) / sigma2 + log_w[s : s + step].to(corr).view(-1, 1, 1)
        # A running log-sum-exp over the blocks; a block of zero-weight templates (-inf) adds 0.
        value, k = e.max(0)
        best_k = torch.where(value > top, k + s, best_k)
        new = torch.maximum(top, value)
        shift = torch.where(torch.isfinite(new), new, 0)
        total = total * (top - shift).exp() + (e - shift).exp().sum(0)
        top = new
    top = torch.where(torch.isfinite(top), top, 0)
    return top + total.log() + log_odds, best_k


def evidence_candidates(em, source, x, log_rho, sigma2: float, radius: float) -> Picks:
    """Every copy position's combined evidence (``copy_evidence``) as candidate picks: the
    local maxima among the corners of copies that lie inside their micrograph, of which one is
    kept among any whose centres lie within ``radius`` in both axes (default L - 1: the boxes
    of copies, which never overlap, are at least L apart).

    The evidence is taken over the whole micrograph, the strip beyond the patch grid included
    (the same likelihood there): a copy reaching into the strip is scored whole, and no
    candidate rests on a sliver (a few pixels of a template at an edge, which otherwise gave
    false picks: measured).
    """
    L = em.L
    x = torch.as_tensor(x, device=em.device, dtype=em.dtype)
    templates = em.group.templates(x).to(em.dtype)
    log_w = em.group.log_weights()
    log_odds = corner_log_odds(log_rho, L)
    parts = []
    mics = source.micrographs.tensors(source.dtype, source.device)
    for s, micrograph in enumerate(mics):
        score, best_k = copy_evidence(micrograph, templates, log_w, sigma2, log_odds)
        # Corners 0 .. N - L: entries L - 1 .. N - 1 of the map.
        N0, N1 = micrograph.shape
        score = score[L - 1 : N0, L - 1 : N1]
        best_k = best_k[L - 1 : N0, L - 1 : N1]
        parts.append(_peak_picks(score, best_k, max(1, int(radius)), s, source.names, L, em.group))
    return merge(concatenate(parts, list(source.names), L), radius, p=math.inf)


def evidence_noise_score(
    em, x, log_rho, sigma2: float, shape, radius: float, seed: int = 0, draws: int = 4
) -> float:
    """``noise_score`` for the combined evidence: the ``draws``-th largest candidate score of
    ``draws`` micrographs of pure white noise of ``shape`` (the data's micrographs' on
    average), drawn on the CPU from ``seed``."""

    noise = _noise_micrographs(shape, draws, seed, math.sqrt(sigma2))
    source = PatchSource(noise, em.L, em.dtype, em.device)
    found = evidence_candidates(em, source, x, log_rho, sigma2, radius).scores
    return _draws_th_largest(found, draws)


def pick_posterior(
    em, data, x, log_rho, sigma2: float, options: PickingOptions | None = None, seed: int = 0,
    **changes,
) -> tuple[Picks, PatchPosteriors]:  # fmt: skip
    """Particles from the EM posteriors (the stochastic-EM paper, Section IV-B), mapped back to
    their micrographs, and Algorithm 2's per-patch posteriors.

    ``combine="evidence"`` (the default): a copy is seen by up to four patches, and their
    evidence is added up (``copy_evidence``: the log posterior odds of a copy at each corner
    from every patch it touches, with rho's prior odds); candidates are its local maxima, one
    kept among any within ``merge_radius`` of each other in both axes (copies never overlap).
    Measured on MNIST micrographs (tests/benchmarks/bench_picking.py): with the true digit above
    template matching with it at low SNR (Algorithm 2 per patch, which sees a quarter of a copy
    on a patch corner, is below it).

    ``combine="nms"``: Algorithm 2 per patch (``_patch_candidates``).

    A candidate is selected when its score exceeds ``threshold``: 0 is the Bayes rule, "noise"
    (the default) the larger of 0 and the score that ``noise_draws`` micrographs of pure noise
    as large as those of ``data`` on average reach under the same estimate, rho and sigma (their
    ``noise_draws``-th largest: ``evidence_noise_score`` / ``noise_score``). The posteriors of a
    poor estimate are not calibrated (measured on another simulator's MNIST micrograph at SNR
    0.1, per patch: F1 0.71 at 0 and 0.88 at "noise"; unchanged where EM succeeds). The
    ``PatchPosteriors`` returned are those at ``empty_energy``, for the paper's patch-level
    measures (empty when the blank pairs hold at least half the mass).

    Args:
        em, data, x, log_rho, sigma2: as ``patch_posteriors``.
        options: ``PickingOptions`` (combine, empty_rule, empty_energy, detect_energy,
            merge_radius, threshold, noise_draws); None: the defaults. The merge radius defaults
            to L - 1: copies that do not overlap have centres at least L apart, so no two copies
            merge, while ("nms") the detections of a copy's slivers, whose shift along the cut
            is poorly determined at low SNR, do (L / 2 left such duplicates: measured in
            tests/benchmarks/bench_picking.py).
        seed: of the noise that sets the "noise" threshold.
        changes: fields of ``options`` to replace (``combine="nms"``, ``threshold=0.0``, ...).

    Returns:
        (the merged ``Picks``, best first; the per-patch ``PatchPosteriors``).
    """
    o = replace(options or PickingOptions(), **changes)
    if o.threshold == "auto":
        raise ValueError(
            "threshold must be a finite number or 'noise', got 'auto' (template only)"
        )
    L = em.L
    radius = L - 1 if o.merge_radius is None else float(o.merge_radius)
    data, x, log_rho = _inputs(em, data, x, log_rho, sigma2)
    post = patch_posteriors(em, data, x, log_rho, sigma2, o.empty_energy)
    draws = int(o.noise_draws)
    if o.combine == "evidence":
        picks = evidence_candidates(em, data.source, x, log_rho, sigma2, radius)

        def noise() -> float:
            shape = data.source.micrographs.mean_shape()
            return evidence_noise_score(em, x, log_rho, sigma2, shape, radius, seed, draws)

    else:
        seen = post
        if o.detect_energy != o.empty_energy:
            seen = patch_posteriors(em, data, x, log_rho, sigma2, o.detect_energy)
        picks = merge(_patch_candidates(em, data, seen, o.empty_rule), radius)

        def noise() -> float:
            per_micrograph = max(1, round(data.D / len(data.source.names)))
            return noise_score(
                em, x, log_rho, sigma2, per_micrograph, o.empty_rule, o.detect_energy, seed,
                draws,
            )  # fmt: skip

    level = max(0.0, noise()) if o.threshold == "noise" else float(o.threshold)
    picks.selected = picks.scores > level
    picks.info = {"method": "posterior", "combine": o.combine, "threshold": level}
    if o.combine == "nms":
        picks.info["empty_rule"] = o.empty_rule
    return picks, post


def _patch_candidates(em, data, seen: PatchPosteriors, empty_rule: str) -> Picks:
    """Algorithm 2 per patch: every patch's candidate, unmerged.

    The centre of the copy at the patch's best shift l* among the (template, shift) pairs that
    show more than ``detect_energy`` of the template's energy (``seen`` is the posteriors at that
    level), the best template's pose there, and the score ``PatchPosteriors.score(empty_rule)``.
    Every copy shows at least a quarter of its energy in one of the (at most four) patches it
    touches, so the default 0.2 loses no copy, while the many faint slivers (a few per cent of a
    copy, which rho cannot tell from empty shifts at low SNR and which made noise patches look
    occupied: measured) no longer count as detections. Equal scores, e.g. saturated ones at high
    SNR, are ranked by p(l* | I), the sharpest localisation first.
    """
    L = em.L
    mic, origin = patch_origins(data.source)
    poses = em.group.poses()
    k = seen.template
    return Picks(
        centres=(origin + copy_offset(seen.shift, L) + (L - 1) / 2).astype(np.float64),
        scores=seen.score(empty_rule, _np_dtype(em.dtype)),
        selected=np.zeros(data.D, dtype=bool),
        micrograph=mic,
        names=list(data.source.names),
        angles=np.full(len(k), np.nan) if poses.angles is None else poses.angles[k],
        mirrored=poses.mirrored[k],
        templates=k,
        patches=np.arange(data.D),
        L=L,
        prob=seen.shift_prob,
    )
