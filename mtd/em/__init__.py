"""Approximate EM: patches, the E-step as a stream of posteriors and its consumers, the
likelihood's correlation forms, the thread policy, the M-steps, the loop and its distributed
sums (the approximate-EM paper; the score-prior paper's M-step; the stochastic-EM paper's
Algorithm 1)."""

from mtd.em.estep import Compute, EStep, Patches, Posterior
from mtd.em.loop import ApproximateEM, EMResult, Stochastic, TorchDistributed
from mtd.em.msteps import (
    ClosedForm,
    ConstantGamma,
    Continued,
    Denoise,
    Gradient,
    LinearGamma,
    MStep,
)
from mtd.em.patches import PatchSource, extract_patches
from mtd.em.refine import refine
from mtd.em.search import anneal_variants, search
from mtd.em.statistics import PatchSummaries, Statistics, empty_shifts

__all__ = [
    "anneal_variants",
    "ApproximateEM",
    "ClosedForm",
    "Compute",
    "ConstantGamma",
    "Continued",
    "Denoise",
    "EMResult",
    "EStep",
    "Gradient",
    "LinearGamma",
    "MStep",
    "PatchSource",
    "PatchSummaries",
    "Patches",
    "Posterior",
    "Statistics",
    "Stochastic",
    "TorchDistributed",
    "empty_shifts",
    "extract_patches",
    "refine",
    "search",
]
