"""A reconstruction's files: the estimates, the truth, the measurement, a figure and a summary.

Each file is written whole or not at all (``atomic_write``), the summary last, so a run stopped
part-way leaves no half-written file and no summary claiming outputs that are not there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mtd.forward.images import Measurement
from mtd.io.files import atomic_write, write_micrograph, write_summary
from mtd.io.source import MicrographSource
from mtd.plots.images import save_figure


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
) -> Path:
    """Write a reconstruction's files into ``out``, ``summary.json`` last.

    Files: ``estimate_<name>.npy`` and ``.mrc`` per estimate, ``truth.npy`` (with a truth),
    ``measurement.mrc`` (a simulated ``measurement``, unless ``save_measurement`` is false),
    ``reconstruction.png`` (see
    ``save_figure``) and ``summary.json``.

    Args:
        out: the folder (made if missing).
        estimates: {name: (L, L) estimate}.
        summary: what ``summary.json`` holds (JSON-serialisable; other values as ``str``).
        data: the measurement (a ``MicrographSource`` or what makes one; the figure shows a
            crop of the first micrograph, memory-mapped).
        group: the ``TransformSet`` the estimates are known up to (the figure's alignment).
        truth: (L, L) true image, or None.
        measurement: the simulated ``Measurement`` to save (its copies centre the crop), or None.
        errors: {name: error or (error, error up to translation)} shown in the figure's
            titles.
        crop: the figure's crop is ``crop * L`` pixels wide.
        save_measurement: write ``measurement.mrc``.

    Returns:
        ``out`` as a Path.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    estimates = {name: est.detach().cpu() for name, est in estimates.items()}
    for name, est in estimates.items():
        atomic_write(out / f"estimate_{name}.npy", lambda p, e=est: np.save(p, e.numpy()))
        write_micrograph(out / f"estimate_{name}.mrc", est)
    if truth is not None:
        atomic_write(out / "truth.npy", lambda p: np.save(p, truth.cpu().numpy()))
    if measurement is not None and save_measurement:
        measurement.save(out / "measurement.mrc")
    position = None  # centre the figure's crop on a planted copy
    if measurement is not None and len(measurement.positions):
        position = measurement.positions[0]
    data = MicrographSource.of(data)[0]
    errors = errors or {}
    shown = {name: (est, errors.get(name)) for name, est in estimates.items()}
    save_figure(out / "reconstruction.png", truth, data, shown, group, crop, position)
    write_summary(out / "summary.json", summary)
    return out
