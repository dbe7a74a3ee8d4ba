"""Reconstruct an image from an MTD measurement: ``python reconstruct.py [ckpt=PATH|none]``.

Hydra composes ``configs/reconstruct.yaml``; ``reconstruct(cfg)`` does the work and can be called
from tests. It loads the score prior (``priors``), simulates a measurement of a held-out target or
reads one from disk, runs approximate EM (``mtd``) with and without the prior from the same initial
guess, logs the iterations to W&B (``wandb_setup``) and writes the estimates, a figure and
``summary.json`` into the run directory (``mtd.io.outputs``).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import mtd
import mtd.forward.volumes
from mtd import picking
from mtd.io.files import write_summary
from mtd.io.outputs import write_outputs
from mtd.metrics import volumes as volume_metrics
from mtd.plots import volumes as volume_outputs
from mtd.plots.images import crop_window
from priors import ScorePrior
from priors import denoise as denoising
from run_checks import (
    USER_ERRORS,
    check_numbers,
    check_run_dir,
    check_scale,
    check_stochastic,
    checkpoint_identity,
    integer,
    is_none,
    number,
    patch_count,
    register_project_resolver,
    threshold,
    user_error_exit,
)
from wandb_setup import (
    check_reconstruction_logger,
    em_logger,
    log_results,
    run_name,
    start_reconstruction,
)

register_project_resolver()

INITS = ("digits", "uniform", "normal", "autocorrelation", "prior_mean", "prior_samples", "file")
BASELINES = ("same", "closed_form")


# ------------------------------------------------------------------------------------------------
# Inputs: prior, measurement, initial guess; the EMs
# ------------------------------------------------------------------------------------------------
def load_prior(cfg: DictConfig, device: torch.device) -> ScorePrior | None:
    """The checkpoint's score prior, or None for ``ckpt=none``."""
    if is_none(cfg.ckpt):
        if cfg.oracle:
            raise ValueError("oracle=true needs the checkpoint of a Gaussian prior, got ckpt=none")
        return None
    return ScorePrior.from_checkpoint(
        cfg.ckpt, device=device, dtype=getattr(torch, cfg.prior_dtype)
    )


def target_image(cfg: DictConfig, prior: ScorePrior | None) -> tuple[torch.Tensor, str]:
    """The simulated measurement's true image (L, L) float64 and a description of where from."""
    m = cfg.measurement
    if m.target == "random":
        if is_none(m.L):
            raise ValueError("measurement.target=random needs measurement.L (the image side)")
        L, seed = integer(cfg, "measurement.L", 1), int(m.target_seed) + int(m.index)
        image = mtd.random_image(L, seed=seed, norm=number(cfg, "measurement.norm"))
        return image, f"random[{seed}]"
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


def get_measurement(cfg: DictConfig, prior: ScorePrior | None):
    """The measurement.

    Returns:
        (data: (N, N) tensor or the file path(s), sigma given to EM or None, truth (L, L) or None,
        info dict for the summary, the simulated ``mtd.Measurement`` or None).
    """
    m = cfg.measurement
    if m.source == "simulate":
        truth, where = target_image(cfg, prior)
        L = truth.shape[-1]
        N = 11 * L if is_none(m.N) else integer(cfg, "measurement.N", L)
        density, snr = number(cfg, "measurement.density"), number(cfg, "measurement.snr")
        if not density > 0:  # no copies: EM would fit pure noise and report errors
            raise ValueError(
                f"measurement.density must be > 0 (the share of the measurement covered by "
                f"copies), got {m.density!r}"
            )
        if not snr > 0:
            raise ValueError(f"measurement.snr must be > 0 (inf: no noise), got {m.snr!r}")
        if math.isinf(snr) and m.sigma_known:  # the true sigma is 0: no likelihood
            raise ValueError(
                "measurement.snr=inf (no noise) gives EM the true sigma = 0 with "
                "measurement.sigma_known=true; add measurement.sigma_known=false (EM estimates "
                "sigma)"
            )
        basis = None
        if not is_none(m.fb_coefficients):  # the approximate-EM paper's forward model
            radius = None if is_none(m.fb_radius) else m.fb_radius
            basis = mtd.FBBasis(
                L,
                n=integer(cfg, "measurement.fb_coefficients", 1),
                radius=L // 2 + 1 if radius == "square" else radius,
                selection=m.fb_selection,
            )
        meas = mtd.simulate(
            truth,
            N,
            density=density,
            snr=snr,
            K=integer(cfg, "measurement.K", 1),
            rotation=m.rotation,
            reflect=bool(m.reflect),
            separation=m.separation,
            seed=int(m.seed),
            basis=basis,
            snr_of=m.snr_of,
        )
        truth = meas.image  # the band-limited image when the copies are its exact rotations
        if not len(meas.angles):
            raise ValueError(
                f"measurement.density={m.density} plants no copy of a {L} x {L} image in "
                f"{N} x {N} (round(density N^2 / L^2) = 0): raise measurement.density or "
                "measurement.N"
            )
        info = {"target": where, "N": N, "L": L, "copies": len(meas.angles), "snr": snr}
        info["sigma"] = float(meas.sigma)
        return meas.data, info["sigma"] if m.sigma_known else None, truth, info, meas
    if m.source == "file":
        data, info = measurement_files(cfg)
        truth = None if is_none(m.truth) else mtd.read_images(m.truth)[0]
        sigma = None if is_none(m.sigma) else float(m.sigma)
        return data, sigma, truth, info, None
    raise ValueError(f"measurement.source must be simulate or file, got {m.source!r}")


