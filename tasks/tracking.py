"""W&B for the commands: offline without credentials (never a prompt); reconstruction runs.

``tasks.train`` calls ``wandb_mode_for`` before Lightning's ``WandbLogger`` starts. A
reconstruction checks its logger first (``check_reconstruction_logger``), opens its run when the
inputs are good (``reconstruction_run``: the start, Ctrl-C and the finish written once) and logs
each EM iteration through ``em_logger``. ``wandb`` itself is imported only when a run starts (it
is slow to import).
"""

from __future__ import annotations

import contextlib
import netrc
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

# EM history key -> W&B name under em/<variant>/ ("step" is ||F_new - F||, the update's size).
EM_KEYS = {
    "loglik": "loglik",
    "delta": "step",
    "error": "error",
    "empty_mass": "empty_mass",
    "sigma": "sigma",
    "gamma": "gamma",
    "lr": "lr",
    "noise": "noise",
}


def wandb_mode_for(cfg_logger: DictConfig | None) -> None:
    """Send W&B offline when there are no credentials, saying once how to upload; never prompt."""
    if not cfg_logger or "wandb" not in cfg_logger or os.environ.get("WANDB_MODE"):
        return
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            has_key = netrc.netrc().authenticators("api.wandb.ai") is not None
        except (FileNotFoundError, netrc.NetrcParseError):
            has_key = False
    if not has_key:
        os.environ["WANDB_MODE"] = "offline"
        save_dir = cfg_logger.wandb.get("save_dir", ".")
        print(
            "W&B: no credentials found, logging offline; upload later with "
            f"`wandb sync {save_dir}/wandb/offline-run-*`"
        )


def check_reconstruction_logger(cfg: DictConfig) -> None:
    """reconstruct.py logs to W&B or nowhere; say so before any work for another logger."""
    others = [k for k in (cfg.get("logger") or {}) if k != "wandb"]
    if others:
        raise ValueError(
            f"reconstruct.py logs to W&B only: logger=wandb or logger=none, got {others}"
        )


def run_name(cfg: DictConfig, info: dict) -> str:
    """A reconstruction run's display name: preset, target and SNR (or the measurement file),
    e.g. ``mnist held_out[0] snr=1``, so that runs tell apart on a dashboard."""
    target = info.get("target")
    if isinstance(target, list):  # measurement files
        target = Path(target[0]).name + (f" +{len(target) - 1}" if len(target) > 1 else "")
    name = f"{cfg.em.name}{' oracle' if cfg.get('oracle') else ''} {target}"
    return name + (f" snr={info['snr']:g}" if "snr" in info else "")


