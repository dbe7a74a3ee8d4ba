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

Modules: ``posteriors`` (per-patch posteriors), ``evidence`` (posterior picking), ``template``
(template matching), ``picks`` (the candidates), ``metrics``, ``outputs`` (STAR, figure,
metrics of a picker).

**Metrics.** The stochastic-EM paper's two (eq. 39: the F1 score of empty-patch detection, empty
patches the positives, beside the always-empty classifier's; and the share of at least
half-occupied patches whose shift is found within one pixel in each axis), and micrograph-level
precision, recall and F1 by one-to-one (Hungarian) matching of picks to true centres within a
radius, with the precision-recall curve over the score and its area (average precision), as
Topaz computes them (Bepler et al., Nature Methods 16, 2019: ``topaz.algorithms.
match_coordinates`` and ``topaz.metrics.average_precision``).
"""

from mtd.picking.evidence import (
    copy_evidence,
    corner_log_odds,
    evidence_candidates,
    evidence_noise_score,
    pick_posterior,
)
from mtd.picking.metrics import (
    PatchTruth,
    in_frame_of,
    match,
    patch_metrics,
    patch_predictions,
    patch_truth,
    picking_metrics,
    precision_recall_curve,
    truth_of,
)
from mtd.picking.options import COMBINE, EMPTY_RULES, PickingOptions
from mtd.picking.outputs import picking_outputs
from mtd.picking.picks import Picks, concatenate, merge
from mtd.picking.posteriors import (
    PatchPosteriors,
    blank_pairs,
    check_empty_rule,
    copy_offset,
    fit_rho_sigma,
    noise_score,
    patch_origins,
    patch_posteriors,
    shift_of_offset,
)
from mtd.picking.template import noise_threshold, normalised_cross_correlation, template_match

__all__ = [
    "COMBINE",
    "EMPTY_RULES",
    "PatchPosteriors",
    "PatchTruth",
    "PickingOptions",
    "Picks",
    "blank_pairs",
    "check_empty_rule",
    "concatenate",
    "copy_evidence",
    "copy_offset",
    "corner_log_odds",
    "evidence_candidates",
    "evidence_noise_score",
    "fit_rho_sigma",
    "in_frame_of",
    "match",
    "merge",
    "noise_score",
    "noise_threshold",
    "normalised_cross_correlation",
    "patch_metrics",
    "patch_origins",
    "patch_posteriors",
    "patch_predictions",
    "patch_truth",
    "pick_posterior",
    "picking_metrics",
    "picking_outputs",
    "precision_recall_curve",
    "shift_of_offset",
    "template_match",
    "truth_of",
]