def measurement_files(cfg: DictConfig) -> tuple:
    """measurement.path: one file, a list of files, or a glob pattern (sorted), memory-mapped.

    Returns:
        (the path, or the list of paths, and info for the summary).
    """
    m = cfg.measurement
    spec = list(m.path) if OmegaConf.is_list(m.path) else str(m.path)
    paths = mtd.io.files.expand_paths(spec, "measurement.path")
    shapes = [list(mtd.open_micrograph(p).shape) for p in paths]
    info = {"target": paths, "N": shapes, "L": integer(cfg, "measurement.L", 1)}
    return paths if len(paths) > 1 else paths[0], info


def fit_autocorrelation(cfg: DictConfig, data, sigma, group):
    """The approximate-EM paper's baseline: the measurement's first three autocorrelations (one
    pass) fitted in the group's Fourier-Bessel basis (``mtd.autocorrelation.fit``, ``ac.*``).

    Returns:
        (the ``FitResult``, its seconds with the pass over the data).
    """
    if not isinstance(group, mtd.Steerable):
        raise ValueError(
            "autocorrelation analysis (em.init=autocorrelation, autocorrelation=true) needs "
            f"em/group=steerable (a Fourier-Bessel unknown), got {type(group).__name__}"
        )
    a = cfg.ac
    start = time.perf_counter()
    moments = mtd.autocorrelations(data, group.L)
    fit = mtd.autocorrelation.fit(
        moments,
        group.basis,
        sigma=sigma,
        starts=integer(cfg, "ac.starts", 1),
        seed=int(cfg.seed),
        iterations=integer(cfg, "ac.iterations", 1),
        weights=a.weights if isinstance(a.weights, str) else list(a.weights),
    )
    return fit, time.perf_counter() - start


def initial_guess(
    cfg: DictConfig,
    L: int,
    prior: ScorePrior | None,
    truth,
    group: mtd.TransformSet | None = None,
    ac=None,
) -> torch.Tensor:
    """(R, *group.shape) float64 initial guesses of the unknown, R = em.restarts: images (R, L, L)
    for an image group (or none given), the group's ``from_image`` of them otherwise
    (``normal``: N(0, 1) draws of the unknown itself, the approximate-EM paper's random
    guesses; ``autocorrelation``: the estimate of autocorrelation analysis ``ac`` first, as the
    paper's Fig. 2 starts EM, then N(0, 1) draws: fits from other seeds mostly land on the same
    minimum, measured; ``digits``: the mean of the ``em.init_indices`` digits, as the score-prior
    paper, then the digits themselves)."""
    e = cfg.em
    R = integer(cfg, "em.restarts", 1)
    shape = (L, L) if group is None else tuple(group.shape)
    if e.init == "autocorrelation":
        g = torch.Generator().manual_seed(int(cfg.seed))
        rest = torch.randn((R - 1, *shape), generator=g, dtype=torch.float64)
        return torch.cat([ac.coefficients.to(torch.float64)[None], rest])
    if e.init == "normal":
        g = torch.Generator().manual_seed(int(cfg.seed))
        return torch.randn((R, *shape), generator=g, dtype=torch.float64)
    if e.init == "uniform":  # the paper's Gaussian init, U[0, 1]
        g = torch.Generator().manual_seed(int(cfg.seed))
        x = torch.rand((R, L, L), generator=g, dtype=torch.float64)
    elif e.init == "digits":  # the paper's MNIST init: the mean of ten training digits
        with np.load(e.init_digits) as f:
            digits = torch.from_numpy(f["images"][list(e.init_indices)].astype(np.float64) / 255)
        if truth is not None and any(torch.equal(d, truth) for d in digits):
            raise ValueError("em.init_indices include the target itself: choose other digits")
        if R > len(digits) + 1:
            raise ValueError(
                f"em.restarts={R} with em.init=digits: at most {len(digits) + 1} (the mean, then "
                f"each of the {len(digits)} digits of em.init_indices)"
            )
        # Restarts after the mean start from the digits themselves (one per class in the
        # default indices): at low SNR EM from the mean misses a basin the likelihood prefers.
        x = torch.cat([digits.mean(0)[None], digits[: R - 1]])
    elif e.init == "file":
        if is_none(e.init_file):
            raise ValueError("em.init=file needs em.init_file=PATH (an (L, L) or (n, L, L) image)")
        stack = mtd.read_images(e.init_file)
        x = stack[:R] if len(stack) >= R else stack[:1].expand(R, *stack.shape[1:]).clone()
    elif e.init in ("prior_mean", "prior_samples"):
        if prior is None:
            raise ValueError(f"em.init={e.init} needs a prior (ckpt=PATH), got ckpt=none")
        if e.init == "prior_mean":
            x = prior.mean().expand(R, L, L).clone()
        else:  # reverse-SDE draws
            x = prior.sample(R, int(cfg.seed))
    else:
        raise ValueError(f"em.init must be one of {INITS}, got {e.init!r}")
    if x.shape[-1] != L:  # before the measurement's one pass, which can be long
        raise ValueError(
            f"em.init={e.init} gives {x.shape[-1]}-pixel images, the EM needs L = {L}"
        )
    return x if group is None else group.from_image(x)


