"""Priors as the EM engine wants them: a callable ``score(x: (B, 1, L, L), t) -> (B, 1, L, L)``.

``ScorePrior.from_checkpoint`` rebuilds a trained network from a checkpoint's hyperparameters alone
and loads its EMA weights with ``weights_only=True`` (an untrusted checkpoint cannot run code).
``AnalyticGaussianPrior`` is the exact score of the Gaussian data set, the oracle.
"""

from __future__ import annotations

import copy
import math
import pickle
import re
import zipfile
from pathlib import Path

import torch

from priors.nets import LEGACY_SDE_KEYS, ScoreAdapter, build_net
from priors.sde import VPSDE, sample


def _load_reason(error: Exception, path: Path) -> str:
    """Why torch.load refused ``path``, in one line, without torch's advice to retry with
    weights_only=False (not for a file nobody vouches for)."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", str(error)) if p.strip()]
    # torch 2.6-2.14: advice paragraph, the reason, a documentation link; older: after a marker.
    kept = [
        p.split("WeightsUnpickler error:")[-1].strip()
        for p in paragraphs
        if "weights_only` set to `False`" not in p and not p.startswith("Check the documentation")
    ]
    kept = [line for p in kept for line in p.splitlines() if line.strip()]
    if kept:
        return kept[0].strip()
    if path.stat().st_size == 0:
        return "the file is empty"
    return "the file ends early (truncated?)" if isinstance(error, EOFError) else "no reason given"


def _load_checkpoint(path: Path) -> dict:
    """A train.py checkpoint as a dict, loaded with weights_only=True, or a clear error."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise ValueError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {_load_reason(e, path)}); "
            "checkpoints are loaded with weights_only=True, so that a file cannot run code"
        ) from e
    if not isinstance(ckpt, dict) or "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path} has no hyper_parameters/state_dict: not a train.py checkpoint")
    return ckpt


def _check_index(index: int) -> int:
    if isinstance(index, bool) or int(index) != index or index < 0:
        raise ValueError(f"index must be an integer >= 0, got {index!r}")
    return int(index)


def _gaussian_target(mu: torch.Tensor, index: int, seed: int) -> tuple[torch.Tensor, str]:
    """Draw ``index`` (from 0) of N(mu, I), (L, L) float64, from a CPU generator seeded ``seed``.

    All index + 1 draws are made, so a draw does not depend on how many are asked for after it.
    """
    index, seed = _check_index(index), int(seed)
    g = torch.Generator().manual_seed(seed)
    draws = torch.randn((index + 1, *mu.shape), generator=g, dtype=torch.float64)
    return mu + draws[index], f"N(mu, I) draw {index} of seed {seed}"


class _Prior:
    """What every prior gives the EM engine: the score in measurement units and Tweedie on it."""

    sde: VPSDE
    scale = 1.0  # measurement units per network unit

    def score(self, x: torch.Tensor, t) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        return self.score(x, t)

    def denoise(self, x: torch.Tensor, t) -> torch.Tensor:
        """Tweedie's posterior mean E[x_0 | x_t = x] = (x + (u sigma_t)^2 s(x, t)) / alpha_t.

        In measurement units (u per network unit) the SDE's noise is u sigma_t.
        """
        t = torch.as_tensor(t, dtype=torch.float64)
        a, s = self.sde.alpha(t), self.sde.sigma(t)
        a = a.to(x).view(-1, *(1,) * (x.ndim - 1)) if a.ndim else float(a)
        s = s.to(x).view(-1, *(1,) * (x.ndim - 1)) if s.ndim else float(s)
        return (x + (self.scale * s) ** 2 * self.score(x, t)) / a

    def posterior_mean(self, y: torch.Tensor, noise: float) -> torch.Tensor:
        """E[x_0 | y] for y = x_0 + noise * z, z ~ N(0, I): Tweedie at the matching diffusion time.

        y is x_t / alpha_t for the t with u sigma_t / alpha_t = noise (u: measurement units per
        network unit), so E[x_0 | y] is ``denoise(alpha_t y, t)``. This is the prior step of EM's
        ``Denoise`` M-step.
        """
        t = self.sde.time_at_noise(noise / self.scale)
        return self.denoise(float(self.sde.alpha(t)) * y, t)


