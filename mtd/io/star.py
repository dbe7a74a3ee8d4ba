"""RELION coordinate STAR files (``starfile``): ``rlnCoordinateX`` is the column,
``rlnCoordinateY`` the row, ``rlnAnglePsi`` in degrees."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mtd.io.files import atomic_write

STAR_COLUMNS = ("rlnCoordinateX", "rlnCoordinateY", "rlnAnglePsi", "rlnAutopickFigureOfMerit")

if TYPE_CHECKING:
    from mtd.picking.picks import Picks


def check_star_path(path) -> Path:
    """A .star path whose folder exists (checked before any work)."""
    path = Path(path)
    if path.suffix.lower() != ".star":
        raise ValueError(f"the picks file must end in .star, got {path}")
    if not path.parent.is_dir():
        raise ValueError(f"the folder of the picks file {path} does not exist: {path.parent}")
    return path


def write_star(path, picks: Picks, selected_only: bool = True) -> Path:
    """Write picks as a RELION coordinate STAR file, whole or not at all.

    Columns: ``rlnCoordinateX`` (the centre's column), ``rlnCoordinateY`` (its row), in pixels;
    ``rlnAnglePsi`` (the picked in-plane angle in degrees, counter-clockwise with the row axis
    down as ``mtd.simulate``; left out where the group has no angles);
    ``rlnAutopickFigureOfMerit`` (the score); ``rlnClassNumber`` (template index + 1: where the
    group has no angles, or mirror images); ``rlnMicrographName`` when the picks come from more
    than one micrograph.
    """
    import pandas as pd
    import starfile

    path = check_star_path(path)
    p = picks.picked() if selected_only else picks
    table = {"rlnCoordinateX": p.centres[:, 1], "rlnCoordinateY": p.centres[:, 0]}
    has_angles = not np.isnan(p.angles).any() if len(p) else not np.isnan(picks.angles).any()
    if has_angles:
        table["rlnAnglePsi"] = np.degrees(p.angles)
    table["rlnAutopickFigureOfMerit"] = p.scores
    if not has_angles or p.mirrored.any():
        table["rlnClassNumber"] = p.templates + 1
    if len(picks.names) > 1:
        table["rlnMicrographName"] = [picks.names[s] for s in p.micrograph]
    df = pd.DataFrame(table)
    atomic_write(path, lambda tmp: starfile.write(df, tmp, overwrite=True))
    return path


def read_star(path) -> dict:
    """The columns of a coordinate STAR file as numpy arrays (``rlnCoordinateY`` the row)."""
    import starfile

    df = starfile.read(path, always_dict=False)
    if isinstance(df, dict):  # several blocks: the first table with coordinates
        df = next(v for v in df.values() if hasattr(v, "columns") and "rlnCoordinateX" in v)
    return {c: df[c].to_numpy() for c in df.columns}
