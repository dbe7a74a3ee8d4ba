"""What a run reports of an estimate against its truth, for any kind of unknown."""

from __future__ import annotations

from mtd.metrics.fsc import FSCCurve, fsc
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