class AnalyticGaussianPrior(_Prior):
    """Data N(mu, I) under the VP-SDE: x_t ~ N(alpha_t mu, I), so s(x, t) = -(x - alpha_t mu).

    Args:
        mu: (L, L) mean.
        sde: the VP-SDE (default ``VPSDE()``).
    """

    kind = "gaussian"
    time_conditioned = True

    def __init__(self, mu, sde: VPSDE | None = None):
        self.mu = torch.as_tensor(mu)
        self.sde = sde or VPSDE()

    @property
    def image_size(self) -> int:
        return self.mu.shape[-1]

    def score(self, x: torch.Tensor, t) -> torch.Tensor:
        a = self.sde.alpha(torch.as_tensor(t, dtype=torch.float64)).to(x)
        a = a.view(-1, *(1,) * (x.ndim - 1)) if a.ndim else a
        return -(x - a * self.mu.to(x))

    def mean(self) -> torch.Tensor:
        """mu, (L, L) float64 on the CPU."""
        return self.mu.to(device="cpu", dtype=torch.float64)

    def target(self, index: int, seed: int) -> tuple[torch.Tensor, str]:
        """Draw ``index`` of N(mu, I) from ``seed``, as ``ScorePrior.target``: (L, L) float64."""
        return _gaussian_target(self.mean(), index, seed)


