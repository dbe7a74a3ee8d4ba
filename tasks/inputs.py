"""A reconstruction's inputs, from its settings: the prior, the measurement (simulated, or the
user's micrographs) with its truth, the group, the engines and the initial guesses."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import hydra
import numpy as np
import torch

import mtd
from mtd.io import MicrographSource
from priors import ScorePrior
from tasks.config import is_none
from tasks.settings import Reconstruct


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when torch sees a GPU), or the device named, refused where it is missing."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name}, but torch sees no CUDA GPU here: use cpu or auto")
    return device


def load_prior(s: Reconstruct, device: torch.device) -> ScorePrior | None:
    """The checkpoint's score prior, or None for ``ckpt=none``."""
    if is_none(s.ckpt):
        if s.oracle:
            raise ValueError("oracle=true needs the checkpoint of a Gaussian prior, got ckpt=none")
        return None
    return ScorePrior.from_checkpoint(s.ckpt, device=device, dtype=getattr(torch, s.prior_dtype))


@dataclass
class Inputs:
    """What a reconstruction works on.

    Attributes:
        source: the micrograph(s) (``MicrographSource``).
        L: the image (or volume) side.
        sigma: the noise level handed to EM, or None (EM estimates it).
        truth: the true object, (L, L) image or (L, L, L) volume, or None.
        info: what summary.json records of the measurement.
        simulated: the simulation's ``mtd.forward.Measurement``, or None for files.
        voxel_size: Angstrom per voxel of a volume's outputs.
    """

    source: MicrographSource
    L: int
    sigma: float | None
    truth: torch.Tensor | None
    info: dict
    simulated: mtd.Measurement | None = None
    voxel_size: float = 1.0


def measurement(s: Reconstruct, prior: ScorePrior | None) -> Inputs:
    """The measurement of ``s.measurement``: simulated from a target (an image, or a volume for
    ``object=volume``), or read from files."""
    m = s.measurement
    if s.object == "volume":
        return _volume_measurement(s, prior)
    if m.source == "file":
        truth = None if is_none(m.truth) else mtd.read_images(m.truth)[0]
        return _files(s, _side(m.L, "measurement.L", 1), truth)
    truth, where = target_image(s, prior)
    L = truth.shape[-1]
    N = _simulated_N(s, L)
    if not m.density > 0:  # no copies: EM would fit pure noise and report errors
        raise ValueError(
            f"measurement.density must be > 0 (the share of the measurement covered by copies), "
            f"got {m.density!r}"
        )
    if not m.snr > 0:
        raise ValueError(f"measurement.snr must be > 0 (inf: no noise), got {m.snr!r}")
    if math.isinf(m.snr) and m.sigma_known:  # the true sigma is 0: no likelihood
        raise ValueError(
            "measurement.snr=inf (no noise) gives EM the true sigma = 0 with "
            "measurement.sigma_known=true; add measurement.sigma_known=false (EM estimates sigma)"
        )
    basis = None
    if m.fb_coefficients is not None:  # the approximate-EM paper's forward model
        radius = L // 2 + 1 if m.fb_radius == "square" else m.fb_radius
        basis = mtd.FBBasis(L, n=m.fb_coefficients, radius=radius, selection=m.fb_selection)
    meas = mtd.simulate(
        truth, N, density=m.density, snr=m.snr, K=m.K, rotation=m.rotation, reflect=m.reflect,
        separation=m.separation, seed=m.seed, basis=basis, snr_of=m.snr_of,
    )  # fmt: skip
    if not len(meas.angles):
        raise ValueError(
            f"measurement.density={m.density} plants no copy of a {L} x {L} image in {N} x {N} "
            "(round(density N^2 / L^2) = 0): raise measurement.density or measurement.N"
        )
    # The truth is the band-limited image when the copies are its exact rotations.
    return _simulated(s, meas, where)


def target_image(s: Reconstruct, prior: ScorePrior | None) -> tuple[torch.Tensor, str]:
    """The simulated measurement's true image (L, L) float64 and a description of where from."""
    m = s.measurement
    if m.target == "random":
        if m.L is None:
            raise ValueError("measurement.target=random needs measurement.L (the image side)")
        seed = m.target_seed + m.index
        return mtd.random_image(m.L, seed=seed, norm=m.norm), f"random[{seed}]"
    if m.target != "held_out":
        stack = mtd.read_images(m.target)
        if not 0 <= m.index < len(stack):
            raise ValueError(
                f"measurement.index must be in 0..{len(stack) - 1} (the images of {m.target}), "
                f"got {m.index}"
            )
        return stack[m.index], f"{m.target}[{m.index}]"
    source = prior  # ckpt=none: the same targets as with the reference prior
    if source is None:
        source = ScorePrior.from_checkpoint(m.reference_ckpt)
    return source.target(m.index, m.target_seed)


