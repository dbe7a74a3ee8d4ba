"""Reconstruct an image from an MTD measurement: ``python reconstruct.py [ckpt=PATH|none]``.

Hydra composes ``configs/reconstruct.yaml``; ``reconstruct(cfg)`` does the work and can be called
from tests. It loads the score prior (``priors``), simulates a measurement of a held-out target or
reads one from disk, runs approximate EM (``mtd``) with and without the prior from the same initial
guess, logs the iterations to W&B (``wandb_setup``) and writes the estimates, a figure and
``summary.json`` into the run directory (``mtd.outputs``).
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import mtd
from mtd.outputs import crop_window, write_outputs
from priors import ScorePrior
from wandb_setup import (
    check_reconstruction_logger,
    em_logger,
    log_results,
    run_name,
    start_reconstruction,
)

ROOT = Path(__file__).resolve().parent
# ${project:PATH}: a file shipped with the project, wherever the command is run from.
OmegaConf.register_new_resolver("project", lambda p="": str(ROOT / p), replace=True)

INITS = ("digits", "uniform", "prior_mean", "prior_samples", "file")
# check_scale: an initial guess peaking at more than this many times the measurement's peak is on
# another scale (a 0-255 digit against MNIST measurements at SNR 0.1-10: 45-200 times; the
# presets' guesses: below 1).
SCALE_RATIO = 10.0
BASELINES = ("same", "closed_form")


def _none(value) -> bool:
    return value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))


def _integer(cfg: DictConfig, key: str, minimum: int | None = None) -> int:
    """``cfg``'s value at the dotted ``key`` as an int, or an error naming the key and value."""
    value = OmegaConf.select(cfg, key)
    try:
        number = int(value)
        if isinstance(value, bool) or number != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be an integer, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return number


def _number(cfg: DictConfig, key: str) -> float:
    """``cfg``'s value at the dotted ``key`` as a float, or an error naming the key and value."""
    value = OmegaConf.select(cfg, key)
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number, got {value!r}") from None


# Config values that must be integers (with their least value) or numbers, checked up front so that
# a typo names its key instead of failing in int() / float() somewhere later.
INTEGER_KEYS = {
    "seed": None,
    "max_shift": 0,
    "crop": 1,
    "image_every": 0,
    "stochastic_min_patches": 0,
    "em.K": 1,
    "em.iterations": 1,
    "em.polish": 0,
    "em.restarts": 1,
}
SIMULATE_INTEGER_KEYS = {"measurement.index": 0, "measurement.seed": None, "measurement.K": 1}
NUMBER_KEYS = ("em.tol", "em.stochastic")


def check_numbers(cfg: DictConfig) -> None:
    """Every integer and number of the config is one, or an error naming its key and value."""
    keys = dict(INTEGER_KEYS)
    if cfg.measurement.source == "simulate":
        keys.update(SIMULATE_INTEGER_KEYS)
    for key, least in keys.items():
        if key in ("max_shift", "image_every") and OmegaConf.select(cfg, key) is None:
            continue  # null: off, as 0
        _integer(cfg, key, least)
    for key in NUMBER_KEYS:
        _number(cfg, key)


def checkpoint_identity(ckpt) -> dict:
    """What summary.json records of the prior, so that report.py never averages runs of two
    different checkpoints: its path, size in bytes and SHA-256 (None for ckpt=none)."""
    if _none(ckpt):
        return {"path": None}
    path = Path(str(ckpt))
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def check_run_dir(out: Path) -> None:
    """Refuse a run directory that already holds a finished run (its summary.json): a run never
    writes into another run's directory. A folder left by an interrupted run (no summary.json)
    is reused."""
    if (out / "summary.json").exists():
        raise ValueError(
            f"the run directory {out} already holds a finished run (summary.json); outputs never "
            "overwrite another run: point hydra.run.dir (or paths.output_dir) at a new folder, "
            "or delete that one"
        )


# ------------------------------------------------------------------------------------------------
# Inputs: prior, measurement, initial guess; the EMs
# ------------------------------------------------------------------------------------------------
def load_prior(cfg: DictConfig, device: torch.device) -> ScorePrior | None:
    """The checkpoint's score prior, or None for ``ckpt=none``."""
    if _none(cfg.ckpt):
        if cfg.oracle:
            raise ValueError("oracle=true needs the checkpoint of a Gaussian prior, got ckpt=none")
        return None
    return ScorePrior.from_checkpoint(
        cfg.ckpt, device=device, dtype=getattr(torch, cfg.prior_dtype)
    )


