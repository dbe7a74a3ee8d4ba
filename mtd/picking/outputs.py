"""A picker's files (STAR, figure) and its metrics against a truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mtd.io.source import MicrographSource
from mtd.io.star import write_star
from mtd.picking.metrics import patch_metrics, patch_predictions, patch_truth, picking_metrics
from mtd.picking.picks import Picks
from mtd.picking.posteriors import PatchPosteriors
from mtd.plots.picks import save_picks_figure


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
        data: the micrograph(s) picked (a ``MicrographSource`` or what makes one; the figure
            shows the first).
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
    centres = mic_of = None
    if truth is not None:
        centres = np.asarray(truth["centres"], dtype=np.float64).reshape(-1, 2)
        mic_of = truth.get("micrograph")
    if figure:
        first = centres if mic_of is None else centres[np.asarray(mic_of) == 0]
        save_picks_figure(out / figure, MicrographSource.of(data)[0], picks, first)
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