def _side(value, key: str, least: int) -> int:
    if value is None:
        raise ValueError(f"{key} must be an integer >= {least}, got None")
    if value < least:
        raise ValueError(f"{key} must be an integer >= {least}, got {value!r}")
    return value


def _simulated_N(s: Reconstruct, L: int) -> int:
    """measurement.N (null: the paper's 11 L), at least L."""
    N = s.measurement.N
    return 11 * L if N is None else _side(N, "measurement.N", L)


def _simulated(s: Reconstruct, meas, where: str, voxel_size: float = 1.0) -> Inputs:
    m = s.measurement
    info = {"target": where, "N": meas.N, "L": meas.L, "copies": len(meas.positions)}
    info.update(snr=meas.snr, sigma=float(meas.sigma))
    sigma = info["sigma"] if m.sigma_known else None
    source = MicrographSource(meas.data)
    return Inputs(source, meas.L, sigma, meas.truth, info, meas, voxel_size)


def _files(s: Reconstruct, L: int, truth, voxel_size: float = 1.0) -> Inputs:
    """measurement.path: one file, a list of files, or a glob pattern (sorted), memory-mapped."""
    m = s.measurement
    if m.path is None:
        raise ValueError("measurement=file needs measurement.path=PATH (a .npy / .mrc or a glob)")
    source = MicrographSource(m.path, key="measurement.path")
    info = {"target": source.names, "N": [list(shape) for shape in source.shapes], "L": L}
    return Inputs(source, L, m.sigma, truth, info, None, voxel_size)


def _volume_measurement(s: Reconstruct, prior: ScorePrior | None) -> Inputs:
    """A volume run's measurement (the stochastic-EM paper's model): its truth a held-out
    structure of the volume prior (``held_out``, ``measurement.index``; simulations' default),
    the Shepp-Logan phantom, a volume file, or none; simulated or from files."""
    m = s.measurement
    L = _side(m.L, "measurement.L", 2)
    truth, voxel = None, m.voxel_size
    where = None if is_none(m.truth) else str(m.truth)
    if where == "default":  # a held-out protein for simulations; a file's volume is not known
        where = "held_out" if m.source == "simulate" else None
    if where == "shepp_logan":  # the standard test volume, built from its ellipsoid table
        truth = mtd.shepp_logan(L)
    elif where == "held_out":  # ckpt=none: the same targets as with the reference prior
        source = prior if prior is not None else ScorePrior.from_checkpoint(m.reference_ckpt)
        if source.ndim != 3 or source.image_size != L:
            raise ValueError(
                f"measurement.truth=held_out takes the held-out volumes of {source.path}, a "
                f"prior of {' x '.join(map(str, source.object_shape))} "
                f"{'images' if source.ndim == 2 else 'volumes'}; measurement.L "
                f"is {L}"
            )
        truth, where = source.target(m.index, 0)
    elif where is not None:
        array, voxel_file = mtd.io.read_volume(where)
        truth = torch.from_numpy(array)
        voxel = voxel_file or voxel
        if tuple(truth.shape) != (L, L, L):
            raise ValueError(
                f"measurement.truth {where} is a {tuple(truth.shape)} volume; measurement.L is {L}"
            )
    if m.source == "file":  # (the truth, if any: the volume the micrographs were made of)
        return _files(s, L, truth, voxel)
    if truth is None:
        raise ValueError("a simulated volume run needs measurement.truth (shepp_logan or a PATH)")
    N = _simulated_N(s, L)
    meas = mtd.simulate_volume(
        truth, N, density=m.density, snr=m.snr, separation=m.separation, seed=m.seed
    )
    return _simulated(s, meas, where, voxel)


def make_group(s: Reconstruct, L: int, K: int | None = None) -> mtd.TransformSet:
    """``em.group`` at side L (with ``K`` rotations when given: a refinement's finer grid),
    checked against ``object``: an image run's unknown stands for an image, a volume run's for a
    volume."""
    group = hydra.utils.instantiate(s.em.group, **({} if K is None else {"K": K}))(L)
    if (len(group.object_shape) == 3) != (s.object == "volume"):
        raise ValueError(
            f"object={s.object} needs an em.group whose unknown stands for "
            f"{'a volume (em=volume)' if s.object == 'volume' else 'an image'}; em={s.em.name}'s "
            f"stands for {group.object_shape} objects"
        )
    return group


