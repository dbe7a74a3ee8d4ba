"""M-steps and their schedules, as small objects the engine calls once per EM iteration.

Each M-step maps the E-step's statistics (and the current estimate) to the next estimate, through
the ``TransformSet``'s adjoint and normal equations only, so it serves every kind of unknown:

- ``ClosedForm``: argmax_x Q, the normal equations of eq. (16) of the approximate-EM paper;
- ``Gradient``: eq. (18) of the score-prior paper, ``steps`` ascent steps on Q + gamma log p;
- ``Denoise``: the closed-form step, then the prior's posterior mean at the noise level of that
  estimate (a MAP step for a Gaussian prior), annealed coarse to fine.

Schedules give the prior weight gamma^(tau) of eq. (18): ``LinearGamma`` (the paper's
``linspace(0, 1, T)``) and ``ConstantGamma``.

The prior is a pixel-space model of (L, L) images; the unknown x need not be one (the coefficients
alpha of ``mtd.Steerable``). Through the seam, the image is I(x) = ``group.to_image(x)`` and the
unknown nearest an image y is P(y) = ``group.from_image(y)`` (the least-squares projection onto the
basis, P(I(x)) = x):

- ``Gradient`` ascends Q(x) + gamma log p(I(x)), whose gradient is grad Q + gamma J_I^T s(I(x))
  (the chain rule through ``to_image``: B^T s(B alpha) for a basis B; eq. 18 in the unknown);
- ``Denoise`` solves the likelihood part in the unknown (eq. 16, in the coefficients), denoises its
  image I(x_ml) in pixels and projects: x <- (1 - g) x_ml + g P(E[image | I(x_ml)]).
  For a Gaussian prior this is argmax_alpha -||B alpha - B alpha_ml||^2 / (2 v^2) + log p(B alpha),
  the MAP step with Q's curvature taken as B^T B / v^2, which is Q's own when the coverage is
  uniform and B^T B commutes with the K rotations (tests/priors/test_prior_steerable.py).

For an image unknown I and P are the identity, and both steps are what they were.
"""

from __future__ import annotations

import math

import torch


def grad_q(group, stats, x: torch.Tensor, sigma2: float) -> torch.Tensor:
    """grad_x Q = (sum_k T_k^T b_k - sum_k T_k^T diag(c_k) T_k x) / sigma^2 (from eq. 16)."""
    return (group.adjoint(stats.b) - group.adjoint(stats.c * group.templates(x))) / sigma2


def closed_form(group, stats, x: torch.Tensor) -> torch.Tensor:
    """argmax_x Q: solve sum_k T_k^T diag(c_k) T_k x = sum_k T_k^T b_k (eq. 16 set to zero)."""
    return group.normal_solve(stats.c, group.adjoint(stats.b), x)


def normal_apply(group, c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_k T_k^T diag(c_k) T_k v: the group's own when it has one, else through the seam."""
    if hasattr(group, "normal_apply"):
        return group.normal_apply(c, v)
    return group.adjoint(c * group.templates(v))


def ridge_solve(
    group, stats, lam: float, w: torch.Tensor, x: torch.Tensor, tol: float, iterations: int
) -> torch.Tensor:
    """argmax_x Q(x) - lam ||x - w||^2 / (2 sigma^2) by conjugate gradients from x:
    (sum_k T_k^T diag(c_k) T_k + lam I) x' = sum_k T_k^T b_k + lam w.

    The x-update of the splitting M-step (``Denoise`` with ``admm_iterations``); the ridge makes
    the system positive definite, so CG converges whatever the coverage. Stops at ||r|| <= tol
    ||right-hand side|| or after ``iterations``.
    """
    rhs = group.adjoint(stats.b) + lam * w
    r = rhs - normal_apply(group, stats.c, x) - lam * x
    p, rr = r.clone(), float((r * r).sum())
    target = tol * float(torch.linalg.vector_norm(rhs))
    for _ in range(iterations):
        if math.sqrt(rr) <= target:
            break
        Ap = normal_apply(group, stats.c, p) + lam * p
        alpha = rr / float((p * Ap).sum())
        x, r = x + alpha * p, r - alpha * Ap
        rr, rr_old = float((r * r).sum()), rr
        p = r + (rr / rr_old) * p
    return x


def residual(group, stats, x: torch.Tensor) -> torch.Tensor:
    """sum_m sum_{l,k} w_m(l,k) ||M_m - C T_l Z T_k x||^2, from the statistics."""
    T = group.templates(x)
    return stats.energy - 2 * (stats.b * T).sum() + (stats.c * T * T).sum()


class LinearGamma:
    """gamma^(tau) = max * tau / (T - 1): the score-prior paper's ``linspace(0, 1, T)``.

    Args:
        max: the weight at the last iteration (and after it, e.g. in polish iterations).
    """

    def __init__(self, max: float = 1.0):
        if not math.isfinite(max) or max < 0:
            raise ValueError(f"gamma max must be a finite number >= 0, got {max!r}")
        self.max = float(max)

    def __call__(self, tau: int, T: int) -> float:
        if T == 1:
            return self.max
        return self.max * min(tau / (T - 1), 1.0)

    def __repr__(self) -> str:
        return f"LinearGamma(max={self.max})"


class ConstantGamma:
    """gamma^(tau) = value at every iteration."""

    def __init__(self, value: float = 1.0):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"gamma value must be a finite number >= 0, got {value!r}")
        self.value = float(value)

    def __call__(self, tau: int, T: int) -> float:
        return self.value

    def __repr__(self) -> str:
        return f"ConstantGamma(value={self.value})"


