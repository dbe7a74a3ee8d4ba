"""Particle picking from the EM posteriors (stochastic-EM paper, Section IV-B, Algorithm 2), the
template-matching baseline, and the picking metrics of the field.

**Where a copy lies in its patch.** The patch model (DESIGN section 4) is
``M_m = C T_l Z T_k(x)``: patch pixel (i, j) holds ``(Z T_k x)[(i + l_x) mod 2L, (j + l_y) mod
2L]``, the template sitting in the top-left L x L corner of the 2L x 2L padding. Template row a
therefore lands on patch row (a - l_x) mod 2L, which is inside the patch (< L) only along one
unwrapped placement: for l_x < L the template's top row sits at -l_x (above the patch, the copy
cut by the patch's top border when l_x > 0), for l_x > L at 2L - l_x (inside, cut by the bottom
border); l_x = L leaves the patch empty. The same for columns with l_y. So a copy whose top-left
corner is at ``o`` (in (-L, L)^2) relative to its patch's has shift ``l = -o mod 2L``
(``copy_offset`` / ``shift_of_offset``), and its centre is ``patch origin + o + (L - 1) / 2``
(templates are rotated about ((L - 1) / 2, (L - 1) / 2), so rotation does not move the centre).

**Algorithm 2.** For every patch the posterior of (l, k) (eq. 23 of the stochastic-EM paper) is
summed over the templates to p(l | I_m, x), and the picked shift is its arg max over all
l in {0..2L-1}^2, the empty shifts included: the patch is empty when an all-padding shift wins.
``patch_posteriors`` streams the E-step's posteriors (``EStep.posteriors``) into per-patch
summaries without storing any of them. Taken literally (``empty_rule="argmax"``) the rule fails
for an image with an empty border, such as an MNIST digit: the many shifts that show only its
zero border explain a noise patch exactly as well as the 4L - 1 all-padding shifts, and one of
them nearly always beats each all-padding shift (measured with the true digit: empty-patch F1
0.0 at SNR 10, 1 and 0.3, where declaring every patch empty scores 0.75).
So (template, shift) pairs whose crop carries at most a share ``empty_energy`` (5%) of the
template's energy count as *blank* (for an image that fills its frame: the all-padding shifts),
and by default (``empty_rule="half"``) a patch is empty when the blank pairs hold at least half
the posterior mass: the Bayes decision between "empty" and "shows a copy". The scores are log
posterior ratios (``PatchPosteriors.score``), > 0 exactly when the rule says "not empty";
probabilities are floored at the dtype's smallest normal number, so scores saturate at about
+-708 (float64) or +-87 (float32).

**Picks combine the patches** (``pick_posterior``, ``combine="evidence"``, the default). A copy
cut by patch borders is seen by up to four patches, each showing part of it (a quarter, where the
copy sits on a patch corner). Their log-likelihood ratios against a blank patch (eq. 10 of the
approximate-EM paper) add up, because the patches are disjoint and the noise white, to the
ratio of the whole copy (``copy_evidence``); with rho's prior odds of a copy's corner at a pixel
(``corner_log_odds``) and the sum over templates this is the log posterior odds of "a copy at
corner c", a posterior-weighted vote in the log domain. The candidates are its local maxima, one
kept among any whose L x L boxes overlap (copies never overlap). A pick's score must also beat
what micrographs of pure noise give under the same estimate, rho and sigma
(``evidence_noise_score``, the default ``threshold="noise"``): the posteriors of a poor estimate
are not calibrated.

``combine="nms"`` is Algorithm 2 per patch: the rule above at a higher level, ``detect_energy`` (a
fifth of a copy): faint slivers, which rho cannot tell from empty shifts at low SNR, otherwise
made noise patches look occupied; the noise threshold there is ``noise_score``. The patches'
candidates of one copy, which give the same centre at high SNR, are merged: ``merge`` keeps,
among candidates within ``radius`` (default L - 1: copies that do not overlap are at least L
apart) of each other in one micrograph, the one with the highest score (non-maximum
suppression).

**Template matching** (``template_match``), the standard baseline: the normalised
cross-correlation (NCC) of the micrograph with the K templates of a given image (the group's
``templates``, so any object the engine estimates), its maximum over the templates per position,
and greedy peak picking with a minimum distance; the operating point, like the posterior
picker's, the score that micrographs of white noise as large reach.

**Metrics.** The stochastic-EM paper's two (eq. 39: the F1 score of empty-patch detection, empty
patches the positives, beside the always-empty classifier's; and the share of at least
half-occupied patches whose shift is found within one pixel in each axis), and micrograph-level
precision, recall and F1 by one-to-one (Hungarian) matching of picks to true centres within a
radius, with the precision-recall curve over the score and its area (average precision), as
Topaz computes them (Bepler et al., Nature Methods 16, 2019: ``topaz.algorithms.
match_coordinates`` and ``topaz.metrics.average_precision``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from mtd.estep import Patches, empty_shifts
from mtd.group import TransformSet
from mtd.likelihood import template_energy
from mtd.threads import limit_threads

EMPTY_RULES = ("half", "argmax", "mass")
COMBINE = ("evidence", "nms")
STAR_COLUMNS = ("rlnCoordinateX", "rlnCoordinateY", "rlnAnglePsi", "rlnAutopickFigureOfMerit")


# ------------------------------------------------------------------------------------------------
# Geometry: shifts, offsets, patch origins
# ------------------------------------------------------------------------------------------------
def copy_offset(shift, L: int):
    """Top-left corner of the copy relative to its patch's for shifts l (l != L), elementwise.

    ``-l`` for l < L, ``2L - l`` for l > L (module doc): in (-L, L).
    """
    return np.where(np.asarray(shift) < L, -np.asarray(shift), 2 * L - np.asarray(shift))


def shift_of_offset(offset, L: int):
    """The shift l in {0..2L-1} that puts a copy's top-left corner at ``offset`` in (-L, L)."""
    return np.mod(-np.asarray(offset), 2 * L)


