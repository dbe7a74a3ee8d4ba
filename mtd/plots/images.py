"""The figure of an image reconstruction: truth, a crop of the measurement, the estimates."""

from __future__ import annotations

import numpy as np
import torch

from mtd.io.files import atomic_write
from mtd.metrics.images import align


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
