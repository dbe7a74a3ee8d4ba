"""Algorithm 2's per-patch posteriors (the stochastic-EM paper, Section IV-B), streamed from the
E-step: where a copy lies in its patch, the blank (template, shift) pairs, the empty-patch rules,
rho and sigma by EM with an estimate held fixed, and the noise score of the per-patch rule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mtd.em.estep import Patches
from mtd.em.likelihood import template_energy
from mtd.em.statistics import empty_shifts
from mtd.parallel import limit_threads
from mtd.picking.options import EMPTY_RULES


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
    grid (``mtd.em.patches``), so this is exact for streamed multi-file data too.

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


def _np_dtype(dtype: torch.dtype):
    return np.float32 if dtype in (torch.float32, torch.float16, torch.bfloat16) else np.float64


# ------------------------------------------------------------------------------------------------
# Template matching (the baseline)
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# Outputs: STAR, PNG
# ------------------------------------------------------------------------------------------------
