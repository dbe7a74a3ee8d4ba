"""The variance-preserving SDE of the score-prior paper (eqs. 6-8) and a reverse-time sampler.

    dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw,        beta(t) = beta_min + (beta_max - beta_min) t

    x_t | x_0 ~ N(alpha_t x_0, sigma_t^2 I),   alpha_t = exp(-int_0^t beta / 2),   sigma_t^2 = 1 -
    alpha_t^2

Names follow score_sde: ``sde``, ``marginal_prob``, ``prior_sampling``, ``discretize``,
``reverse``. Times ``t`` are tensors of shape (B,) (or floats); images are (B, 1, L, L).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _col(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast (B,) times against (B, ...) images."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t.view(-1, *(1,) * (x.ndim - 1))


class VPSDE:
    """VP-SDE with a linear beta schedule on t in [0, T].

    Args:
        beta_min: beta(0).
        beta_max: beta(1).
        N: number of discretisation steps of ``discretize`` and the sampler.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        if not 0 < beta_min < beta_max:
            raise ValueError(f"need 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max, self.N, self.T = beta_min, beta_max, N, 1.0

    def beta(self, t):
        return self.beta_min + (self.beta_max - self.beta_min) * t

    def log_alpha(self, t):
        """log alpha_t = -int_0^t beta / 2 = -(beta_min t + (beta_max - beta_min) t^2 / 2) / 2."""
        return -0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t)

    def alpha(self, t):
        return torch.exp(self.log_alpha(torch.as_tensor(t, dtype=torch.float64)))

    def sigma(self, t):
        """sigma_t = sqrt(1 - alpha_t^2), computed as sqrt(-expm1(2 log alpha_t)) for small t."""
        return torch.sqrt(
            -torch.expm1(2 * self.log_alpha(torch.as_tensor(t, dtype=torch.float64)))
        )

    def time_at_noise(self, noise: float) -> float:
        """The t at which x_t / alpha_t = x_0 + noise * z, i.e. sigma_t / alpha_t = noise.

        sigma_t^2 / alpha_t^2 = exp(int_0^t beta) - 1, so int_0^t beta = log(1 + noise^2): a
        quadratic in t. Clamped to (0, T].
        """
        if not noise > 0:
            raise ValueError(f"noise must be > 0, got {noise!r}")
        a, b, c = 0.5 * (self.beta_max - self.beta_min), self.beta_min, -math.log1p(noise**2)
        t = 2 * -c / (b + math.sqrt(b * b - 4 * a * c))  # the positive root, stable for small c
        return min(t, self.T)

    def marginal_prob(self, x0: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean alpha_t x0 and std sigma_t of x_t given x0 (eq. 8), broadcast to x0."""
        la = self.log_alpha(_col(t, x0))
        return torch.exp(la) * x0, torch.sqrt(-torch.expm1(2 * la)).expand_as(x0)

    def sde(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift -beta x / 2 and diffusion sqrt(beta) of eq. (6)."""
        b = self.beta(_col(t, x))
        return -0.5 * b * x, torch.sqrt(b).expand_as(x)

    def prior_sampling(self, shape, generator=None, device=None, dtype=torch.float32):
        """Samples of x_T ~ N(0, I)."""
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        d = z[0].numel()
        return -0.5 * d * math.log(2 * math.pi) - 0.5 * z.flatten(1).square().sum(1)

    def discretize(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Euler-Maruyama increments f dt and G sqrt(dt) with dt = T / N."""
        drift, diffusion = self.sde(x, t)
        dt = self.T / self.N
        return drift * dt, diffusion * math.sqrt(dt)

    def reverse(self, score: Score, probability_flow: bool = False) -> ReverseSDE:
        """The reverse-time SDE (or probability-flow ODE) driven by ``score(x, t)``."""
        return ReverseSDE(self, score, probability_flow)


class ReverseSDE:
    """dx = [f - g^2 s(x, t)] dt + g dw-bar (half the score term and no noise for the ODE)."""

    def __init__(self, sde: VPSDE, score: Score, probability_flow: bool):
        self.forward_sde, self.score, self.probability_flow = sde, score, probability_flow
        self.N, self.T = sde.N, sde.T

    def sde(self, x, t):
        drift, diffusion = self.forward_sde.sde(x, t)
        weight = 0.5 if self.probability_flow else 1.0
        drift = drift - diffusion**2 * self.score(x, t) * weight
        return drift, torch.zeros_like(diffusion) if self.probability_flow else diffusion

    def discretize(self, x, t):
        f, G = self.forward_sde.discretize(x, t)
        weight = 0.5 if self.probability_flow else 1.0
        f = f - G**2 * self.score(x, t) * weight
        return f, torch.zeros_like(G) if self.probability_flow else G


@torch.no_grad()
def sample(
    sde: VPSDE,
    score: Score,
    shape: tuple[int, ...],
    steps: int | None = None,
    eps: float = 1e-3,
    corrector_steps: int = 0,
    corrector_snr: float = 0.16,
    generator: torch.Generator | None = None,
    device=None,
    dtype=torch.float32,
) -> torch.Tensor:
    """Draw samples by the reverse SDE: Euler-Maruyama predictor, optional Langevin corrector.

    Args:
        sde: the forward SDE.
        score: ``score(x, t)`` with t of shape (B,).
        shape: (B, 1, L, L).
        steps: predictor steps from t = 1 to t = eps (default ``sde.N``).
        eps: last time; the final step returns the mean (no noise), as score_sde does.
        corrector_steps: Langevin corrector steps per predictor step (0: predictor only).
        corrector_snr: the corrector's signal-to-noise ratio.
        generator: for reproducible samples.

    Returns:
        (B, 1, L, L) samples in data units.
    """
    steps = steps or sde.N
    x = sde.prior_sampling(shape, generator, device, dtype)
    times = torch.linspace(sde.T, eps, steps, device=device, dtype=dtype)
    dt = (sde.T - eps) / steps
    for i, t in enumerate(times):
        tb = t.expand(shape[0])
        for _ in range(corrector_steps):  # Langevin at fixed t (score_sde's LangevinCorrector)
            g = score(x, tb)
            z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
            ratio = corrector_snr * z.flatten(1).norm(dim=1) / g.flatten(1).norm(dim=1)
            step = 2 * sde.alpha(t).to(dtype) ** 2 * ratio.square()
            step = step.view(-1, *(1,) * (len(shape) - 1))
            x = x + step * g + torch.sqrt(2 * step) * z
        drift, diffusion = sde.sde(x, tb)
        mean = x - (drift - diffusion**2 * score(x, tb)) * dt
        if i == steps - 1:
            return mean
        x = mean + diffusion * math.sqrt(dt) * torch.randn(
            shape, generator=generator, device=device, dtype=dtype
        )
    return x