def target_image(cfg: DictConfig, prior: ScorePrior | None) -> tuple[torch.Tensor, str]:
    """The simulated measurement's true image (L, L) float64 and a description of where from."""
    m = cfg.measurement
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
        N = 11 * L if _none(m.N) else _integer(cfg, "measurement.N", L)
        density, snr = _number(cfg, "measurement.density"), _number(cfg, "measurement.snr")
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
        meas = mtd.simulate(
            truth,
            N,
            density=density,
            snr=snr,
            K=_integer(cfg, "measurement.K", 1),
            rotation=m.rotation,
            reflect=bool(m.reflect),
            separation=m.separation,
            seed=int(m.seed),
        )
        if not len(meas.angles):
            raise ValueError(
                f"measurement.density={m.density} plants no copy of a {L} x {L} image in "
                f"{N} x {N} (round(density N^2 / L^2) = 0): raise measurement.density or "
                "measurement.N"
            )
        info = {"target": where, "N": N, "L": L, "copies": len(meas.angles), "snr": snr}
        info["sigma"] = float(meas.sigma)
        return meas.data, info["sigma"] if m.sigma_known else None, truth, info, meas
    if m.source == "file":  # one file, a list of files, or a glob pattern (sorted)
        items = list(m.path) if OmegaConf.is_list(m.path) else [m.path]
        paths = []
        for item in map(str, items):
            found = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
            if not found:
                raise FileNotFoundError(f"measurement.path: no file matches {item}")
            paths += found
        shapes = [list(mtd.open_micrograph(p).shape) for p in paths]  # memory-mapped
        info = {"target": paths, "N": shapes, "L": _integer(cfg, "measurement.L", 1)}
        truth = None if _none(m.truth) else mtd.read_images(m.truth)[0]
        sigma = None if _none(m.sigma) else float(m.sigma)
        return paths if len(paths) > 1 else paths[0], sigma, truth, info, None
    raise ValueError(f"measurement.source must be simulate or file, got {m.source!r}")


def initial_guess(cfg: DictConfig, L: int, prior: ScorePrior | None, truth) -> torch.Tensor:
    """(R, L, L) float64 initial guesses, R = em.restarts."""
    e = cfg.em
    R = _integer(cfg, "em.restarts", 1)
    if e.init == "uniform":  # the paper's Gaussian init, U[0, 1]
        g = torch.Generator().manual_seed(int(cfg.seed))
        x = torch.rand((R, L, L), generator=g, dtype=torch.float64)
    elif e.init == "digits":  # the paper's MNIST init: the mean of ten training digits
        with np.load(e.init_digits) as f:
            digits = torch.from_numpy(f["images"][list(e.init_indices)].astype(np.float64) / 255)
        if truth is not None and any(torch.equal(d, truth) for d in digits):
            raise ValueError("em.init_indices include the target itself: choose other digits")
        x = digits.mean(0).expand(R, *digits.shape[1:]).clone()
    elif e.init == "file":
        if _none(e.init_file):
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
    return x


def check_scale(init: torch.Tensor, data, what: str) -> float:
    """Warn when the initial guess is on another scale than the measurement (e.g. 0-255 grey
    levels against a measurement in [0, 1]): EM then starts, and often stays, far off.

    The measurement's scale is its largest absolute value over an evenly strided sample of at most
    about 10^6 pixels (memory-mapped files read only those); the guess's, its largest absolute
    value. The measurement's peak is at least about a copy's (copies plus noise), so a guess
    peaking at more than SCALE_RATIO times it is on another scale. A guess far below it is not
    flagged: at low SNR the noise alone makes the measurement's peak many times the image's.

    Returns:
        The ratio of the two peaks.
    """
    if not torch.is_tensor(data):
        data = mtd.open_micrograph(data if isinstance(data, str | Path) else data[0])
    step = max(1, int(math.sqrt(data.shape[0] * data.shape[1] / 1e6)))
    sample = data[::step, ::step]
    sample = sample if torch.is_tensor(sample) else torch.from_numpy(np.array(sample))
    peak_data = float(sample.abs().max())
    peak_init = float(init.abs().max())
    ratio = peak_init / peak_data if peak_data > 0 else math.inf
    if ratio > SCALE_RATIO:
        print(
            f"warning: the initial guess ({what}) peaks at {peak_init:.4g}, the measurement at "
            f"{peak_data:.4g}: {ratio:.3g} times its scale; EM expects the guess in the "
            "measurement's units (images stored as 0-255 grey levels: divide by 255)",
            file=sys.stderr,
        )
    return ratio


