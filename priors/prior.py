"""Priors as the EM engine wants them: a callable ``score(x: (B, 1, L, L), t) -> (B, 1, L, L)``.

``ScorePrior.from_checkpoint`` rebuilds a trained network from a checkpoint's hyperparameters alone
and loads its EMA weights with ``weights_only=True`` (an untrusted checkpoint cannot run code).
``AnalyticGaussianPrior`` is the exact score of the Gaussian data set, the oracle.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from priors.nets import build_net
from priors.sde import VPSDE


def _load_checkpoint(path: Path) -> dict:
    """A train.py checkpoint as a dict, loaded with weights_only=True, or a clear error."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        # torch's message for a refused pickle suggests weights_only=False: not for a file
        # nobody vouches for. Keep the reason only.
        text = str(e)
        reason = text.split("WeightsUnpickler error:")[-1].strip() or text
        raise ValueError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: "
            f"{reason.splitlines()[0]}); checkpoints are loaded with weights_only=True, so that "
            "a file cannot run code"
        ) from e
    if not isinstance(ckpt, dict) or "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path} has no hyper_parameters/state_dict: not a train.py checkpoint")
    return ckpt


class _Prior:
    sde: VPSDE

    def score(self, x: torch.Tensor, t) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        return self.score(x, t)

    def denoise(self, x: torch.Tensor, t) -> torch.Tensor:
        """Tweedie's posterior mean E[x_0 | x_t = x] = (x + sigma_t^2 s(x, t)) / alpha_t."""
        t = torch.as_tensor(t, dtype=torch.float64)
        a, s = self.sde.alpha(t), self.sde.sigma(t)
        a = a.to(x).view(-1, *(1,) * (x.ndim - 1)) if a.ndim else float(a)
        s = s.to(x).view(-1, *(1,) * (x.ndim - 1)) if s.ndim else float(s)
        return (x + s**2 * self.score(x, t)) / a

    def posterior_mean(self, y: torch.Tensor, noise: float) -> torch.Tensor:
        """E[x_0 | y] for y = x_0 + noise * z, z ~ N(0, I): Tweedie at the matching diffusion time.

        y is x_t / alpha_t for the t with sigma_t / alpha_t = noise, so E[x_0 | y] is
        ``denoise(alpha_t y, t)``. This is the prior step of EM's ``m_step="denoise"``.
        """
        t = self.sde.time_at_noise(noise)
        return self.denoise(float(self.sde.alpha(t)) * y, t)


class AnalyticGaussianPrior(_Prior):
    """Data N(mu, I) under the VP-SDE: x_t ~ N(alpha_t mu, I), so s(x, t) = -(x - alpha_t mu).

    Args:
        mu: (L, L) mean.
    """

    def __init__(self, mu, sde: VPSDE | None = None):
        self.mu = torch.as_tensor(mu)
        self.sde = sde or VPSDE()

    def score(self, x: torch.Tensor, t) -> torch.Tensor:
        a = self.sde.alpha(torch.as_tensor(t, dtype=torch.float64)).to(x)
        a = a.view(-1, *(1,) * (x.ndim - 1)) if a.ndim else a
        return -(x - a * self.mu.to(x))


class ScorePrior(_Prior):
    """A trained score network (EMA weights) in measurement units.

    Attributes:
        net: the network, in eval mode.
        sde: the VP-SDE it was trained with.
        meta: what the checkpoint says of the data: image_size, units, held-out targets, mu, ...
    """

    def __init__(
        self, net: torch.nn.Module, sde: VPSDE, meta: dict, held_out: torch.Tensor | None
    ):
        self.net, self.sde, self.meta, self.held_out = net.eval(), sde, meta, held_out
        self.image_size = int(meta["image_size"])
        self.scale = float(meta.get("units", 1.0))  # measurement units per network unit

    @classmethod
    def from_checkpoint(cls, path, device="cpu", dtype=torch.float32) -> ScorePrior:
        """Rebuild the network from the checkpoint's hyperparameters and load its EMA weights.

        Args:
            path: a Lightning ``.ckpt`` written by ``train.py`` (or an exported EMA-only file).
            device: where the network runs.
            dtype: its floating dtype.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: the file is not a readable score-prior checkpoint.
        """
        path = Path(path)
        ckpt = _load_checkpoint(path)
        hp = ckpt["hyper_parameters"]
        try:
            net = build_net(**hp["net"])
            sde = VPSDE(**hp["sde"])
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
        return cls(net, sde, meta, None if held_out is None or held_out.numel() == 0 else held_out)

    @torch.no_grad()
    def score(self, x: torch.Tensor, t) -> torch.Tensor:
        """The score in measurement units: s(x) = s_net(x / u) / u for x = u * (network units)."""
        if x.ndim != 4 or x.shape[1:] != (1, self.image_size, self.image_size):
            raise ValueError(
                f"the prior takes (B, 1, {self.image_size}, {self.image_size}) images, "
                f"got {tuple(x.shape)}"
            )
        p = next(self.net.parameters())
        t = torch.as_tensor(t, device=p.device, dtype=p.dtype)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        out = self.net(x.to(p) / self.scale, t) / self.scale
        return out.to(x)

    def posterior_mean(self, y: torch.Tensor, noise: float) -> torch.Tensor:
        if getattr(self.net, "time", True) is False:
            raise ValueError(
                "this prior's network is time-free (trained by ISM at t = 0): it has no score at "
                "the diffusion time a denoiser needs; use m_step=gradient"
            )
        return super().posterior_mean(y, noise)


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
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(slim, tmp)
    tmp.replace(out)
    return out