def build_em(
    s: Reconstruct, group, m_step, sigma, device, iterations: int | None = None
) -> mtd.ApproximateEM:
    """The configured engine around ``group`` and ``m_step`` (``em.iterations`` unless given)."""
    e = s.em
    stochastic = None
    if e.stochastic != 1:
        stochastic = mtd.Stochastic(e.stochastic, e.polish, seed=s.seed)
    return mtd.ApproximateEM(
        group,
        m_step=m_step,
        sigma=sigma,
        rho=e.rho,
        iterations=e.iterations if iterations is None else iterations,
        tol=e.tol,
        stochastic=stochastic,
        compute=mtd.Compute(e.method, e.chunk_size, e.stream),
        device=device,
        dtype=s.dtype,
    )


def fit_autocorrelation(s: Reconstruct, source: MicrographSource, sigma, group):
    """The approximate-EM paper's baseline: the measurement's first three autocorrelations (one
    pass) fitted in the group's Fourier-Bessel basis (``mtd.autocorrelation.fit``, ``ac.*``).

    Returns:
        (the ``FitResult``, its seconds with the pass over the data).
    """
    if group.steerable_basis is None:
        raise ValueError(
            "autocorrelation analysis (em.init=autocorrelation, autocorrelation=true) needs "
            f"em/group=steerable (a Fourier-Bessel unknown), got {type(group).__name__}"
        )
    start = time.perf_counter()
    moments = mtd.autocorrelations(source, group.L)
    fit = mtd.autocorrelation.fit(
        moments, group.steerable_basis, sigma=sigma, starts=s.ac.starts, seed=s.seed,
        iterations=s.ac.iterations, weights=s.ac.weights,
    )  # fmt: skip
    return fit, time.perf_counter() - start


def initial_guess(s: Reconstruct, L: int, prior, truth, group, ac=None) -> torch.Tensor:
    """(R, *group.shape) float64 initial guesses of the unknown, R = em.restarts: images (R, L, L)
    for an image group, the group's ``from_image`` of them otherwise (``normal``: N(0, 1) draws
    of the unknown itself, the approximate-EM paper's random guesses; ``autocorrelation``: the
    estimate of autocorrelation analysis ``ac`` first, as the paper's Fig. 2 starts EM, then
    N(0, 1) draws: fits from other seeds mostly land on the same minimum, measured; ``digits``:
    the mean of the ``em.init_indices`` digits, as the score-prior paper, then the digits
    themselves)."""
    e, R, shape = s.em, s.em.restarts, tuple(group.shape)
    g = torch.Generator().manual_seed(s.seed)
    if e.init == "autocorrelation":
        rest = torch.randn((R - 1, *shape), generator=g, dtype=torch.float64)
        return torch.cat([ac.coefficients.to(torch.float64)[None], rest])
    if e.init == "normal":
        return torch.randn((R, *shape), generator=g, dtype=torch.float64)
    if e.init == "uniform":  # the paper's Gaussian init, U[0, 1]
        x = torch.rand((R, L, L), generator=g, dtype=torch.float64)
    elif e.init == "digits":  # the paper's MNIST init: the mean of ten training digits
        x = _digits(s, R, truth)
    elif e.init == "file":
        if e.init_file is None:
            raise ValueError("em.init=file needs em.init_file=PATH (an (L, L) or (n, L, L) image)")
        stack = mtd.read_images(e.init_file)
        x = stack[:R] if len(stack) >= R else stack[:1].expand(R, *stack.shape[1:]).clone()
    else:  # prior_mean, prior_samples
        if prior is None:
            raise ValueError(f"em.init={e.init} needs a prior (ckpt=PATH), got ckpt=none")
        x = (
            prior.mean().expand(R, L, L).clone()
            if e.init == "prior_mean"
            else prior.sample(R, s.seed)
        )
    if x.shape[-1] != L:  # before the measurement's one pass, which can be long
        raise ValueError(
            f"em.init={e.init} gives {x.shape[-1]}-pixel images, the EM needs L = {L}"
        )
    return group.from_image(x)


def _digits(s: Reconstruct, R: int, truth) -> torch.Tensor:
    """The mean of the ``em.init_indices`` digits, then the digits themselves (restarts after
    the mean: at low SNR EM from the mean misses a basin the likelihood prefers)."""
    with np.load(s.em.init_digits) as f:
        digits = torch.from_numpy(f["images"][list(s.em.init_indices)].astype(np.float64) / 255)
    if truth is not None and any(torch.equal(d, truth) for d in digits):
        raise ValueError("em.init_indices include the target itself: choose other digits")
    if R > len(digits) + 1:
        raise ValueError(
            f"em.restarts={R} with em.init=digits: at most {len(digits) + 1} (the mean, then each "
            f"of the {len(digits)} digits of em.init_indices)"
        )
    return torch.cat([digits.mean(0)[None], digits[: R - 1]])