def _image_prior(fn, x: torch.Tensor, *args, batch: bool = False) -> torch.Tensor:
    """Call a prior's ``fn`` (its score, or posterior_mean) on x as one (1, 1, L, L) image, or
    with ``batch`` on the B images of x (B, L, L) as (B, 1, L, L)."""
    shape = (x.shape[0], 1, *x.shape[1:]) if batch else (1, 1, *x.shape)
    y = fn(x.reshape(shape), *args)
    if tuple(y.shape) != shape:
        raise ValueError(
            f"the prior must map (B, 1, L, L) to (B, 1, L, L); for {tuple(x.shape)} images it "
            f"returned shape {tuple(y.shape)}"
        )
    return y.reshape(x.shape).to(x)


def prior_gradient(group, prior, x: torch.Tensor, t: float) -> torch.Tensor:
    """grad_x log p(I(x)) = J_I(x)^T s(I(x), t), I = ``group.to_image`` (the shape of x).

    The chain rule through the image map: for a basis, B^T s(B alpha, t). For an image unknown
    (``to_image`` returns x itself) it is the score itself, with no arithmetic added.
    """
    image = group.to_image(x)
    score = _image_prior(prior, image, t)
    if image is x:  # onto the unknown's subspace (a band-limited volume's Pi; else itself)
        return group.from_image(score)
    _, pullback = torch.func.vjp(group.to_image, x)  # J^T s for any differentiable to_image
    return pullback(score)[0]


def in_measurement_units(prior, group, x: torch.Tensor, noise: float = 0.0):
    """``prior`` in the units of the estimate x, for a prior of shapes (``prior.scale_free``:
    its objects unit RMS over the ball, as the volume priors); any other prior as it is.

    x is taken as the object plus white noise of ``noise`` per direction of the unknown's space
    (the level the Denoise M-step hands the denoiser), so the object's energy is ||I(x)||^2 -
    noise^2 dim; the units are its RMS over the ball's voxels (a tenth of x's energy at least,
    should the noise seem to exceed it).
    """
    if not getattr(prior, "scale_free", False):
        return prior
    energy = float(group.to_image(x).square().sum())
    clean = max(energy - noise**2 * group.dimension, 0.1 * energy)
    return prior.rescaled(max(math.sqrt(clean / prior.support_voxels), 1e-12))


class MStep:
    """The M-step interface: ``step(group, stats, x, sigma2, tau, T, prior) -> (x_new, info)``.

    ``info`` holds what the history records of the step: ``gamma`` (the prior's weight),
    ``lr`` and ``noise`` (NaN where they do not apply).
    """

    uses_prior = False

    def gamma(self, tau: int, T: int) -> float:
        """The prior's weight at iteration tau of T (0 for an M-step without a prior)."""
        return 0.0

    def check_prior(self, prior) -> None:
        """Raise a clear error if this M-step cannot use ``prior``."""
        if prior is not None and not self.uses_prior:
            raise ValueError(
                f"a prior needs a Gradient or Denoise M-step; {type(self).__name__} has no "
                "prior term"
            )

    def step(self, group, stats, x, sigma2, tau, T, prior):
        raise NotImplementedError


class ClosedForm(MStep):
    """argmax_x Q (eq. 16 of the approximate-EM paper set to zero): no prior."""

    def step(self, group, stats, x, sigma2, tau, T, prior):
        return closed_form(group, stats, x), {"gamma": 0.0, "lr": math.nan, "noise": math.nan}

    def __repr__(self) -> str:
        return "ClosedForm()"


