"""The picking metrics of the field: micrograph-level precision, recall, F1 and average precision
(Topaz's matching), and the stochastic-EM paper's patch-level measures (eq. 39: empty-patch F1;
the shift accuracy of at least half-occupied patches), with the truth of a simulation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mtd.em.patches import extract_patches
from mtd.groups.base import TransformSet
from mtd.io.source import MicrographSource
from mtd.picking.picks import Picks
from mtd.picking.posteriors import copy_offset, shift_of_offset


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
        cleans = MicrographSource.of(clean, key="clean").tensors()
        seen = torch.cat([extract_patches(c, L).square().sum((1, 2)) for c in cleans]).numpy()
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


def truth_of(measurement) -> dict:
    """The truth a simulated ``Measurement`` gives the metrics: centres, corners, clean, energy."""
    corners = measurement.positions.cpu().numpy()
    return {
        "centres": corners + (measurement.L - 1) / 2,
        "corners": corners,
        "clean": measurement.clean(),
        "energy": measurement.copy_energy,
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
    (a STAR file's truth) ``truth`` is returned as it is.

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
    L, s = group.L, int(max_shift)
    T = group.templates(group.on_tables(x)).detach().cpu().double()[:, None]  # (K, 1, L, L)
    energy = T.square().sum((1, 2, 3))
    cleans = MicrographSource.of(clean, key="clean").tensors(torch.float64, "cpu")
    padded = [torch.nn.functional.pad(c, (s,) * 4) for c in cleans]
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
