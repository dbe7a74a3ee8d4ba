"""Train a score prior: ``train(cfg)`` (``python train.py data=mnist`` or ``data=gaussian``).

Hydra composes ``configs/train.yaml``; ``train(cfg)`` does the work and can be called from tests.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from tasks.tracking import wandb_mode_for


def instantiate_list(cfg: DictConfig | None) -> list:
    """Instantiate every entry of a group that holds several objects (callbacks, loggers)."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if c and "_target_" in c]


def check_epochs(cfg: DictConfig) -> None:
    """Refuse a trainer that would stop before its first step (it would exit 0 with no
    checkpoint): max_epochs >= 1, or -1 / null with max_steps >= 1."""
    t = cfg.trainer
    epochs, steps = t.get("max_epochs"), t.get("max_steps", -1)
    if steps is not None and steps != -1 and steps < 1:
        raise ValueError(f"trainer.max_steps must be >= 1 (or -1: no limit), got {steps!r}")
    if epochs is not None and epochs != -1 and epochs < 1:
        raise ValueError(
            f"trainer.max_epochs must be >= 1 (or -1 with trainer.max_steps), got {epochs!r}: "
            "no epoch, no checkpoint"
        )


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Fit a score network as configured.

    Returns:
        (metrics, objects): the trainer's final metrics as floats, and the model, data module and
        trainer.
    """
    check_epochs(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()  # the held-out targets are needed before fit
    datamodule.setup("fit")
    held_out = datamodule.held_out_images()
    model = hydra.utils.instantiate(
        cfg.model, data_meta=datamodule.meta(), n_held_out=len(held_out), _convert_="all"
    )
    model.held_out.copy_(held_out)
    wandb_mode_for(cfg.get("logger"))
    loggers = instantiate_list(cfg.get("logger"))
    callbacks = instantiate_list(cfg.get("callbacks"))
    if not loggers:  # nothing to log the learning rate to
        callbacks = [
            c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)
        ]
    for logger in loggers:
        if hasattr(logger, "log_hyperparams"):
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    finally:
        if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
            import wandb

            wandb.finish()  # so that the runs of a multirun do not share a W&B run
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v)}
    return metrics, {"model": model, "datamodule": datamodule, "trainer": trainer}


def report(metrics: dict, objects: dict) -> None:
    """What ``python train.py`` prints: the final metrics and where the checkpoints are."""
    if not objects["trainer"].is_global_zero:  # under DDP, one summary
        return
    saved = [c.best_model_path for c in objects["trainer"].checkpoint_callbacks]
    saved = [p for p in saved if p]
    print(f"metrics: {metrics}")
    if saved:
        print(f"checkpoints: {Path(saved[0]).parent} (last.ckpt and the best epoch)")
