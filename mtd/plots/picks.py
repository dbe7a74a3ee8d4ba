"""The figure of a picker: the micrograph, its selected picks and the true centres."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mtd.io.files import atomic_write

if TYPE_CHECKING:
    from mtd.picking.picks import Picks


def save_picks_figure(
    path, micrograph, picks: Picks, truth=None, which: int = 0, title: str | None = None
) -> Path:
    """The micrograph with the selected picks (circles of radius L / 2) and the true centres
    (crosses), as a PNG (matplotlib Agg), written whole or not at all.

    Args:
        micrograph: (N0, N1) the micrograph ``which`` (tensor or array).
        picks: ``Picks``; those of micrograph ``which`` are drawn.
        truth: (m, 2) true centres of that micrograph (row, column), or None.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    img = micrograph.detach().cpu().numpy() if torch.is_tensor(micrograph) else micrograph
    img = np.asarray(img, dtype=np.float64)
    p = picks.picked()
    p = p.take(p.micrograph == which)
    size = min(12.0, max(4.0, img.shape[1] / 60))
    fig, ax = plt.subplots(figsize=(size, size * img.shape[0] / img.shape[1]))
    ax.imshow(img, cmap="gray", interpolation="nearest")
    for r, c in p.centres:
        ax.add_patch(Circle((c, r), picks.L / 2, fill=False, color="tab:red", lw=1.0))
    if truth is not None and len(truth):
        t = np.asarray(truth, dtype=np.float64).reshape(-1, 2)
        ax.plot(t[:, 1], t[:, 0], "+", color="lime", ms=6, mew=1.2)
    ax.set_title(title or f"{len(p)} picks (red), truth (green +)", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return Path(path)