class Gradient(MStep):
    """x <- x + mu (grad Q(x) + gamma^(tau) s_theta(x, t)), ``steps`` times (eq. 18 of the
    score-prior paper, Algorithm 1).

    Args:
        steps: gradient ascent steps per EM iteration (the paper's N).
        lr: the learning rate mu.
        gamma: the prior weight's schedule (``LinearGamma`` or ``ConstantGamma``).
        prior_t: diffusion time at which the score is evaluated.
    """

    uses_prior = True

    def __init__(self, steps: int = 1, lr: float = 1e-3, gamma=None, prior_t: float = 0.01):
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not 0 < prior_t <= 1:
            raise ValueError(f"prior_t must be in (0, 1], got {prior_t!r}")
        self.steps, self.lr, self.prior_t = int(steps), float(lr), float(prior_t)
        self.schedule = LinearGamma(1.0) if gamma is None else gamma

    def gamma(self, tau: int, T: int) -> float:
        return self.schedule(tau, T)

    def step(self, group, stats, x, sigma2, tau, T, prior):
        gamma = self.gamma(tau, T)
        prior = None if prior is None else in_measurement_units(prior, group, x)
        x_new = x
        for _ in range(self.steps):  # from the E-step's x
            direction = grad_q(group, stats, x_new, sigma2)
            if prior is not None:  # + gamma J^T s(I(x)): eq. (18) in the unknown
                direction = direction + gamma * prior_gradient(group, prior, x_new, self.prior_t)
            x_new = x_new + self.lr * direction
        return x_new, {
            "gamma": gamma if prior is not None else 0.0,
            "lr": self.lr,
            "noise": math.nan,
        }

    def __repr__(self) -> str:
        return (
            f"Gradient(steps={self.steps}, lr={self.lr}, gamma={self.schedule!r}, "
            f"prior_t={self.prior_t})"
        )


