"""mtd: multi-target detection by approximate EM; the engine and forward model (plain torch)."""

from mtd.em import ApproximateEM, EMResult, Patches, Statistics, TorchDistributed
from mtd.measurement import (
    Measurement,
    open_micrograph,
    read_micrograph,
    simulate,
    write_micrograph,
)
from mtd.metrics import relative_error
from mtd.patches import PatchSource, extract_patches
from mtd.rotations import Rotations, rotate

__all__ = [
    "ApproximateEM",
    "EMResult",
    "Measurement",
    "PatchSource",
    "Patches",
    "Rotations",
    "Statistics",
    "TorchDistributed",
    "extract_patches",
    "open_micrograph",
    "read_micrograph",
    "relative_error",
    "rotate",
    "simulate",
    "write_micrograph",
]