def build_em(
    cfg: DictConfig, group: mtd.TransformSet, m_step, sigma, device, iterations=None
) -> mtd.ApproximateEM:
    """The configured engine around ``group`` and ``m_step`` (``em.iterations`` unless given)."""
    e = cfg.em
    stochastic = None
    if float(e.stochastic) != 1:
        stochastic = mtd.Stochastic(float(e.stochastic), int(e.polish), seed=int(cfg.seed))
    return mtd.ApproximateEM(
        group,
        m_step=m_step,
        sigma=sigma,
        rho=e.rho,
        iterations=int(e.iterations if iterations is None else iterations),
        tol=float(e.tol),
        stochastic=stochastic,
        compute=mtd.Compute(e.method, e.chunk_size, e.stream),
        device=device,
        dtype=cfg.dtype,
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name}, but torch sees no CUDA GPU here: use cpu or auto")
    return device


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------
def reconstruct(cfg: DictConfig, out_dir=None) -> dict:
    """Run the configured reconstruction; write its outputs into ``out_dir``.

    Args:
        cfg: the composed ``configs/reconstruct.yaml``.
        out_dir: where outputs go (default: ``cfg.paths.output_dir``, the Hydra run directory).

    Returns:
        Metrics: ``error/<variant>`` (when the truth is known; the paper's error),
        ``error_shift/<variant>`` (the same, minimised over translations by up to ``max_shift``
        pixels), ``error/init``, ``seconds/<variant>``, ``iterations/<variant>`` for the variants
        run (prior, no_prior).
    """
    out = Path(out_dir if out_dir is not None else cfg.paths.output_dir)
    check_run_dir(out)
    device, comm, rank = resolve_device(cfg.device), None, 0
    if cfg.get("launcher"):  # several processes: Fabric starts them and the process group
        fabric = hydra.utils.instantiate(cfg.launcher)
        fabric.launch()
        device, rank = fabric.device, fabric.global_rank
        comm = mtd.TorchDistributed() if fabric.world_size > 1 else None
    # Everything that can be wrong is checked before EM starts.
    check_reconstruction_logger(cfg)
    check_numbers(cfg)
    if cfg.object not in ("image", "volume"):
        raise ValueError(f"object must be image or volume, got {cfg.object!r}")
    if cfg.object == "volume":
        return reconstruct_volume(cfg, out, device, comm, rank)
    if cfg.em.baseline not in BASELINES:
        raise ValueError(f"em.baseline must be one of {BASELINES}, got {cfg.em.baseline!r}")
    prior = load_prior(cfg, device)
    score = prior.oracle() if prior is not None and cfg.oracle else prior  # what the M-step uses
    data, sigma, truth, info, meas = get_measurement(cfg, prior)
    L = int(info["L"])
    if prior is not None and prior.image_size != L:
        raise ValueError(
            f"the checkpoint {cfg.ckpt} is a prior of {prior.image_size} x {prior.image_size} "
            f"images; the measurement's L is {L}"
        )
    group = hydra.utils.instantiate(cfg.em.group)(L)
    variants = ["no_prior"] if prior is None or cfg.compare else []
    variants += ["prior"] if prior is not None else []
    m_steps = {v: hydra.utils.instantiate(cfg.em.m_step) for v in ("no_prior", "prior")}
    if cfg.em.baseline == "closed_form":  # the run without the prior is closed-form EM
        m_steps["no_prior"] = mtd.ClosedForm()
    ems = {v: build_em(cfg, group, m_steps[v], sigma, device) for v in variants}
    refine = None  # (the finer group, its iterations, its K)
    if not is_none(cfg.em.refine_K):
        K = integer(cfg, "em.refine_K", 1)
        if K <= int(cfg.em.K):
            raise ValueError(
                f"em.refine_K must be a finer grid than em.K = {cfg.em.K}, got {K} (null: no "
                "refinement)"
            )
        refine = (
            hydra.utils.instantiate(cfg.em.group, K=K)(L),
            integer(cfg, "em.refine_iterations", 1),
            K,
        )
    m_steps["prior"].check_prior(score)  # before the long pass over the data
    check_stochastic(cfg, patch_count(info))
    ac = ac_seconds = None  # autocorrelation analysis: the baseline and/or the initial guess
    if cfg.em.init == "autocorrelation" or cfg.autocorrelation:  # (sigma: given, or fitted)
        ac, ac_seconds = fit_autocorrelation(cfg, data, sigma, group)
    init = initial_guess(cfg, L, prior, truth, group, ac)
    check_scale(group.to_image(init), data, f"em.init={cfg.em.init}")
    image = tuple(group.shape) == (L, L)  # else: coefficients of a basis, say
    truth_image, truth = truth, (None if truth is None else group.from_image(truth))
    metrics: dict = {}
    records: dict = {}
    if truth is not None:  # (checks the truth's shape before the long work)
        metrics["error/init"] = min(mtd.relative_error(truth, x, group=group) for x in init)
    if cfg.autocorrelation:  # the baseline, its eq. (19) error
        records["autocorrelation"] = {
            "gamma": ac.gamma,
            "sigma": ac.sigma,
            "misfit": ac.misfit,
            "starts": ac.starts,
        }
        metrics["seconds/autocorrelation"] = ac_seconds
        if truth is not None:
            metrics["error/autocorrelation"] = mtd.relative_error(
                truth, ac.coefficients, group=group
            )
    patches = ems[variants[-1]].prepare(data)  # one pass: every value checked, transforms

    tags = [*cfg.tags, f"em={cfg.em.name}", f"K={cfg.em.K}"] + (["oracle"] if cfg.oracle else [])
    if "snr" in info:
        tags.append(f"snr={info['snr']:g}")
    if cfg.pick:
        pick_threshold(cfg)
    if cfg.pick and rank == 0:  # a folder that cannot take picks.star fails before EM
        out.mkdir(parents=True, exist_ok=True)
        mtd.io.check_star_path(out / "picks.star")
    run = start_reconstruction(cfg, tags, run_name(cfg, info)) if rank == 0 else None
    results, fits = {}, {}
    exit_code = 1  # what W&B records if the loop does not finish: failed (130: interrupted)
    try:
        for v in variants:
            log = em_logger(run, v, len(init), int(cfg.image_every or 0)) if run else None
            shown = log if log is None or image else ImageLog(log, group)
            res, seconds = run_em(
                ems[v], v, patches, init, score if v == "prior" else None, truth, shown, comm, rank
            )
            if refine is not None:  # the best restart on the finer grid
                ems[v], res, more = refine_em(
                    cfg, refine, ems[v], res, patches, score if v == "prior" else None, truth,
                    shown, comm, rank,
                )  # fmt: skip
                seconds += more
            if log is not None:  # the estimate EM returns, whatever image_every skipped
                log.final({**res.history[-1], "estimate": group.to_image(res.estimate)})
            # Outputs are images; an unknown that is not one is written aligned to the truth (its
            # group's orbit is not a set of images the figure could align over).
            aligned = (
                res.estimate
                if truth is None or image
                else mtd.align(truth, res.estimate, group=group)
            )
            results[v], fits[v] = group.to_image(aligned), res
            records[v] = run_record(res, seconds, ems[v], cfg.em.K)
            if refine is not None:
                records[v]["refine_K"] = refine[2]
            metrics[f"seconds/{v}"] = seconds
            metrics[f"iterations/{v}"] = len(res.history)
            if truth is not None:
                metrics[f"error/{v}"] = mtd.relative_error(truth, res.estimate, group=group)
                if cfg.max_shift and image:  # an empty-bordered image: up to a translation
                    metrics[f"error_shift/{v}"] = mtd.relative_error(
                        truth, res.estimate, max_shift=int(cfg.max_shift), group=group
                    )
        if cfg.autocorrelation:  # its estimate beside EM's, as an image like theirs
            coef = ac.coefficients
            aligned = coef if truth is None else mtd.align(truth, coef, group=group)
            results["autocorrelation"] = group.to_image(aligned)
        if rank == 0 and cfg.pick:  # before summary.json, which holds the pick/* metrics
            metrics.update(pick_particles(cfg, out, ems, fits, variants[-1], patches, data, meas))
        if rank == 0 and cfg.denoise:  # the denoised micrograph(s), guided by the estimate
            v = variants[-1]
            metrics.update(denoise_measurement(cfg, out, data, fits[v].sigma, results[v], meas))
        if rank == 0:
            summary = {
                "metrics": metrics,
                "measurement": info,
                "checkpoint": checkpoint_identity(cfg.ckpt),
                "runs": records,
                "config": OmegaConf.to_container(cfg, resolve=True),
            }
            write_outputs(
                out,
                results,
                summary,
                data,
                group if image else mtd.Rotations(L, 1),  # (non-images: aligned above)
                truth=truth_image,
                measurement=meas,
                errors={
                    v: (metrics.get(f"error/{v}"), metrics.get(f"error_shift/{v}"))
                    for v in results
                },
                crop=int(cfg.crop),
                save_measurement=cfg.measurement.get("save", True),
            )
        if run is not None:
            run.summary.update(metrics)
            crop = crop_for_logging(data, meas, L, int(cfg.crop))
            log_results(run, out, results, truth_image, crop)
        exit_code = 0
    except KeyboardInterrupt:
        exit_code = 130  # Ctrl-C: the W&B run is marked failed, not uploaded as a finished one
        raise
    finally:
        if run is not None:
            if exit_code:  # so that `wandb sync` and the dashboard tell it from finished runs
                run.summary["interrupted" if exit_code == 130 else "crashed"] = True
            run.finish(exit_code=exit_code)
    return metrics


