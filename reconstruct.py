"""Reconstruct an image from an MTD measurement: ``python reconstruct.py [ckpt=PATH|none]``.

Hydra composes ``configs/reconstruct.yaml``; ``reconstruct(cfg)`` does the work and can be called
from tests. It loads the score prior, simulates a measurement of a held-out target (or reads one
from disk), runs approximate EM with and without the prior from the same initial guess, logs the
iterations to W&B and writes the estimates, a figure and ``summary.json`` into the run directory.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import mtd
from priors.prior import AnalyticGaussianPrior, ScorePrior

ROOT = Path(__file__).resolve().parent
# ${project:PATH}: a file shipped with the project, wherever the command is run from.
OmegaConf.register_new_resolver("project", lambda p="": str(ROOT / p), replace=True)

INITS = ("digits", "uniform", "prior_mean", "prior_samples", "file")
# EM history key -> W&B name under em/<variant>/ ("step" is ||F_new - F||, the update's size).
W_AND_B_KEYS = {
    "loglik": "loglik",
    "delta": "step",
    "error": "error",
    "empty_mass": "empty_mass",
    "sigma": "sigma",
    "gamma": "gamma",
    "lr": "lr",
    "noise": "noise",
}


def _none(value) -> bool:
    return value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))


# ------------------------------------------------------------------------------------------------
# Inputs: prior, target, measurement, initial guess
# ------------------------------------------------------------------------------------------------
def load_prior(cfg: DictConfig, device: torch.device) -> ScorePrior | None:
    """The checkpoint's score prior, or None for ``ckpt=none``."""
    if _none(cfg.ckpt):
        if cfg.oracle:
            raise ValueError("oracle=true needs the checkpoint of a Gaussian prior, got ckpt=none")
        return None
    prior = ScorePrior.from_checkpoint(
        cfg.ckpt, device=device, dtype=getattr(torch, cfg.prior_dtype)
    )
    if cfg.oracle and "mu" not in prior.meta:
        raise ValueError(
            f"oracle=true needs a Gaussian prior's stored mean; {cfg.ckpt} is a prior of "
            f"{prior.meta.get('name')!r} data"
        )
    return prior


def em_prior(cfg: DictConfig, prior: ScorePrior):
    """What the M-step uses: the network, or with oracle=true the exact score of N(mu, I)."""
    if not cfg.oracle:
        return prior
    mu = torch.tensor(prior.meta["mu"], dtype=torch.float64)
    return AnalyticGaussianPrior(mu.reshape(prior.image_size, prior.image_size), prior.sde)


def _read_stack(path) -> torch.Tensor:
    """(n, L, L) float64 images from a .npy / .mrc holding one image or a stack."""
    array = np.array(mtd.measurement.open_array(path, what="image"))
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1] != array.shape[2]:
        raise ValueError(f"{path} holds shape {array.shape}; expected (L, L) or (n, L, L) images")
    if not np.isfinite(array).all():
        raise ValueError(f"{path} has non-finite values")
    return torch.from_numpy(array.astype(np.float64))


def target_image(cfg: DictConfig, prior: ScorePrior | None) -> tuple[torch.Tensor, str]:
    """The simulated measurement's true image (L, L) float64 and a description of where from."""
    m = cfg.measurement
    index = int(m.index)
    if index < 0:
        raise ValueError(f"measurement.index must be >= 0, got {index}")
    if m.target != "held_out":
        stack = _read_stack(m.target)
        if index >= len(stack):
            raise ValueError(
                f"measurement.index {index} is outside the {len(stack)} images of {m.target}"
            )
        return stack[index], f"{m.target}[{index}]"
    source = prior
    if source is None:  # ckpt=none: the same targets as with the reference prior
        source = ScorePrior.from_checkpoint(m.reference_ckpt)
    if source.meta.get("name") == "gaussian":
        mu = torch.tensor(source.meta["mu"], dtype=torch.float64).reshape(
            source.image_size, source.image_size
        )
        g = torch.Generator().manual_seed(int(m.target_seed))
        draws = torch.randn((index + 1, *mu.shape), generator=g, dtype=torch.float64)
        return mu + draws[index], f"N(mu, I) draw {index} of seed {m.target_seed}"
    if source.held_out is None:
        raise ValueError("the checkpoint stores no held-out targets: set measurement.target=PATH")
    if index >= len(source.held_out):
        raise ValueError(
            f"measurement.index must be in 0..{len(source.held_out) - 1} (the checkpoint's "
            f"held-out targets), got {index}"
        )
    held = source.meta.get("held_out")
    where = f"held-out target {index}" + (f" (data index {held[index]})" if held else "")
    return source.held_out[index].to(torch.float64).cpu(), where