def patch_origins(source, index=None) -> tuple[np.ndarray, np.ndarray]:
    """Micrograph and top-left pixel (row, column) of patches of a ``PatchSource``.

    Patches are numbered micrograph after micrograph, each row-major over its (N0 // L, N1 // L)
    grid (``mtd.patches``), so this is exact for streamed multi-file data too.

    Args:
        source: the ``PatchSource`` (``Patches.source``).
        index: (n,) patch indices; None for all D.

    Returns:
        (micrograph (n,) int64, origin (n, 2) int64).
    """
    index = np.arange(source.D) if index is None else np.asarray(index, dtype=np.int64)
    offsets = np.asarray(source.offsets, dtype=np.int64)
    mic = np.searchsorted(offsets, index, side="right") - 1
    local = index - offsets[mic]
    cols = np.array([g[1] for g in source.grid], dtype=np.int64)[mic]
    origin = np.stack([local // cols, local % cols], 1) * source.L
    return mic.astype(np.int64), origin.astype(np.int64)


def template_angles(group: TransformSet) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The in-plane angle (radians, counter-clockwise as ``mtd.simulate``) and mirror flag of each
    template of ``group``, or (None, None) where the group has no such reading.

    ``Rotations``: 2 pi k / K; ``Dihedral``: templates K + k are R_k of the mirror image;
    ``Steerable``: 2 pi k / K. Another group may define ``template_angles()`` returning (K,)
    angles (and optionally the mirror flags); otherwise picks carry the template index only.
    """
    from mtd.rotations import Dihedral, Rotations
    from mtd.steerable import Steerable

    K = group.K
    k = np.arange(K)
    if isinstance(group, (Rotations, Dihedral)):
        r = int(group.rotations)
        return 2 * math.pi * (k % r) / r, k >= r
    if isinstance(group, Steerable):
        return 2 * math.pi * k / K, np.zeros(K, dtype=bool)
    own = getattr(group, "template_angles", None)
    if callable(own):
        out = own()
        angles, mirrored = out if isinstance(out, tuple) else (out, None)
        angles = np.asarray(torch.as_tensor(angles).cpu(), dtype=np.float64)
        if mirrored is None:
            mirrored = np.zeros(K, dtype=bool)
        return angles, np.asarray(mirrored, dtype=bool)
    return None, None


# ------------------------------------------------------------------------------------------------
# Per-patch posteriors (Algorithm 2)
# ------------------------------------------------------------------------------------------------
@dataclass
class PatchPosteriors:
    """Per-patch summaries of p(l, k | I_m, x) for picking (float64 / int64 on the CPU).

    "Blank" (l, k) pairs are those whose crop C T_l Z T_k(x) carries at most ``empty_energy`` of
    the template's energy: the all-padding shifts (l_x = L or l_y = L), and for an image with an
    empty border (an MNIST digit) also the shifts that show only that border, which explain a
    patch exactly as well as an empty one does.

    Attributes:
        loglik: (D,) log p(I_m | x, rho, sigma).
        empty: (D,) posterior mass of the all-padding shifts.
        empty_max: (D,) the largest posterior probability of a single all-padding shift.
        blank: (D,) posterior mass of the blank (l, k) pairs (``empty`` included).
        occupied: (D,) the rest: the probability that the patch shows a copy.
        shift: (D, 2) l*, the arg max over l of sum_k p(l, k | I_m, x) over non-blank pairs.
        shift_prob: (D,) that sum at l*.
        template: (D,) the most probable non-blank template at l*.
        template_prob: (D,) its probability given l* (among non-blank pairs).
    """

    loglik: np.ndarray
    empty: np.ndarray
    empty_max: np.ndarray
    blank: np.ndarray
    occupied: np.ndarray
    shift: np.ndarray
    shift_prob: np.ndarray
    template: np.ndarray
    template_prob: np.ndarray

    def score(self, empty_rule: str = "half", dtype=np.float64) -> np.ndarray:
        """(D,) the log posterior ratio that decides ``empty_rule`` (> 0: not empty).

        "half": log occupied - log blank (the patch shows a copy with probability > 1/2);
        "argmax": log p(l*) - log max_{l all-padding} p(l) (Algorithm 2's comparison of single
        shifts, with l* the best non-blank shift: over every shift that is not all-padding, as
        written, no patch of a digit would be empty); "mass": log p(l*) - log(all-padding
        mass).
        """
        check_empty_rule(empty_rule)
        tiny = np.finfo(dtype).tiny
        top, bottom = {
            "half": (self.occupied, self.blank),
            "argmax": (self.shift_prob, self.empty_max),
            "mass": (self.shift_prob, self.empty),
        }[empty_rule]
        return np.log(np.maximum(top, tiny)) - np.log(np.maximum(bottom, tiny))


def check_empty_rule(empty_rule: str) -> None:
    if empty_rule not in EMPTY_RULES:
        raise ValueError(f"empty_rule must be one of {EMPTY_RULES}, got {empty_rule!r}")


def blank_pairs(em, x: torch.Tensor, empty_energy: float) -> torch.Tensor:
    """(K, 2L, 2L) bool: the (template, shift) pairs whose crop carries at most ``empty_energy``
    of the template's energy (the all-padding shifts always)."""
    if not (math.isfinite(empty_energy) and 0 <= empty_energy < 1):
        raise ValueError(f"the energy share must be in [0, 1), got {empty_energy!r}")
    L = em.L
    G = em.estep.padded(x)  # (K, 2L, 2L): the templates of the engine's own E-step
    visible = template_energy(G, L)  # ||C T_l G_k||^2
    total = G.square().sum((1, 2)).view(-1, 1, 1)
    # A relative 1e-9 absorbs the FFT's rounding where the crop is exactly zero.
    blank = visible <= total * max(empty_energy, 1e-9)
    return blank | empty_shifts(L, G.device)


class _PickingSummary:
    """Consumer of ``EStep.posteriors``: per-patch ``PatchPosteriors``, (D,)-sized arrays only.

    A chunk's template blocks arrive one after another (first .. last); the consumer keeps the
    chunk's running marginals over the templates and, per shift, the best non-blank template.
    """

    def __init__(self, L: int, D: int, blank: torch.Tensor):
        device = blank.device
        self.L, self.P, self.blank = L, 2 * L, blank
        self.empty_mask = empty_shifts(L, device)
        names = ("loglik", "empty", "empty_max", "blank", "occupied", "shift_prob")
        self.out = {n: torch.zeros(D, dtype=torch.float64, device=device) for n in names}
        self.out["template_prob"] = torch.zeros(D, dtype=torch.float64, device=device)
        self.out["shift"] = torch.zeros(D, 2, dtype=torch.int64, device=device)
        self.out["template"] = torch.zeros(D, dtype=torch.int64, device=device)
        self._run = None

    def add(self, post, energy) -> None:
        w = post.weights()  # (B, k, 2L, 2L), normalised over all templates and shifts
        blank = self.blank[post.block]
        seen = w.masked_fill(blank, 0)
        best, best_k = w.masked_fill(blank, -1.0).max(1)
        part = {
            "all": w.sum(1),  # p(l | I) of the block
            "seen": seen.sum(1),  # its non-blank part
            "blank": (w.sum((1, 2, 3)) - seen.sum((1, 2, 3))).clamp(min=0),
            "best": best,
            "best_k": best_k + post.block.start,
        }
        if post.first:
            self._run = part
        else:
            run = self._run
            for name in ("all", "seen", "blank"):
                run[name] = run[name] + part[name]
            better = part["best"] > run["best"]
            run["best"] = torch.where(better, part["best"], run["best"])
            run["best_k"] = torch.where(better, part["best_k"], run["best_k"])
        if post.last:
            self._finish(post)

    def _finish(self, post) -> None:
        P, index, run = self.P, post.index, self._run
        seen = run["seen"]
        prob, flat = seen.reshape(len(seen), -1).max(1)  # l*: the best non-blank shift
        rows = torch.arange(len(seen), device=seen.device)
        lx, ly = flat // P, flat % P
        tiny = torch.finfo(prob.dtype).tiny
        o, f64 = self.out, torch.float64
        o["loglik"][index] = post.loglik.to(f64)
        o["empty"][index] = run["all"][:, self.empty_mask].sum(1).to(f64)
        o["empty_max"][index] = run["all"][:, self.empty_mask].amax(1).to(f64)
        o["blank"][index] = run["blank"].to(f64)
        o["occupied"][index] = seen.sum((1, 2)).to(f64)
        o["shift"][index] = torch.stack([lx, ly], 1)
        o["shift_prob"][index] = prob.to(f64)
        o["template"][index] = run["best_k"][rows, lx, ly]
        joint = run["best"][rows, lx, ly].clamp(min=0)
        o["template_prob"][index] = (joint / prob.clamp(min=tiny)).to(f64)

    def result(self) -> PatchPosteriors:
        return PatchPosteriors(**{k: v.cpu().numpy() for k, v in self.out.items()})


def _inputs(em, data, x, log_rho, sigma2):
    """The prepared patches and (x, log rho) on the engine's device and dtype, checked."""
    shape = tuple(em.group.shape)
    x = torch.as_tensor(x, device=em.device, dtype=em.dtype)
    if tuple(x.shape) != shape:
        raise ValueError(
            f"estimate has shape {tuple(x.shape)}; the group {type(em.group).__name__} (L = "
            f"{em.L}) needs {shape}"
        )
    if not torch.isfinite(x).all():
        raise ValueError("estimate has non-finite values")
    L = em.L
    log_rho = torch.as_tensor(log_rho, device=em.device, dtype=em.dtype)
    if tuple(log_rho.shape) != (2 * L, 2 * L):
        raise ValueError(f"log_rho must be ({2 * L}, {2 * L}), got {tuple(log_rho.shape)}")
    if not (math.isfinite(sigma2) and sigma2 > 0):
        raise ValueError(f"sigma2 must be a finite number > 0, got {sigma2!r}")
    data = data if isinstance(data, Patches) else em.prepare(data)
    return data, x, log_rho


def patch_posteriors(
    em, data, x, log_rho, sigma2: float, empty_energy: float = 0.05
) -> PatchPosteriors:
    """Algorithm 2's per-patch quantities, streamed from the E-step (nothing stores all w).

    Args:
        em: an ``mtd.ApproximateEM`` (its group, device, dtype and compute options).
        data: a measurement, path(s), or what ``em.prepare`` returned for them.
        x: the estimate (the group's ``shape``).
        log_rho: (2L, 2L) log of the shift distribution (``EMResult.rho.log()``).
        sigma2: the noise variance.
        empty_energy: (template, shift) pairs whose crop carries at most this share of the
            template's energy count as blank (``PatchPosteriors``).

    Returns:
        ``PatchPosteriors``.
    """
    data, x, log_rho = _inputs(em, data, x, log_rho, sigma2)
    summary = _PickingSummary(em.L, data.D, blank_pairs(em, x, empty_energy))
    with limit_threads(em.estep.threads(data.D)):
        for post, energy in em.estep.posteriors(data, x, log_rho, sigma2):
            summary.add(post, energy)
    return summary.result()


def fit_rho_sigma(
    em, data, x, sigma: float | None = None, rho: str = "estimate", iterations: int = 10
) -> tuple[torch.Tensor, float]:
    """rho (eq. 18 of the approximate-EM paper) and sigma^2 by EM with the estimate x held fixed.

    For picking with an estimate made elsewhere: the E-step at (x, rho, sigma), then the M-step's
    updates of rho and sigma^2 only (x stays), ``iterations`` times from a uniform rho and the
    patches' mean power (an upper bound on sigma^2), as ``ApproximateEM`` starts.

    Args:
        sigma: the noise level if known (then only rho is updated).
        rho: "estimate" or "uniform" (kept uniform).

    Returns:
        (log rho (2L, 2L), sigma^2).
    """
    if rho not in ("estimate", "uniform"):
        raise ValueError(f"rho must be 'estimate' or 'uniform', got {rho!r}")
    if int(iterations) != iterations or iterations < 0:
        raise ValueError(f"iterations must be an integer >= 0, got {iterations!r}")
    L = em.L
    data, x, log_rho = _inputs(em, data, x, torch.zeros(2 * L, 2 * L), 1.0)
    log_rho = torch.full_like(log_rho, -math.log(4 * L * L))
    if sigma is not None:
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
        sigma2 = float(sigma) ** 2
    else:
        sigma2 = max(float(data.energy.sum()) / (data.D * L * L), 1e-12)
    for _ in range(int(iterations)):
        stats = em.e_step(data, x, log_rho, sigma2)
        if rho == "estimate":
            log_rho = (stats.omega.sum(0) / stats.D).log()
        if sigma is None:
            sigma2 = max(float(em.residual(stats, x)) / (stats.D * L * L), 1e-12)
    return log_rho, sigma2


# ------------------------------------------------------------------------------------------------
# Picks
# ------------------------------------------------------------------------------------------------
@dataclass
class Picks:
    """Candidate particles of one picker (``order`` sorts them best first).

    Attributes:
        centres: (n, 2) float64 particle centres (row, column) in pixels of their micrograph.
        scores: (n,) float64 the picker's score (higher: more confident).
        selected: (n,) bool the picks at the picker's operating point (the rest are candidates
            kept for the precision-recall curve).
        micrograph: (n,) int64 index into ``names``.
        names: the micrographs' names (paths for files).
        angles: (n,) float64 in-plane angle in radians (NaN where the group has none).
        mirrored: (n,) bool the mirror image was picked (``Dihedral``).
        templates: (n,) int64 the template index.
        patches: (n,) int64 the patch a posterior pick comes from (-1 for template matching).
        L: the particle (template) side.
        prob: (n,) float64 the tie-break of equal scores (higher first), or None.
        info: how the picks were made.
    """

    centres: np.ndarray
    scores: np.ndarray
    selected: np.ndarray
    micrograph: np.ndarray
    names: list
    angles: np.ndarray
    mirrored: np.ndarray
    templates: np.ndarray
    patches: np.ndarray
    L: int
    prob: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.scores)

    def take(self, index) -> Picks:
        """The picks at ``index`` (a bool mask or integer indices)."""
        arrays = ("centres", "scores", "selected", "micrograph", "angles", "mirrored")
        arrays += ("templates", "patches") + (() if self.prob is None else ("prob",))
        return replace(self, **{a: getattr(self, a)[index] for a in arrays})

    def picked(self) -> Picks:
        """The selected picks only."""
        return self.take(self.selected)

    def order(self) -> Picks:
        """Sorted by score, highest first, then by ``prob`` (stable)."""
        if self.prob is None:
            return self.take(np.argsort(-self.scores, kind="stable"))
        return self.take(np.lexsort((-self.prob, -self.scores)))


def merge(picks: Picks, radius: float, p: float = 2) -> Picks:
    """Non-maximum suppression per micrograph: a candidate within ``radius`` (<=, in the
    Minkowski ``p``-norm: 2 Euclidean, inf the larger of the row and column distances) of a
    higher-scored kept one is dropped; ties keep the earlier one. Returns the kept, best first.
    """
    from scipy.spatial import cKDTree

    if not radius >= 0:
        raise ValueError(f"radius must be >= 0, got {radius!r}")
    picks = picks.order()
    keep = np.zeros(len(picks), dtype=bool)
    for s in np.unique(picks.micrograph):
        idx = np.flatnonzero(picks.micrograph == s)
        tree = cKDTree(picks.centres[idx])
        gone = np.zeros(len(idx), dtype=bool)
        for j in range(len(idx)):
            if gone[j]:
                continue
            keep[idx[j]] = True
            gone[tree.query_ball_point(picks.centres[idx[j]], r=radius, p=p)] = True
    return picks.take(keep)


def noise_score(
    em,
    x,
    log_rho,
    sigma2: float,
    patches: int,
    empty_rule: str = "half",
    detect_energy: float = 0.2,
    seed: int = 0,
    draws: int = 4,
    block: int = 64,
) -> float:
    """The largest pick score a micrograph of ``patches`` patches of pure white noise gives.

    The threshold of ``pick_posterior(combine="nms")``: a score above it is one a
    micrograph of pure noise with as many patches would not give on average. The posteriors of
    a poor estimate are not calibrated (measured: at SNR 0.1 and 0.05 the Bayes rule, score > 0,
    picked 1.7 and 2.3 times as many patches as there were copies), so the scores' own
    behaviour on noise, under the same estimate, rho and sigma, sets the operating point. The
    largest of one noise micrograph's scores varies much from draw to draw (0 to 4 false picks
    on five pure-noise micrographs), so ``draws`` micrographs' worth of noise patches are scored
    and the ``draws``-th largest returned (a quantile at 1 - 1 / patches). The noise is drawn on
    the CPU from ``seed`` (the same threshold on every device) in micrographs of at most
    ``block`` x ``block`` patches, so memory stays that of one E-step chunk; the cost is
    ``draws`` E-step passes over as many patches.

    Returns:
        That score (``PatchPosteriors.score`` at ``detect_energy``).
    """
    for name, value in (("patches", patches), ("draws", draws), ("block", block)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    L, draws = em.L, int(draws)
    left, top = int(patches) * draws, np.empty(0)
    gen = torch.Generator().manual_seed(int(seed))
    std = math.sqrt(sigma2)
    while left > 0:
        rows = min(block, math.ceil(left / block))
        cols = min(block, left) if rows == 1 else block
        noise = torch.randn(rows * L, cols * L, generator=gen, dtype=torch.float64) * std
        post = patch_posteriors(em, noise.to(em.dtype), x, log_rho, sigma2, detect_energy)
        score = post.score(empty_rule, _np_dtype(em.dtype))[: min(left, rows * cols)]
        top = np.sort(np.concatenate([top, score]))[-draws:]  # the draws largest so far
        left -= rows * cols
    return float(top[0])


# ------------------------------------------------------------------------------------------------
# The patches' evidence combined: one score per copy position
# ------------------------------------------------------------------------------------------------
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


def _peak_picks(score, best_k, r: int, s: int, names: list, L: int, group) -> Picks:
    """The local maxima of a score map over (2r + 1)^2 windows as candidate ``Picks`` of
    micrograph ``s``, best first (stable); entry (i, j) of the map is the copy whose top-left
    corner is (i, j), ``best_k`` its template."""
    pooled = torch.nn.functional.max_pool2d(score[None, None], 2 * r + 1, 1, r)[0, 0]
    peak = torch.nonzero(score >= pooled)
    val = score[peak[:, 0], peak[:, 1]]
    order = torch.argsort(val, descending=True, stable=True)
    peak, val = peak[order].cpu().numpy(), val[order].cpu().numpy().astype(np.float64)
    k = best_k.cpu().numpy()[peak[:, 0], peak[:, 1]].astype(np.int64)
    angles, mirrored = template_angles(group)
    n = len(val)
    return Picks(
        centres=peak.astype(np.float64) + (L - 1) / 2,
        scores=val,
        selected=np.zeros(n, dtype=bool),
        micrograph=np.full(n, s, dtype=np.int64),
        names=list(names),
        angles=np.full(n, np.nan) if angles is None else angles[k],
        mirrored=np.zeros(n, dtype=bool) if mirrored is None else mirrored[k],
        templates=k,
        patches=np.full(n, -1, dtype=np.int64),
        L=L,
    )


def _micrographs(source):
    """(index, micrograph as a tensor in the source's dtype and device) of a ``PatchSource``."""
    for s, array in enumerate(source.arrays):
        m = array if torch.is_tensor(array) else torch.from_numpy(np.array(array))
        yield s, m.to(device=source.device, dtype=source.dtype)


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
    for s, micrograph in _micrographs(source):
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
    from mtd.patches import PatchSource

    noise = _noise_micrographs(shape, draws, seed, math.sqrt(sigma2))
    source = PatchSource(noise, em.L, em.dtype, em.device)
    found = evidence_candidates(em, source, x, log_rho, sigma2, radius).scores
    return _draws_th_largest(found, draws)


def _mean_shape(arrays) -> tuple[int, int]:
    """The micrographs' mean shape, rounded: the size of the noise micrographs of a threshold."""
    return tuple(round(float(np.mean([a.shape[i] for a in arrays]))) for i in (0, 1))


def _noise_micrographs(shape, draws: int, seed: int, std: float = 1.0) -> list[torch.Tensor]:
    """``draws`` micrographs of white noise of ``shape``, float64, drawn on the CPU from
    ``seed`` (the same threshold on every device)."""
    gen = torch.Generator().manual_seed(int(seed))
    return [torch.randn(*shape, generator=gen, dtype=torch.float64) * std for _ in range(draws)]


def _draws_th_largest(scores: np.ndarray, draws: int) -> float:
    """The ``draws``-th largest of ``draws`` noise micrographs' candidate scores (fewer
    candidates: the largest; none: +inf, nothing selected)."""
    if len(scores) == 0:
        return math.inf
    return float(np.sort(scores)[-min(int(draws), len(scores))])


def pick_posterior(
    em,
    data,
    x,
    log_rho,
    sigma2: float,
    empty_rule: str = "half",
    radius: float | None = None,
    threshold: float | str = "noise",
    empty_energy: float = 0.05,
    detect_energy: float = 0.2,
    seed: int = 0,
    noise_draws: int = 4,
    combine: str = "evidence",
) -> tuple[Picks, PatchPosteriors]:
    """Particles from the EM posteriors (the stochastic-EM paper, Section IV-B), mapped back to
    their micrographs, and Algorithm 2's per-patch posteriors.

    ``combine="evidence"`` (the default): a copy is seen by up to four patches, and their
    evidence is added up (``copy_evidence``: the log posterior odds of a copy at each corner
    from every patch it touches, with rho's prior odds); candidates are its local maxima, one
    kept among any within ``radius`` of each other in both axes (copies never overlap). Measured
    on MNIST micrographs (tests/benchmarks/bench_picking.py): with the true digit above template
    matching with it at low SNR (Algorithm 2 per patch, which sees a quarter of a copy on a
    patch corner, is below it).

    ``combine="nms"``: Algorithm 2 per patch. Every patch gives one candidate: the centre of
    the copy at its best shift l* among the (template, shift) pairs that show more than
    ``detect_energy`` of the template's energy, the best template's angle there, and the score
    ``PatchPosteriors.score(empty_rule)`` at that level. Every copy shows at least a quarter of
    its energy in one of the (at most four) patches it touches, so the default 0.2 loses no
    copy, while the many faint slivers (a few per cent of a copy, which rho cannot tell from
    empty shifts at low SNR and which made noise patches look occupied: measured) no longer
    count as detections. Candidates of one copy seen by several patches are merged (``merge``
    within ``radius``, Euclidean; equal scores, e.g. saturated ones at high SNR, are ranked by
    p(l* | I), the sharpest localisation first).

    A candidate is selected when its score exceeds ``threshold``: 0 is the Bayes rule, "noise"
    (the default) the larger of 0 and the score that ``noise_draws`` micrographs of pure noise
    as large as those of ``data`` on average reach under the same estimate, rho and sigma (their
    ``noise_draws``-th largest: ``evidence_noise_score`` / ``noise_score``). The posteriors of a
    poor estimate are not calibrated (measured on another simulator's MNIST micrograph at SNR
    0.1, per patch: F1 0.71 at 0 and 0.88 at "noise"; unchanged where EM succeeds). The
    ``PatchPosteriors`` returned are those at ``empty_energy``, for the paper's patch-level
    measures (empty when the blank pairs hold at least half the mass).

    Args:
        em, data, x, log_rho, sigma2, empty_energy: as ``patch_posteriors``.
        detect_energy: "nms": the share of a copy's energy a patch must show to count as a
            detection.
        empty_rule: of the per-patch posteriors: "half" (default: the blank pairs hold at least
            half the posterior mass), "argmax" (Algorithm 2's arg max of p(l | I) over single
            shifts, an all-padding shift against the best non-blank one) or "mass" (the
            all-padding mass against p(l* | I)). See ``PatchPosteriors.score``.
        radius: of the merge, default L - 1: copies that do not overlap have centres at least L
            apart, so no two copies merge, while ("nms") the detections of a copy's slivers,
            whose shift along the cut is poorly determined at low SNR, do (L / 2 left such
            duplicates: measured in tests/benchmarks/bench_picking.py).
        threshold: on the score for the operating point: a number, or "noise" (above).
        seed, noise_draws: of the noise that sets the "noise" threshold.
        combine: "evidence" or "nms" (above).

    Returns:
        (the merged ``Picks``, best first; the per-patch ``PatchPosteriors``).
    """
    check_empty_rule(empty_rule)
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
    number = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
    if not (threshold == "noise" or (number and math.isfinite(threshold))):
        raise ValueError(f"threshold must be a finite number or 'noise', got {threshold!r}")
    if int(noise_draws) != noise_draws or noise_draws < 1:
        raise ValueError(f"noise_draws must be an integer >= 1, got {noise_draws!r}")
    L = em.L
    radius = L - 1 if radius is None else float(radius)
    if not radius >= 0:
        raise ValueError(f"radius must be >= 0, got {radius!r}")
    data, x, log_rho = _inputs(em, data, x, log_rho, sigma2)
    post = patch_posteriors(em, data, x, log_rho, sigma2, empty_energy)
    if combine == "evidence":
        picks = evidence_candidates(em, data.source, x, log_rho, sigma2, radius)

        def noise() -> float:
            shape = _mean_shape(data.source.arrays)
            draws = int(noise_draws)
            return evidence_noise_score(em, x, log_rho, sigma2, shape, radius, seed, draws)

    else:
        seen = post
        if detect_energy != empty_energy:
            seen = patch_posteriors(em, data, x, log_rho, sigma2, detect_energy)
        mic, origin = patch_origins(data.source)
        angles, mirrored = template_angles(em.group)
        k = seen.template
        picks = Picks(
            centres=(origin + copy_offset(seen.shift, L) + (L - 1) / 2).astype(np.float64),
            scores=seen.score(empty_rule, _np_dtype(em.dtype)),
            selected=np.zeros(data.D, dtype=bool),
            micrograph=mic,
            names=list(data.source.names),
            angles=np.full(len(k), np.nan) if angles is None else angles[k],
            mirrored=np.zeros(len(k), dtype=bool) if mirrored is None else mirrored[k],
            templates=k,
            patches=np.arange(data.D),
            L=L,
            prob=seen.shift_prob,
        )
        picks = merge(picks, radius)

        def noise() -> float:
            per_micrograph = max(1, round(data.D / len(data.source.names)))
            return noise_score(
                em, x, log_rho, sigma2, per_micrograph, empty_rule, detect_energy, seed,
                noise_draws,
            )  # fmt: skip

    level = max(0.0, noise()) if threshold == "noise" else float(threshold)
    picks.selected = picks.scores > level
    picks.info = {"method": "posterior", "combine": combine, "threshold": level}
    if combine == "nms":
        picks.info["empty_rule"] = empty_rule
    return picks, post


def _np_dtype(dtype: torch.dtype):
    return np.float32 if dtype in (torch.float32, torch.float16, torch.bfloat16) else np.float64


# ------------------------------------------------------------------------------------------------
# Template matching (the baseline)
# ------------------------------------------------------------------------------------------------
def _as_micrographs(data) -> tuple[list, list[str]]:
    """Micrographs (tensors or memory-mapped arrays) and their names, as ``PatchSource``."""
    from mtd.measurement import open_micrograph

    items = list(data) if isinstance(data, (list, tuple)) else [data]
    arrays, names = [], []
    for i, item in enumerate(items):
        if isinstance(item, (str, Path)):
            arrays.append(open_micrograph(item))
            names.append(str(item))
        else:
            arrays.append(item)
            names.append(f"micrograph {i}")
    return arrays, names


def normalised_cross_correlation(
    micrograph: torch.Tensor, templates: torch.Tensor, block: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """max_k NCC(window at (u, v), T_k) over the K templates, for every full L x L window.

    NCC = sum (W - mean W)(T - mean T) / (||W - mean W|| ||T - mean T||), the correlation by FFT
    (circular on the micrograph's own size: no window that fits wraps), the window norms by
    cumulative sums. Flat windows get 0.

    Args:
        micrograph: (N0, N1).
        templates: (K, L, L), none of them constant.
        block: templates per FFT batch (memory: block x N0 x N1 complex numbers).

    Returns:
        (score (N0 - L + 1, N1 - L + 1), best template (same shape, int64)); window (u, v) has
        its top-left corner at (u, v).
    """
    N0, N1 = micrograph.shape
    K, L, _ = templates.shape
    t = templates - templates.mean((1, 2), keepdim=True)
    norm = t.square().sum((1, 2)).sqrt()
    if not bool((norm > 0).all()):
        raise ValueError("a template is constant (zero variance): its NCC is undefined")
    t = t / norm.view(-1, 1, 1)
    spectrum = torch.fft.rfft2(micrograph)
    # Window sums of M and M^2 from cumulative sums (float64 for the differences).
    m64 = micrograph.to(torch.float64)
    s1 = _box_sum(m64, L)
    s2 = _box_sum(m64.square(), L)
    var = (s2 - s1.square() / (L * L)).clamp(min=0)
    denom = var.sqrt()
    flat = denom <= 1e-12 * float(denom.max()) if denom.numel() else denom > 0
    best = torch.full((N0 - L + 1, N1 - L + 1), -math.inf, dtype=micrograph.dtype,
                      device=micrograph.device)  # fmt: skip
    best_k = torch.zeros(best.shape, dtype=torch.int64, device=micrograph.device)
    for s in range(0, K, block):
        padded = torch.zeros(min(block, K - s), N0, N1, dtype=t.dtype, device=t.device)
        padded[:, :L, :L] = t[s : s + block]
        corr = torch.fft.irfft2(spectrum * torch.fft.rfft2(padded).conj(), s=(N0, N1))
        corr = corr[:, : N0 - L + 1, : N1 - L + 1]
        value, k = corr.max(0)
        better = value > best
        best = torch.where(better, value, best)
        best_k = torch.where(better, k + s, best_k)
    score = torch.where(flat, 0, best / torch.where(flat, 1, denom).to(best.dtype))
    return score, best_k


def _box_sum(a: torch.Tensor, L: int) -> torch.Tensor:
    """Sums of a over every L x L window: (N0 - L + 1, N1 - L + 1)."""
    c = torch.nn.functional.pad(a.cumsum(0).cumsum(1), (1, 0, 1, 0))
    return c[L:, L:] - c[:-L, L:] - c[L:, :-L] + c[:-L, :-L]


def noise_threshold(windows: int, K: int, L: int) -> float:
    """The expected largest NCC of pure white noise over ``windows`` positions and K templates.

    A window of white noise and a fixed zero-mean template have an NCC of mean 0 and variance
    1 / (L^2 - 1); the largest of n independent such values is about sqrt(2 ln n) of their
    standard deviation. Neighbouring windows are correlated, so this errs high: a peak above it is
    one a micrograph of pure noise would not give on average.
    """
    n = max(2, windows * K)
    return math.sqrt(2 * math.log(n) / max(L * L - 1, 1))


def _on_group(group: TransformSet, x) -> torch.Tensor:
    """x on the group's tables' device and in their float dtype (float64 for a group with none)."""
    floats = [b.dtype for b in group.buffers() if b.dtype.is_floating_point]
    return torch.as_tensor(x).to(device=group.device, dtype=floats[0] if floats else torch.float64)


def template_match(
    data,
    group: TransformSet,
    x,
    min_distance: float | None = None,
    threshold: float | str = "noise",
    n_picks: int | None = None,
    device=None,
    dtype=torch.float64,
    max_candidates: int | None = None,
    seed: int = 0,
    noise_draws: int = 4,
) -> Picks:
    """Pick particles by template matching with the templates ``group.templates(x)``.

    Peaks: local maxima of the NCC map (max over templates), greedily kept best first at least
    ``min_distance`` apart in the row or the column (with the default L: no two picks' boxes
    overlap, copies whose boxes touch are both kept, and a partial match overlapping a better
    one is dropped); every kept peak is a candidate, those with an NCC
    >= ``threshold`` (and among the ``n_picks`` best, when given) are selected.

    Args:
        data: a micrograph ((N0, N1) tensor or array), a .npy / .mrc path, or a list of these.
        group: the ``TransformSet`` whose templates are matched (rotations of an image, ...).
        x: the unknown the templates are made from (the group's ``shape``: the true image for
            the oracle, the EM estimate otherwise).
        min_distance: between peaks in pixels (the larger of the row and column distances);
            default L (one particle's width).
        threshold: NCC threshold of the operating point; "noise" (the default): the
            ``noise_draws``-th largest candidate NCC of ``noise_draws`` micrographs of white
            noise as large as those of ``data`` on average (drawn on the CPU from ``seed``; the
            NCC does not depend on the noise level), as posterior picking's threshold;
            "auto": ``noise_threshold``, its closed-form approximation, which errs high
            (measured on MNIST micrographs at SNR 0.05: 0.19 against 0.16-0.17, F1 0.82
            against 0.93 with the true digit).
        n_picks: select at most this many (the best); None: no limit.
        device, dtype: of the computation (device None: the group's).
        max_candidates: keep at most this many candidates per micrograph (None: all peaks).
        seed, noise_draws: of the "noise" threshold.

    Returns:
        ``Picks``, best first (``patches`` is -1).
    """
    L, K = group.L, group.K
    if n_picks is not None and (int(n_picks) != n_picks or n_picks < 0):
        raise ValueError(f"n_picks must be an integer >= 0 or None, got {n_picks!r}")
    number = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
    if not (threshold in ("auto", "noise") or number):
        raise ValueError(f"threshold must be a number, 'noise' or 'auto', got {threshold!r}")
    if int(noise_draws) != noise_draws or noise_draws < 1:
        raise ValueError(f"noise_draws must be an integer >= 1, got {noise_draws!r}")
    min_distance = float(L if min_distance is None else min_distance)
    if not min_distance >= 0:
        raise ValueError(f"min_distance must be >= 0, got {min_distance!r}")
    device = group.device if device is None else torch.device(device)
    xt = _on_group(group, x)
    if tuple(xt.shape) != tuple(group.shape):
        raise ValueError(
            f"estimate has shape {tuple(xt.shape)}; the group {type(group).__name__} (L = {L}) "
            f"needs {tuple(group.shape)}"
        )
    if not torch.isfinite(xt).all():
        raise ValueError("estimate has non-finite values")
    templates = group.templates(xt).to(device=device, dtype=dtype)
    arrays, names = _as_micrographs(data)
    for a, name in zip(arrays, names, strict=True):
        if a.ndim != 2 or min(a.shape) < L:
            raise ValueError(
                f"{name}: the micrograph {tuple(a.shape)} is not 2-D or is smaller than one "
                f"particle (L = {L})"
            )
    parts = []
    for s, a in enumerate(arrays):
        m = a if torch.is_tensor(a) else torch.from_numpy(np.array(a))
        m = m.to(device=device, dtype=dtype)
        if not torch.isfinite(m).all():
            raise ValueError(f"{names[s]}: the micrograph has non-finite values")
        score, best_k = normalised_cross_correlation(m, templates)
        # Local maxima over the positions closer than min_distance in both axes: a square as
        # wide as min_distance itself let a neighbour whose box only touches this one's (L
        # apart) hide a copy (measured: one of 30 copies missed at SNR 1).
        r = max(1, math.ceil(min_distance) - 1)
        parts.append(_peak_picks(score, best_k, r, s, names, L, group))
    picks = concatenate(parts, names, L)
    picks = merge(picks, math.nextafter(min_distance, 0), p=math.inf)  # min_distance apart: kept
    if max_candidates is not None:
        keep = np.zeros(len(picks), dtype=bool)
        for s in np.unique(picks.micrograph):
            keep[np.flatnonzero(picks.micrograph == s)[: int(max_candidates)]] = True
        picks = picks.take(keep)
    if threshold == "noise":
        noise = _noise_micrographs(_mean_shape(arrays), int(noise_draws), seed)
        found = template_match(noise, group, xt, min_distance, 0.0, None, device, dtype).scores
        level = _draws_th_largest(found, noise_draws)
    elif threshold == "auto":
        windows = sum((a.shape[0] - L + 1) * (a.shape[1] - L + 1) for a in arrays)
        level = noise_threshold(windows // len(arrays), K, L)
    else:
        level = float(threshold)
    selected = picks.scores >= level
    if n_picks is not None:
        selected &= np.cumsum(selected) <= int(n_picks)
    picks.selected = selected
    picks.info = {"method": "template", "threshold": level, "min_distance": min_distance}
    return picks


def concatenate(parts: list[Picks], names: list, L: int) -> Picks:
    """One ``Picks`` of several (the same micrograph names)."""
    if not parts:
        z = np.zeros(0)
        return Picks(z.reshape(0, 2), z, z.astype(bool), z.astype(np.int64), names, z,
                     z.astype(bool), z.astype(np.int64), z.astype(np.int64), L)  # fmt: skip
    fields = ("centres", "scores", "selected", "micrograph", "angles", "mirrored")
    fields += ("templates", "patches")
    joined = {f: np.concatenate([getattr(p, f) for p in parts]) for f in fields}
    return Picks(**joined, names=names, L=L)


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------
def match(picks: np.ndarray, truth: np.ndarray, radius: float) -> np.ndarray:
    """One-to-one matching of picks to true centres within ``radius`` (Topaz's rule).

    The assignment maximises sum (radius^2 - d^2) over the pairs closer than ``radius``
    (``scipy.optimize.linear_sum_assignment`` on min(d^2 - radius^2, 0), as
    ``topaz.algorithms.match_coordinates``); a pick is a true positive when it is assigned a
    centre strictly within ``radius``.

    Args:
        picks: (n, 2) coordinates.
        truth: (m, 2) coordinates.

    Returns:
        (n,) bool: matched.
    """
    from scipy.optimize import linear_sum_assignment

    picks = np.asarray(picks, dtype=np.float64).reshape(-1, 2)
    truth = np.asarray(truth, dtype=np.float64).reshape(-1, 2)
    labels = np.zeros(len(picks), dtype=bool)
    if len(picks) == 0 or len(truth) == 0:
        return labels
    d2 = ((picks[:, None] - truth[None]) ** 2).sum(-1)
    cost = np.minimum(d2 - radius * radius, 0)
    rows, cols = linear_sum_assignment(cost)
    labels[rows[cost[rows, cols] < 0]] = True
    return labels


def precision_recall_curve(
    labels: np.ndarray, scores: np.ndarray, n_true: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Precision and recall at every score threshold, and the average precision.

    Candidates with equal scores form one step (``topaz.metrics.average_precision``): AP =
    sum over steps of precision(step) * (true positives the step adds) / n_true, so true
    particles that no candidate matches keep it below 1.

    Returns:
        (precision, recall, thresholds, average precision); thresholds descending.
    """
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if n_true <= 0:
        raise ValueError(f"n_true must be >= 1 (the true particles), got {n_true}")
    if len(scores) == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0), 0.0
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[s[1:] != s[:-1], True]  # the end of every run of equal scores
    tp = np.cumsum(y)[last]
    pp = np.flatnonzero(last) + 1
    precision = tp / pp
    recall = tp / n_true
    gained = np.diff(np.r_[0, tp])
    return precision, recall, s[last], float((precision * gained).sum() / n_true)


def _by_micrograph(centres, micrograph):
    micrograph = np.zeros(len(centres), np.int64) if micrograph is None else micrograph
    return np.asarray(centres, dtype=np.float64).reshape(-1, 2), np.asarray(micrograph)


def picking_metrics(
    picks: Picks, truth: np.ndarray, truth_micrograph=None, radius: float | None = None
) -> dict:
    """Micrograph-level precision, recall, F1 (the selected picks) and the PR curve's area.

    Args:
        picks: ``Picks`` (candidates and the selection).
        truth: (m, 2) true centres (row, column).
        truth_micrograph: (m,) the micrograph of each (None: all in micrograph 0).
        radius: of the matching, default L / 2.

    Returns:
        {precision, recall, f1 (operating point; Hungarian on the selected picks), ap (average
        precision, the area under the PR curve over all candidates, labels from one Hungarian
        matching of all of them as Topaz does), best_f1 (the best F1 along that curve), picks,
        particles, candidates}.
    """
    radius = picks.L / 2 if radius is None else float(radius)
    truth, tmic = _by_micrograph(truth, truth_micrograph)
    n_true = len(truth)

    def labels_of(p: Picks) -> np.ndarray:
        out = np.zeros(len(p), dtype=bool)
        for s in np.unique(np.r_[p.micrograph, tmic]):
            mine = p.micrograph == s
            out[mine] = match(p.centres[mine], truth[tmic == s], radius)
        return out

    chosen = picks.picked()
    tp = int(labels_of(chosen).sum())
    precision = tp / len(chosen) if len(chosen) else 1.0
    recall = tp / n_true if n_true else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    out = {"precision": precision, "recall": recall, "f1": f1, "picks": len(chosen)}
    out.update({"particles": n_true, "candidates": len(picks)})
    if n_true:
        p, r, _, ap = precision_recall_curve(labels_of(picks), picks.scores, n_true)
        f = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0)
        out.update({"ap": ap, "best_f1": float(f.max()) if len(f) else 0.0})
    return out


@dataclass
class PatchTruth:
    """The true content of every patch (from the copies' top-left corners).

    Attributes:
        empty: (D,) bool the patch shows no copy: no pixel of one falls in it, or (with the
            clean micrograph) what falls in it carries at most ``empty_energy`` of a copy's
            energy (the posterior's blank pairs, ``PatchPosteriors``).
        shift: (D, 2) the true shift l of the copy that covers most of the patch (L, L if
            none does).
        half: (D,) bool at least half-occupied in the paper's sense: l_x < L/2 or l_x > 3L/2,
            and the same for l_y (more than half the copy's rows and columns in the patch).
    """

    empty: np.ndarray
    shift: np.ndarray
    half: np.ndarray


def patch_truth(
    source, positions, micrograph=None, clean=None, energy=None, empty_energy: float = 0.05
) -> PatchTruth:
    """The true shift of every patch of ``source`` from the copies' top-left corners.

    Under well separation at most one copy touches a patch; otherwise the one covering most
    pixels is taken. The stochastic-EM paper calls a patch empty when it was generated with an
    all-padding shift; for an image with an empty border some patches that a copy touches show
    only that border, as empty as the others: give the clean micrograph(s) and the copies'
    energy to count those as empty too.

    Args:
        source: the ``PatchSource`` (``Patches.source``) or anything with ``L``, ``grid``,
            ``offsets``.
        positions: (p, 2) top-left corners (row, column) of the copies (``Measurement.positions``).
        micrograph: (p,) micrograph of each copy (None: micrograph 0).
        clean: the clean micrograph ((N0, N1), ``Measurement.clean()``) or a list, one per
            micrograph; None: the geometric rule.
        energy: ||F||^2 of a copy (with ``clean``).
        empty_energy: with ``clean``: a patch whose clean content carries at most this share of
            ``energy`` is empty.
    """
    from mtd.patches import extract_patches

    L = source.L
    D = int(source.offsets[-1])
    positions = np.asarray(positions, dtype=np.int64).reshape(-1, 2)
    micrograph = np.zeros(len(positions), np.int64) if micrograph is None else micrograph
    shift = np.full((D, 2), L, dtype=np.int64)
    area = np.zeros(D, dtype=np.int64)
    for (r, c), s in zip(positions, np.asarray(micrograph), strict=True):
        n0, n1 = source.grid[s]
        for a in {r // L, (r + L - 1) // L}:
            for b in {c // L, (c + L - 1) // L}:
                if not (0 <= a < n0 and 0 <= b < n1):
                    continue  # in the dropped remainder strip
                rows = min(r + L, (a + 1) * L) - max(r, a * L)
                cols = min(c + L, (b + 1) * L) - max(c, b * L)
                m = int(source.offsets[s]) + a * n1 + b
                if rows > 0 and cols > 0 and rows * cols > area[m]:
                    area[m] = rows * cols
                    shift[m] = shift_of_offset([r - a * L, c - b * L], L)
    empty = area == 0
    if clean is not None:
        if energy is None or not energy > 0:
            raise ValueError(f"patch_truth with clean needs the copies' energy > 0, got {energy}")
        cleans = list(clean) if isinstance(clean, (list, tuple)) else [clean]
        seen = torch.cat(
            [extract_patches(torch.as_tensor(c), L).square().sum((1, 2)) for c in cleans]
        ).numpy()
        empty = empty | (seen <= empty_energy * float(energy))
        shift[empty] = L
    q = (shift < L / 2) | (shift > 3 * L / 2)
    return PatchTruth(empty, shift, ~empty & q[:, 0] & q[:, 1])


def patch_metrics(
    pred_empty: np.ndarray, pred_shift: np.ndarray, truth: PatchTruth, L: int
) -> dict:
    """The stochastic-EM paper's two measures (Section IV-B).

    Args:
        pred_empty: (D,) bool the patch was declared empty.
        pred_shift: (D, 2) the shift found where not declared empty.
        truth: ``PatchTruth``.

    Returns:
        {empty_f1 (eq. 39, empty patches the positives), empty_f1_always (the classifier that
        declares every patch empty: the paper's dashed line), shift_accuracy (the share of at
        least half-occupied patches declared non-empty with the shift within one pixel in each
        axis), empty_patches, half_occupied}.
    """
    pred_empty = np.asarray(pred_empty, dtype=bool)
    true_empty = truth.empty
    tp = int((pred_empty & true_empty).sum())
    fp = int((pred_empty & ~true_empty).sum())
    fn = int((~pred_empty & true_empty).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    e = float(true_empty.mean()) if len(true_empty) else 0.0
    half = truth.half
    ok = np.zeros(len(half), dtype=bool)
    if half.any():
        got = copy_offset(np.asarray(pred_shift)[half], L)
        want = copy_offset(truth.shift[half], L)
        ok[half] = (np.abs(got - want) <= 1).all(1) & ~pred_empty[half]
    return {
        "empty_f1": f1,
        "empty_f1_always": 2 * e / (1 + e) if e > 0 else 0.0,
        "shift_accuracy": float(ok[half].mean()) if half.any() else float("nan"),
        "empty_patches": int(true_empty.sum()),
        "half_occupied": int(half.sum()),
    }


def patch_predictions(
    picks: Picks, source, templates=None, empty_energy: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """Patch-level predictions of any picker: the patches a selected pick's L x L frame covers
    are non-empty, with the shift that puts the frame there (the higher score wins).

    Args:
        picks: ``Picks`` with their template indices.
        source: the ``PatchSource``.
        templates: (K, L, L) the picker's templates: a patch counts only where the picked
            template's part inside it carries more than ``empty_energy`` of its energy (as
            ``PatchPosteriors`` and ``patch_truth`` with ``clean``); None: any overlap.

    Returns:
        (empty (D,) bool, shift (D, 2) int64).
    """
    L = source.L
    D = int(source.offsets[-1])
    empty = np.ones(D, dtype=bool)
    shift = np.full((D, 2), L, dtype=np.int64)
    best = np.full(D, -np.inf)
    chosen = picks.picked()
    corners = np.rint(chosen.centres - (L - 1) / 2).astype(np.int64)
    sq = None
    if templates is not None:
        sq = torch.as_tensor(templates).detach().cpu().double().square().numpy()
    for (r, c), s, score, k in zip(
        corners, chosen.micrograph, chosen.scores, chosen.templates, strict=True
    ):
        n0, n1 = source.grid[s]
        for a in {r // L, (r + L - 1) // L}:
            for b in {c // L, (c + L - 1) // L}:
                if not (0 <= a < n0 and 0 <= b < n1):
                    continue
                if sq is not None:  # the template's rows and columns inside patch (a, b)
                    i0, i1 = max(a * L - r, 0), min((a + 1) * L - r, L)
                    j0, j1 = max(b * L - c, 0), min((b + 1) * L - c, L)
                    if sq[k, i0:i1, j0:j1].sum() <= empty_energy * sq[k].sum():
                        continue
                m = int(source.offsets[s]) + a * n1 + b
                if score > best[m]:
                    best[m], empty[m] = score, False
                    shift[m] = shift_of_offset([r - a * L, c - b * L], L)
    return empty, shift


# ------------------------------------------------------------------------------------------------
# Outputs: STAR, PNG
# ------------------------------------------------------------------------------------------------
def check_star_path(path) -> Path:
    """A .star path whose folder exists (checked before any work)."""
    path = Path(path)
    if path.suffix.lower() != ".star":
        raise ValueError(f"the picks file must end in .star, got {path}")
    if not path.parent.is_dir():
        raise ValueError(f"the folder of the picks file {path} does not exist: {path.parent}")
    return path


def write_star(path, picks: Picks, selected_only: bool = True) -> Path:
    """Write picks as a RELION coordinate STAR file, whole or not at all.

    Columns: ``rlnCoordinateX`` (the centre's column), ``rlnCoordinateY`` (its row), in pixels;
    ``rlnAnglePsi`` (the picked in-plane angle in degrees, counter-clockwise with the row axis
    down as ``mtd.simulate``; left out where the group has no angles);
    ``rlnAutopickFigureOfMerit`` (the score); ``rlnClassNumber`` (template index + 1: where the
    group has no angles, or mirror images); ``rlnMicrographName`` when the picks come from more
    than one micrograph.
    """
    import pandas as pd
    import starfile

    from mtd.measurement import atomic_write

    path = check_star_path(path)
    p = picks.picked() if selected_only else picks
    table = {"rlnCoordinateX": p.centres[:, 1], "rlnCoordinateY": p.centres[:, 0]}
    has_angles = not np.isnan(p.angles).any() if len(p) else not np.isnan(picks.angles).any()
    if has_angles:
        table["rlnAnglePsi"] = np.degrees(p.angles)
    table["rlnAutopickFigureOfMerit"] = p.scores
    if not has_angles or p.mirrored.any():
        table["rlnClassNumber"] = p.templates + 1
    if len(picks.names) > 1:
        table["rlnMicrographName"] = [picks.names[s] for s in p.micrograph]
    df = pd.DataFrame(table)
    atomic_write(path, lambda tmp: starfile.write(df, tmp, overwrite=True))
    return path


def read_star(path) -> dict:
    """The columns of a coordinate STAR file as numpy arrays (``rlnCoordinateY`` the row)."""
    import starfile

    df = starfile.read(path, always_dict=False)
    if isinstance(df, dict):  # several blocks: the first table with coordinates
        df = next(v for v in df.values() if hasattr(v, "columns") and "rlnCoordinateX" in v)
    return {c: df[c].to_numpy() for c in df.columns}


def save_picks_figure(
    path, micrograph, picks: Picks, truth=None, which: int = 0, title: str | None = None
) -> Path:
    """The micrograph with the selected picks (circles of radius L / 2) and the true centres
    (crosses), as a PNG (matplotlib Agg), written whole or not at all.

    Args:
        micrograph: (N0, N1) the micrograph ``which`` (tensor or array).
        picks: ``Picks``; those of micrograph ``which`` are drawn.
        truth: (m, 2) true centres of that micrograph (row, column), or None.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    from mtd.measurement import atomic_write

    img = micrograph.detach().cpu().numpy() if torch.is_tensor(micrograph) else micrograph
    img = np.asarray(img, dtype=np.float64)
    p = picks.picked()
    p = p.take(p.micrograph == which)
    size = min(12.0, max(4.0, img.shape[1] / 60))
    fig, ax = plt.subplots(figsize=(size, size * img.shape[0] / img.shape[1]))
    ax.imshow(img, cmap="gray", interpolation="nearest")
    for r, c in p.centres:
        ax.add_patch(Circle((c, r), picks.L / 2, fill=False, color="tab:red", lw=1.0))
    if truth is not None and len(truth):
        t = np.asarray(truth, dtype=np.float64).reshape(-1, 2)
        ax.plot(t[:, 1], t[:, 0], "+", color="lime", ms=6, mew=1.2)
    ax.set_title(title or f"{len(p)} picks (red), truth (green +)", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return Path(path)


def truth_of(measurement, basis=None) -> dict:
    """The truth a simulated ``Measurement`` gives the metrics: centres, corners, clean, energy.

    Args:
        measurement: ``mtd.Measurement`` (or anything with ``L``, ``positions``, ``image`` and
            ``clean()``).
        basis: the steerable basis its copies were rotated in, if any; without it such a
            measurement's clean micrograph is left out (the geometric rule for empty patches).
    """
    L = measurement.L
    corners = measurement.positions.cpu().numpy()
    steerable = getattr(measurement, "coefficients", None) is not None
    clean = None
    if not steerable or basis is not None:
        clean = measurement.clean(basis) if steerable else measurement.clean()
    return {
        "centres": corners + (L - 1) / 2,
        "corners": corners,
        "clean": clean,
        "energy": float(measurement.image.square().sum()),
    }


def in_frame_of(truth: dict, x, group: TransformSet, max_shift: int = 3) -> dict:
    """``truth`` with every copy's top-left corner where the templates of ``x`` place it.

    An MTD estimate is the image up to a translation (an image with an empty border leaves it
    free; measured on MNIST: error 0.36 against 0.02 up to 3 px at SNR 10), and a picker that
    uses it puts every centre off by that translation, turned with the copy. The paper's shift
    accuracy (+-1 px) of such a picker is scored in the estimate's own frame: for each planted
    copy, the (template, offset within ``max_shift`` pixels) whose placement fits the clean
    micrograph around it best in least squares (a symmetric image may fit two ways). The
    centres, which F1 matches within L / 2, stay the planted ones. Without a clean micrograph
    (``truth_of`` of a steerable measurement without its basis, a STAR file's truth) ``truth``
    is returned as it is.

    Args:
        truth: ``truth_of(measurement)``: "corners" (p, 2), "clean" (N0, N1) or a list of them
            with "micrograph" (p,), the copies' micrographs.
        x: the estimate (the group's ``shape``).
        group: the ``TransformSet`` whose templates the picker used.
        max_shift: the largest offset searched in each axis.
    """
    clean = truth.get("clean")
    if clean is None or max_shift <= 0:
        return truth
    cleans = list(clean) if isinstance(clean, (list, tuple)) else [clean]
    L, s = group.L, int(max_shift)
    T = group.templates(_on_group(group, x)).detach().cpu().double()[:, None]  # (K, 1, L, L)
    energy = T.square().sum((1, 2, 3))
    padded = [
        torch.nn.functional.pad(torch.as_tensor(c, dtype=torch.float64).cpu(), (s,) * 4)
        for c in cleans
    ]
    corners = np.asarray(truth["corners"], dtype=np.int64).reshape(-1, 2)
    micrograph = truth.get("micrograph")
    micrograph = np.zeros(len(corners), np.int64) if micrograph is None else micrograph
    moved = corners.copy()
    for n, ((r, c), m) in enumerate(zip(corners, micrograph, strict=True)):
        window = padded[int(m)][r : r + L + 2 * s, c : c + L + 2 * s]
        # Least squares, ||W_o - T_k||^2 = ||W_o||^2 - 2 <W_o, T_k> + ||T_k||^2, over the
        # offsets o and templates k (templates of unequal energy, e.g. projections, included).
        corr = torch.nn.functional.conv2d(window[None, None], T)[0]  # (K, 2s + 1, 2s + 1)
        seen = torch.nn.functional.avg_pool2d(window[None, None].square(), L, 1)[0] * L * L
        misfit = seen - 2 * corr + energy.view(-1, 1, 1)
        _, i, j = np.unravel_index(int(misfit.argmin()), tuple(misfit.shape))
        moved[n] = (r + i - s, c + j - s)
    return {**truth, "corners": moved}


def picking_outputs(
    out,
    picks: Picks,
    data,
    source=None,
    post: PatchPosteriors | None = None,
    truth: dict | None = None,
    radius: float | None = None,
    empty_rule: str = "half",
    empty_energy: float = 0.05,
    templates=None,
    star: str = "picks.star",
    figure: str | None = "picks.png",
) -> dict:
    """Write a picker's STAR file and figure into ``out``; return its metrics (with a truth).

    Args:
        out: the folder (must exist).
        picks: the ``Picks`` (the selected ones are written).
        data: the micrograph(s) picked: tensor, path or list (the figure shows the first).
        source: the ``PatchSource`` of the patches (for the patch-level measures), or None.
        post: the ``PatchPosteriors`` of posterior picking (its own patch predictions); None:
            the patch predictions of the picks (``patch_predictions``).
        truth: ``truth_of(measurement)``, or {"centres": (m, 2)[, "micrograph": (m,)]} (a STAR
            file of true centres); None: no metrics.
        radius: of the matching (default L / 2).
        empty_rule, empty_energy: as ``pick_posterior``.
        templates: (K, L, L) the picker's templates, for ``patch_predictions``.
        star, figure: file names in ``out`` (figure None: none).

    Returns:
        {precision, recall, f1, ap, best_f1, picks, particles, candidates} and, with the
        copies' corners and a ``source``, {empty_f1, empty_f1_always, shift_accuracy, ...}; only
        {picks, candidates} without a truth.
    """
    out = Path(out)
    write_star(out / star, picks)
    arrays, _ = _as_micrographs(data)
    centres = mic_of = None
    if truth is not None:
        centres = np.asarray(truth["centres"], dtype=np.float64).reshape(-1, 2)
        mic_of = truth.get("micrograph")
    if figure:
        first = centres if mic_of is None else centres[np.asarray(mic_of) == 0]
        save_picks_figure(out / figure, arrays[0], picks, first)
    if truth is None:
        return {"picks": int(picks.selected.sum()), "candidates": len(picks)}
    metrics = picking_metrics(picks, centres, mic_of, radius)
    if source is not None and truth.get("corners") is not None:
        pt = patch_truth(
            source,
            truth["corners"],
            mic_of,
            clean=truth.get("clean"),
            energy=truth.get("energy"),
            empty_energy=empty_energy,
        )
        if post is not None:
            pred_empty, pred_shift = post.score(empty_rule) <= 0, post.shift
        else:
            pred_empty, pred_shift = patch_predictions(picks, source, templates, empty_energy)
        metrics.update(patch_metrics(pred_empty, pred_shift, pt, source.L))
    return metrics