def volume_measurement(cfg: DictConfig):
    """A volume run's measurement (the stochastic-EM paper's model).

    Returns:
        (data: (N, N) tensor or the file path(s), sigma given to EM or None, the true (L, L, L)
        volume or None, its voxel size, info for the summary, the ``VolumeMeasurement`` or None).
    """
    m = cfg.measurement
    L = integer(cfg, "measurement.L", 2)
    truth, voxel = None, number(cfg, "measurement.voxel_size")
    where = None if is_none(m.truth) else str(m.truth)
    if where == "default":  # the phantom for simulations; a file's volume is not known
        where = "shepp_logan" if m.source == "simulate" else None
    if where == "shepp_logan":  # the standard test volume, built from its ellipsoid table
        truth = mtd.forward.volumes.shepp_logan(L)
    elif where is not None:
        array, voxel_file = mtd.io.read_volume(where)
        truth = torch.from_numpy(array)
        voxel = voxel_file or voxel
        if tuple(truth.shape) != (L, L, L):
            raise ValueError(
                f"measurement.truth {where} is a {tuple(truth.shape)} volume; measurement.L is {L}"
            )
    if m.source == "file":  # (the truth, if any: the volume the micrographs were made of)
        data, info = measurement_files(cfg)
        sigma = None if is_none(m.sigma) else float(m.sigma)
        return data, sigma, truth, voxel, info, None
    if m.source != "simulate":
        raise ValueError(f"measurement.source must be simulate or file, got {m.source!r}")
    if truth is None:
        raise ValueError("a simulated volume run needs measurement.truth (shepp_logan or a PATH)")
    N = 11 * L if is_none(m.N) else integer(cfg, "measurement.N", L)
    meas = mtd.forward.volumes.simulate_volume(
        truth,
        N,
        density=number(cfg, "measurement.density"),
        snr=number(cfg, "measurement.snr"),
        separation=m.separation,
        seed=int(m.seed),
    )
    info = {"target": where, "N": N, "L": L, "copies": len(meas.positions), "snr": meas.snr}
    info["sigma"] = float(meas.sigma)
    return meas.data, info["sigma"] if m.sigma_known else None, truth, voxel, info, meas