def _measurement_paths(spec) -> list[Path]:
    """measurement.path: one file, a list of files, or a glob pattern (sorted)."""
    import glob

    items = list(spec) if OmegaConf.is_list(spec) or isinstance(spec, list) else [spec]
    paths = []
    for item in items:
        item = str(item)
        found = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not found:
            raise FileNotFoundError(f"measurement.path: no file matches {item}")
        paths += [Path(f) for f in found]
    return paths


def get_measurement(cfg: DictConfig, prior: ScorePrior | None):
    """The measurement.

    Returns:
        (data (N, N), sigma given to EM or None, truth (L, L) or None, info dict, the simulated
        ``mtd.Measurement`` or None).
    """
    m = cfg.measurement
    if m.source == "simulate":
        truth, where = target_image(cfg, prior)
        L = truth.shape[-1]
        N = 11 * L if _none(m.N) else int(m.N)
        meas = mtd.simulate(
            truth,
            N,
            density=float(m.density),
            snr=float(m.snr),
            K=int(m.K),
            rotation=m.rotation,
            separation=m.separation,
            seed=int(m.seed),
        )
        info = {
            "target": where,
            "N": N,
            "L": L,
            "copies": len(meas.angles),
            "snr": float(m.snr),
            "sigma": float(meas.sigma),
        }
        sigma = float(meas.sigma) if m.sigma_known else None
        return meas.data, sigma, truth, info, meas
    if m.source == "file":
        paths = _measurement_paths(m.path)
        arrays = [mtd.open_micrograph(p) for p in paths]  # memory-mapped; checked while streamed
        data = [str(p) for p in paths] if len(paths) > 1 else str(paths[0])
        L = int(m.L)
        if not _none(m.sigma) and not (math.isfinite(float(m.sigma)) and float(m.sigma) > 0):
            raise ValueError(
                f"measurement.sigma must be > 0 (or null to estimate it), got {m.sigma}"
            )
        truth = None if _none(m.truth) else _read_stack(m.truth)[0]
        if truth is not None and truth.shape != (L, L):
            raise ValueError(f"measurement.truth is {tuple(truth.shape)}, not ({L}, {L})")
        info = {
            "target": [str(p) for p in paths],
            "N": [list(a.shape) for a in arrays],
            "L": L,
        }
        return data, None if _none(m.sigma) else float(m.sigma), truth, info, None
    raise ValueError(f"measurement.source must be simulate or file, got {m.source!r}")


def initial_guess(cfg: DictConfig, L: int, prior, truth) -> torch.Tensor:
    """(R, L, L) float64 initial guesses, R = em.restarts."""
    e = cfg.em
    R = int(e.restarts)
    g = torch.Generator().manual_seed(int(cfg.seed))
    if e.init == "uniform":  # the paper's Gaussian init, U[0, 1]
        return torch.rand((R, L, L), generator=g, dtype=torch.float64)
    if e.init == "digits":  # the paper's MNIST init: the mean of ten training digits
        with np.load(e.init_digits) as f:
            digits = torch.from_numpy(f["images"][list(e.init_indices)].astype(np.float64) / 255)
        if digits.shape[-1] != L:
            raise ValueError(
                f"em.init=digits gives {digits.shape[-1]}-pixel images, the EM needs L = {L}"
            )
        if truth is not None and any(torch.equal(d, truth) for d in digits):
            raise ValueError("em.init_indices include the target itself: choose other digits")
        return digits.mean(0).expand(R, L, L).clone()
    if e.init == "file":
        stack = _read_stack(e.init_file)
        if stack.shape[-1] != L:
            raise ValueError(
                f"em.init_file holds {stack.shape[-1]}-pixel images, the EM needs L = {L}"
            )
        return stack[:R] if len(stack) >= R else stack[:1].expand(R, L, L).clone()
    if prior is None:
        raise ValueError(f"em.init={e.init} needs a prior (ckpt=PATH), got ckpt=none")
    if e.init == "prior_mean":
        if "mu" not in prior.meta:
            raise ValueError(
                "em.init=prior_mean: the checkpoint stores no data mean "
                f"(data {prior.meta.get('name')!r})"
            )
        mu = torch.tensor(prior.meta["mu"], dtype=torch.float64).reshape(L, L)
        return mu.expand(R, L, L).clone()
    if e.init == "prior_samples":
        from priors.sde import sample

        p = next(prior.net.parameters())
        gen = torch.Generator(device=p.device).manual_seed(int(cfg.seed))
        with torch.no_grad():  # in network units, then to measurement units
            x = sample(
                prior.sde, prior.net, (R, 1, L, L), generator=gen, device=p.device, dtype=p.dtype
            )
        return x[:, 0].to(torch.float64).cpu() * prior.scale
    raise ValueError(f"em.init must be one of {INITS}, got {e.init!r}")


