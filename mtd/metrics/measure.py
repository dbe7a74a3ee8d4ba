"""What a run reports of an estimate against its truth, for any kind of unknown."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mtd.metrics.fsc import FSCCurve, fsc
from mtd.metrics.images import align, relative_error
from mtd.metrics.volumes import VolumeAlignment, align_volume


def measure_volume(
    truth,
    estimate,
    voxel_size: float = 1.0,
    align: dict | None = None,
    fsc_options: dict | None = None,
) -> tuple[VolumeAlignment, FSCCurve]:
    """Align ``estimate`` to ``truth`` (``align_volume(**align)``) and take the FSC of the truth
    with the aligned estimate (``fsc(**fsc_options)``): what a run reports."""
    al = align_volume(truth, estimate, **(align or {}))
    curve = fsc(truth, al.aligned, voxel_size=voxel_size, **(fsc_options or {}))
    return al, curve


@dataclass
class Score:
    """What ``score`` finds of an estimate.

    Attributes:
        metrics: "error" (eq. 19 of the approximate-EM paper over the group; a volume's after
            alignment, in the ball), "error_shift" (an image's, up to a translation),
            "resolution_0.5" / "resolution_0.143" (a volume's FSC crossings, Angstrom).
        aligned: the estimate as the object it stands for (``group.to_image``), at the element of
            its orbit nearest the truth where that is not an image of pixels (an image is shown
            aligned by its figure).
        record: what summary.json keeps of the alignment and the FSC curve (volumes).
        curve: the ``FSCCurve`` (volumes), else None.
    """

    metrics: dict
    aligned: torch.Tensor
    record: dict = field(default_factory=dict)
    curve: FSCCurve | None = None


def score(group, truth, estimate, max_shift: int = 0, voxel_size: float = 1.0) -> Score:
    """The errors of ``estimate`` (the group's ``shape``) against the true object ``truth`` (its
    ``object_shape``) up to the group's symmetry: for an image, ``relative_error`` over the group
    in the unknown (``group.from_image(truth)``; over translations of up to ``max_shift`` pixels
    too where the unknown is the image itself); for a volume, the error after its alignment over
    SO(3), the mirror and small shifts, and the FSC with the truth (``measure_volume``)."""
    if len(group.object_shape) == 3:
        al, curve = measure_volume(truth, estimate, voxel_size)
        metrics = {"error": al.error}
        metrics.update({f"resolution_{t}": curve.resolution(t) for t in (0.5, 0.143)})
        return Score(
            metrics, al.aligned, {"alignment": al.to_dict(), "fsc": curve.to_dict()}, curve
        )
    truth = group.from_image(truth)
    metrics = {"error": relative_error(truth, estimate, group=group)}
    if max_shift and group.is_image:  # an empty-bordered image: up to a translation
        metrics["error_shift"] = relative_error(truth, estimate, max_shift=max_shift, group=group)
    # Outputs are images; an unknown that is not one is written aligned to the truth (its
    # group's orbit is not a set of images the figure could align over).
    aligned = estimate if group.is_image else align(truth, estimate, group=group)
    return Score(metrics, group.to_image(aligned))


class ErrorCurve:
    """The errors of successive estimates of one truth, as an EM run's curve: an image's over
    its group (eq. 19, in the unknown ``group.from_image(truth)``); a volume's after alignment
    (``align_volume``), each alignment refined from the last (after the first search, a local
    refinement: 0.2 s at L = 11), the error of ``score``.

    Args:
        group: the ``TransformSet`` of the estimates.
        truth: the true object (the group's ``object_shape``).
    """

    def __init__(self, group, truth):
        self.group, self.truth, self.last = group, truth, None

    def __call__(self, x: torch.Tensor) -> float:
        if len(self.group.object_shape) == 3:
            x = x.detach().double().cpu()
            self.last = align_volume(self.truth, x, start=self.last)
            return self.last.error
        return relative_error(self.group.from_image(self.truth), x, group=self.group)