def reconstruct_volume(cfg: DictConfig, out: Path, device, comm=None, rank: int = 0) -> dict:
    """A 3-D volume from micrographs (the stochastic-EM paper): EM over the projections of the
    volume at an SO(3) grid (``em=volume``, ``mtd.groups.tomography.Projections``), stochastic EM and
    frequency marching as configured; with a truth, the estimate aligned over SO(3), the mirror
    and small shifts (``mtd.metrics.volumes``), its error and FSC curve.

    Writes estimate_no_prior.mrc/.npy (aligned when the truth is known), truth.mrc, volume.png,
    fsc.png, measurement.mrc (simulated), summary.json last.
    """
    if not is_none(cfg.ckpt):
        raise ValueError(f"object=volume runs without a prior (ckpt=none), got ckpt={cfg.ckpt}")
    if not is_none(cfg.em.refine_K):  # its grid is em.group.resolution, refined by its schedule
        raise ValueError(f"em.refine_K is for images; object=volume got {cfg.em.refine_K!r}")
    data, sigma, truth, voxel, info, meas = volume_measurement(cfg)
    L = int(info["L"])
    group = hydra.utils.instantiate(cfg.em.group)(L)
    if len(group.shape) != 3:
        raise ValueError(
            f"object=volume needs em=volume (projections of a volume), got {cfg.em.name}"
        )
    em = build_em(cfg, group, hydra.utils.instantiate(cfg.em.m_step), sigma, device)
    check_stochastic(cfg, patch_count(info))
    init = initial_guess(cfg, L, None, None, group)
    patches = em.prepare(data)
    metrics: dict = {}
    run = start_reconstruction(cfg, [*cfg.tags, "volume", f"K={group.K}"], run_name(cfg, info))
    exit_code = 1
    try:
        log = em_logger(run, "no_prior", len(init), int(cfg.image_every or 0)) if run else None
        shown = None if log is None else VolumeLog(log, truth, int(cfg.volume_error_every or 0))
        res, seconds = run_em(em, "no_prior", patches, init, None, None, shown, comm, rank)
        estimate = res.estimate.detach().double().cpu()
        metrics.update({"seconds/no_prior": seconds, "iterations/no_prior": len(res.history)})
        summary = {
            "measurement": info,
            "runs": {"no_prior": run_record(res, seconds, em, group.K)},
        }
        if truth is not None:
            aligned, curve = mtd.metrics.measure_volume(truth, estimate, voxel)
            estimate = aligned.aligned
            metrics["error/no_prior"] = aligned.error
            for level in (0.5, 0.143):
                metrics[f"resolution_{level}/no_prior"] = curve.resolution(level)
            summary["alignment"], summary["fsc"] = aligned.to_dict(), curve.to_dict()
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            mtd.io.write_volume(out / "estimate_no_prior.mrc", estimate, voxel)
            mtd.io.write_volume(out / "estimate_no_prior.npy", estimate, voxel)
            if truth is not None:
                mtd.io.write_volume(out / "truth.mrc", truth, voxel)
                volume_outputs.save_volume_figure(
                    out / "volume.png", truth, {"EM": estimate}, {"EM": metrics["error/no_prior"]}
                )
                volume_outputs.save_fsc_plot(out / "fsc.png", {"EM": curve})
            if meas is not None and cfg.measurement.get("save", True):
                meas.save(out / "measurement.mrc")
            summary.update(metrics=metrics, config=OmegaConf.to_container(cfg, resolve=True))
            write_summary(out / "summary.json", summary)
        if run is not None:
            run.summary.update(metrics)
        exit_code = 0
    except KeyboardInterrupt:
        exit_code = 130
        raise
    finally:
        if run is not None:
            run.finish(exit_code=exit_code)
    return metrics


