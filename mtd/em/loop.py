"""Approximate expectation-maximization for MTD, with an optional score prior in the M-step.

The model (approximate-EM paper, eqs. 5-7; score-prior paper, eq. 9): every L x L patch of the
measurement is ``M_m = C T_l Z T_k(x) + noise`` with an unknown shift l in {0..2L-1}^2 and
template k of a ``TransformSet`` (the K rotations of an image, rotations and reflections, ...).
The E-step (``mtd.em.estep``) streams the posterior of (l, k) for every patch (eq. 11 / 14) into
the sufficient statistics of docs/design.md, section 4; the M-step (``mtd.em.msteps``) needs
nothing else. This module runs the loop: restarts, rho (eq. 18), sigma, stochastic EM, the
stopping rule.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from mtd.em.estep import Compute, EStep, Patches
from mtd.em.msteps import ClosedForm, MStep, closed_form, grad_q, in_measurement_units, residual
from mtd.em.statistics import PatchSummaries, Statistics, empty_shifts
from mtd.groups.base import TransformSet, check_group
from mtd.metrics import relative_error

Prior = Callable[[torch.Tensor, float], torch.Tensor]


class TorchDistributed:
    """The E-step's view of a torch.distributed process group (gloo, NCCL), e.g. under Fabric.

    Statistics are sums over patches, so all-reducing them with SUM gives every process the
    statistics of all patches, and the M-step, run identically on every process, the same F.
    """

    def __init__(self, group=None):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised (launch with Fabric/torchrun)"
            )
        self.dist, self.group = dist, group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        self.dist.all_reduce(tensor, op=self.dist.ReduceOp.SUM, group=self.group)
        return tensor


# The seed offset of stochastic EM's scoring subset (restart r draws its subsets from seed + r).
_EVAL = 1 << 31


@dataclass
class Stochastic:
    """Stochastic EM (stochastic-EM paper, Algorithm 1): each E-step on floor(S D) random patches.

    Args:
        fraction: the factor S in (0, 1].
        polish: up to this many iterations on all patches after the stochastic ones (rho and
            sigma carried over), to remove the sampling noise of the last draws. Without a
            polish the final log-likelihood (each restart's score) is taken on one subset of
            floor(S D) patches, the same for every restart, scaled to all patches.
        seed: of the draws (restart r draws from seed + r).
    """

    fraction: float
    polish: int = 0
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.fraction <= 1:
            raise ValueError(
                f"stochastic (the fraction S of patches per E-step) must be in (0, 1], "
                f"got {self.fraction!r}"
            )
        if int(self.polish) != self.polish or self.polish < 0:
            raise ValueError(f"polish must be an integer >= 0, got {self.polish!r}")


@dataclass
class EMResult:
    """What ``ApproximateEM.fit`` returns (the best restart).

    Attributes:
        estimate: the estimate x (the group's ``shape``, e.g. (L, L)).
        rho: (2L, 2L) the shift distribution.
        sigma: the noise level (given, or estimated).
        loglik: (iterations + 1,) approximate log-likelihood at every iterate, the last at
        ``estimate`` (stochastic EM: estimates from its subsets, the last from the subset every
        restart is scored on, unless a polish ends on all patches).
        history: one dict per iteration (see ``ApproximateEM.fit``).
        converged: whether the stopping rule ||F_new - F|| < tol was met.
        restart: index of the chosen initial guess.
        scores: (R,) the ranking score of every restart (log-likelihood, plus gamma * log-prior
        with a prior).
        score: the returned estimate's ranking score (``scores[restart]`` after a fit; after a
        continuation, ``refine``, the continued estimate's).
        dropped: pixels of the measurement outside the patch grid (rows, columns) that were not
        used.
    """

    estimate: torch.Tensor
    rho: torch.Tensor
    sigma: float
    loglik: torch.Tensor
    history: list[dict] = field(default_factory=list)
    converged: bool = False
    restart: int = 0
    scores: torch.Tensor | None = None
    score: float | None = None
    dropped: tuple[int, int] = (0, 0)


class ApproximateEM(torch.nn.Module):
    """Approximate EM over patches (Algorithm 1 of the approximate-EM and score-prior papers).

    Args:
        group: the ``TransformSet`` searched (``mtd.Rotations(L, K)``, ``mtd.Dihedral(L, K)``,
            ...); the engine works on a copy moved to ``device`` and ``dtype``.
        m_step: an ``mtd.em.msteps`` M-step (``ClosedForm()``, ``Gradient(...)``,
            ``Denoise(...)``); None is ``ClosedForm()``.
        sigma: noise standard deviation; None estimates sigma^2 in every M-step.
        rho: "estimate" (eq. 18 of the approximate-EM paper) or "uniform" (the score-prior paper).
        iterations: maximum number of EM iterations T.
        tol: stop when ||x_new - x|| < tol.
        stochastic: ``Stochastic(fraction, polish, seed)``, or None for all patches every time.
        compute: ``Compute(method, chunk_size, stream)`` options of the E-step.
        device: torch device of the computation.
        dtype: floating dtype of the computation.
    """

    def __init__(
        self,
        group: TransformSet,
        m_step: MStep | None = None,
        sigma: float | None = None,
        rho: str = "estimate",
        iterations: int = 100,
        tol: float = 1e-5,
        stochastic: Stochastic | None = None,
        compute: Compute | None = None,
        device="cpu",
        dtype=torch.float32,
    ):
        super().__init__()
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(
                f"dtype must be a floating torch dtype (float32, float64), got {dtype!r}"
            )
        check_group(group)
        if sigma is not None and not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(
                f"sigma must be > 0 and finite (or None to estimate it), got {sigma!r}"
            )
        if rho not in ("estimate", "uniform"):
            raise ValueError(f"rho must be one of ('estimate', 'uniform'), got {rho!r}")
        if int(iterations) != iterations or iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
        if not tol >= 0:
            raise ValueError(f"tol must be >= 0, got {tol!r}")
        self.device, self.dtype = torch.device(device), dtype
        self.group = copy.deepcopy(group).to(device=self.device, dtype=dtype)
        self.L, self.K = self.group.L, self.group.K
        self.m_step = ClosedForm() if m_step is None else m_step
        if not isinstance(self.m_step, MStep):
            raise ValueError(f"m_step must be an mtd M-step (ClosedForm, ...), got {m_step!r}")
        self.sigma, self.rho_mode = sigma, rho
        self.iterations, self.tol = int(iterations), tol
        self.stochastic = stochastic
        self.estep = EStep(self.group, compute or Compute(), self.device, dtype)

    @property
    def total_iterations(self) -> int:
        """The most iterations one restart runs: ``iterations`` plus stochastic EM's polish."""
        return self.iterations + (self.stochastic.polish if self.stochastic else 0)

    # --------------------------------------------------------------------------------------------
    # The E-step (mtd.em.estep) and the M-step's pieces (mtd.em.msteps), for callers and tests
    # --------------------------------------------------------------------------------------------
    def prepare(self, data) -> Patches:
        """Validate the measurement(s) and get the patches ready (``EStep.prepare``)."""
        return self.estep.prepare(data)

    def e_step(self, data: Patches, x, log_rho, sigma2, subset=None, comm=None) -> Statistics:
        """The sufficient statistics of one E-step (``EStep.statistics``)."""
        return self.estep.statistics(data, x, log_rho, sigma2, subset, comm)

    def summaries(self, data, x, log_rho, sigma2, comm=None) -> PatchSummaries:
        """Per-patch posterior summaries (``EStep.summaries``), e.g. for picking."""
        data = data if isinstance(data, Patches) else self.prepare(data)
        return self.estep.summaries(data, x, log_rho, sigma2, comm)

    def log_likelihoods(self, data, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """(D, K, 2L, 2L) -||M_m - C T_l Z T_k x||^2 / (2 sigma^2) (``EStep.log_likelihoods``)."""
        data = data if isinstance(data, Patches) else self.prepare(data)
        x = torch.as_tensor(x, device=self.device, dtype=self.dtype)
        return self.estep.log_likelihoods(data, x, sigma)

    # The M-step's pieces run on the E-step's cores (EStep.limit), as they do inside fit.
    def grad_q(self, stats: Statistics, x: torch.Tensor, sigma2: float) -> torch.Tensor:
        with self.estep.limit(stats.D):
            return grad_q(self.group, stats, x, sigma2)

    def closed_form(self, stats: Statistics, x: torch.Tensor) -> torch.Tensor:
        with self.estep.limit(stats.D):
            return closed_form(self.group, stats, x)

    def residual(self, stats: Statistics, x: torch.Tensor) -> torch.Tensor:
        with self.estep.limit(stats.D):
            return residual(self.group, stats, x)

    def q_function(self, stats: Statistics, x: torch.Tensor, sigma2: float) -> torch.Tensor:
        """The x-dependent part of Q (eq. 16): -residual / (2 sigma^2)."""
        return -self.residual(stats, x) / (2 * sigma2)

    def log_prior(self, prior: Prior, x: torch.Tensor, nodes: int = 8) -> float:
        """log p(I(x)) - log p(0) by integrating the score along the segment from 0 to I(x).

        The prior is a pixel-space model: I(x) = ``group.to_image(x)`` is the image the unknown
        stands for (x itself for an image unknown; B alpha for a basis, which maps 0 to 0). A
        score prior gives no log-density; ranking restarts only needs differences, and the line
        integral of the score (Gauss-Legendre, ``nodes`` points) is that difference for a
        conservative score. The score is taken at the M-step's ``prior_t``.
        """
        t = self.m_step.prior_t
        prior = in_measurement_units(prior, self.group, x)
        x = self.group.to_image(x)
        u, wq = np.polynomial.legendre.leggauss(nodes)
        total = 0.0
        for ui, wi in zip((u + 1) / 2, wq / 2, strict=True):
            s = prior((ui * x).reshape(1, 1, *x.shape), t).reshape(x.shape).to(x)
            total += wi * float((s * x).sum())
        return total

    # --------------------------------------------------------------------------------------------
    # The loop
    # --------------------------------------------------------------------------------------------
    def _validate_image(self, name, x):
        x = torch.as_tensor(x, device=self.device, dtype=self.dtype)
        shape = self.group.shape
        if tuple(x.shape[-len(shape) :]) != shape:
            raise ValueError(f"{name} must be {shape} images, got shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} has non-finite values")
        return x

    def fit(
        self,
        data,
        init,
        prior: Prior | None = None,
        truth=None,
        callback: Callable[[dict], None] | None = None,
        comm=None,
        rho: torch.Tensor | None = None,
        sigma: float | None = None,
    ) -> EMResult:
        """Run EM from each initial guess and keep the best (approximate-EM paper, Section 3).

        Args:
            data: (N, N) measurement, a .npy / .mrc path, or a list of these (see ``prepare``),
                or what ``prepare`` returned for them.
            init: the initial guess (the group's ``shape``, e.g. (L, L)), or (R, *shape) for R
                restarts.
            prior: callable ``score(x: (B, 1, L, L), t: float) -> (B, 1, L, L)`` in measurement
                units; needs a ``Gradient`` M-step, or ``Denoise`` with a
                ``posterior_mean(y, noise)`` method as ``priors.ScorePrior`` has. It acts on the
                image ``group.to_image(x)`` of an unknown that is not one (``mtd.em.msteps``).
            truth: the true unknown, to record the error along the iterations.
            callback: called after every iteration with that iteration's history dict: ``restart``,
                ``iteration``, ``loglik`` (at the E-step's estimate), ``delta`` (||x_new - x||),
                ``sigma``, ``gamma``, ``lr``, ``empty_mass`` (rho's mass on shifts that leave the
                patch empty), ``noise`` (the denoiser's noise level with ``Denoise``) and
                ``error`` (when truth is given); the callback's copy also holds ``estimate``, the
                new iterate.
            comm: for a run across processes, ``mtd.TorchDistributed()`` (see ``EStep``); every
                process passes the same data and gets the same result.
            rho, sigma: where every restart starts the shift distribution ((2L, 2L), summing to
                1) and, when it is estimated, the noise level: an earlier fit's, to continue it
                (None: a uniform rho and the patches' mean power, an upper bound on sigma^2).

        Returns:
            ``EMResult`` of the restart with the highest log-likelihood (plus gamma * log-prior).
        """
        self.m_step.check_prior(prior)
        shape = self.group.shape
        if prior is not None:  # the prior acts on the image the unknown stands for
            probe = torch.zeros(shape, device=self.device, dtype=self.dtype)
            image_shape = tuple(self.group.to_image(probe).shape)
            if image_shape != tuple(self.group.object_shape):
                raise ValueError(
                    f"a prior acts on {tuple(self.group.object_shape)} objects; this group's "
                    f"unknown {shape} ({type(self.group).__name__}) maps to {image_shape} by "
                    "to_image"
                )
        inits = self._validate_image("init", init)
        if inits.ndim not in (len(shape), len(shape) + 1):
            raise ValueError(
                f"init must be {shape} or (R, *{shape}), got shape {tuple(inits.shape)}"
            )
        inits = inits.reshape(-1, *shape)
        if len(inits) == 0:
            raise ValueError("init holds no initial guess (R = 0 restarts)")
        if truth is not None:
            truth = self._validate_image("truth", truth)
            if truth.ndim != len(shape):
                raise ValueError(f"truth must be one {shape} image, got {tuple(truth.shape)}")
        L = self.L
        if rho is not None:
            rho = torch.as_tensor(rho, device=self.device, dtype=self.dtype)
            ok = tuple(rho.shape) == (2 * L, 2 * L) and bool(torch.isfinite(rho).all())
            if not (ok and bool((rho >= 0).all()) and abs(float(rho.sum()) - 1) < 1e-6):
                raise ValueError(
                    f"rho must be a ({2 * L}, {2 * L}) distribution (>= 0, summing to 1), got "
                    f"shape {tuple(rho.shape)}"
                )
        if sigma is not None and not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be > 0 and finite or None, got {sigma!r}")
        data = data if isinstance(data, Patches) else self.prepare(data)
        for name, array, rest in zip(
            data.source.names, data.source.arrays, data.source.dropped, strict=True
        ):
            if any(rest):
                warnings.warn(
                    f"{name} {tuple(array.shape)} is not a multiple of L = {self.L}: the last "
                    f"{rest[0]} rows and {rest[1]} columns are outside the patch grid, unused",
                    stacklevel=2,
                )
        dropped = data.source.dropped[0] if len(data.source.dropped) == 1 else data.source.dropped
        results, scores = [], []
        # Every step of every iteration on the E-step's cores (EStep.limit): the M-step, the
        # prior, the errors too, so no op splits over a core that the chunks gave up.
        with self.estep.limit(data.D, self._subset_size(data.D)):
            for r, x0 in enumerate(inits):
                res = self._fit_one(data, x0, prior, truth, callback, r, comm, rho, sigma)
                score = float(res.loglik[-1])
                if prior is not None:
                    gamma = self.m_step.gamma(len(res.history) - 1, self.iterations)
                    score += gamma * self.log_prior(prior, res.estimate)
                results.append(res)
                scores.append(score)
        best = int(np.argmax(scores))
        result = results[best]
        result.restart, result.dropped = best, dropped
        result.scores, result.score = torch.tensor(scores, device="cpu"), scores[best]
        return result

    def _initial_sigma2(self, data: Patches) -> float:
        # The patches' mean power: an upper bound on sigma^2 that the M-steps then lower.
        return max(float(data.energy.sum()) / (data.D * self.L**2), 1e-12)

    def _subset(self, data: Patches, generator: torch.Generator) -> torch.Tensor | None:
        """Stochastic EM (stochastic-EM paper, Algorithm 1): floor(S D) patches drawn uniformly."""
        n = self._subset_size(data.D)
        if n is None:
            return None
        return torch.randperm(data.D, generator=generator, device="cpu")[:n].sort().values

    def _subset_size(self, D: int) -> int | None:
        """Patches per stochastic E-step, floor(S D) (at least one); None: all of them."""
        if self.stochastic is None or self.stochastic.fraction >= 1:
            return None
        return max(1, math.floor(self.stochastic.fraction * D))

    def _fit_one(
        self, data, x, prior, truth, callback, restart, comm, rho=None, sigma=None
    ) -> EMResult:
        L = self.L
        x = x.clone()
        if rho is None:
            rho = torch.full((2 * L, 2 * L), 1 / (4 * L * L), dtype=self.dtype, device=self.device)
        if self.sigma is not None:
            sigma2 = self.sigma**2
        else:
            sigma2 = sigma**2 if sigma is not None else self._initial_sigma2(data)
        seed = self.stochastic.seed if self.stochastic else 0
        generator = torch.Generator().manual_seed(seed + restart)
        empty = empty_shifts(L, self.device)  # the shifted copy misses the patch
        history, logliks, converged = [], [], False
        for tau in range(self.total_iterations):
            self.group.start_iteration(tau)  # (frequency marching: the band of iteration tau)
            # Stochastic EM draws its patches for the first `iterations`, then polishes on all.
            subset = self._subset(data, generator) if tau < self.iterations else None
            stats = self.e_step(data, x, rho.log(), sigma2, subset, comm)
            x_new, info = self.m_step.step(
                self.group, stats, x, sigma2, tau, self.iterations, prior
            )
            if self.rho_mode == "estimate":
                rho = stats.omega.sum(0) / stats.D  # eq. (18) of the approximate-EM paper
            if self.sigma is None:  # sigma^2 maximising Q at the new x
                sigma2 = max(float(self.residual(stats, x_new)) / (stats.D * L * L), 1e-12)
            delta = float(torch.linalg.vector_norm(x_new - x))
            entry = {
                "restart": restart,
                "iteration": tau,
                "loglik": float(stats.loglik),
                "delta": delta,
                "sigma": math.sqrt(sigma2),
                **info,
                "empty_mass": float(rho[empty].sum()),
            }
            if truth is not None:
                entry["error"] = relative_error(truth, x_new, group=self.group)
            history.append(entry)
            logliks.append(float(stats.loglik))
            x = x_new
            if callback is not None:
                callback({**entry, "estimate": x})
            if not math.isfinite(delta):
                hint = f"; lower lr ({self.m_step.lr})" if hasattr(self.m_step, "lr") else ""
                raise FloatingPointError(
                    f"EM diverged at iteration {tau} (non-finite estimate){hint}"
                )
            if delta < self.tol:
                converged = True
                break
        self.group.start_iteration(len(history) - 1)  # the band the estimate lies in
        # The log-likelihood at the estimate (the restart's score). Stochastic EM without a
        # polish scores on one subset of floor(S D) patches, the same for every restart, scaled
        # to all: an unbiased estimate at the cost of one of its iterations, not of a pass over
        # all patches (as long as 1 / S of them: 20 iterations' worth at S = 0.05).
        final = None
        if self.stochastic is not None and self.stochastic.polish == 0:
            final = self._subset(data, torch.Generator().manual_seed(self.stochastic.seed + _EVAL))
        logliks.append(float(self.e_step(data, x, rho.log(), sigma2, final, comm=comm).loglik))
        return EMResult(
            estimate=x,
            rho=rho,
            sigma=math.sqrt(sigma2),
            loglik=torch.tensor(logliks, dtype=torch.float64, device="cpu"),
            history=history,
            converged=converged,
            restart=restart,
        )
