"""mtd: multi-target detection by approximate EM; the engine and forward model (plain torch)."""

from mtd import autocorrelation
from mtd.autocorrelation import Autocorrelations, autocorrelations
from mtd.em import ApproximateEM, EMResult, Stochastic, TorchDistributed
from mtd.estep import Compute, EStep, Patches, PatchSummaries, Statistics
from mtd.group import TransformSet
from mtd.measurement import (
    Measurement,
    open_micrograph,
    random_image,
    read_images,
    read_micrograph,
    simulate,
    write_micrograph,
)
from mtd.metrics import align, relative_error
from mtd.msteps import (
    ClosedForm,
    ConstantGamma,
    Continued,
    Denoise,
    Gradient,
    LinearGamma,
    MStep,
)
from mtd.patches import PatchSource, extract_patches
from mtd.rotations import Dihedral, Rotations, mirror, rotate
from mtd.steerable import FBBasis, Steerable

__all__ = [
    "ApproximateEM",
    "Autocorrelations",
    "ClosedForm",
    "Compute",
    "ConstantGamma",
    "Continued",
    "Denoise",
    "Dihedral",
    "EMResult",
    "EStep",
    "FBBasis",
    "Gradient",
    "LinearGamma",
    "MStep",
    "Measurement",
    "PatchSource",
    "PatchSummaries",
    "Patches",
    "Rotations",
    "Statistics",
    "Steerable",
    "Stochastic",
    "TorchDistributed",
    "TransformSet",
    "align",
    "autocorrelation",
    "autocorrelations",
    "extract_patches",
    "mirror",
    "open_micrograph",
    "random_image",
    "read_images",
    "read_micrograph",
    "relative_error",
    "rotate",
    "simulate",
    "write_micrograph",
]