def build_em(
    cfg: DictConfig, L: int, K: int, sigma, with_prior: bool, device
) -> mtd.ApproximateEM:
    """The EM of the preset; without the prior, the preset's ``baseline``."""
    e = cfg.em
    m_step = e.m_step
    if not with_prior and e.baseline == "closed_form":
        m_step = "closed_form"
    elif e.baseline not in ("same", "closed_form"):
        raise ValueError(f"em.baseline must be same or closed_form, got {e.baseline!r}")
    return mtd.ApproximateEM(
        L,
        K=K,
        sigma=sigma,
        rho=e.rho,
        m_step=m_step,
        steps=int(e.steps),
        lr=float(e.lr),
        gamma=e.gamma,
        gamma_max=float(e.gamma_max),
        prior_t=float(e.prior_t),
        noise_scale=float(e.noise_scale),
        anneal_from=None if _none(e.anneal_from) else float(e.anneal_from),
        anneal_iterations=int(e.anneal_iterations),
        iterations=int(e.iterations),
        tol=float(e.tol),
        chunk_size=None if _none(e.chunk_size) else int(e.chunk_size),
        stream=None if _none(e.stream) else bool(e.stream),
        stochastic=float(e.stochastic),
        polish=int(e.polish),
        seed=int(cfg.seed),
        method=e.method,
        device=device,
        dtype=getattr(torch, cfg.dtype),
    )


# ------------------------------------------------------------------------------------------------
# Logging and outputs
# ------------------------------------------------------------------------------------------------
def _check_logger(cfg: DictConfig) -> None:
    others = [k for k in (cfg.get("logger") or {}) if k != "wandb"]
    if others:
        raise ValueError(
            f"reconstruct.py logs to W&B only: logger=wandb or logger=none, got {others}"
        )


def start_wandb(cfg: DictConfig, tags: list[str]):
    """A W&B run for this reconstruction, or None with logger=none."""
    logger = cfg.get("logger") or {}
    if "wandb" not in logger:
        return None
    from train import wandb_mode_for

    wandb_mode_for(logger)
    import wandb

    w = logger.wandb
    save_dir = Path(w.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=w.project,
        name=w.get("name"),
        dir=str(save_dir),
        group=cfg.group,
        job_type="reconstruct",
        tags=tags,
        config=OmegaConf.to_container(cfg, resolve=True),
        mode="offline" if w.get("offline") else None,
        reinit="finish_previous",
    )
    run.define_metric("em/iteration")
    run.define_metric("em/*", step_metric="em/iteration")
    return run


def _image(x: torch.Tensor) -> np.ndarray:
    """An (L, L) image as uint8 grey levels scaled to its own range, for W&B."""
    x = x.detach().cpu().double().numpy()
    lo, hi = x.min(), x.max()
    return np.uint8(255 * (x - lo) / (hi - lo if hi > lo else 1.0))


def _aligned(truth, estimate, K: int) -> torch.Tensor:
    """The rotation R_k of ``estimate`` closest to ``truth`` (the one the error is measured at)."""
    if truth is None:
        return estimate
    rots = mtd.Rotations(estimate.shape[-1], K, dtype=torch.float64)(estimate)
    errs = [float(torch.linalg.vector_norm(truth - r)) for r in rots]
    return rots[int(np.argmin(errs))]


