"""How a picker works and is scored: one set of options for posterior picking, template matching
and their metrics (``configs/picking/default.yaml`` holds them for every command)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

EMPTY_RULES = ("half", "argmax", "mass")
COMBINE = ("evidence", "nms")


@dataclass
class PickingOptions:
    """Options of the pickers (``pick_posterior``, ``template_match``) and their metrics.

    Attributes:
        combine: posterior picking: "evidence" (the log-likelihood ratios of the patches a copy
            touches, summed) or "nms" (Algorithm 2 per patch, non-maximum suppression).
        empty_rule: per patch: "half" (the blank pairs hold at least half the posterior mass),
            "argmax" (Algorithm 2 as written) or "mass" (``PatchPosteriors.score``).
        empty_energy: a crop with at most this share of the template's energy is blank.
        detect_energy: "nms": a pick needs a patch showing more than this share of a copy.
        merge_radius: keep one pick within this many pixels (evidence: in both axes); None:
            L - 1.
        threshold: a pick's least score: "noise" (the score micrographs of pure noise reach, at
            least 0 for the posteriors), a finite number (0: the Bayes rule), or "auto" (template
            matching: the closed-form expected largest NCC of noise, which errs high); None is
            "noise".
        noise_draws: noise micrographs scored for the "noise" threshold (their noise_draws-th
            largest score).
        radius: matching radius of the metrics in pixels; None: L / 2.
        min_distance: template matching: least row or column distance between picks; None: L.
        n_picks: template matching: select at most this many; None: no limit.
        template: with a simulated truth, also score template matching (with the true image and
            with the estimate) beside posterior picking.
    """

    combine: Literal["evidence", "nms"] = "evidence"
    empty_rule: Literal["half", "argmax", "mass"] = "half"
    empty_energy: float = 0.05
    detect_energy: float = 0.2
    merge_radius: float | None = field(default=None, metadata={"min": 0})
    threshold: float | Literal["noise", "auto"] | None = field(
        default="noise", metadata={"finite": True}
    )
    noise_draws: int = field(default=4, metadata={"min": 1})
    radius: float | None = field(default=None, metadata={"min": 0})
    min_distance: float | None = field(default=None, metadata={"min": 0})
    n_picks: int | None = field(default=None, metadata={"min": 0})
    template: bool = True

    def __post_init__(self):
        if self.threshold is None:  # (null: the default rule)
            self.threshold = "noise"
        if self.combine not in COMBINE:
            raise ValueError(f"combine must be one of {', '.join(COMBINE)}, got {self.combine!r}")
        if self.empty_rule not in EMPTY_RULES:
            raise ValueError(
                f"empty_rule must be one of {', '.join(EMPTY_RULES)}, got {self.empty_rule!r}"
            )
        number = isinstance(self.threshold, int | float) and not isinstance(self.threshold, bool)
        if not (self.threshold in ("noise", "auto") or (number and math.isfinite(self.threshold))):
            raise ValueError(
                f"threshold must be a finite number, 'noise' or 'auto', got {self.threshold!r}"
            )
        if int(self.noise_draws) != self.noise_draws or self.noise_draws < 1:
            raise ValueError(f"noise_draws must be an integer >= 1, got {self.noise_draws!r}")
        for name in ("empty_energy", "detect_energy"):
            share = getattr(self, name)
            if not (math.isfinite(share) and 0 <= share < 1):
                raise ValueError(f"{name} (an energy share) must be in [0, 1), got {share!r}")
