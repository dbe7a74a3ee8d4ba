"""The seam between the E-step and the kind of unknown (``TransformSet``), and its kinds.

- ``Rotations``, ``Dihedral``: the K rotations of an image (and its mirror image);
- ``Steerable`` over an ``FBBasis``: exact rotations of an image's Fourier-Bessel coefficients;
- ``Projections``: tomographic projections of a volume at an SO(3) grid.

``steerable(L, K, ...)`` and ``projections(L, resolution, ...)`` build the last two from plain
values (the factories of ``configs/em/group/``).
"""

from mtd.groups.base import Poses, TransformSet, solve_normal
from mtd.groups.fourier_bessel import FBBasis, Steerable, steerable
from mtd.groups.rotations import Dihedral, Rotations, mirror, rotate
from mtd.groups.tomography import Projections, back_project, project, projections

__all__ = [
    "Dihedral",
    "FBBasis",
    "Poses",
    "Projections",
    "Rotations",
    "Steerable",
    "TransformSet",
    "back_project",
    "mirror",
    "project",
    "projections",
    "rotate",
    "solve_normal",
    "steerable",
]