def save_figure(path: Path, truth, data, estimates: dict, K: int, crop: int, meas) -> None:
    """Truth, a crop of the measurement and the estimates, side by side (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = next(iter(estimates.values()))[0].shape[-1]
    panels = []
    if truth is not None:
        panels.append(("truth", truth))
    r0 = c0 = 0
    if meas is not None and len(meas.positions):  # centre the crop on a planted copy
        r0, c0 = (int(v) for v in meas.positions[0])
        r0, c0 = max(0, r0 - (crop * L - L) // 2), max(0, c0 - (crop * L - L) // 2)
    size = min(crop * L, *data.shape)
    r0, c0 = min(r0, data.shape[0] - size), min(c0, data.shape[1] - size)
    panels.append((f"measurement ({size} x {size} crop)", data[r0 : r0 + size, c0 : c0 + size]))
    for name, (est, err) in estimates.items():
        title = name.replace("_", " ") + ("" if err is None else f"\nerror {err:.3f}")
        panels.append((title, _aligned(truth, est, K)))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.1))
    for ax, (title, img) in zip(np.atleast_1d(axes), panels, strict=True):
        img = img.detach().double().cpu().numpy() if torch.is_tensor(img) else img
        ax.imshow(np.asarray(img, dtype=np.float64), cmap="gray")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    mtd.measurement.atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name}, but torch sees no CUDA GPU here: use cpu or auto")
    return device


def reconstruct(cfg: DictConfig, out_dir=None) -> dict:
    """Run the configured reconstruction; write its outputs into ``out_dir``.

    Args:
        cfg: the composed ``configs/reconstruct.yaml``.
        out_dir: where outputs go (default: ``cfg.paths.output_dir``, the Hydra run directory).

    Returns:
        Metrics: ``error/<variant>`` (when the truth is known; the paper's error),
        ``error_shift/<variant>`` (the same, minimised over translations by up to ``max_shift``
        pixels), ``error/init``,
        ``seconds/<variant>``, ``iterations/<variant>`` for the variants run (prior, no_prior).
    """
    out = Path(out_dir if out_dir is not None else cfg.paths.output_dir)
    device, comm, rank = resolve_device(cfg.device), None, 0
    if cfg.get("launcher"):  # several processes: Fabric starts them and the process group
        fabric = hydra.utils.instantiate(cfg.launcher)
        fabric.launch()
        device, rank = fabric.device, fabric.global_rank
        comm = mtd.TorchDistributed() if fabric.world_size > 1 else None
    if cfg.dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, got {cfg.dtype!r}")
    if cfg.em.init not in INITS:
        raise ValueError(f"em.init must be one of {INITS}, got {cfg.em.init!r}")
    _check_logger(cfg)
    # Everything that can be wrong is checked before EM starts.
    prior = load_prior(cfg, device)
    data, sigma, truth, info, meas = get_measurement(cfg, prior)
    L, K = int(info["L"]), int(cfg.measurement.K)
    if prior is not None and prior.image_size != L:
        raise ValueError(
            f"the checkpoint {cfg.ckpt} is a prior of {prior.image_size} x {prior.image_size} "
            f"images; the measurement's L is {L}"
        )
    variants = (["no_prior"] if prior is None or cfg.compare else []) + (
        ["prior"] if prior is not None else []
    )
    ems = {v: build_em(cfg, L, K, sigma, v == "prior", device) for v in variants}
    if prior is not None and ems["prior"].m_step == "closed_form":
        raise ValueError(
            "a prior needs em.m_step=gradient or denoise; the closed-form M-step has no prior term"
        )
    if prior is not None and cfg.em.m_step == "denoise" and not cfg.oracle:
        if getattr(prior.net, "time", True) is False:
            raise ValueError(
                f"em.m_step=denoise needs a time-conditioned prior; {cfg.ckpt} is time-free "
                "(ISM): use em.m_step=gradient"
            )
    init = initial_guess(cfg, L, prior, truth)
    patches = ems[variants[-1]].prepare(data)  # one pass: every value checked, transforms

    tags = [*cfg.tags, f"em={cfg.em.name}", f"K={K}"] + (["oracle"] if cfg.oracle else [])
    if "snr" in info:
        tags.append(f"snr={info['snr']:g}")
    run = start_wandb(cfg, tags) if rank == 0 else None
    metrics: dict = {}
    if truth is not None:
        metrics["error/init"] = min(mtd.relative_error(truth, x, K) for x in init)
    results = {}
    try:
        for v in variants:
            score = em_prior(cfg, prior) if v == "prior" else None
            results[v] = _run(ems[v], v, patches, init, score, truth, run, cfg, comm, rank)
            res = results[v]
            metrics[f"seconds/{v}"] = res.seconds
            metrics[f"iterations/{v}"] = len(res.history)
            if truth is not None:
                metrics[f"error/{v}"] = mtd.relative_error(truth, res.estimate, K)
                if cfg.max_shift:  # an empty-bordered image is identified up to a translation
                    metrics[f"error_shift/{v}"] = mtd.relative_error(
                        truth, res.estimate, K, max_shift=int(cfg.max_shift)
                    )
        if rank == 0:
            write_outputs(out, cfg, info, data, truth, init, results, metrics, K, meas)
        if run is not None:
            run.summary.update(metrics)
    finally:
        if run is not None:
            run.finish()
    return metrics


def _run(em, variant, data, init, prior, truth, run, cfg, comm=None, rank=0):
    """One EM fit with a progress bar and W&B logging; ``res.seconds`` is its wall time."""
    from tqdm import tqdm

    bar = tqdm(
        disable=rank != 0,
        total=(em.iterations + (em.polish if em.stochastic < 1 else 0)) * len(init),
        desc=f"EM {variant.replace('_', ' ')}",
        unit="it",
        file=sys.stdout,
        leave=True,
    )
    every = int(cfg.image_every)

    def callback(entry):
        bar.update(1)
        shown = {"loglik": f"{entry['loglik']:.5g}"}
        if "error" in entry:
            shown["error"] = f"{entry['error']:.3f}"
        bar.set_postfix(shown)
        if run is None:
            return
        row = {"em/iteration": entry["iteration"]}
        for key, name in W_AND_B_KEYS.items():
            if key in entry and entry[key] == entry[key]:  # NaN: not used by this M-step
                row[f"em/{variant}/{name}"] = entry[key]
        if len(init) > 1:
            row[f"em/{variant}/restart"] = entry["restart"]
        if every and entry["iteration"] % every == 0:
            import wandb

            row[f"em/{variant}/estimate"] = wandb.Image(_image(entry["estimate"]))
        run.log(row)

    start = time.perf_counter()
    try:
        res = em.fit(
            data, init.to(em.device), prior=prior, truth=truth, callback=callback, comm=comm
        )
    finally:
        bar.close()
    res.seconds = time.perf_counter() - start
    return res


def write_outputs(out: Path, cfg, info, data, truth, init, results, metrics, K, meas) -> None:
    """Estimates (.npy, .mrc), the figure and summary.json, each written whole; summary last."""
    out.mkdir(parents=True, exist_ok=True)
    for v, res in results.items():
        est = res.estimate.detach().cpu()
        mtd.measurement.atomic_write(
            out / f"estimate_{v}.npy", lambda p, e=est: np.save(p, e.numpy())
        )
        mtd.write_micrograph(out / f"estimate_{v}.mrc", est)
    if truth is not None:
        mtd.measurement.atomic_write(out / "truth.npy", lambda p: np.save(p, truth.numpy()))
    if meas is not None and cfg.measurement.get("save", True):
        meas.save(out / "measurement.mrc")
    shown = {v: (r.estimate.cpu(), metrics.get(f"error/{v}")) for v, r in results.items()}
    if not torch.is_tensor(data):  # files: a crop of the first, memory-mapped
        data = mtd.open_micrograph(data if isinstance(data, str) else data[0])
    save_figure(out / "reconstruction.png", truth, data, shown, K, int(cfg.crop), meas)
    summary = {
        "metrics": metrics,
        "measurement": info,
        "runs": {
            v: {
                "iterations": len(r.history),
                "converged": r.converged,
                "seconds": r.seconds,
                "sigma": r.sigma,
                "restart": r.restart,
                "loglik": float(r.loglik[-1]),
                "empty_mass": r.history[-1]["empty_mass"],
                "dropped": list(r.dropped),
            }
            for v, r in results.items()
        },
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    text = json.dumps(summary, indent=2, default=str)
    mtd.measurement.atomic_write(out / "summary.json", lambda p: p.write_text(text))


@hydra.main(version_base="1.3", config_path="configs", config_name="reconstruct")
def main(cfg: DictConfig) -> None:
    metrics = reconstruct(cfg)
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
