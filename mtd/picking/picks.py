"""Picks: candidate particles with their scores, the operating point's selection, merging."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch


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
    poses = group.poses()
    n = len(val)
    return Picks(
        centres=peak.astype(np.float64) + (L - 1) / 2,
        scores=val,
        selected=np.zeros(n, dtype=bool),
        micrograph=np.full(n, s, dtype=np.int64),
        names=list(names),
        angles=np.full(n, np.nan) if poses.angles is None else poses.angles[k],
        mirrored=poses.mirrored[k],
        templates=k,
        patches=np.full(n, -1, dtype=np.int64),
        L=L,
    )


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
