"""mtd: multi-target detection by approximate EM; the engine and forward model (plain torch).

Subpackages, one noun of the domain each: ``groups`` (the seam: what the unknown is and its K
templates), ``forward`` (the simulators), ``io`` (files: micrographs, volumes, STAR, a run's
outputs), ``em`` (the E-step, M-steps and the loop), ``picking``, ``metrics``, ``plots``; and
``autocorrelation`` (the approximate-EM paper's baseline), ``so3`` (rotations in 3-D). The
names below are the public interface (docs/design.md, section 8).
"""

from mtd import autocorrelation
from mtd.autocorrelation import Autocorrelations, autocorrelations
from mtd.em import (
    ApproximateEM,
    ClosedForm,
    Compute,
    ConstantGamma,
    Continued,
    Denoise,
    EMResult,
    EStep,
    Gradient,
    LinearGamma,
    MStep,
    Patches,
    PatchSource,
    PatchSummaries,
    Statistics,
    Stochastic,
    TorchDistributed,
    extract_patches,
)
from mtd.forward import Measurement, random_image, shepp_logan, simulate, simulate_volume
from mtd.groups import (
    Dihedral,
    FBBasis,
    Projections,
    Rotations,
    Steerable,
    TransformSet,
    mirror,
    projections,
    rotate,
    steerable,
)
from mtd.io import (
    MicrographSource,
    open_micrograph,
    read_images,
    read_micrograph,
    write_micrograph,
)
from mtd.metrics import align, relative_error

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
    "MicrographSource",
    "PatchSource",
    "PatchSummaries",
    "Patches",
    "Projections",
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
    "projections",
    "random_image",
    "read_images",
    "read_micrograph",
    "relative_error",
    "rotate",
    "shepp_logan",
    "simulate",
    "simulate_volume",
    "steerable",
    "write_micrograph",
]
