"""Networks and the adapter that turns their output into a score.

Each network maps (x: (B, 1, L, L), t: (B,)) to a raw output (B, 1, L, L) (volumes: (B, 1, L, L,
L) through ``UNet(dims=3)``) and names its parameterisation in ``output``; ``ScoreAdapter`` (as
score_sde's ``get_score_fn`` or NVlabs/edm's ``VPPrecond``) turns that output into the score with
the SDE the checkpoint stores, so one SDE drives both the loss and the score.

- ``PaperUNet``: the score-prior paper's MNIST network: ten convolutions with LogSigmoid, max-pool
  down and transposed-convolution up, skip connections, t given as a constant input channel, the
  score as output (``output = "score"``).
- ``UNet``: residual blocks with GroupNorm and SiLU, a sinusoidal embedding of t added in every
  block; it predicts the noise eps (``output = "noise"``, score = -eps / sigma_t), the usual
  parameterisation of score_sde / EDM, which keeps the output of order one at every t.
- ``MLP``: the paper's 3-layer Softplus MLP for 5 x 5 images; time-free (for the ISM loss at t = 0)
  or with t appended to the input (for DSM); the score as output.

``build_net(name, sde=..., **kwargs)`` rebuilds any of them from the plain values stored in a
checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from priors.sde import VPSDE

OUTPUTS = ("score", "noise")  # what a network's raw output is (``ScoreAdapter``)
# Written into every checkpoint (top-level key "score_format"). Format 1 (no key): the UNet divided
# its output by its own VPSDE(beta_min, beta_max) of hp["net"] (default 0.1, 20), whatever
# hp["sde"] said; format 2: ScoreAdapter divides it by sigma_t of hp["sde"].
SCORE_FORMAT = 2
# Keywords the UNet took before the SDE moved out of it, in format-1 checkpoints' hp["net"], and
# their defaults then.
LEGACY_SDE_KEYS = {"unet": {"beta_min": 0.1, "beta_max": 20.0}}


def _times(t, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t.reshape(x.shape[0])


class PaperUNet(nn.Module):
    """The score-prior paper's U-Net for 28 x 28 images (channels 32-64-128-256-256).

    Args:
        image_size: must be 28 (the pooling paddings are those of 28 -> 14 -> 7 -> 4 -> 2).
        channels: widths of the five levels.
    """

    output = "score"
    time_conditioned = True

    def __init__(self, image_size: int = 28, channels: tuple[int, ...] = (32, 64, 128, 256, 256)):
        super().__init__()
        if image_size != 28:
            raise ValueError(f"PaperUNet is built for 28 x 28 images, got {image_size}")
        c = list(channels)
        self.first = nn.Conv2d(2, c[0], 3, padding=1)

        def down(cin, cout, pad):
            return nn.Sequential(
                nn.MaxPool2d(2, 2, padding=pad),
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.LogSigmoid(),
            )

        def up(cin, cout, out_pad):
            return nn.Sequential(
                nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=out_pad),
                nn.LogSigmoid(),
            )

        # 28 -> 14 -> 7 -> 4 -> 2 and back
        self.downs = nn.ModuleList(
            [down(c[0], c[1], 0), down(c[1], c[2], 0), down(c[2], c[3], 1), down(c[3], c[4], 0)]
        )
        self.ups = nn.ModuleList(
            [
                up(c[4], c[3], 1),
                up(2 * c[3], c[2], 0),
                up(2 * c[2], c[1], 1),
                up(2 * c[1], c[0], 1),
            ]
        )
        self.last = nn.Conv2d(c[0], 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        t = _times(t, x).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:])
        h = self.first(torch.cat([x, t], 1))
        skips = [h]
        for down in self.downs:
            h = down(h)
            skips.append(h)
        skips.pop()  # the bottom level has no skip
        for i, up in enumerate(self.ups):
            h = up(h if i == 0 else torch.cat([h, skips.pop()], 1))
        return self.last(h)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1], scaled by 1000 like diffusion steps: (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
    args = 1000 * t[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], 1)


_CONV = {2: (nn.Conv2d, nn.ConvTranspose2d), 3: (nn.Conv3d, nn.ConvTranspose3d)}


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int, groups: int = 8, dims: int = 2):
        super().__init__()
        conv = _CONV[dims][0]
        self.norm1, self.conv1 = (
            nn.GroupNorm(min(groups, cin), cin),
            conv(cin, cout, 3, padding=1),
        )
        self.emb = nn.Linear(emb, cout)
        self.norm2, self.conv2 = (
            nn.GroupNorm(min(groups, cout), cout),
            conv(cout, cout, 3, padding=1),
        )
        self.skip = conv(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, e):
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.emb(e).reshape(*e.shape[:1], -1, *(1,) * (x.ndim - 2))
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return h + self.skip(x)


class UNet(nn.Module):
    """A small residual U-Net with a sinusoidal time embedding (two levels for 28 x 28), for
    images (B, 1, L, L) or, with ``dims=3``, volumes (B, 1, L, L, L).

    The output is eps_theta(x, t), the predicted noise of x_t = alpha_t x_0 + sigma_t eps;
    ``ScoreAdapter`` turns it into the score -eps_theta / sigma_t with the checkpoint's SDE.
    A side not divisible by 2^(len(mults) - 1) is zero-padded up to the next multiple at the end
    of every axis and the output cropped back (a volume of side 11 runs at 12).

    Args:
        image_size: side of the (square) images or (cubic) volumes.
        channels: base width.
        mults: width multipliers per level.
        emb_dim: width of the time embedding.
        dims: 2 (images) or 3 (volumes).
    """

    output = "noise"
    time_conditioned = True

    def __init__(
        self,
        image_size: int = 28,
        channels: int = 32,
        mults: tuple[int, ...] = (1, 2, 2),
        emb_dim: int = 128,
        dims: int = 2,
    ):
        super().__init__()
        if dims not in _CONV:
            raise ValueError(f"dims must be 2 (images) or 3 (volumes), got {dims!r}")
        conv, conv_t = _CONV[dims]
        step = 2 ** (len(mults) - 1)
        self.image_size, self.dims = image_size, dims
        self.pad = -image_size % step
        self.emb_dim = emb_dim
        self.emb = nn.Sequential(
            nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        widths = [channels * m for m in mults]
        self.inp = conv(1, widths[0], 3, padding=1)
        self.down_blocks, self.pools = nn.ModuleList(), nn.ModuleList()
        cin = widths[0]
        for i, w in enumerate(widths):
            self.down_blocks.append(ResBlock(cin, w, emb_dim, dims=dims))
            self.pools.append(
                conv(w, w, 3, stride=2, padding=1) if i < len(widths) - 1 else nn.Identity()
            )
            cin = w
        self.mid = ResBlock(cin, cin, emb_dim, dims=dims)
        self.up_blocks, self.ups = nn.ModuleList(), nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            self.up_blocks.append(ResBlock(cin + w, w, emb_dim, dims=dims))
            self.ups.append(conv_t(w, w, 4, stride=2, padding=1) if i > 0 else nn.Identity())
            cin = w
        self.out = nn.Sequential(
            nn.GroupNorm(min(8, cin), cin), nn.SiLU(), conv(cin, 1, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        t = _times(t, x)
        e = self.emb(timestep_embedding(t, self.emb_dim))
        if self.pad:  # up to a side the levels halve exactly; cropped back below
            x = nn.functional.pad(x, (0, self.pad) * self.dims)
        h = self.inp(x)
        skips = []
        for block, pool in zip(self.down_blocks, self.pools, strict=True):
            h = block(h, e)
            skips.append(h)
            h = pool(h)
        h = self.mid(h, e)
        for block, up in zip(self.up_blocks, self.ups, strict=True):
            h = up(block(torch.cat([h, skips.pop()], 1), e))
        h = self.out(h)
        return h[(..., *(slice(0, self.image_size),) * self.dims)] if self.pad else h


class MLP(nn.Module):
    """The paper's MLP for L x L images: L^2 (+1 for t) -> hidden -> hidden -> L^2, Softplus.

    Args:
        image_size: L.
        hidden: width of the two hidden layers.
        time: whether t is an input (DSM); False gives a time-free score (ISM), t is then ignored.
    """

    output = "score"

    def __init__(self, image_size: int = 5, hidden: int = 256, time: bool = False):
        super().__init__()
        d = image_size * image_size
        self.time = time
        self.layers = nn.Sequential(
            nn.Linear(d + int(time), hidden),
            nn.Softplus(),
            nn.Linear(hidden, hidden),
            nn.Softplus(),
            nn.Linear(hidden, d),
        )

    @property
    def time_conditioned(self) -> bool:
        return self.time

    def forward(self, x: torch.Tensor, t=None) -> torch.Tensor:
        return self.layers(self._input(x, t)).view_as(x)

    def _input(self, x, t):
        h = x.flatten(1)
        return torch.cat([h, _times(t, x)[:, None]], 1) if self.time else h

    def score_and_divergence(self, x: torch.Tensor, t=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The score and its exact divergence tr(d s / d x), in closed form: (B, 1, L, L), (B,).

        With s = W3 softplus(W2 softplus(W1 x + b1) + b2) + b3, d s / d x = W3 D2 W2 D1 W1 with D =
        diag(sigmoid(pre-activation)), so tr = sum_ab sigmoid(a2)_a W2[a, b] (W1 W3)[b, a]
        sigmoid(a1)_b: one small matrix product instead of L^2 backward passes.
        """
        lin1, _, lin2, _, lin3 = self.layers
        a1 = lin1(self._input(x, t))
        a2 = lin2(nn.functional.softplus(a1))
        s = lin3(nn.functional.softplus(a2)).view_as(x)
        d = x[0].numel()
        M = lin2.weight * (lin1.weight[:, :d] @ lin3.weight).T
        div = ((torch.sigmoid(a2) @ M) * torch.sigmoid(a1)).sum(1)
        return s, div


