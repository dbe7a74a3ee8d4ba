"""What the E-step's stream of posteriors is reduced to: the sufficient statistics of the M-step
(``StatisticsSum`` -> ``Statistics``) and per-patch summaries (``PatchSummary`` ->
``PatchSummaries``), both summed chunk by chunk (DESIGN section 4 of docs/design.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mtd.em.estep import EStep, Posterior


@dataclass
class Statistics:
    """Sufficient statistics of one E-step (DESIGN section 4), summed over patches.

    Attributes:
        omega: (K, 2L, 2L) posterior occupancy of every (template, shift).
        b: (K, L, L) weighted back-projection of the patches.
        c: (K, L, L) weighted coverage.
        loglik: () approximate log-likelihood of the patches at the E-step's (x, rho, sigma).
        energy: () sum_m ||M_m||^2.
        D: number of patches.
    """

    omega: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    loglik: torch.Tensor
    energy: torch.Tensor
    D: int


def coverage(omega: torch.Tensor, L: int) -> torch.Tensor:
    """c_k = Z^T (omega_k circularly convolved with Z 1): c_k(y) = sum_{d in [0, L)^2} omega_k(y -
    d mod 2L).

    Summed directly (a box filter on the circularly extended occupancy) rather than by FFT, so that
    the result is exactly non-negative and exactly zero where no posterior mass reaches.

    Args:
        omega: (K, 2L, 2L).

    Returns:
        (K, L, L).
    """
    ext = torch.cat([omega[:, -(L - 1) :], omega], 1) if L > 1 else omega  # rows -(L-1) .. 2L-1
    rows = ext.unfold(1, L, 1)[:, :L].sum(-1)  # (K, L, 2L)
    ext = torch.cat([rows[:, :, -(L - 1) :], rows], 2) if L > 1 else rows
    return ext.unfold(2, L, 1)[:, :, :L].sum(-1)


def empty_shifts(L: int, device=None) -> torch.Tensor:
    """(2L, 2L) bool: the shifts with l_x = L or l_y = L, whose crop is all zero padding."""
    empty = torch.zeros(2 * L, 2 * L, dtype=torch.bool, device=device)
    empty[L, :] = empty[:, L] = True
    return empty


class StatisticsSum:
    """Consumer: the sufficient statistics of DESIGN section 4, summed over the stream."""

    def __init__(self, estep: EStep, blocks: list[slice]):
        form = estep.form
        self.form, self.blocks, self.L, self.K = form, blocks, estep.L, estep.K
        self.acc = [form.accumulator(b.stop - b.start) for b in blocks]
        self.loglik = torch.zeros((), dtype=torch.float64, device=estep.device)
        self.energy = torch.zeros((), dtype=estep.dtype, device=estep.device)
        self._block = {(b.start, b.stop): j for j, b in enumerate(blocks)}

    def merge(self, other: StatisticsSum) -> None:
        """Add another worker's sums to these."""
        for mine, theirs in zip(self.acc, other.acc, strict=True):
            pairs = [(mine, theirs)] if torch.is_tensor(mine) else zip(mine, theirs, strict=True)
            for m, t in pairs:  # the FFT form's accumulator is a (spectra, omega) pair
                m += t
        self.loglik += other.loglik
        self.energy += other.energy

    def add(self, post: Posterior, energy: torch.Tensor) -> None:
        j = self._block[(post.block.start, post.block.stop)]
        self.form.accumulate(post.held, post.local, post.w, post.scale, self.acc[j])
        if post.first:
            self.loglik += post.loglik.sum(dtype=torch.float64)
            self.energy += energy.sum()

    def result(self, D: int, comm=None, scale: float = 1.0) -> Statistics:
        """The statistics, all-reduced over ``comm``'s processes and multiplied by ``scale``."""
        L = self.L
        parts = [
            self.form.finish(a, b.stop - b.start)
            for a, b in zip(self.acc, self.blocks, strict=True)
        ]
        omega = torch.cat([p[0] for p in parts])
        b = torch.cat([p[1] for p in parts])[:, :L, :L]
        loglik, energy = self.loglik, self.energy
        if comm is not None:
            omega, b, loglik, energy = (comm.all_reduce(t) for t in (omega, b, loglik, energy))
        if scale != 1:
            omega, b, loglik, energy = omega * scale, b * scale, loglik * scale, energy * scale
        return Statistics(omega, b, coverage(omega, L), loglik, energy, D)


@dataclass
class PatchSummaries:
    """Per-patch summaries of the posteriors, for picking (stochastic-EM paper, Algorithm 2).

    Shifts are (l_x, l_y) in {0..2L-1}^2: the image's top-left corner lies at (-l_x, -l_y) mod 2L
    relative to the patch's (eq. 7 of the approximate-EM paper); l_x = L or l_y = L is empty.

    Attributes:
        loglik: (D,) log p(M_m | x, rho, sigma).
        empty: (D,) posterior mass of the empty shifts (summed over templates).
        shift: (D, 2) int64 the most probable shift of the posterior summed over templates.
        shift_prob: (D,) its probability.
        best: (D, 3) int64 the most probable (template, l_x, l_y) jointly.
        best_prob: (D,) its probability.
    """

    loglik: torch.Tensor
    empty: torch.Tensor
    shift: torch.Tensor
    shift_prob: torch.Tensor
    best: torch.Tensor
    best_prob: torch.Tensor


class PatchSummary:
    """Consumer: per-patch ``PatchSummaries``; only (D,)-sized arrays are kept."""

    def __init__(self, estep: EStep, D: int):
        L, dev, dt = estep.L, estep.device, estep.dtype
        self.L, self.P = L, 2 * L
        self.empty_mask = empty_shifts(L, dev)
        self.loglik = torch.zeros(D, dtype=torch.float64, device=dev)
        self.empty = torch.zeros(D, dtype=dt, device=dev)
        self.shift = torch.zeros(D, 2, dtype=torch.int64, device=dev)
        self.shift_prob = torch.zeros(D, dtype=dt, device=dev)
        self.best = torch.zeros(D, 3, dtype=torch.int64, device=dev)
        self.best_prob = torch.full((D,), -1.0, dtype=dt, device=dev)
        self._marginal = None

    def add(self, post: Posterior, energy: torch.Tensor) -> None:
        P, index = self.P, post.index
        w = post.weights()  # (B, k, 2L, 2L)
        marginal = w.sum(1)  # (B, 2L, 2L)
        self._marginal = marginal if post.first else self._marginal + marginal
        prob, flat = w.reshape(len(w), -1).max(1)
        better = prob > self.best_prob[index]
        best = torch.stack([flat // (P * P) + post.block.start, flat // P % P, flat % P], 1)
        self.best[index] = torch.where(better[:, None], best, self.best[index])
        self.best_prob[index] = torch.where(better, prob, self.best_prob[index])
        if post.last:
            m = self._marginal
            self.loglik[index] = post.loglik.to(torch.float64)
            self.empty[index] = m[:, self.empty_mask].sum(1)
            prob, flat = m.reshape(len(m), -1).max(1)
            self.shift[index] = torch.stack([flat // P, flat % P], 1)
            self.shift_prob[index] = prob

    def result(self, comm=None) -> PatchSummaries:
        fields = [self.loglik, self.empty, self.shift, self.shift_prob, self.best, self.best_prob]
        if comm is not None:  # every patch was filled by one rank, the others hold zeros
            self.best_prob.clamp_(min=0)
            fields = [comm.all_reduce(t) for t in fields]
        return PatchSummaries(*fields)
