"""A reconstruction's files, for images and volumes: the estimates, the truth, the measurement,
figures and a summary.

Each file is written whole or not at all (``atomic_write``), the summary last, so a run stopped
part-way leaves no half-written file and no summary claiming outputs that are not there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mtd.forward.measurement import Measurement
from mtd.groups.rotations import Rotations
from mtd.io.files import atomic_write, write_micrograph, write_summary, write_volume
from mtd.io.source import MicrographSource
from mtd.plots.images import save_figure
from mtd.plots.volumes import save_fsc_plot, save_volume_figure


def write_outputs(
    out,
    estimates: dict,
    summary: dict,
    data,
    group,
    truth=None,
    measurement: Measurement | None = None,
    errors: dict | None = None,
    crop: int = 4,
    save_measurement: bool = True,
    voxel_size: float = 1.0,
    curves: dict | None = None,
) -> Path:
    """Write a reconstruction's files into ``out``, ``summary.json`` last.

    Files, for images: ``estimate_<name>.npy`` and ``.mrc`` per estimate, ``truth.npy`` (with a
    truth) and ``reconstruction.png`` (``mtd.plots.save_figure``); for volumes (the group's
    ``object_shape`` is 3-D): ``estimate_<name>.mrc`` (with ``voxel_size``) and ``.npy``,
    ``truth.mrc``, ``volume.png`` (central slices and a projection beside the truth's) and
    ``fsc.png`` (the FSC ``curves``); for both ``measurement.mrc`` (a simulated ``measurement``,
    unless ``save_measurement`` is false) and ``summary.json``.

    Args:
        out: the folder (made if missing).
        estimates: {name: the object each estimate stands for, (L, L) or (L, L, L)}; those of an
            unknown that is not an image of pixels already aligned to the truth.
        summary: what ``summary.json`` holds (JSON-serialisable; other values as ``str``).
        data: the measurement (a ``MicrographSource`` or what makes one; the figure shows a
            crop of the first micrograph, memory-mapped).
        group: the ``TransformSet`` the estimates are known up to (an image figure aligns over
            it where the unknown is the image itself).
        truth: the true object, or None.
        measurement: the simulated ``Measurement`` to save (its copies centre the crop), or None.
        errors: {name: error or (error, error up to translation)} shown in the figure's titles.
        crop: the figure's crop is ``crop * L`` pixels wide.
        save_measurement: write ``measurement.mrc``.
        voxel_size: Angstrom per voxel of a volume's files.
        curves: {name: ``FSCCurve``} of volumes, or None.

    Returns:
        ``out`` as a Path.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    estimates = {name: est.detach().cpu() for name, est in estimates.items()}
    errors = errors or {}
    if len(group.object_shape) == 3:
        _write_volumes(out, estimates, truth, errors, voxel_size, curves)
    else:
        _write_images(out, estimates, truth, errors, data, group, measurement, crop)
    if measurement is not None and save_measurement:
        measurement.save(out / "measurement.mrc")
    write_summary(out / "summary.json", summary)
    return out


def _write_images(out, estimates, truth, errors, data, group, measurement, crop) -> None:
    for name, est in estimates.items():
        atomic_write(out / f"estimate_{name}.npy", lambda p, e=est: np.save(p, e.numpy()))
        write_micrograph(out / f"estimate_{name}.mrc", est)
    if truth is not None:
        atomic_write(out / "truth.npy", lambda p: np.save(p, truth.cpu().numpy()))
    position = None  # centre the figure's crop on a planted copy
    if measurement is not None and len(measurement.positions):
        position = measurement.positions[0]
    shown = {name: (est, errors.get(name)) for name, est in estimates.items()}
    # The estimates of an unknown that is not an image come aligned: shown as they are.
    figure_group = group if group.is_image else Rotations(group.L, 1)
    micrograph = MicrographSource.of(data)[0]
    save_figure(out / "reconstruction.png", truth, micrograph, shown, figure_group, crop, position)


def _write_volumes(out, estimates, truth, errors, voxel_size, curves) -> None:
    for name, est in estimates.items():
        write_volume(out / f"estimate_{name}.mrc", est, voxel_size)
        write_volume(out / f"estimate_{name}.npy", est, voxel_size)
    if truth is not None:
        write_volume(out / "truth.mrc", truth, voxel_size)
        save_volume_figure(out / "volume.png", truth, estimates, errors)
    if curves:
        save_fsc_plot(out / "fsc.png", curves)
