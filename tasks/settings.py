"""The typed settings of each command: what its config may hold, read once (``tasks.config``).

The configs (``configs/*.yaml`` and their groups) give the values; these classes give their
types, so that a value of the wrong type is refused by name before any work, whether or not the
run uses it. Nodes that Hydra builds into objects (``em.group``, ``em.m_step``, the logger, the
launcher) are kept as they are (``Any``) and instantiated where they are used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mtd.picking import PickingOptions
from tasks.config import at_least, read

Floating = Literal["float16", "bfloat16", "float32", "float64"]


@dataclass
class Measurement:
    """``measurement``: simulated (``configs/measurement/simulate.yaml``) or from files
    (``file.yaml``); a volume experiment adds ``truth`` and ``voxel_size``."""

    source: Literal["simulate", "file"]
    # simulate
    target: str = "held_out"
    L: int | None = field(default=None, metadata=at_least(1))
    norm: float = 10.0
    fb_coefficients: int | None = field(default=None, metadata=at_least(1))
    fb_radius: float | Literal["square"] | None = None
    fb_selection: Literal["lambda", "paper_code"] = "lambda"
    snr_of: Literal["planted", "raw"] = "planted"
    index: int = field(default=0, metadata=at_least(0))
    target_seed: int = 1337
    reference_ckpt: str | None = None
    snr: float = 1.0
    N: int | None = field(default=None, metadata=at_least(1))
    density: float = 0.1
    K: int = field(default=4, metadata=at_least(1))
    rotation: Literal["discrete", "continuous"] = "discrete"
    reflect: bool = False
    separation: Literal["well", "arbitrary"] = "well"
    seed: int = 0
    sigma_known: bool = True
    save: bool = True
    # file
    path: str | list[str] | None = None
    sigma: float | None = None
    # the truth: an image for the error (file), or a volume (shepp_logan, default, a path)
    truth: str | None = None
    voxel_size: float = 1.0


@dataclass
class EM:
    """``em``: a preset of ``configs/em/`` (the engine's settings and the run-level choices)."""

    name: str
    group: Any
    m_step: Any
    K: int = field(default=4, metadata=at_least(1))
    rho: Literal["estimate", "uniform"] = "uniform"
    iterations: int = field(default=100, metadata=at_least(1))
    tol: float = 1e-5
    method: Literal["auto", "fft", "gemm"] = "auto"
    chunk_size: int | None = field(default=None, metadata=at_least(1))
    stream: bool | None = None
    stochastic: float = 1.0
    polish: int = field(default=0, metadata=at_least(0))
    init: Literal[
        "digits", "uniform", "normal", "autocorrelation", "prior_mean", "prior_samples", "file"
    ] = "digits"
    init_digits: str | None = None
    init_indices: list[int] = field(default_factory=list)
    init_file: str | None = None
    restarts: int = field(default=1, metadata=at_least(1))
    refine_K: int | None = field(default=None, metadata=at_least(1))
    refine_iterations: int = field(default=50, metadata=at_least(1))
    baseline: Literal["same", "closed_form"] = "same"
    search_anneal: list[float | None] = field(default_factory=list)
    search_from_no_prior: bool = False
    search_iterations: int = field(default=0, metadata=at_least(0))


@dataclass
class Autocorrelation:
    """``ac``: the autocorrelation analysis (``mtd.autocorrelation.fit``)."""

    starts: int = field(default=5, metadata=at_least(1))
    iterations: int = field(default=300, metadata=at_least(1))
    weights: Literal["noise", "entries"] | list[float] = "noise"


@dataclass
class Denoising:
    """``configs/denoising/default.yaml``: the micrograph denoiser (``priors.denoise``)."""

    ckpt: str
    guidance: float = 0.25
    K: int = field(default=16, metadata=at_least(1))
    density: float = 0.1
    empty: float | None = None
    stride: int | None = field(default=None, metadata=at_least(1))
    batch_size: int = field(default=64, metadata=at_least(1))


@dataclass
class Reconstruct:
    """``configs/reconstruct.yaml``."""

    measurement: Measurement
    em: EM
    picking: PickingOptions
    denoising: Denoising
    ac: Autocorrelation
    object: Literal["image", "volume"] = "image"
    group: str = "reconstruct"
    tags: list[str] = field(default_factory=list)
    seed: int = 0
    ckpt: str | None = None
    compare: bool = True
    oracle: bool = False
    device: str = "cpu"
    dtype: Floating = "float64"
    prior_dtype: Floating = "float32"
    max_shift: int | None = field(default=3, metadata=at_least(0))
    image_every: int | None = field(default=10, metadata=at_least(0))
    volume_error_every: int | None = field(default=5, metadata=at_least(0))
    crop: int = field(default=4, metadata=at_least(1))
    pick: bool = False
    denoise: bool = False
    autocorrelation: bool = False
    stochastic_min_patches: int = field(default=60, metadata=at_least(0))


@dataclass
class Pick:
    """``configs/pick.yaml``'s own keys (its picking options, ``configs/picking/``, beside)."""

    micrograph: str | list[str]
    estimate: str
    L: int | None = field(default=None, metadata=at_least(1))
    K: int = field(default=4, metadata=at_least(1))
    group: str = "rotations"
    method: Literal["posterior", "template"] = "posterior"
    sigma: float | None = field(default=None, metadata={"min": 0, "finite": True})
    rho: Literal["estimate", "uniform"] = "estimate"
    rho_iterations: int = field(default=10, metadata=at_least(0))
    seed: int = 0
    truth: str | None = None
    star: str = "picks.star"
    figure: str | None = "picks.png"
    device: str = "cpu"
    dtype: Floating = "float64"
    chunk_size: int | None = field(default=None, metadata=at_least(1))


@dataclass
class Denoise:
    """``configs/denoise.yaml``'s own keys (its options, ``configs/denoising/``, beside)."""

    micrograph: str
    sigma: float = field(metadata={"finite": True})
    estimate: str | None = None
    L: int | None = field(default=None, metadata=at_least(1))
    clean: str | None = None
    out_dir: str | None = None
    suffix: str = "_denoised"
    figure: bool = True
    device: str = "cpu"
    dtype: Floating = "float32"


def reconstruct_settings(cfg) -> Reconstruct:
    """The reconstruction's settings, every value checked (``tasks.config.read``)."""
    return read(Reconstruct, cfg)


def _own_and_options(cls, option_cls, cfg):
    """A command whose option group sits at its config's top level (``picking@_here_``): its own
    keys and the options' keys are read from the same node."""

    def keys(c):
        return {k: cfg[k] for k in c.__dataclass_fields__ if k in cfg}

    return read(cls, keys(cls)), read(option_cls, keys(option_cls))


def pick_settings(cfg) -> tuple[Pick, PickingOptions]:
    return _own_and_options(Pick, PickingOptions, cfg)


def denoise_settings(cfg) -> tuple[Denoise, Denoising]:
    return _own_and_options(Denoise, Denoising, cfg)