def start_reconstruction(cfg: DictConfig, tags: list[str], name: str | None = None):
    """A W&B run for one reconstruction (group = cfg.group, job type reconstruct), or None.

    Args:
        cfg: the composed reconstruct config, its logger checked by
            ``check_reconstruction_logger``; ``cfg.logger.wandb`` holds project, name, save_dir,
            offline. No logger (logger=none): no run.
        tags: the run's tags.
        name: the display name when ``logger.wandb.name`` is not set (``run_name``).

    Returns:
        The ``wandb`` run, with every ``em/*`` metric on the ``em/iteration`` axis, or None.
    """
    logger = cfg.get("logger") or {}
    if "wandb" not in logger:
        return None
    wandb_mode_for(logger)
    import wandb

    w = logger.wandb
    save_dir = Path(w.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=w.project,
        name=w.get("name") or name,
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


@contextlib.contextmanager
def reconstruction_run(
    cfg: DictConfig, tags: list[str], name: str, active: bool = True
) -> Iterator:
    """A W&B run around a reconstruction's work (``start_reconstruction``; None without a logger,
    or where ``active`` is false: the processes of a distributed run other than rank 0).

    The run is finished whatever happens: as failed when the work raises (``crashed`` in its
    summary), as interrupted on Ctrl-C (exit code 130, ``interrupted``), so that ``wandb sync``
    and the dashboard tell such runs from finished ones.
    """
    run = start_reconstruction(cfg, tags, name) if active else None
    exit_code = 1
    try:
        yield run
        exit_code = 0
    except KeyboardInterrupt:
        exit_code = 130
        raise
    finally:
        if run is not None:
            if exit_code:
                run.summary["interrupted" if exit_code == 130 else "crashed"] = True
            run.finish(exit_code=exit_code)


def _image(x: torch.Tensor) -> np.ndarray:
    """An (L, L) image as uint8 grey levels scaled to its own range (a volume: its central
    slice along axis 0)."""
    x = x.detach().cpu().double()
    x = (x[x.shape[0] // 2] if x.ndim == 3 else x).numpy()
    lo, hi = x.min(), x.max()
    return np.uint8(255 * (x - lo) / (hi - lo if hi > lo else 1.0))


def em_logger(run, variant: str, restarts: int, image_every: int) -> Callable[[dict], None]:
    """A callback logging one EM history entry to ``run`` under ``em/<variant>/``.

    Its ``final(entry)`` logs the last entry's estimate too when ``image_every`` skipped it, so
    that the dashboard's last image is the estimate EM returned (call it with that entry).

    Args:
        run: a W&B run (from ``start_reconstruction``).
        variant: "prior" or "no_prior".
        restarts: number of initial guesses (with more than one, the restart index is logged).
        image_every: log the estimate as an image every this many iterations (0: never).
    """

    logged = set()

    def final(entry: dict) -> None:
        if (
            image_every
            and (entry.get("candidate"), entry.get("restart"), entry["iteration"]) not in logged
        ):
            import wandb

            run.log(
                {
                    "em/iteration": entry["iteration"],
                    f"em/{variant}/estimate": wandb.Image(_image(entry["estimate"])),
                }
            )

    def log(entry: dict) -> None:
        row = {"em/iteration": entry["iteration"]}
        for key, name in EM_KEYS.items():
            if key in entry and entry[key] == entry[key]:  # NaN: not used by this M-step
                row[f"em/{variant}/{name}"] = entry[key]
        if restarts > 1:
            row[f"em/{variant}/restart"] = entry["restart"]
        if "candidate" in entry:  # the prior run's search (mtd.em.search)
            row[f"em/{variant}/candidate"] = entry["candidate"]
        if image_every and entry["iteration"] % image_every == 0:
            import wandb

            row[f"em/{variant}/estimate"] = wandb.Image(_image(entry["estimate"]))
            logged.add((entry.get("candidate"), entry.get("restart"), entry["iteration"]))
        run.log(row)

    log.final = final
    return log


def log_results(run, out: Path, estimates: dict, truth, crop) -> None:
    """What a researcher comparing runs looks for, logged once EM is done: each final estimate,
    the truth, a crop of the measurement (``final/*`` images), ``reconstruction.png``, and an
    artifact (type ``reconstruction``) of the run directory's estimate and truth files and
    ``summary.json``.

    Args:
        run: the W&B run.
        out: the run directory, its files written (``mtd.io.write_outputs``).
        estimates: {variant: (L, L) estimate}.
        truth: (L, L) true image, or None.
        crop: (n, n) crop of the measurement around a copy, or None.
    """
    import wandb

    row = {f"final/{v}/estimate": wandb.Image(_image(x)) for v, x in estimates.items()}
    if truth is not None:
        row["final/truth"] = wandb.Image(_image(truth))
    if crop is not None:
        row["final/measurement_crop"] = wandb.Image(_image(torch.as_tensor(np.asarray(crop))))
    if (out / "reconstruction.png").is_file():
        row["final/reconstruction"] = wandb.Image(str(out / "reconstruction.png"))
    run.log(row)
    artifact = wandb.Artifact(f"reconstruction-{run.id}", type="reconstruction")
    for pattern in ("estimate_*.npy", "estimate_*.mrc", "truth.npy", "summary.json"):
        for file in sorted(out.glob(pattern)):
            artifact.add_file(str(file))
    run.log_artifact(artifact)