def denoise_measurement(cfg: DictConfig, out: Path, data, sigma: float, estimate, meas) -> dict:
    """The measurement denoised by the tile prior ``denoising.ckpt`` (Tweedie over blended tiles),
    guided by the run's estimate with weight ``denoising.guidance``: denoised.mrc / .png in
    ``out`` (denoised_<i> for several files) and the denoise/* metrics (PSNR, relative error
    against the clean micrograph of a simulation)."""
    d = cfg.denoising
    out.mkdir(parents=True, exist_ok=True)
    files = [data] if torch.is_tensor(data) or isinstance(data, str | Path) else list(data)
    metrics = {}
    clean = meas.clean() if meas is not None and meas.coefficients is None else None
    for i, item in enumerate(files):
        micrograph = item if torch.is_tensor(item) else mtd.open_micrograph(item)
        found = denoising.denoise_outputs(
            out,
            micrograph,
            float(sigma),
            estimate,
            number(cfg, "denoising.guidance"),
            clean=clean,
            name="denoised" if len(files) == 1 else f"denoised_{i}",
            ckpt=d.ckpt,
            K=integer(cfg, "denoising.K", 1),
            density=number(cfg, "denoising.density"),
            device=resolve_device(cfg.device),
        )
        suffix = "" if len(files) == 1 else f"_{i}"
        metrics.update({f"{k}{suffix}": value for k, value in found.items()})
    return metrics