class Denoise(MStep):
    """Closed-form step, then the prior's posterior mean: x <- (1 - g) x_ml + g E[x | x_ml].

    The closed-form estimate x_ml is modelled as the image plus white noise of variance
    sigma^2 / (mean per-pixel coverage), the curvature of Q (eq. 16); E[x | x_ml] is the prior's
    MMSE denoiser at that noise (Tweedie's formula for a score prior, ``prior.posterior_mean``).
    For a Gaussian prior and uniform coverage this is exactly the MAP M-step,
    argmax_x Q(x) + log p(x).

    For an unknown that is not an image (``mtd.Steerable``'s coefficients), x_ml is the closed
    form in the unknown, the denoiser acts on its image ``group.to_image(x_ml)`` and its output is
    projected back with ``group.from_image`` (module docstring). The noise level is the same rule:
    with an orthonormal basis and uniform coverage c per template pixel, the coefficients of
    x_ml have noise variance sigma^2 / (K c) = sigma^2 / (mean coverage) each, and so has its
    image in every direction of the basis's span (none outside it). The sampled Fourier-Bessel
    basis is only near-orthonormal (the eigenvalues of B^T B lie in 0.52..1.48 at L = 28 with
    the Nyquist count), so this level is an approximation there; ``noise_scale`` corrects it.

    That image has no noise outside the basis's span (462 of 784 directions at L = 28), where the
    denoiser, trained on white noise, expects it. With ``complete_draws`` = D > 0 the denoiser is
    handed D completions z + (I - P) n_d, n_d white at the level (P = to_image o from_image, the
    projector onto the span), and their outputs are averaged: the Monte Carlo form of
    E[image | z] = E[ E[image | y] | z ] for y = image + white noise and z = P y, taking the
    image's own part outside the span (8% of a digit's norm at L = 28) as zero. While the level
    is annealed above the estimate's own, the completion is drawn at the handed level (the input
    is then noisier outside the span than inside, as coarse as the schedule asks). The draws are
    seeded by (``seed``, iteration), so restarts see the same ones and runs repeat exactly. For an
    image unknown P is the identity and nothing is drawn.

    Where Q's curvature is not a multiple of the identity (a volume's projections: sum_k P_k^T
    diag(c_k) P_k is the ramp filter of the Fourier slice theorem, not uniform coverage), the one
    denoising step is not the MAP step. With ``admm_iterations`` = n > 0 the step is n rounds of
    ADMM on -Q(x) - g log p(x) (the plug-and-play splitting): with v the level above and lam =
    sigma^2 / v^2,

        x <- argmax Q(x) - ||x - (z - u)||^2 / (2 v^2)   (``ridge_solve``: CG, warm-started)
        z <- P(E[image | I(x + u)] at noise v sqrt(g))  (the prior's posterior mean, projected)
        u <- u + x - z

    from x = x_ml, z = the denoised x_ml, u = x_ml - z; z is returned. For a Gaussian prior the
    posterior mean at noise v sqrt(g) is exactly the proximal map of -g log p with parameter v^2
    (on the unknown's subspace too: P is an orthogonal projector and the prior isotropic), so
    the rounds converge to argmax Q + g log p inside the subspace, whatever v: v sets the speed
    (and, for a learned prior, which MMSE denoiser stands in for the proximal map).

    Args:
        gamma: the weight g's schedule.
        noise_scale: factor on the estimated noise level handed to the denoiser.
        anneal_from: noise level of the denoiser at the first iteration (None: no annealing);
            it decays geometrically to the estimated level over the first ``anneal_iterations``
            iterations, coarse to fine, and never goes below that level.
        anneal_iterations: length of that schedule.
        prior_t: diffusion time of the score that ranks restarts (``ApproximateEM.log_prior``).
        complete_draws: completions of a basis image's missing noise averaged (0: none).
        seed: of those draws.
        admm_iterations: rounds of the ADMM splitting (0: the one denoising step, blended by g).
        cg_tol, cg_iterations: the conjugate gradients of each round's x-update.
    """

    uses_prior = True

    def __init__(
        self,
        gamma=None,
        noise_scale: float = 1.0,
        anneal_from: float | None = None,
        anneal_iterations: int = 0,
        prior_t: float = 0.01,
        complete_draws: int = 0,
        seed: int = 0,
        admm_iterations: int = 0,
        cg_tol: float = 1e-6,
        cg_iterations: int = 50,
    ):
        for key, value, least in (
            ("admm_iterations", admm_iterations, 0),
            ("cg_iterations", cg_iterations, 1),
        ):
            if int(value) != value or value < least:
                raise ValueError(f"{key} must be an integer >= {least}, got {value!r}")
        if not (math.isfinite(cg_tol) and cg_tol >= 0):
            raise ValueError(f"cg_tol must be a finite number >= 0, got {cg_tol!r}")
        self.admm_iterations, self.cg_iterations = int(admm_iterations), int(cg_iterations)
        self.cg_tol = float(cg_tol)
        if not 0 < prior_t <= 1:
            raise ValueError(f"prior_t must be in (0, 1], got {prior_t!r}")
        self.prior_t = float(prior_t)
        if not (math.isfinite(noise_scale) and noise_scale > 0):
            raise ValueError(f"noise_scale must be > 0, got {noise_scale!r}")
        if anneal_from is not None and not (math.isfinite(anneal_from) and anneal_from > 0):
            raise ValueError(f"anneal_from must be > 0 or None, got {anneal_from!r}")
        if int(anneal_iterations) != anneal_iterations or anneal_iterations < 0:
            raise ValueError(
                f"anneal_iterations must be an integer >= 0, got {anneal_iterations!r}"
            )
        if int(complete_draws) != complete_draws or complete_draws < 0:
            raise ValueError(f"complete_draws must be an integer >= 0, got {complete_draws!r}")
        if int(seed) != seed:
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.schedule = ConstantGamma(1.0) if gamma is None else gamma
        self.noise_scale, self.anneal_from = float(noise_scale), anneal_from
        self.anneal_iterations = int(anneal_iterations)
        self.complete_draws, self.seed = int(complete_draws), int(seed)

    def check_prior(self, prior) -> None:
        if prior is not None and not hasattr(prior, "posterior_mean"):
            raise ValueError(
                "the Denoise M-step needs a prior with posterior_mean(y, noise) "
                "(priors.ScorePrior and AnalyticGaussianPrior have one); a bare score function "
                "has not"
            )
        if prior is not None and getattr(prior, "time_conditioned", True) is False:
            raise ValueError(
                "the Denoise M-step needs a time-conditioned prior (its score at the diffusion "
                "time of each noise level); this prior is time-free (ISM): use a Gradient M-step"
            )

    def gamma(self, tau: int, T: int) -> float:
        return self.schedule(tau, T)

    def noise(self, stats, sigma2: float, tau: int) -> float:
        """The noise level handed to the denoiser at iteration tau."""
        pixels = math.prod(stats.c.shape[1:])
        mean_coverage = float(stats.c.sum()) / pixels
        level = self.noise_scale * math.sqrt(sigma2 / max(mean_coverage, 1e-12))
        if self.anneal_from is None or tau >= self.anneal_iterations:
            return level
        u = tau / self.anneal_iterations
        return max(level, self.anneal_from ** (1 - u) * level**u)

    def step(self, group, stats, x, sigma2, tau, T, prior):
        noise = self.noise(stats, sigma2, tau)
        gamma = self.gamma(tau, T)
        x_ml = closed_form(group, stats, x)  # eq. (16) in the unknown (the coefficients)
        info = {"gamma": gamma if prior is not None else 0.0, "lr": math.nan, "noise": noise}
        if prior is None or gamma == 0:
            return x_ml, info
        prior = in_measurement_units(prior, group, x_ml, noise)
        if self.admm_iterations == 0:
            denoised = self.prox(group, prior, x_ml, noise, tau)
            return (1 - gamma) * x_ml + gamma * denoised, info
        level, lam = noise * math.sqrt(gamma), sigma2 / noise**2  # the class docstring
        x, z = x_ml, self.prox(group, prior, x_ml, level, tau)
        u = x_ml - z
        for _ in range(self.admm_iterations - 1):
            x = ridge_solve(group, stats, lam, z - u, x, self.cg_tol, self.cg_iterations)
            z = self.prox(group, prior, x + u, level, tau)
            u = u + x - z
        return z, info

    def prox(self, group, prior, x: torch.Tensor, noise: float, tau: int) -> torch.Tensor:
        """P(E[object | I(x)]): the prior's posterior mean of the object the unknown x stands
        for, at ``noise``, projected back onto the unknown (the band-limited subspace of a
        volume, a basis's span; an image unknown: the posterior mean itself)."""
        image = group.to_image(x)  # the prior is a model of the object (pixels, voxels)
        if image is x:
            return group.from_image(_image_prior(prior.posterior_mean, image, noise))
        return group.from_image(self.denoise_span(group, prior, image, noise, tau))

    def denoise_span(self, group, prior, image, noise: float, tau: int) -> torch.Tensor:
        """The prior's posterior mean of a basis image (L, L), its missing noise completed."""
        if self.complete_draws == 0:
            return _image_prior(prior.posterior_mean, image, noise)
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + tau) % 2**63)
        white = noise * torch.randn(
            (self.complete_draws, *image.shape), generator=gen, dtype=torch.float64
        ).to(image)  # drawn on the CPU: the same completions on every device
        completed = image + white - group.to_image(group.from_image(white))  # (D, L, L)
        return _image_prior(prior.posterior_mean, completed, noise, batch=True).mean(0)

    def __repr__(self) -> str:
        return (
            f"Denoise(gamma={self.schedule!r}, noise_scale={self.noise_scale}, "
            f"anneal_from={self.anneal_from}, anneal_iterations={self.anneal_iterations}, "
            f"complete_draws={self.complete_draws}"
            + (f", admm_iterations={self.admm_iterations})" if self.admm_iterations else ")")
        )


