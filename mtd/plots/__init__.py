"""Figures (matplotlib, Agg), each written whole or not at all."""

from mtd.plots.images import crop_window, save_figure
from mtd.plots.picks import save_picks_figure
from mtd.plots.volumes import save_fsc_plot, save_volume_figure

__all__ = [
    "crop_window",
    "save_figure",
    "save_fsc_plot",
    "save_picks_figure",
    "save_volume_figure",
]