class ScoreAdapter(nn.Module):
    """The score s_theta(x, t) of a network under one SDE (score_sde's ``get_score_fn``).

        output "score":  s_theta(x, t) = F(x, t)
        output "noise":  s_theta(x, t) = -F(x, t) / sigma_t     (F predicts eps in
                         x_t = alpha_t x_0 + sigma_t eps, so E[eps | x_t] = -sigma_t s(x_t, t))

    with F the network and sigma_t that of ``sde``, the SDE the loss trains with and the checkpoint
    stores. The adapter has no parameters or buffers of its own: ``state_dict`` keys are the
    network's under the prefix ``net.``, and checkpoints store the bare network's.

    Args:
        net: a network with an ``output`` attribute in ``OUTPUTS``.
        sde: the VP-SDE.

    Attributes:
        time_conditioned: False for a time-free network (the ISM MLP), whose t is ignored.
    """

    def __init__(self, net: nn.Module, sde: VPSDE):
        super().__init__()
        output = getattr(net, "output", None)
        if output not in OUTPUTS:
            raise ValueError(
                f"{type(net).__name__}.output is {output!r}; a score network says what it "
                f"outputs, one of {OUTPUTS}"
            )
        self.net, self.sde, self.output = net, sde, output
        self.time_conditioned = bool(getattr(net, "time_conditioned", True))
        if output == "score" and hasattr(net, "score_and_divergence"):
            # the score is the output itself, so its closed-form divergence is the ISM loss's
            self.score_and_divergence = net.score_and_divergence

    def sigma(self, t, x: torch.Tensor) -> torch.Tensor:
        """sigma_t of the SDE for the batch of x, (B, 1, 1, 1) ((B, 1, 1, 1, 1) for volumes)."""
        return self.sde.sigma(_times(t, x)).to(x.dtype).view(-1, *(1,) * (x.ndim - 1))

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        out = self.net(x, t)
        if self.output == "score":
            return out
        return -out / self.sigma(t, x)


