"""The reconstruction of any object: ``reconstruct(cfg)`` (``python reconstruct.py``).

One pipeline for images, steerable images and volumes: the settings (every value checked), the
prior, the measurement and its truth, the group (``em.group``: what the unknown is), the initial
guesses, EM with and without the prior from the same start (and a finer grid's refinement),
the errors through the group (``mtd.metrics.score``), picking and denoising after EM, the files
(``mtd.io.write_outputs``) and W&B. It branches on what the group says of itself (its
``object_shape``, ``is_image``, ``costly_nearest``, ``steerable_basis``), never on its type.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import mtd
from mtd.io import MicrographSource
from tasks import after_em, inputs, tracking
from tasks.checks import (
    check_run_dir,
    check_scale,
    check_stochastic,
    checkpoint_identity,
    patch_count,
)
from tasks.config import is_none
from tasks.settings import Reconstruct, reconstruct_settings

NAMES = {
    "init": "initial guess",
    "autocorrelation": "autocorrelation analysis",
    "no_prior": "without prior",
    "prior": "with prior",
}


@dataclass
class Run:
    """What one reconstruction holds while it runs (``reconstruct``)."""

    s: Reconstruct
    cfg: DictConfig
    out: Path
    device: torch.device
    comm: object
    rank: int
    inputs: inputs.Inputs
    group: mtd.TransformSet
    score: object
    ems: dict
    refine: tuple | None
    init: torch.Tensor
    truth: torch.Tensor | None
    ac: object = None
    metrics: dict = field(default_factory=dict)
    records: dict = field(default_factory=dict)
    objects: dict = field(default_factory=dict)
    fits: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)

    @property
    def variants(self) -> list[str]:
        return list(self.ems)


def reconstruct(cfg: DictConfig, out_dir=None) -> dict:
    """Run the configured reconstruction; write its outputs into ``out_dir``.

    Args:
        cfg: the composed ``configs/reconstruct.yaml``.
        out_dir: where outputs go (default: ``cfg.paths.output_dir``, the Hydra run directory).

    Returns:
        Metrics: ``error/<variant>`` (when the truth is known; the paper's error, a volume's
        after alignment), ``error_shift/<variant>`` (an image's, minimised over translations by
        up to ``max_shift`` pixels), ``resolution_<0.5|0.143>/<variant>`` (a volume's FSC),
        ``error/init``, ``seconds/<variant>``, ``iterations/<variant>`` for the variants run
        (prior, no_prior), and the ``pick/*`` and ``denoise/*`` metrics after EM.
    """
    run = prepare(cfg, out_dir)  # everything that can be wrong is checked before EM starts
    patches = run.ems[run.variants[-1]].prepare(run.inputs.source)  # one pass: checks, transforms
    tags, name = run_tags(run), tracking.run_name(cfg, run.inputs.info)
    with tracking.reconstruction_run(cfg, tags, name, active=run.rank == 0) as wandb_run:
        for v in run.variants:
            fit_variant(run, v, patches, wandb_run)
        if run.s.autocorrelation:  # its estimate beside EM's, as an image like theirs
            coef = run.ac.coefficients
            aligned = coef if run.truth is None else mtd.align(run.truth, coef, group=run.group)
            run.objects["autocorrelation"] = run.group.to_image(aligned)
        if run.rank == 0:
            finish(run, patches)
        if wandb_run is not None:
            wandb_run.summary.update(run.metrics)
            crop = crop_for_logging(run)
            truth = run.inputs.truth
            tracking.log_results(wandb_run, run.out, run.objects, truth, crop)
    return run.metrics


def prepare(cfg: DictConfig, out_dir) -> Run:
    """The settings, inputs, group, engines and initial guesses, every check made."""
    s = reconstruct_settings(cfg)
    check_settings(s)
    out = Path(out_dir if out_dir is not None else cfg.paths.output_dir)
    check_run_dir(out)
    device, comm, rank = inputs.resolve_device(s.device), None, 0
    if cfg.get("launcher"):  # several processes: Fabric starts them and the process group
        fabric = hydra.utils.instantiate(cfg.launcher)
        fabric.launch()
        device, rank = fabric.device, fabric.global_rank
        comm = mtd.TorchDistributed() if fabric.world_size > 1 else None
    tracking.check_reconstruction_logger(cfg)
    prior = inputs.load_prior(s, device)
    score = prior.oracle() if prior is not None and s.oracle else prior  # what the M-step uses
    data = inputs.measurement(s, prior)
    group = inputs.make_group(s, data.L)
    if prior is not None and prior.object_shape != group.object_shape:
        kinds = {2: "images", 3: "volumes"}
        stands = f"{kinds[len(group.object_shape)]} of side {data.L}"
        raise ValueError(
            f"the checkpoint {s.ckpt} is a prior of {' x '.join(map(str, prior.object_shape))} "
            f"{kinds[prior.ndim]}; the measurement's unknowns are {stands}"
        )
    ems, refine = engines(s, group, data, device)
    if "prior" in ems:  # before the long pass over the data
        ems["prior"].m_step.check_prior(score)
    check_stochastic(s.em.stochastic, s.stochastic_min_patches, patch_count(data.source, data.L))
    ac = ac_seconds = None  # autocorrelation analysis: the baseline and/or the initial guess
    if s.em.init == "autocorrelation" or s.autocorrelation:  # (sigma: given, or fitted)
        ac, ac_seconds = inputs.fit_autocorrelation(s, data.source, data.sigma, group)
    init = inputs.initial_guess(s, data.L, prior, data.truth, group, ac)
    check_scale(group.to_image(init), data.source, f"em.init={s.em.init}")
    truth = None if data.truth is None else group.from_image(data.truth)
    run = Run(s, cfg, out, device, comm, rank, data, group, score, ems, refine, init, truth, ac)
    if truth is not None and not group.costly_nearest:  # (checks the truth's shape early)
        run.metrics["error/init"] = min(mtd.relative_error(truth, x, group=group) for x in init)
    if s.autocorrelation:  # the baseline, its eq. (19) error
        record_autocorrelation(run, ac_seconds)
    if s.pick and rank == 0:  # a folder that cannot take picks.star fails before EM
        out.mkdir(parents=True, exist_ok=True)
        mtd.io.check_star_path(out / "picks.star")
    return run


def check_settings(s: Reconstruct) -> None:
    """What the settings alone can tell is wrong, before a prior is loaded or data simulated."""
    if s.pick and s.picking.threshold == "auto":
        raise ValueError(
            "picking.threshold=auto is template matching's (pick.py method=template); posterior "
            "picking after EM takes a number, noise or null"
        )
    if s.denoise and s.object == "volume" and s.denoising.guidance > 0:
        raise ValueError(
            "denoise=true guides the denoiser by an image estimate: a volume has none (set "
            "denoising.guidance=0)"
        )
    if s.em.refine_K is not None:
        if "K" not in s.em.group:  # (a volume's grid is its resolution, refined by its schedule)
            raise ValueError(
                f"em.refine_K refines a grid of K rotations; em.group ({s.em.name}) has no K"
            )
        if s.em.refine_K <= s.em.K:
            raise ValueError(
                f"em.refine_K must be a finer grid than em.K = {s.em.K}, got {s.em.refine_K} "
                "(null: no refinement)"
            )


def engines(s: Reconstruct, group, data, device) -> tuple[dict, tuple | None]:
    """The engines of the variants (``no_prior``, ``prior``) and the refinement's finer group."""
    variants = ["no_prior"] if is_none(s.ckpt) or s.compare else []
    variants += [] if is_none(s.ckpt) else ["prior"]
    m_steps = {v: hydra.utils.instantiate(s.em.m_step) for v in variants}
    if s.em.baseline == "closed_form" and "no_prior" in m_steps:
        m_steps["no_prior"] = mtd.ClosedForm()  # the run without the prior is closed-form EM
    ems = {v: inputs.build_em(s, group, m_steps[v], data.sigma, device) for v in variants}
    refine = None  # (the finer group, its iterations, its K)
    if s.em.refine_K is not None:
        fine = inputs.make_group(s, data.L, K=s.em.refine_K)
        refine = (fine, s.em.refine_iterations, s.em.refine_K)
    return ems, refine


def record_autocorrelation(run: Run, seconds: float) -> None:
    ac = run.ac
    keep = {"gamma": ac.gamma, "sigma": ac.sigma, "misfit": ac.misfit, "starts": ac.starts}
    run.records["autocorrelation"] = keep
    run.metrics["seconds/autocorrelation"] = seconds
    if run.truth is not None:
        error = mtd.relative_error(run.truth, ac.coefficients, group=run.group)
        run.metrics["error/autocorrelation"] = error


def run_tags(run: Run) -> list[str]:
    s = run.s
    tags = [*s.tags, f"em={s.em.name}", f"K={recorded_K(run)}"] + (["oracle"] if s.oracle else [])
    if "snr" in run.inputs.info:
        tags.append(f"snr={run.inputs.info['snr']:g}")
    return tags


def recorded_K(run: Run) -> int:
    """The K a run records: the rotations its group searches (em.K; a volume's grid size)."""
    return run.group.n_rotations


def fit_variant(run: Run, v: str, patches, wandb_run) -> None:
    """EM for variant ``v`` (and its refinement), its record and errors."""
    s, group, em = run.s, run.group, run.ems[v]
    prior = run.score if v == "prior" else None
    truth = None if group.costly_nearest else run.truth  # a volume's error: at the end
    log = None
    if wandb_run is not None:
        every = s.volume_error_every if group.costly_nearest else 0
        logger = tracking.em_logger(wandb_run, v, len(run.init), s.image_every or 0)
        log = EMLog(logger, group, run.inputs.truth, every or 0)
    if v == "prior" and searching(s):
        start = no_prior_start(run, patches) if s.em.search_from_no_prior else None
        m_steps = search_m_steps(s, em)

        def fit(callback):
            return mtd.em.search(
                em, patches, run.init, prior, m_steps, start, truth, callback, run.comm
            )

        fits = len(m_steps) * len(run.init) + (start is not None)
    else:

        def fit(callback):
            return em, em.fit(
                patches, run.init, prior=prior, truth=truth, callback=callback, comm=run.comm
            )

        fits = len(run.init)
    (em, res), seconds = with_progress(fit, em.total_iterations * fits, v, run.rank, log)
    stages = []  # (group, iterations, label) of each continuation, by mtd.em.refine
    if v == "prior" and searching(s) and s.em.search_iterations:
        # the kept candidate on to convergence: at low SNR the search's short fits stop short
        # of the basin they rank (docs/benchmarks.md, "Low SNR")
        stages.append((group, s.em.search_iterations, "prior continued"))
    if run.refine is not None:  # the best restart on the finer grid
        stages.append((run.refine[0], run.refine[1], "refine"))
    for on, n, label in stages:

        def more(callback, on=on, n=n, em=em, res=res):
            return mtd.em.refine(em, res, on, n, patches, prior, truth, callback, run.comm)

        total = n + (em.stochastic.polish if em.stochastic else 0)
        (em, res), extra = with_progress(more, total, label, run.rank, log)
        seconds += extra
    run.ems[v] = em  # the search's winner, continued: its M-step for picking
    if log is not None:  # the estimate EM returns, whatever image_every skipped
        log.final({**res.history[-1], "estimate": res.estimate})
    run.fits[v] = res
    run.records[v] = run_record(res, seconds, em, recorded_K(run))
    if run.refine is not None:
        run.records[v]["refine_K"] = run.refine[2]
    run.metrics[f"seconds/{v}"] = seconds
    run.metrics[f"iterations/{v}"] = len(res.history)
    if run.truth is None:
        run.objects[v] = group.to_image(res.estimate)
        return
    found = mtd.metrics.score(
        group, run.inputs.truth, res.estimate, s.max_shift or 0, run.inputs.voxel_size
    )
    run.objects[v], run.scores[v] = found.aligned, found
    run.metrics.update({f"{k}/{v}": value for k, value in found.metrics.items()})
    run.records[v].update(found.record)


def searching(s: Reconstruct) -> bool:
    """Whether the prior run is a search over candidates (``mtd.em.search``)."""
    return bool(s.em.search_anneal) or s.em.search_from_no_prior


def search_m_steps(s: Reconstruct, em) -> list:
    """The search's M-steps: the configured one, then at each ``em.search_anneal`` level (a
    preset's denoiser; em/m_step=gradient and the like have no annealing to vary)."""
    levels = s.em.search_anneal if hasattr(em.m_step, "anneal_from") else []
    return mtd.em.anneal_variants(em.m_step, levels)


def no_prior_start(run: Run, patches):
    """The search's start from EM without the prior: the no_prior variant's fit when the run
    compares (it runs first), else that fit made here, not recorded."""
    if "no_prior" in run.fits:
        return run.fits["no_prior"]
    em = run.ems["prior"]
    fit = lambda callback: em.fit(patches, run.init, callback=callback, comm=run.comm)  # noqa: E731
    res, _ = with_progress(fit, em.total_iterations * len(run.init), "no_prior", run.rank)
    return res


def finish(run: Run, patches) -> None:
    """Rank 0, after EM: picking, denoising, then the files (summary.json last)."""
    s, last = run.s, run.variants[-1]
    if s.pick:  # before summary.json, which holds the pick/* metrics
        found = after_em.pick_after_em(
            s, run.out, run.ems[last], run.fits[last], patches, run.inputs
        )
        run.metrics.update(found)
    if s.denoise:  # the denoised micrograph(s), guided by the estimate
        estimate = run.objects[last] if s.denoising.guidance > 0 else None
        found = after_em.denoise_after_em(
            s, run.out, run.inputs, run.fits[last].sigma, estimate, run.device
        )
        run.metrics.update(found)
    summary = {
        "metrics": run.metrics,
        "measurement": run.inputs.info,
        "checkpoint": checkpoint_identity(s.ckpt),
        "runs": run.records,
        "config": OmegaConf.to_container(run.cfg, resolve=True),
    }
    errors = {v: errors_of(run.metrics, v, run.group) for v in run.objects}
    curves = {v: sc.curve for v, sc in run.scores.items() if sc.curve is not None}
    mtd.io.write_outputs(
        run.out, run.objects, summary, run.inputs.source, run.group, truth=run.inputs.truth,
        measurement=run.inputs.simulated, errors=errors, crop=s.crop,
        save_measurement=s.measurement.save, voxel_size=run.inputs.voxel_size, curves=curves,
    )  # fmt: skip


def errors_of(metrics: dict, v: str, group):
    """A variant's errors as the figure titles them: the error and, for images, up to a shift."""
    error = metrics.get(f"error/{v}")
    if len(group.object_shape) == 3:
        return error
    return error, metrics.get(f"error_shift/{v}")


def run_record(res, seconds: float, em, K: int) -> dict:
    """What summary.json says of one EM run."""
    return {
        "iterations": len(res.history),
        "converged": res.converged,
        "seconds": seconds,
        "sigma": res.sigma,
        "restart": res.restart,
        "scores": None if res.scores is None else res.scores.tolist(),  # each restart's or
        # search candidate's log-likelihood + gamma * log-prior
        "score": res.score,  # the estimate's (continued or refined: after that)
        "loglik": float(res.loglik[-1]),
        "empty_mass": res.history[-1]["empty_mass"],
        "dropped": list(res.dropped),
        "group": type(em.group).__name__,
        "K": int(K),
        "templates": em.K,
    }


def with_progress(fit, total: int, variant: str, rank: int, log=None):
    """``fit(callback)`` with a progress bar; ``log(entry)`` gets every iteration's entry.

    Returns:
        (what ``fit`` returns, its wall time in seconds).
    """
    bar = tqdm(
        disable=rank != 0, total=total, desc=f"EM {variant.replace('_', ' ')}", unit="it",
        file=sys.stdout, leave=True,
    )  # fmt: skip

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
        result = fit(callback)
    finally:
        bar.close()
    return result, time.perf_counter() - start


class EMLog:
    """An EM callback for W&B: the estimate as the object it stands for (``group.to_image``; a
    volume's central slice is what the dashboard shows), and for a group whose errors are costly
    (a volume's alignment) the error against the truth every ``every`` iterations
    (``mtd.metrics.ErrorCurve``: each alignment refined from the last)."""

    def __init__(self, log, group, truth, every: int = 0):
        self.log, self.group, self.every = log, group, every
        self.curve = None if truth is None or not every else mtd.metrics.ErrorCurve(group, truth)

    def __call__(self, entry: dict) -> None:
        x = entry["estimate"].detach()
        row = {**entry, "estimate": self.group.to_image(x)}
        if self.curve is not None and entry["iteration"] % self.every == 0:
            row["error"] = self.curve(x)
        self.log(row)

    def final(self, entry: dict) -> None:
        self.log.final({**entry, "estimate": self.group.to_image(entry["estimate"])})


def crop_for_logging(run: Run):
    """The (n, n) crop of the measurement that the dashboard shows (around a planted copy for
    simulated data, the corner of the first micrograph otherwise), n = min(crop * L, N)."""
    data = MicrographSource.of(run.inputs.source)[0]
    meas = run.inputs.simulated
    position = meas.positions[0] if meas is not None and len(meas.positions) else None
    r0, c0, size = mtd.plots.crop_window(data.shape, run.inputs.L, run.s.crop, position)
    window = data[r0 : r0 + size, c0 : c0 + size]
    return window.detach().cpu().numpy().copy() if torch.is_tensor(window) else window.copy()


def print_errors(metrics: dict, out) -> None:
    """What ``python reconstruct.py`` prints: each variant's errors, and where the files are."""
    for key, title in (("error", "relative error"), ("error_shift", "up to translation")):
        found = [
            f"{NAMES[v]} {metrics[f'{key}/{v}']:.4f}" for v in NAMES if f"{key}/{v}" in metrics
        ]
        if found:
            print(f"{title}: " + ", ".join(found))
    print(f"outputs: {out}")
