"""Errors that respect the symmetry of MTD: an estimate is known up to its group's action (and a
small translation); volumes after alignment over SO(3) and the mirror, with their FSC."""

from mtd.metrics.fsc import FSCCurve, fsc
from mtd.metrics.images import align, relative_error
from mtd.metrics.measure import ErrorCurve, Score, measure_volume, score
from mtd.metrics.volumes import VolumeAlignment, align_volume, volume_error

__all__ = [
    "ErrorCurve",
    "FSCCurve",
    "Score",
    "VolumeAlignment",
    "align",
    "align_volume",
    "fsc",
    "measure_volume",
    "relative_error",
    "score",
    "volume_error",
]