NETS = {"unet_paper": PaperUNet, "unet": UNet, "mlp": MLP}


def build_net(name: str, sde: VPSDE | None = None, **kwargs) -> nn.Module:
    """A network from its registry name and plain keyword values (as stored in checkpoints).

    Args:
        name: a key of ``NETS``.
        sde: the checkpoint's SDE; needed only for the keywords ``beta_min`` / ``beta_max`` that
            UNet checkpoints written before the SDE moved out of the network may carry. Their
            network divided its output by that SDE's sigma_t, as ``ScoreAdapter`` now does with
            ``sde``; so they must equal ``sde``'s and are then dropped.
        **kwargs: the network's keywords (lists become tuples).

    Raises:
        ValueError: an unknown name, or legacy SDE keywords that disagree with ``sde``.
    """
    if name not in NETS:
        raise ValueError(f"unknown network {name!r}; known: {sorted(NETS)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    for key in LEGACY_SDE_KEYS.get(name, ()):
        if key not in kwargs:
            continue
        value = kwargs.pop(key)
        if sde is None:
            raise ValueError(
                f"net.{key}={value!r}: the network no longer holds an SDE; pass the checkpoint's "
                "SDE (build_net(..., sde=...)) to check it, or drop the keyword"
            )
        if float(value) != float(getattr(sde, key)):
            raise ValueError(
                f"net.{key}={value!r} differs from sde.{key}={getattr(sde, key)!r}: the network "
                "would be scaled by another SDE than the one the loss and the score use; the SDE "
                "is set once, by sde.*"
            )
    return NETS[name](**kwargs)