class VolumeLog:
    """An EM callback for a volume: the estimate's central slice as its image, and with a truth
    the error after alignment every ``every`` iterations (each alignment starts from the last:
    a local refinement, 0.2 s at L = 11, after the first full search)."""

    def __init__(self, log, truth, every: int):
        self.log, self.truth, self.every, self.last = log, truth, every, None

    def __call__(self, entry: dict) -> None:
        x = entry["estimate"].detach().double().cpu()
        row = {**entry, "estimate": x[x.shape[0] // 2]}
        if self.truth is not None and self.every and entry["iteration"] % self.every == 0:
            self.last = volume_metrics.align_volume(self.truth, x, start=self.last)
            row["error"] = self.last.error
        self.log(row)


def pick_threshold(cfg: DictConfig) -> float | str:
    """``picking.threshold``: "noise" or a number, or an error naming the key and value (and
    ``picking.noise_draws``, ``picking.combine`` and ``picking.empty_rule`` checked with it)."""
    integer(cfg, "picking.noise_draws", 1)
    for key, allowed in (("combine", picking.COMBINE), ("empty_rule", picking.EMPTY_RULES)):
        value = cfg.picking[key]
        if value not in allowed:
            raise ValueError(f"picking.{key} must be one of {', '.join(allowed)}, got {value!r}")
    return threshold(cfg, "picking.threshold")


def pick_particles(cfg: DictConfig, out: Path, ems, fits, v: str, patches, data, meas) -> dict:
    """Particles picked from the E-step's posteriors at run ``v``'s estimate (the stochastic-EM
    paper, Section IV-B; ``picking.combine``): picks.star and picks.png in ``out``, the pick/*
    metrics (with a simulated truth, also template matching with the true image and with the
    estimate)."""
    p, res, em = cfg.picking, fits[v], ems[v]
    radius = None if is_none(p.radius) else number(cfg, "picking.radius")
    draws = integer(cfg, "picking.noise_draws", 1)
    picks, post = picking.pick_posterior(
        em,
        patches,
        res.estimate,
        res.rho.log(),
        res.sigma**2,
        p.empty_rule,
        None if is_none(p.merge_radius) else number(cfg, "picking.merge_radius"),
        pick_threshold(cfg),
        number(cfg, "picking.empty_energy"),
        number(cfg, "picking.detect_energy"),
        int(cfg.seed),
        draws,
        p.combine,
    )
    truth = None if meas is None else picking.truth_of(meas)
    seen = truth  # an image's patch measures in its own frame (it is the image up to a shift)
    if truth is not None and tuple(em.group.shape) == (em.L, em.L):
        seen = picking.in_frame_of(truth, res.estimate, em.group, int(cfg.max_shift or 0))
    found = picking.picking_outputs(
        out, picks, data, patches.source, post, seen, radius, p.empty_rule,
        number(cfg, "picking.empty_energy"),
    )  # fmt: skip
    metrics = {f"pick/{k}": value for k, value in found.items()}
    if truth is not None and p.template:  # the standard baseline beside it
        group = em.group
        for name, x in (("true", group.from_image(meas.image)), ("estimate", res.estimate)):
            tm = picking.template_match(
                data, group, x.to(res.estimate), seed=int(cfg.seed), noise_draws=draws
            )
            scores = picking.picking_metrics(tm, truth["centres"], radius=radius)
            metrics.update({f"pick_template_{name}/{k}": value for k, value in scores.items()})
    return metrics


class ImageLog:
    """A W&B logger that gets the estimates of a non-image unknown as the images they stand for."""

    def __init__(self, log, group):
        self.log, self.group = log, group

    def __call__(self, entry):
        self.log({**entry, "estimate": self.group.to_image(entry["estimate"])})

    def final(self, entry):
        self.log.final(entry)


def crop_for_logging(data, meas, L: int, crop: int):
    """The (n, n) crop of the measurement that reconstruction.png shows (around a planted copy for
    simulated data, the corner of the first file otherwise), n = min(crop * L, N)."""
    if not torch.is_tensor(data):
        data = mtd.open_micrograph(data if isinstance(data, str | Path) else data[0])
    position = meas.positions[0] if meas is not None and len(meas.positions) else None
    r0, c0, size = crop_window(data.shape, L, crop, position)
    window = data[r0 : r0 + size, c0 : c0 + size]
    return window.detach().cpu().numpy().copy() if torch.is_tensor(window) else np.array(window)


def run_em(
    em, variant, data, init, prior, truth, log=None, comm=None, rank=0, rho=None, sigma=None
):
    """One EM fit with a progress bar; ``log(entry)`` gets every iteration's history entry;
    ``rho``, ``sigma``: where it starts (``ApproximateEM.fit``; None: afresh).

    Returns:
        (the ``EMResult``, its wall time in seconds).
    """
    bar = tqdm(
        disable=rank != 0,
        total=em.total_iterations * len(init),
        desc=f"EM {variant.replace('_', ' ')}",
        unit="it",
        file=sys.stdout,
        leave=True,
    )

    def callback(entry):
        bar.update(1)
        shown = {"loglik": f"{entry['loglik']:.5g}"}
        if "error" in entry:
            shown["error"] = f"{entry['error']:.3f}"
        bar.set_postfix(shown)
        if log is not None:
            log(entry)

    start = time.perf_counter()
    try:
        res = em.fit(
            data,
            init,
            prior=prior,
            truth=truth,
            callback=callback,
            comm=comm,
            rho=rho,
            sigma=sigma,
        )
    finally:
        bar.close()
    return res, time.perf_counter() - start


def refine_em(cfg, refine, em, res, data, prior, truth, log=None, comm=None, rank=0):
    """Coarse-to-fine search: the best restart's estimate refined by EM on a finer grid.

    A K-point grid fits copies at any angle with the nearest of its K rotations, so at high
    SNR its estimate is the truth averaged over +-pi / K (measured: error 0.022 at SNR 17 with
    K = 8, where the autocorrelation analysis, which takes every angle, reaches 0.013). The
    search keeps the coarse grid's cost and basin; the refinement (one start, the same M-step
    continued past its schedule, ``mtd.Continued``; rho and sigma where the search left them)
    removes that bias, as an auto-refinement's finer angular sampling does (0.004 at SNR 17 with
    K = 32).

    Returns:
        (the refinement's engine, the ``EMResult`` with both stages' history, its seconds).
    """
    group, iterations, _ = refine
    step = mtd.Continued(em.m_step, em.total_iterations)
    fine = build_em(cfg, group, step, em.sigma, em.device, iterations)
    first = len(res.history)

    def after(entry: dict) -> dict:  # the refinement's iterations after the best restart's
        return {
            **entry,
            "iteration": first + entry["iteration"],
            "restart": res.restart,
            "stage": "refine",
        }

    def shifted(entry):
        log(after(entry))

    more, seconds = run_em(
        fine, "refine", data, res.estimate[None], prior, truth, None if log is None else shifted,
        comm, rank, rho=res.rho, sigma=res.sigma,
    )  # fmt: skip
    history = res.history + [after(h) for h in more.history]
    loglik = torch.cat([res.loglik[:-1], more.loglik])
    combined = dataclasses.replace(more, history=history, loglik=loglik, restart=res.restart)
    combined.scores = res.scores
    return fine, combined, seconds


def run_record(res, seconds: float, em, K: int) -> dict:
    """What summary.json says of one EM run."""
    return {
        "iterations": len(res.history),
        "converged": res.converged,
        "seconds": seconds,
        "sigma": res.sigma,
        "restart": res.restart,
        "loglik": float(res.loglik[-1]),
        "empty_mass": res.history[-1]["empty_mass"],
        "dropped": list(res.dropped),
        "group": type(em.group).__name__,
        "K": int(K),
        "templates": em.K,
    }


@hydra.main(version_base="1.3", config_path="configs", config_name="reconstruct")
def main(cfg: DictConfig) -> None:
    try:
        metrics = reconstruct(cfg)
    except USER_ERRORS as e:
        user_error_exit(e)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return  # rank 0 reports
    names = {
        "init": "initial guess",
        "autocorrelation": "autocorrelation analysis",
        "no_prior": "without prior",
        "prior": "with prior",
    }
    for key, title in (("error", "relative error"), ("error_shift", "up to translation")):
        found = [
            f"{names[v]} {metrics[f'{key}/{v}']:.4f}" for v in names if f"{key}/{v}" in metrics
        ]
        if found:
            print(f"{title}: " + ", ".join(found))
    print(f"outputs: {cfg.paths.output_dir}")


if __name__ == "__main__":
    main()
