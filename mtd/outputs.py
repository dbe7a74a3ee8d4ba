"""A reconstruction's files: the estimates, the truth, the measurement, a figure and a summary.

Each file is written whole or not at all (``atomic_write``), the summary last, so a run stopped
part-way leaves no half-written file and no summary claiming outputs that are not there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mtd.measurement import (
    Measurement,
    atomic_write,
    open_micrograph,
    write_micrograph,
    write_summary,
)
from mtd.metrics import align


def crop_window(shape, L: int, crop: int = 4, position=None) -> tuple[int, int, int]:
    """The figure's crop of an ``shape`` = (N0, N1) measurement: (top row, left column, side),
    side = min(crop * L, N0, N1), centred on ``position`` (a copy's top-left corner) if given."""
    size = min(crop * L, *shape)
    r0 = c0 = 0
    if position is not None:
        r0, c0 = (max(0, int(v) - (crop * L - L) // 2) for v in position)
    return min(r0, shape[0] - size), min(c0, shape[1] - size), size


def save_figure(path, truth, data, estimates: dict, group, crop: int = 4, position=None) -> None:
    """Truth, a crop of the measurement and the estimates side by side, as a PNG.

    Args:
        path: the PNG to write.
        truth: (L, L) true image, or None.
        data: (N, N) measurement (tensor or array, e.g. memory-mapped).
        estimates: {name: ((L, L) estimate, its errors)}: the errors are None, the error over
            the group, or (that error, the error up to translation too or None), as summary.json
            has them (``error/<name>``, ``error_shift/<name>``); each estimate is shown at the
            group element the error is measured at (``mtd.align``).
        group: the ``TransformSet`` the estimates are known up to.
        crop: the crop is ``crop * L`` pixels wide (at most the measurement).
        position: (row, column) top-left corner of a planted copy to centre the crop on, or None
            (the crop starts at the corner).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = next(iter(estimates.values()))[0].shape[-1]
    panels = [] if truth is None else [("truth", truth)]
    r0, c0, size = crop_window(data.shape, L, crop, position)
    panels.append((f"measurement ({size} x {size} crop)", data[r0 : r0 + size, c0 : c0 + size]))
    for name, (est, err) in estimates.items():
        err, shift = err if isinstance(err, tuple | list) else (err, None)
        title = name.replace("_", " ") + ("" if err is None else f"\nerror {err:.3f}")
        if shift is not None:  # one pixel off reads large above; this is the shape's error
            title += f"\nup to translation {shift:.3f}"
        panels.append((title, est if truth is None else align(truth, est, group=group)))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.1))
    for ax, (title, img) in zip(np.atleast_1d(axes), panels, strict=True):
        img = img.detach().double().cpu().numpy() if torch.is_tensor(img) else img
        ax.imshow(np.asarray(img, dtype=np.float64), cmap="gray")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


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
        data: the measurement: an (N, N) tensor, or the path(s) of its file(s) (the figure shows
            a crop of the first, memory-mapped).
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
    if not torch.is_tensor(data):
        data = open_micrograph(data if isinstance(data, str | Path) else data[0])
    errors = errors or {}
    shown = {name: (est, errors.get(name)) for name, est in estimates.items()}
    save_figure(out / "reconstruction.png", truth, data, shown, group, crop, position)
    write_summary(out / "summary.json", summary)
    return out
