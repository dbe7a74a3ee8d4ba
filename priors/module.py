"""The LightningModule that trains a score network, with an exponential moving average of its
weights.

Hyperparameters are plain values only (the network's registry name and keywords, the SDE's
parameters, the loss, the data description), so a checkpoint loads with ``weights_only=True`` and
``priors.prior.ScorePrior.from_checkpoint`` needs nothing else. The optimizer and scheduler arrive
as partials from Hydra and are not stored.

One SDE per checkpoint: the loss, the sampler and the score all use ``self.sde`` (hp["sde"]),
through ``ScoreAdapter``; the networks themselves hold no SDE. ``net`` and ``ema`` are the bare
networks, so the checkpoint's keys are ``net.*`` and ``ema.*`` of the network's parameters.
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import torch

from priors.losses import dsm_loss, ism_loss
from priors.nets import SCORE_FORMAT, ScoreAdapter, build_net
from priors.sde import VPSDE, sample


class ScoreModule(L.LightningModule):
    """Trains ``net`` by DSM (eq. 7) or ISM (eq. 5); the EMA weights are what inference uses.

    Args:
        net: ``{"name": ..., **kwargs}`` for ``priors.nets.build_net``.
        sde: VP-SDE parameters (beta_min, beta_max, N).
        loss: "dsm" or "ism".
        optimizer: a partial taking the parameters (Hydra ``_partial_: true``).
        scheduler: a partial taking the optimizer, or None.
        ema_decay: decay of the weights' moving average.
        eps: smallest diffusion time of the DSM loss.
        hutchinson: ISM with Hutchinson's trace estimator instead of the exact trace.
        antithetic: DSM with antithetic noise pairs (see ``priors.losses.dsm_loss``).
        weighting: DSM's lambda(t): "sigma2" (eq. 7) or "none".
        t_sampling: DSM's distribution of t: "uniform" (eq. 7) or "log".
        sample_every_n_epochs: how often a grid of reverse-SDE samples is drawn and logged (0:
        never). n_samples, sample_steps: the grid's size and sampler steps.
        data_meta: plain description of the data (``DataModule.meta()``), stored for inference.
        n_held_out: number of held-out targets; their images are the ``held_out`` buffer.
    """

    def __init__(
        self,
        net: dict,
        sde: dict | None = None,
        loss: str = "dsm",
        optimizer=None,
        scheduler=None,
        ema_decay: float = 0.999,
        eps: float = 1e-5,
        hutchinson: bool = False,
        antithetic: bool = False,
        weighting: str = "sigma2",
        t_sampling: str = "uniform",
        sample_every_n_epochs: int = 5,
        n_samples: int = 64,
        sample_steps: int = 500,
        data_meta: dict | None = None,
        n_held_out: int = 0,
    ):
        super().__init__()
        if loss not in ("dsm", "ism"):
            raise ValueError(f"loss must be 'dsm' or 'ism', got {loss!r}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.sde = VPSDE(**(sde or {}))
        self.net = build_net(**net, sde=self.sde)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        if loss == "ism" and self.score_fn(self.net).output == "noise":
            raise ValueError(
                f"loss=ism trains the score at t = 0, where the score -eps / sigma_t of a "
                f"noise-predicting network ({net.get('name')!r}) is undefined (sigma_0 = 0): use "
                "loss=dsm or a network whose output is the score (mlp, unet_paper)"
            )
        size = int((data_meta or {}).get("image_size", 28))
        ndim = int((data_meta or {}).get("ndim", 2))  # 3: volumes
        self.register_buffer("held_out", torch.zeros(n_held_out, *(size,) * ndim))

    def score_fn(self, net: torch.nn.Module) -> ScoreAdapter:
        """``net`` (``self.net`` or ``self.ema``) as a score under this module's one SDE.

        Built on each call and never registered as a submodule, so that the state_dict keeps the
        bare networks' keys.
        """
        return ScoreAdapter(net, self.sde)

    def loss(self, score: ScoreAdapter, x: torch.Tensor, generator=None) -> torch.Tensor:
        """The configured loss of ``score`` (``self.score_fn(net)``) on a batch x (B, 1, L, L)."""
        if self.hparams.loss == "ism":
            return ism_loss(score, x, self.hparams.hutchinson, generator)
        hp = self.hparams
        return dsm_loss(
            score, self.sde, x, hp.eps, generator, hp.antithetic, hp.weighting, hp.t_sampling
        )

    def training_step(self, batch, batch_idx):
        loss = self.loss(self.score_fn(self.net), batch[0])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        decay = self.hparams.ema_decay
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.net.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
            for e, b in zip(self.ema.buffers(), self.net.buffers(), strict=True):
                e.copy_(b)

    def validation_step(self, batch, batch_idx):
        # The EMA network, with noise fixed per batch so that epochs compare.
        g = torch.Generator(device=batch[0].device).manual_seed(batch_idx)
        with torch.enable_grad():  # ISM differentiates the score
            loss = self.loss(self.score_fn(self.ema), batch[0], g)
        self.log("val/loss", loss.detach(), prog_bar=True, on_epoch=True, sync_dist=True)

    def on_validation_epoch_end(self):
        every = self.hparams.sample_every_n_epochs
        if not every or self.trainer.sanity_checking or (self.current_epoch + 1) % every:
            return
        if not self.score_fn(self.ema).time_conditioned:
            return  # a time-free (ISM) score cannot drive the reverse SDE
        self.log_samples()

    @torch.no_grad()
    def log_samples(self) -> torch.Tensor:
        """Draw a grid of samples from the EMA network by the reverse SDE; save and log it."""
        from torchvision.utils import make_grid, save_image

        shape = self.held_out.shape[1:]
        g = torch.Generator(device=self.device).manual_seed(0)
        x = sample(
            self.sde,
            self.score_fn(self.ema),
            (self.hparams.n_samples, 1, *shape),
            steps=self.hparams.sample_steps,
            generator=g,
            device=self.device,
        )
        if (self.hparams.data_meta or {}).get("name") == "mnist":
            x = x.clamp(0, 1)  # pixel units
        grid = make_grid(_as_images(x), nrow=8, normalize=True)
        folder = Path(self.trainer.default_root_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        save_image(grid, folder / f"epoch_{self.current_epoch:03d}.png")
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image("samples", [grid], step=self.global_step)
        return x

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["score_format"] = SCORE_FORMAT
        # The global RNG draws the training noise (t, z of the losses): a run resumed from this
        # checkpoint continues its stream, so it equals the uninterrupted run (tensors only, so
        # the checkpoint still loads with weights_only=True).
        checkpoint["rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Applied when training starts (on_train_start), after Lightning's sanity check.
        self._resume_rng = checkpoint.get("rng")

    def on_train_start(self) -> None:
        state, self._resume_rng = getattr(self, "_resume_rng", None), None
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("ScoreModule needs an optimizer partial to train")
        opt = self.optimizer_factory(params=self.net.parameters())
        if self.scheduler_factory is None:
            return opt
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=opt)},
        }


def _as_images(x: torch.Tensor) -> torch.Tensor:
    """Samples as images for a grid: (B, 1, L, L) as they are; volumes (B, 1, L, L, L) as the
    central slice across axis 0 beside the projection along it, (B, 1, L, 2 L), each scaled to
    its own range (a projection sums L voxels)."""
    if x.ndim == 4:
        return x
    v = x[:, 0]

    def unit(a):
        lo = a.flatten(1).min(1).values[:, None, None]
        hi = a.flatten(1).max(1).values[:, None, None]
        return (a - lo) / (hi - lo).clamp_min(1e-12)

    return torch.cat([unit(v[:, v.shape[1] // 2]), unit(v.sum(1))], -1)[:, None]