def patch_count(info: dict) -> int:
    """D, the measurement's number of non-overlapping L x L patches (all files together)."""
    L, shapes = int(info["L"]), info["N"]
    shapes = [[shapes, shapes]] if isinstance(shapes, int) else shapes
    return sum((int(n0) // L) * (int(n1) // L) for n0, n1 in shapes)


def check_stochastic(cfg: DictConfig, D: int) -> None:
    """Warn when stochastic EM draws fewer patches per iteration than ``stochastic_min_patches``.

    Measured (README): em=mnist at SNR 1 on 121 patches, 40 stochastic iterations and a polish
    of 10, three targets: with 12, 24 or 36 patches per iteration the estimate with the prior ends
    worse than its initial guess for some target (at 12: 1.11 and 1.25 against 0.78 and 0.82);
    from 60 on every target ends below its initial guess, and from 85 on within 0.01 of EM on all
    patches.
    """
    fraction = _number(cfg, "em.stochastic")
    if fraction == 1 or not 0 < fraction < 1:  # off, or refused with its message by mtd
        return
    per_iteration = round(fraction * D)
    least = int(cfg.stochastic_min_patches)
    if per_iteration < least:
        print(
            f"warning: em.stochastic={fraction:g} draws {per_iteration} of the measurement's {D} "
            f"patches per iteration; below {least} (stochastic_min_patches) stochastic EM was "
            f"measured to end worse than its initial guess: use em.stochastic >= "
            f"{min(1.0, math.ceil(100 * least / D) / 100):g} (1: off) on data this small",
            file=sys.stderr,
        )


def build_em(cfg: DictConfig, group: mtd.TransformSet, m_step, sigma, device) -> mtd.ApproximateEM:
    """The configured engine around ``group`` and ``m_step``."""
    e = cfg.em
    stochastic = None
    if float(e.stochastic) != 1:
        stochastic = mtd.Stochastic(float(e.stochastic), int(e.polish), seed=int(cfg.seed))
    return mtd.ApproximateEM(
        group,
        m_step=m_step,
        sigma=sigma,
        rho=e.rho,
        iterations=int(e.iterations),
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
    m_steps["prior"].check_prior(score)  # before the long pass over the data
    check_stochastic(cfg, patch_count(info))
    init = initial_guess(cfg, L, prior, truth)
    check_scale(init, data, f"em.init={cfg.em.init}")
    metrics: dict = {}
    if truth is not None:  # (checks the truth's shape before the long work)
        metrics["error/init"] = min(mtd.relative_error(truth, x, group=group) for x in init)
    patches = ems[variants[-1]].prepare(data)  # one pass: every value checked, transforms

    tags = [*cfg.tags, f"em={cfg.em.name}", f"K={cfg.em.K}"] + (["oracle"] if cfg.oracle else [])
    if "snr" in info:
        tags.append(f"snr={info['snr']:g}")
    run = start_reconstruction(cfg, tags, run_name(cfg, info)) if rank == 0 else None
    results, records = {}, {}
    exit_code = 1  # what W&B records if the loop does not finish: failed (130: interrupted)
    try:
        for v in variants:
            log = em_logger(run, v, len(init), int(cfg.image_every or 0)) if run else None
            res, seconds = run_em(
                ems[v], v, patches, init, score if v == "prior" else None, truth, log, comm, rank
            )
            if log is not None:  # the estimate EM returns, whatever image_every skipped
                log.final({**res.history[-1], "estimate": res.estimate})
            results[v] = res.estimate
            records[v] = run_record(res, seconds, ems[v], cfg.em.K)
            metrics[f"seconds/{v}"] = seconds
            metrics[f"iterations/{v}"] = len(res.history)
            if truth is not None:
                metrics[f"error/{v}"] = mtd.relative_error(truth, res.estimate, group=group)
                if cfg.max_shift:  # an empty-bordered image is identified up to a translation
                    metrics[f"error_shift/{v}"] = mtd.relative_error(
                        truth, res.estimate, max_shift=int(cfg.max_shift), group=group
                    )
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
                group,
                truth=truth,
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
            log_results(run, out, results, truth, crop_for_logging(data, meas, L, int(cfg.crop)))
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


def crop_for_logging(data, meas, L: int, crop: int):
    """The (n, n) crop of the measurement that reconstruction.png shows (around a planted copy for
    simulated data, the corner of the first file otherwise), n = min(crop * L, N)."""
    if not torch.is_tensor(data):
        data = mtd.open_micrograph(data if isinstance(data, str | Path) else data[0])
    position = meas.positions[0] if meas is not None and len(meas.positions) else None
    r0, c0, size = crop_window(data.shape, L, crop, position)
    window = data[r0 : r0 + size, c0 : c0 + size]
    return window.detach().cpu().numpy().copy() if torch.is_tensor(window) else np.array(window)


def run_em(em, variant, data, init, prior, truth, log=None, comm=None, rank=0):
    """One EM fit with a progress bar; ``log(entry)`` gets every iteration's history entry.

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
        res = em.fit(data, init, prior=prior, truth=truth, callback=callback, comm=comm)
    finally:
        bar.close()
    return res, time.perf_counter() - start


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


# Errors our checks raise for bad input: one line, exit status 2, no traceback (tracebacks are for
# bugs; HYDRA_FULL_ERROR=1 shows them anyway).
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def user_error_exit(error: Exception) -> None:
    """Re-raise under HYDRA_FULL_ERROR=1; otherwise print ``error: <message>`` and exit 2."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path="configs", config_name="reconstruct")
def main(cfg: DictConfig) -> None:
    try:
        metrics = reconstruct(cfg)
    except USER_ERRORS as e:
        user_error_exit(e)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return  # rank 0 reports
    names = {"init": "initial guess", "no_prior": "without prior", "prior": "with prior"}
    for key, title in (("error", "relative error"), ("error_shift", "up to translation")):
        found = [
            f"{names[v]} {metrics[f'{key}/{v}']:.4f}" for v in names if f"{key}/{v}" in metrics
        ]
        if found:
            print(f"{title}: " + ", ".join(found))
    print(f"outputs: {cfg.paths.output_dir}")


if __name__ == "__main__":
    main()
