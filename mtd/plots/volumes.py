"""A volume reconstruction's files: the volume (.mrc with its voxel size, or .npy), a figure of
central slices and projections beside the truth, and the FSC plot.

Each file is written whole or not at all (``mtd.io.files.atomic_write``), as ``mtd.io.outputs``
does for images. The array axis order (0, 1, 2) is the MRC file's (z, y, x), as ``mrcfile`` reads
and writes it (``mtd.so3``), so a volume read back has the same voxels on the same axes.
"""

from __future__ import annotations

import numpy as np

from mtd.io.files import atomic_write, volume_array


def _panels(V: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Central slices along axes 0, 1, 2 (index L // 2: the centre for odd L, the voxel after it
    for even L) and the projection along axis 0 (sum over i0: ``mtd.groups.tomography.project`` at
    R = I)."""
    c = V.shape[0] // 2
    return [
        ("slice i0 = L//2", V[c]),
        ("slice i1 = L//2", V[:, c]),
        ("slice i2 = L//2", V[:, :, c]),
        ("projection (axis 0)", V.sum(0)),
    ]


def save_volume_figure(path, truth, estimates, errors: dict | None = None) -> None:
    """Central slices and the projection along axis 0 of the truth and the estimates, one row
    each, as a PNG; each column shares one grey scale across rows (the truth's range when there
    is a truth), so intensities compare.

    Args:
        path: the PNG to write.
        truth: (L, L, L) true volume, or None.
        estimates: an (L, L, L) volume, or {name: (L, L, L) volume}; pass them aligned to the
            truth (``mtd.metrics.volumes.align_volume(...).aligned``): the figure does not align.
        errors: {name: error after alignment} shown in the row titles, or None.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not isinstance(estimates, dict):
        estimates = {"estimate": estimates}
    rows = [] if truth is None else [("truth", volume_array(truth, "truth"))]
    rows += [(name, volume_array(V, f"estimate {name!r}")) for name, V in estimates.items()]
    if len({V.shape for _, V in rows}) != 1:
        raise ValueError(f"volumes of different shapes: {[V.shape for _, V in rows]}")
    errors = errors or {}
    ref = _panels(rows[0][1])
    fig, axes = plt.subplots(len(rows), 4, figsize=(9.6, 2.5 * len(rows)), squeeze=False)
    for r, (name, V) in enumerate(rows):
        label = name.replace("_", " ")
        if errors.get(name) is not None:
            label += f"\nerror {errors[name]:.3f}"
        for c, ((title, img), (_, img0)) in enumerate(zip(_panels(V), ref, strict=True)):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray", vmin=float(img0.min()), vmax=float(img0.max()))
            if r == 0:
                ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def save_fsc_plot(path, curves, title: str | None = None) -> None:
    """The FSC curves against frequency (1/Angstrom), with the 0.5 and 0.143 lines and each
    curve's crossings (resolution in the legend), as a PNG.

    Args:
        path: the PNG to write.
        curves: an ``mtd.metrics.fsc.FSCCurve``, or {name: FSCCurve}.
        title: the figure's title; None states the mask.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not isinstance(curves, dict):
        curves = {"FSC": curves}
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for name, curve in curves.items():
        label = name.replace("_", " ")
        res = [
            f"{thr:g}: {'none' if r is None else f'{r:.3g} A'}"
            for thr, (_, r) in curve.crossings.items()
        ]
        (line,) = ax.plot(
            curve.frequency, curve.fsc, marker="o", ms=3, label=f"{label} ({', '.join(res)})"
        )
        for f, _ in curve.crossings.values():
            if f is not None and f > 0:
                ax.axvline(f, color=line.get_color(), lw=0.8, ls=":")
    for thr, style in ((0.5, "--"), (0.143, ":")):
        ax.axhline(thr, color="grey", lw=0.8, ls=style)
    first = next(iter(curves.values()))
    ax.set_xlabel("spatial frequency (1/A)")
    ax.set_ylabel("FSC")
    ax.set_ylim(min(-0.1, float(min(np.min(c.fsc) for c in curves.values())) - 0.05), 1.05)
    ax.set_xlim(0, float(first.frequency[-1]) * 1.02)
    ax.set_title(title if title is not None else f"mask: {first.mask}", fontsize=8)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