class ScorePrior(_Prior):
    """A trained score network (EMA weights) in measurement units.

    Attributes:
        net: the network as a score, a ``ScoreAdapter`` in eval mode: ``net(x, t)`` is the score in
            network units, ``net.net`` the bare network, ``net.sde`` is ``sde``.
        sde: the VP-SDE it was trained with, the checkpoint's one SDE.
        meta: what the checkpoint says of the data: name, image_size, units, held-out targets, mu.
        held_out: (n, L, L) held-out target images ((n, L, L, L) volumes) in network units, or
            None.
        image_size: L.
        ndim: 2 for a prior of images, 3 for one of volumes (meta["ndim"]).
        scale: measurement units per network unit (meta["units"]).
        path: the checkpoint's path, or None.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        sde: VPSDE,
        meta: dict,
        held_out: torch.Tensor | None,
        path: Path | None = None,
    ):
        """
        Args:
            net: a bare network (wrapped here in ``ScoreAdapter(net, sde)``) or an adapter whose
                SDE is ``sde``.
            sde: the VP-SDE.
            meta: the data description (needs "image_size").
            held_out: (n, L, L) held-out targets or None.
            path: where it was loaded from, for messages.
        """
        if not isinstance(net, ScoreAdapter):
            net = ScoreAdapter(net, sde)
        elif net.sde is not sde:
            raise ValueError("ScorePrior: the adapter's SDE must be the prior's sde")
        self.net, self.sde, self.meta, self.held_out = net.eval(), sde, meta, held_out
        self.image_size = int(meta["image_size"])
        self.ndim = int(meta.get("ndim", 2))  # 3: a prior of (L, L, L) volumes
        self.scale = float(meta.get("units", 1.0))  # measurement units per network unit
        self.path = None if path is None else Path(path)

    @classmethod
    def from_checkpoint(cls, path, device="cpu", dtype=torch.float32) -> ScorePrior:
        """Rebuild the network from the checkpoint's hyperparameters and load its EMA weights.

        The score adapter is built with the SDE of hp["sde"]. Checkpoints written before the SDE
        moved out of the UNet (no "score_format" key) load with the same scores, provided the
        UNet's own SDE (hp["net"]'s beta_min / beta_max, default 0.1 / 20) is hp["sde"]'s.

        Args:
            path: a Lightning ``.ckpt`` written by ``train.py`` (or an exported EMA-only file).
            device: where the network runs.
            dtype: its floating dtype.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: the file is not a readable score-prior checkpoint, or an older UNet
                checkpoint whose network scaled its output by another SDE than hp["sde"].
        """
        path = Path(path)
        ckpt = _load_checkpoint(path)
        hp = ckpt["hyper_parameters"]
        try:
            sde = VPSDE(**hp["sde"])
            net_hp = dict(hp["net"])
            if ckpt.get("score_format", 1) < 2:
                # The network then held VPSDE(beta_min, beta_max), these defaults unless given;
                # build_net checks them against the one SDE and drops them.
                net_hp = {**LEGACY_SDE_KEYS.get(net_hp.get("name"), {}), **net_hp}
            net = build_net(**net_hp, sde=sde)
            meta = dict(hp["data_meta"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{path}: its hyperparameters do not describe a score network ({e})"
            ) from e
        state = ckpt["state_dict"]
        ema = {k[len("ema.") :]: v for k, v in state.items() if k.startswith("ema.")}
        if not ema:
            raise ValueError(f"{path} holds no EMA weights (keys 'ema.*')")
        try:
            net.load_state_dict(ema)
        except RuntimeError as e:
            raise ValueError(f"{path}: EMA weights do not fit the network ({e})") from e
        held_out = state.get("held_out")
        net = net.to(device=device, dtype=dtype)
        held_out = None if held_out is None or held_out.numel() == 0 else held_out
        return cls(ScoreAdapter(net, sde), sde, meta, held_out, path)

    @property
    def scale_free(self) -> bool:
        """The prior is of shapes, not of a scale: its training objects were each scaled to unit
        root-mean-square over the ball |p| <= L / 2 (meta["normalisation"] "ball_rms", the
        volume priors: a micrograph's intensity scale is arbitrary). The M-step then sets the
        units from the estimate (``rescaled``)."""
        return self.meta.get("normalisation") == "ball_rms"

    @property
    def support_voxels(self) -> int:
        """The voxels (pixels) of the ball |p| <= L / 2 the normalisation is taken over."""
        from mtd.so3 import ball_mask

        L = self.image_size
        if self.ndim == 3:
            return int(ball_mask(L).sum())
        p = torch.arange(L, dtype=torch.float64) - (L - 1) / 2
        return int(((p[:, None] ** 2 + p[None] ** 2) <= (L / 2) ** 2).sum())

    def rescaled(self, units: float) -> ScorePrior:
        """The same prior in other measurement units (``units`` per network unit): a copy that
        shares the network."""
        if not (math.isfinite(units) and units > 0):
            raise ValueError(f"units must be a finite number > 0, got {units!r}")
        out = copy.copy(self)
        out.scale = float(units)
        return out

    @property
    def object_shape(self) -> tuple[int, ...]:
        """(L, L) for a prior of images, (L, L, L) for one of volumes."""
        return (self.image_size,) * self.ndim

    @property
    def kind(self) -> str | None:
        """The data the prior was trained on: meta["name"] ("mnist", "gaussian", ...)."""
        return self.meta.get("name")

    @property
    def time_conditioned(self) -> bool:
        """False for a time-free network (ISM at t = 0), which has no score at t > 0."""
        return self.net.time_conditioned

    def _where(self) -> str:
        return "this prior" if self.path is None else str(self.path)

    @torch.no_grad()
    def score(self, x: torch.Tensor, t) -> torch.Tensor:
        """The score in measurement units: s(x) = s_net(x / u) / u for x = u * (network units)."""
        shape = (1, *self.object_shape)
        if tuple(x.shape[1:]) != shape or x.ndim != len(shape) + 1:
            what = "images" if self.ndim == 2 else "volumes"
            dims = ", ".join(map(str, shape))
            raise ValueError(f"the prior takes (B, {dims}) {what}, got {tuple(x.shape)}")
        p = next(self.net.parameters())
        t = torch.as_tensor(t, device=p.device, dtype=p.dtype)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        out = self.net(x.to(p) / self.scale, t) / self.scale
        return out.to(x)

    def posterior_mean(self, y: torch.Tensor, noise: float) -> torch.Tensor:
        if not self.time_conditioned:
            raise ValueError(
                "this prior's network is time-free (trained by ISM at t = 0): it has no score at "
                "the diffusion time a denoiser needs; use m_step=gradient"
            )
        return super().posterior_mean(y, noise)

    def mean(self) -> torch.Tensor:
        """The stored data mean meta["mu"] in measurement units: (L, L) float64 on the CPU.

        Raises:
            ValueError: the checkpoint stores no mean (only the Gaussian data has one).
        """
        return self._mu() * self.scale

    def _mu(self) -> torch.Tensor:
        """meta["mu"] in network units, (L, L) float64."""
        if "mu" not in self.meta:
            raise ValueError(f"the checkpoint stores no data mean (data {self.kind!r})")
        L = self.image_size
        return torch.tensor(self.meta["mu"], dtype=torch.float64).reshape(L, L)

    def target(self, index: int, seed: int) -> tuple[torch.Tensor, str]:
        """A reconstruction target the prior never saw, (L, L) ((L, L, L) for a volume prior)
        float64 on the CPU, and where from.

        Gaussian data: draw ``index`` of N(mu, I) from ``torch.Generator().manual_seed(seed)``
        (the first index + 1 draws of shape (L, L), in float64). Otherwise the checkpoint's
        held-out image ``index``; ``seed`` is then unused. Both in measurement units (times
        ``scale``).

        Args:
            index: which draw / held-out image, from 0.
            seed: the Gaussian draws' seed.

        Raises:
            ValueError: a negative index, one beyond the held-out targets, or no held-out targets.
        """
        if self.kind == "gaussian":  # data u (mu + z) in measurement units, u = self.scale
            image, where = _gaussian_target(self._mu(), index, seed)
            return image * self.scale, where
        index = _check_index(index)
        if self.held_out is None:
            raise ValueError(
                f"{self._where()} stores no held-out targets (data {self.kind!r}): give the "
                "target as an image file"
            )
        if index >= len(self.held_out):
            raise ValueError(
                f"index must be in 0..{len(self.held_out) - 1} (the checkpoint's held-out "
                f"targets), got {index}"
            )
        held = self.meta.get("held_out")
        where = f"held-out target {index}" + (f" (data index {held[index]})" if held else "")
        return self.held_out[index].to(torch.float64).cpu() * self.scale, where

    @torch.no_grad()
    def sample(self, n: int, seed: int, steps: int | None = None) -> torch.Tensor:
        """n reverse-SDE samples of the prior (``priors.sde.sample``), in measurement units.

        Drawn on the network's device and in its dtype, from a generator there seeded ``seed``.

        Args:
            n: number of samples.
            seed: the generator's seed.
            steps: predictor steps (default ``sde.N``).

        Returns:
            (n, L, L) ((n, L, L, L) for a volume prior) float64 on the CPU.

        Raises:
            ValueError: n < 1, or a time-free prior (it cannot drive the reverse SDE).
        """
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        if not self.time_conditioned:
            raise ValueError(
                f"{self._where()} is time-free (trained by ISM at t = 0): it has no score at the "
                "diffusion times the reverse SDE needs"
            )
        p = next(self.net.parameters())
        gen = torch.Generator(device=p.device).manual_seed(int(seed))
        x = sample(
            self.sde,
            self.net,
            (int(n), 1, *self.object_shape),
            steps,
            generator=gen,
            device=p.device,
            dtype=p.dtype,
        )  # in network units
        return x[:, 0].to(torch.float64).cpu() * self.scale

    def oracle(self) -> AnalyticGaussianPrior:
        """The exact score of the Gaussian data the prior was trained on: N(mu, I), same SDE.

        Raises:
            ValueError: the checkpoint stores no mean (not Gaussian data), or its units are not 1
                (the analytic score assumes unit variance in measurement units).
        """
        if "mu" not in self.meta:
            raise ValueError(
                f"oracle=true needs a Gaussian prior's stored mean; {self._where()} is a prior of "
                f"{self.kind!r} data"
            )
        if self.scale != 1.0:
            raise ValueError(
                f"the oracle N(mu, I) assumes units 1; {self._where()} has units {self.scale}"
            )
        return AnalyticGaussianPrior(self.mean(), self.sde)


def score_error(prior, truth, sample_x0, t, n: int = 10000, seed: int = 0) -> float:
    """Relative L2 error of ``prior``'s score against ``truth``'s on x_t of the data distribution.

    x_0 ~ ``sample_x0(n, generator)`` (B, 1, L, L); x_t = alpha_t x_0 + sigma_t z. Returns
    sqrt(sum ||s - s*||^2 / sum ||s*||^2) over the n samples.
    """
    g = torch.Generator().manual_seed(seed)
    x0 = sample_x0(n, g)
    sde = truth.sde
    mean, std = sde.marginal_prob(x0, torch.full((n,), float(t), dtype=x0.dtype))
    x = mean + std * torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    s, s_true = prior(x, t), truth(x, t)
    return float((s - s_true).square().sum().sqrt() / s_true.square().sum().sqrt())


def export_ema(checkpoint, out) -> Path:
    """Write a slim copy of a checkpoint: hyperparameters, EMA weights and held-out targets.

    What ``ScorePrior.from_checkpoint`` needs and nothing else (no optimizer state, no raw
    weights), written atomically; it still loads with ``torch.load(..., weights_only=True)``.
    """
    ckpt = _load_checkpoint(Path(checkpoint))
    keep = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.") or k == "held_out"}
    slim = {
        "hyper_parameters": ckpt["hyper_parameters"],
        "state_dict": keep,
        "epoch": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"),
    }
    if "score_format" in ckpt:
        slim["score_format"] = ckpt["score_format"]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(slim, tmp)
    tmp.replace(out)
    return out