class Continued(MStep):
    """``m_step`` past the end of its schedule: iteration tau of a further stage is iteration
    ``after + tau`` of the run of ``after`` iterations it continues (a prior's weight at its
    last value, annealing done), so that a stage run after EM (a finer rotation grid,
    ``reconstruct.py``'s em.refine_K) does not start the schedule over.
    """

    def __init__(self, m_step: MStep, after: int):
        if int(after) != after or after < 1:
            raise ValueError(f"after must be an integer >= 1, got {after!r}")
        self.m_step, self.after = m_step, int(after)
        self.uses_prior = m_step.uses_prior

    def __getattr__(self, name):  # the rest is the step's own (prior_t ranks restarts, lr, ...)
        if name == "m_step":  # (not set yet: copying)
            raise AttributeError(name)
        return getattr(self.m_step, name)

    def gamma(self, tau: int, T: int) -> float:
        return self.m_step.gamma(self.after + tau, self.after)

    def check_prior(self, prior) -> None:
        self.m_step.check_prior(prior)

    def step(self, group, stats, x, sigma2, tau, T, prior):
        return self.m_step.step(group, stats, x, sigma2, self.after + tau, self.after, prior)

    def __repr__(self) -> str:
        return f"Continued({self.m_step!r}, after={self.after})"
