"""Score-matching losses of the score-prior paper. Both return a scalar: the mean over the batch of
a
per-image sum over pixels."""

from __future__ import annotations

import torch

from priors.sde import VPSDE


def dsm_loss(
    net,
    sde: VPSDE,
    x0: torch.Tensor,
    eps: float = 1e-5,
    generator: torch.Generator | None = None,
    antithetic: bool = False,
    weighting: str = "sigma2",
    t_sampling: str = "uniform",
) -> torch.Tensor:
    """Denoising score matching, eq. (7), with lambda(t) = sigma_t^2 and t ~ U[eps, 1]:

        E || sigma_t s(x_t, t) + z ||^2,   x_t = alpha_t x0 + sigma_t z.

    With ``antithetic`` every (x0, t) is used twice, with z and -z: each half is a plain sample,
    so the loss is unchanged in expectation, but the leading noise term of the gradient, sigma_t z
    times the network's Jacobian, cancels between the two. That noise dominates at small t (its
    ratio to the signal grows like 1 / sigma_t), where the score is otherwise learned slowly.

    Args:
        net: ``net(x, t)`` -> score, (B, 1, L, L).
        sde: the VP-SDE.
        x0: (B, 1, L, L) data.
        eps: smallest time.
        antithetic: pair every noise draw with its negative.
        weighting: lambda(t): "sigma2" (the paper's sigma_t^2) or "none" (lambda = 1, i.e.
            E ||s + z / sigma_t||^2, which weighs small t as much as large t).
        t_sampling: "uniform" (t ~ U[eps, 1], eq. 7) or "log" (log t ~ U[log eps, 0]: more
            samples at small t; another positive weighting of the same objective, whose
            minimiser is still the true score at every t).
    """
    if weighting not in ("sigma2", "none"):
        raise ValueError(f"weighting must be 'sigma2' or 'none', got {weighting!r}")
    if t_sampling not in ("uniform", "log"):
        raise ValueError(f"t_sampling must be 'uniform' or 'log', got {t_sampling!r}")
    u = torch.rand(x0.shape[0], device=x0.device, dtype=x0.dtype, generator=generator)
    t = eps + (1 - eps) * u if t_sampling == "uniform" else eps ** (1 - u)
    z = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    if antithetic:
        x0, t, z = torch.cat([x0, x0]), torch.cat([t, t]), torch.cat([z, -z])
    mean, std = sde.marginal_prob(x0, t)
    residual = std * net(mean + std * z, t) + z  # sigma_t (s + z / sigma_t)
    if weighting == "none":
        residual = residual / std
    return residual.flatten(1).square().sum(1).mean()


def ism_loss(
    net, x: torch.Tensor, hutchinson: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Implicit score matching, eq. (5): E[ ||s(x)||^2 / 2 + tr(d s / d x) ] at t = 0.

    The trace is exact (in closed form for the MLP, else the whole Jacobian by autograd), or
    Hutchinson's unbiased estimate v^T (d s / d x) v with Rademacher v when ``hutchinson``.

    Args:
        net: ``net(x, t)`` -> score; called with t = 0.
        x: (B, 1, L, L) data.
    """
    t = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    if not hutchinson and hasattr(net, "score_and_divergence"):
        s, trace = net.score_and_divergence(x, t)  # exact, in closed form
        return (0.5 * s.flatten(1).square().sum(1) + trace).mean()
    x = x.detach().requires_grad_(True)
    s = net(x, t)
    flat = s.flatten(1)
    if hutchinson:
        v = torch.randint(0, 2, x.shape, device=x.device, generator=generator).to(x.dtype) * 2 - 1
        (g,) = torch.autograd.grad((s * v).sum(), x, create_graph=True)
        trace = (g * v).flatten(1).sum(1)
    else:  # all rows of the Jacobian in one vectorised backward pass
        d = flat.shape[1]
        rows = torch.eye(d, device=x.device, dtype=x.dtype)[:, None, :].expand(d, x.shape[0], d)
        (jac,) = torch.autograd.grad(flat, x, rows, create_graph=True, is_grads_batched=True)
        trace = jac.flatten(2).diagonal(dim1=0, dim2=2).sum(-1)  # sum_i d s_i / d x_i, (B,)
    return (0.5 * flat.square().sum(1) + trace).mean()
