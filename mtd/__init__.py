"""mtd: multi-target detection by approximate EM; the engine and forward model (plain torch)."""

from mtd.em import ApproximateEM, EMResult, Statistics
from mtd.measurement import Measurement, read_micrograph, simulate, write_micrograph
from mtd.metrics import relative_error
from mtd.patches import extract_patches
from mtd.rotations import Rotations, rotate

__all__ = [
    "ApproximateEM",
    "EMResult",
    "Measurement",
    "Rotations",
    "Statistics",
    "extract_patches",
    "read_micrograph",
    "relative_error",
    "rotate",
    "simulate",
    "write_micrograph",
]
