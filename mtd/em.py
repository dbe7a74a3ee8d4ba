"""Approximate expectation-maximization for 2-D MTD, with an optional score prior in the M-step.

The model (approximate-EM paper, eqs. 5-7; score-prior paper, eq. 9): every L x L patch of the
measurement is ``M_m = C T_l Z R_k F + noise`` with an unknown shift l in {0..2L-1}^2 and rotation
k. The E-step computes the posterior of (l, k) for every patch (eq. 11 / 14) by FFT or GEMM
cross-correlation and reduces it, chunk by chunk, to the sufficient statistics of DESIGN section 4;
the M-step needs nothing else.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mtd.likelihood import Correlator, choose_method, template_energy
from mtd.metrics import relative_error
from mtd.patches import PatchSource
from mtd.rotations import Rotations

Prior = Callable[[torch.Tensor, float], torch.Tensor]

# Elements (patches x rotations x shifts) per chunk when chunk_size is None, by correlation form:
# large enough to amortise the per-call overhead, small enough that a chunk's intermediates stay in
# cache (measured with tests/benchmarks/bench_em.py on 2 CPU cores).
_CHUNK_ELEMENTS = {"fft": 1 << 18, "gemm": 1 << 19}
# On a GPU a chunk is worth its ~20 kernel launches only when it is large: 2^23 elements (64 MB in
# float64). Not measured (no GPU was available); chunk_size overrides it.
_CHUNK_ELEMENTS_GPU = 1 << 23
# Streamed E-steps read and transform patches a block of chunks at a time: at most this many bytes
# of patch transforms in memory.
_STREAM_BLOCK_BYTES = 64 << 20


@dataclass
class Statistics:
    """Sufficient statistics of one E-step (DESIGN section 4), summed over patches.

    Attributes:
        omega: (K, 2L, 2L) posterior occupancy of every (rotation, shift).
        b: (K, L, L) weighted back-projection of the patches.
        c: (K, L, L) weighted coverage.
        loglik: () approximate log-likelihood of the patches at the E-step's (F, rho, sigma).
        energy: () sum_m ||M_m||^2.
        D: number of patches.
    """

    omega: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    loglik: torch.Tensor
    energy: torch.Tensor
    D: int


@dataclass
class Patches:
    """A measurement (or several) ready for the E-steps (``ApproximateEM.prepare``).

    Attributes:
        source: the ``PatchSource`` the patches are read from.
        energy: (D,) ||M_m||^2 of every patch.
        l1_max: the largest sum_ij |M_m[i, j]| over the patches (bounds how far a patch's
            logits can spread, see ``ApproximateEM._templates``).
        corr: the ``Correlator`` of all patches when their transforms are held in memory, None
            when they are streamed chunk by chunk.
        layout: a correlator that prepares templates and accumulators (no patches needed).
    """

    source: PatchSource
    energy: torch.Tensor
    l1_max: float
    corr: Correlator | None
    layout: Correlator

    @property
    def D(self) -> int:
        return self.source.D


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


def _count(index) -> int:
    return index.stop - index.start if isinstance(index, slice) else len(index)


def _as_index(index) -> torch.Tensor:
    if isinstance(index, slice):
        return torch.arange(index.start, index.stop, device="cpu")
    return index


def _check_finite(patches: torch.Tensor) -> None:
    if not torch.isfinite(patches).all():
        bad = int((~torch.isfinite(patches)).sum())
        raise ValueError(f"the measurement has {bad} non-finite values (NaN or inf)")


@dataclass
class EMResult:
    """What ``ApproximateEM.fit`` returns (the best restart).

    Attributes:
        estimate: (L, L) the estimate F.
        rho: (2L, 2L) the shift distribution.
        sigma: the noise level (given, or estimated).
        loglik: (iterations + 1,) approximate log-likelihood at every iterate, the last at
        ``estimate``.
        history: one dict per iteration (see ``ApproximateEM.fit``).
        converged: whether the stopping rule ||F_new - F|| < tol was met.
        restart: index of the chosen initial guess.
        scores: (R,) the ranking score of every restart (log-likelihood, plus gamma * log-prior
        with a prior).
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
    dropped: tuple[int, int] = (0, 0)


def _norms(patches: torch.Tensor) -> tuple[torch.Tensor, float]:
    """||M_m||^2 of (B, L, L) patches, (B,), and their largest sum_ij |M_m[i, j]|."""
    flat = patches.reshape(len(patches), -1)
    return flat.square().sum(1), float(flat.abs().sum(1).max())


def _log_sum_exp_passes(
    dtype, n: int, low: float, high: float, spread: float
) -> tuple[bool, bool, float]:
    """Which passes a log-sum-exp over n logits per patch needs before exp.

    Every patch's largest logit lies in [low, high] and its logits within ``spread`` below it.
    exp of a value below log(tiny) underflows anyway, and takes a slow path on some CPUs (35-100x
    slower here): clamp at ``floor`` where a logit may fall below it. Where every patch's largest
    logit lies far enough above floor (then the clamped terms weigh < e^(floor / 2) of a patch's
    sum) and far enough below overflow, exp(logits) is the unnormalised posterior itself: no
    shift by the max (shift False).

    Returns:
        (shift, clamp, floor).
    """
    info = torch.finfo(dtype)
    floor = math.log(info.tiny) + 1
    shift = not (floor / 2 <= low and high <= math.log(info.max / n) - 1)
    clamp = spread >= -floor if shift else low - spread < floor
    return shift, clamp, floor


def coverage(omega: torch.Tensor, L: int) -> torch.Tensor:
    """c_k = Z^T (omega_k circularly convolved with Z 1): c_k(y) = sum_{d in [0, L)^2} omega_k(y -
    d mod 2L).

    Summed directly (a box filter on the circularly extended occupancy) rather than by FFT, so that
    the result is exactly non-negative and exactly zero where no posterior mass reaches.

    Args:
        omega: (K, 2L, 2L).

    Returns:
        (K, L, L).
    """
    ext = torch.cat([omega[:, -(L - 1) :], omega], 1) if L > 1 else omega  # rows -(L-1) .. 2L-1
    rows = ext.unfold(1, L, 1)[:, :L].sum(-1)  # (K, L, 2L)
    ext = torch.cat([rows[:, :, -(L - 1) :], rows], 2) if L > 1 else rows
    return ext.unfold(2, L, 1)[:, :, :L].sum(-1)


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


class ApproximateEM(torch.nn.Module):
    """Approximate EM over patches (Algorithm 1 of the approximate-EM and score-prior papers).

    Args:
        L: image side in pixels.
        K: number of in-plane rotations searched, k * 2*pi/K (exact rot90 for K = 4).
        sigma: noise standard deviation; None estimates sigma^2 in every M-step.
        rho: "estimate" (eq. 18 of the approximate-EM paper) or "uniform" (the score-prior paper).
        m_step: "closed_form" (no prior), "gradient" (eq. 18 of the score-prior paper) or
            "denoise": the closed-form step, then the prior's posterior mean at the noise level
            of that estimate, blended in with weight gamma (see ``denoise_step``).
        steps: gradient ascent steps per EM iteration (the score-prior paper's N).
        lr: gradient ascent learning rate mu.
        gamma: weight of the prior along the iterations: "linear" (gamma_max * tau / (T - 1), the
            paper's ``linspace(0, 1, T)``) or "constant" (gamma_max).
        gamma_max: the prior weight's largest value.
        prior_t: diffusion time at which the score prior is evaluated.
        noise_scale: ``m_step="denoise"``: factor on the estimated noise level handed to the
            denoiser.
        anneal_from: ``m_step="denoise"``: noise level of the denoiser at the first iteration
            (None: no annealing); it decays geometrically to the estimated level over the first
            ``anneal_iterations`` iterations, coarse to fine, and never goes below that level.
        anneal_iterations: length of that schedule.
        iterations: maximum number of EM iterations T.
        tol: stop when ||F_new - F||_F < tol.
        chunk_size: patches per E-step chunk; None picks one from the sizes and the device.
        stream: hold the patch transforms in memory (False) or stream the patches from the
            measurement a block at a time in every E-step (True: memory bounded by the block,
            not by N); None streams measurements given as files and holds in-memory ones.
        stochastic: the stochastic-EM factor S in (0, 1]: each iteration's E-step uses
            floor(S D) patches drawn uniformly at random (1: all patches).
        seed: of those draws.
        polish: with stochastic < 1, up to this many iterations on all patches after the
            ``iterations`` stochastic ones (rho and sigma carried over), to remove the sampling
            noise of the last draws.
        method: "auto", "fft" or "gemm" (the cross-correlation form; "auto" picks by L).
        device: torch device of the computation.
        dtype: floating dtype of the computation.
    """

    def __init__(
        self,
        L: int,
        K: int = 4,
        sigma: float | None = None,
        rho: str = "estimate",
        m_step: str = "closed_form",
        steps: int = 1,
        lr: float = 1e-3,
        gamma: str = "linear",
        gamma_max: float = 1.0,
        prior_t: float = 0.01,
        noise_scale: float = 1.0,
        anneal_from: float | None = None,
        anneal_iterations: int = 0,
        iterations: int = 100,
        tol: float = 1e-5,
        chunk_size: int | None = None,
        stream: bool | None = None,
        stochastic: float = 1.0,
        seed: int = 0,
        polish: int = 0,
        method: str = "auto",
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
        if int(L) != L or L < 1:
            raise ValueError(f"L must be a positive integer, got {L!r}")
        if int(K) != K or K < 1:
            raise ValueError(f"K must be an integer >= 1, got {K!r}")
        if sigma is not None and not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(
                f"sigma must be > 0 and finite (or None to estimate it), got {sigma!r}"
            )
        _check_choice("rho", rho, ("estimate", "uniform"))
        _check_choice("m_step", m_step, ("closed_form", "gradient", "denoise"))
        _check_choice("gamma", gamma, ("linear", "constant"))
        _check_choice("method", method, ("auto", "fft", "gemm"))
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not 0 < prior_t <= 1:
            raise ValueError(f"prior_t must be in (0, 1], got {prior_t!r}")
        if not (math.isfinite(noise_scale) and noise_scale > 0):
            raise ValueError(f"noise_scale must be > 0, got {noise_scale!r}")
        if anneal_from is not None and not (math.isfinite(anneal_from) and anneal_from > 0):
            raise ValueError(f"anneal_from must be > 0 or None, got {anneal_from!r}")
        if int(anneal_iterations) != anneal_iterations or anneal_iterations < 0:
            raise ValueError(
                f"anneal_iterations must be an integer >= 0, got {anneal_iterations!r}"
            )
        if int(iterations) != iterations or iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
        if not tol >= 0:
            raise ValueError(f"tol must be >= 0, got {tol!r}")
        if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
            raise ValueError(f"chunk_size must be an integer >= 1 or None, got {chunk_size!r}")
        self.L, self.K = int(L), int(K)
        self.sigma, self.rho_mode, self.m_step = sigma, rho, m_step
        self.steps, self.lr, self.gamma, self.gamma_max = int(steps), lr, gamma, gamma_max
        self.prior_t, self.iterations, self.tol = prior_t, int(iterations), tol
        self.noise_scale, self.anneal_from = noise_scale, anneal_from
        self.anneal_iterations = int(anneal_iterations)
        if not 0 < stochastic <= 1:
            raise ValueError(
                f"stochastic (the fraction S of patches per E-step) must be in (0, 1], "
                f"got {stochastic!r}"
            )
        self.chunk_size, self.stream = chunk_size, stream
        self.stochastic, self.seed = stochastic, int(seed)
        if int(polish) != polish or polish < 0:
            raise ValueError(f"polish must be an integer >= 0, got {polish!r}")
        self.polish = int(polish)
        self.method = choose_method(self.L) if method == "auto" else method
        self.device, self.dtype = torch.device(device), dtype
        self.rotations = Rotations(self.L, self.K, self.device, dtype)

    # --------------------------------------------------------------------------------------------
    # Data
    # --------------------------------------------------------------------------------------------
    def prepare(self, data) -> Patches:
        """Validate the measurement(s) and get the patches ready for the E-steps.

        In memory (``stream=False``) the patch transforms are computed once; streamed
        (``stream=True``, the default for files) the patches are read and transformed a block at a
        time in every E-step, so memory is bounded by the block, not by N. Either way one pass
        checks every value and computes ||M_m||^2.

        Args:
            data: an (N0, N1) measurement (tensor or array), the path of a .npy / .mrc file
                (memory-mapped), or a list of these treated as one data set.

        Returns:
            ``Patches``.
        """
        source = PatchSource(data, self.L, self.dtype, self.device)
        stream = self.stream
        if stream is None:
            stream = any(
                isinstance(x, (str, Path))
                for x in (data if isinstance(data, (list, tuple)) else [data])
            )
        empty = torch.zeros(0, self.L, self.L, dtype=self.dtype, device=self.device)
        if not stream:
            patches = source.read(slice(0, source.D))
            _check_finite(patches)
            corr = Correlator(patches, self.method)
            return Patches(source, *_norms(patches), corr, corr)
        energy = torch.empty(source.D, dtype=self.dtype, device=self.device)
        l1_max = 0.0
        block = max(1, _STREAM_BLOCK_BYTES // (8 * self.L * self.L))
        for start in range(0, source.D, block):
            patches = source.read(slice(start, min(start + block, source.D)))
            _check_finite(patches)
            energy[start : start + len(patches)], block_l1 = _norms(patches)
            l1_max = max(l1_max, block_l1)
        return Patches(source, energy, l1_max, None, Correlator(empty, self.method))

    def _chunk(self, D: int) -> int:
        if self.chunk_size is not None:
            return min(self.chunk_size, D)
        budget = _CHUNK_ELEMENTS[self.method] if self.device.type == "cpu" else _CHUNK_ELEMENTS_GPU
        most = max(1, min(D, budget // (self.K * 4 * self.L * self.L)))
        # Equal chunks: D = 121 in chunks of at most 20 is 7 chunks of 18 or fewer, not a last
        # chunk of one patch that costs the per-chunk overhead for nothing.
        return math.ceil(D / math.ceil(D / most))

    # --------------------------------------------------------------------------------------------
    # E-step
    # --------------------------------------------------------------------------------------------
    def padded_rotations(self, F: torch.Tensor) -> torch.Tensor:
        """G_k = Z R_k F: (K, 2L, 2L), the rotated image in the top-left corner."""
        L = self.L
        G = torch.zeros(self.K, 2 * L, 2 * L, dtype=F.dtype, device=F.device)
        G[:, :L, :L] = self.rotations(F)
        return G

    def _chunks(self, data: Patches, subset: torch.Tensor | None, comm) -> list:
        """The patch indices of this process's chunks: slices of all patches, or of ``subset``."""
        chunk = self._chunk(data.D)
        if subset is None:
            chunks = [slice(s, min(s + chunk, data.D)) for s in range(0, data.D, chunk)]
        else:
            chunks = [subset[s : s + chunk] for s in range(0, len(subset), chunk)]
        if comm is not None:  # every rank takes every world_size-th chunk
            chunks = chunks[comm.rank :: comm.world_size]
        return chunks

    def _templates(self, data: Patches, F, log_rho, sigma2) -> tuple:
        """The iteration's templates for ``_logits_chunks``, and bounds on every patch's logits.

        Returns:
            (templates, (low, high, spread)): ``correlate`` then gives the logits
            log p(M_m | l, k, F) + log rho(l) - log K + ||M_m||^2 / (2 sigma^2) + (L^2 / 2)
            log(2 pi sigma^2): the patch's own term -||M_m||^2 / (2 sigma^2) of eq. (10) and the
            Gaussian normalisation are left out (they cancel in the posterior; the callers add
            them where they need the likelihood itself). Every patch's largest logit lies in
            [low, high], and its logits within ``spread`` below that.
        """
        L, K = self.L, self.K
        G = self.padded_rotations(F)
        inv = 1.0 / (2.0 * sigma2)
        # Patch-independent part of eq. (10): -e(l,k) / 2 sigma^2 and the prior of (l, k) (eq. 12).
        bias = -template_energy(G, L) * inv + log_rho - math.log(K)
        templates = data.layout.prepare(G, 2 * inv, bias)  # correlate(): c / sigma^2 + bias
        # A logit is (||M||^2 - ||M - C T_l G_k||^2) / 2 sigma^2 + log rho(l) - log K: at most
        # ||M||^2 / 2 sigma^2 + max log rho - log K, and at shifts with l_x = L or l_y = L the crop
        # is all padding, so the largest is at least their log rho - log K.
        high = float(data.energy.max()) * inv + float(log_rho.max()) - math.log(K)
        low = max(float(log_rho[L].max()), float(log_rho[:, L].max())) - math.log(K)
        # Over (l, k) each patch pixel meets every value of G (its zero padding included), so a
        # patch's correlations spread at most (max G - min G) sum_i |M_m[i]|, its logits at most
        # that over sigma^2 plus the bias's spread. The FFT form's padding rotation (odd K) is
        # -inf: no bound.
        if data.layout.method == "fft" and K % 2:
            return templates, (low, high, math.inf)
        spread = 2 * inv * (G.max() - G.min()) * data.l1_max + bias.max() - bias.min()
        return templates, (low, high, float(spread))

    def _logits_chunks(self, data: Patches, templates, subset=None, comm=None):
        """Yield (correlator, local index, global index, logits) chunk by chunk.

        logits: (B, *layout), in the correlator's layout over (rotation, shift); see
        ``_templates``.
        """
        L = self.L
        chunks = self._chunks(data, subset, comm)
        if data.corr is not None:  # all transforms in memory
            for index in chunks:
                index = index if isinstance(index, slice) else index.to(self.device)
                yield data.corr, index, index, data.corr.correlate(index, templates)
            return
        # Streamed: read and transform a block of chunks at a time (one read and one transform
        # call per block, memory bounded by the block), then correlate chunk by chunk.
        per_patch = 2 * 16 * 4 * L * L if self.method == "fft" else 8 * (L * L + 1)
        block = max(1, _STREAM_BLOCK_BYTES // per_patch)
        work, i = None, 0
        while i < len(chunks):
            group, n = [], 0
            while i < len(chunks) and (not group or n + _count(chunks[i]) <= block):
                group.append(chunks[i])
                n += _count(chunks[i])
                i += 1
            index = torch.cat([_as_index(c) for c in group]).to(self.device)
            corr = Correlator(data.source.read(index), self.method, work=work)
            work, offset = corr.work, 0
            for c in group:
                local = slice(offset, offset + _count(c))
                offset = local.stop
                yield corr, local, index[local], corr.correlate(local, templates)

    def log_likelihoods(self, data, F: torch.Tensor, sigma: float) -> torch.Tensor:
        """-||M_m - C T_l Z R_k F||^2 / (2 sigma^2) for every patch, rotation and shift (eq. 10).

        Holds the whole (D, K, 2L, 2L) array: for inspection and tests on small cases; the EM
        never does.

        Returns:
            (D, K, 2L, 2L).
        """
        data = self.prepare(data)
        F = torch.as_tensor(F, device=self.device, dtype=self.dtype)
        sigma2 = float(sigma) ** 2
        zero = torch.zeros(2 * self.L, 2 * self.L, dtype=self.dtype, device=self.device)
        # Undo the prior term of the bias; add the patch energies back.
        shift = math.log(self.K)
        templates, _ = self._templates(data, F, zero, sigma2)
        out = []
        for corr, _, index, lg in self._logits_chunks(data, templates):
            lg = torch.stack([corr.from_layout(x, self.K) for x in lg])
            out.append(lg + shift - (data.energy[index] / (2 * sigma2)).view(-1, 1, 1, 1))
        return torch.cat(out)

    def e_step(
        self,
        data: Patches,
        F: torch.Tensor,
        log_rho: torch.Tensor,
        sigma2: float,
        subset: torch.Tensor | None = None,
        comm=None,
    ) -> Statistics:
        """Posteriors (eq. 11 / 14) by log-sum-exp, reduced chunk by chunk to the statistics.

        Args:
            data: the prepared patches (``prepare``).
            F: (L, L) current estimate.
            log_rho: (2L, 2L) log of the current shift distribution.
            sigma2: noise variance.
            subset: sorted int64 indices of the patches to use (stochastic EM), or None for all;
                the sums over a subset are scaled by D / len(subset), an unbiased estimate of the
                sums over all patches.
            comm: ``mtd.TorchDistributed`` (or any object with rank, world_size and a summing
                all_reduce): this process takes every world_size-th chunk and the sums are
                all-reduced, so every process gets the statistics of all patches.

        Returns:
            ``Statistics``.
        """
        L, K = self.L, self.K
        templates, bounds = self._templates(data, F, log_rho, sigma2)
        # Log-sum-exp without the passes it does not need (each is one pass over every chunk).
        shift, clamp, floor = _log_sum_exp_passes(self.dtype, K * 4 * L * L, *bounds)
        norm = -0.5 * L * L * math.log(2 * math.pi * sigma2)
        zeros = torch.zeros(K, 2 * L, 2 * L, dtype=self.dtype, device=self.device)
        omega, acc = data.layout.to_layout(zeros), data.layout.new_accumulator(K)
        gemm_omega = data.layout.method == "gemm"  # omega rides in the back-projection GEMM
        loglik = torch.zeros((), dtype=torch.float64, device=self.device)
        energy = torch.zeros((), dtype=self.dtype, device=self.device)
        for corr, local, index, logits in self._logits_chunks(data, templates, subset, comm):
            e = logits.view(logits.shape[0], -1)
            if shift:
                top = e.amax(1, keepdim=True)
                e.sub_(top)
            if clamp:
                e.clamp_(min=floor)
            # exp(x) unnormalised: the 1 / sum is folded into the (small) reductions below
            # instead of a pass over the (B, K * 4L^2) array.
            total = e.exp_().sum(1)
            inv_total = total.reciprocal()
            if not gemm_omega:
                omega += (inv_total @ e).view(logits.shape[1:])  # sum_m w_m(l, k)
            corr.accumulate(local, logits, inv_total, acc)
            patch_energy = data.energy[index]
            lse = total.log() + (norm - patch_energy / (2 * sigma2))
            if shift:
                lse += top.view(-1)
            loglik += lse.sum(dtype=torch.float64)
            energy += patch_energy.sum()
        omega = data.layout.occupancy(acc, K) if gemm_omega else data.layout.from_layout(omega, K)
        b = data.layout.finish(acc, K)[:, :L, :L]
        if comm is not None:
            omega, b, loglik, energy = (comm.all_reduce(t) for t in (omega, b, loglik, energy))
        if subset is not None and len(subset) < data.D:
            scale = data.D / len(subset)
            omega, b, loglik, energy = omega * scale, b * scale, loglik * scale, energy * scale
        return Statistics(omega, b, coverage(omega, L), loglik, energy, data.D)

    # --------------------------------------------------------------------------------------------
    # M-step
    # --------------------------------------------------------------------------------------------
    def grad_q(self, stats: Statistics, F: torch.Tensor, sigma2: float) -> torch.Tensor:
        """grad_F Q = (sum_k R_k^T b_k - sum_k R_k^T diag(c_k) R_k F) / sigma^2 (from eq. 16)."""
        R = self.rotations
        return (R.adjoint(stats.b) - R.adjoint(stats.c * R(F))) / sigma2

    def closed_form(self, stats: Statistics, F: torch.Tensor) -> torch.Tensor:
        """argmax_F Q: solve sum_k R_k^T diag(c_k) R_k F = sum_k R_k^T b_k (eq. 16 set to zero).

        Pixels that the posteriors (almost) do not cover keep their value from ``F``: below
        sqrt(eps) of the largest coverage, b / c would be the rounding noise of the FFT
        back-projection divided by a vanishing weight (a stochastic E-step on a few patches
        leaves such pixels, and one of them is enough to blow the estimate up).
        """
        R = self.rotations
        rhs = R.adjoint(stats.b)
        floor = torch.finfo(F.dtype).eps ** 0.5
        if R.is_permutation:  # the system is diagonal
            diag = R.adjoint(stats.c)
            covered = diag > floor * diag.max()
            return torch.where(covered, rhs / torch.where(covered, diag, 1), F)
        A = R.normal_matrix(stats.c)
        covered = A.diagonal() > floor * A.diagonal().max()
        # The system on the covered pixels, the others fixed at F (identity rows).
        F_fixed = torch.where(covered, 0, F.reshape(-1))
        rhs = torch.where(covered.view(self.L, self.L), rhs - (A @ F_fixed).view_as(rhs), F)
        both = covered[:, None] & covered[None, :]
        A = torch.where(both, A, 0) + torch.diag((~covered).to(A.dtype))
        L_chol, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            sol = torch.cholesky_solve(rhs.reshape(-1, 1), L_chol)
        else:
            sol = torch.linalg.lstsq(A, rhs.reshape(-1, 1)).solution
        return sol.reshape(self.L, self.L)

    def residual(self, stats: Statistics, F: torch.Tensor) -> torch.Tensor:
        """sum_m sum_{l,k} w_m(l,k) ||M_m - C T_l Z R_k F||^2, from the statistics."""
        RF = self.rotations(F)
        return stats.energy - 2 * (stats.b * RF).sum() + (stats.c * RF * RF).sum()

    def q_function(self, stats: Statistics, F: torch.Tensor, sigma2: float) -> torch.Tensor:
        """The F-dependent part of Q (eq. 16): -residual / (2 sigma^2)."""
        return -self.residual(stats, F) / (2 * sigma2)

    def denoise_noise(self, stats: Statistics, sigma2: float, tau: int) -> float:
        """The noise level handed to the denoiser at iteration tau (see ``denoise_step``)."""
        coverage = float(stats.c.sum()) / self.L**2
        level = self.noise_scale * math.sqrt(sigma2 / max(coverage, 1e-12))
        if self.anneal_from is None or tau >= self.anneal_iterations:
            return level
        u = tau / self.anneal_iterations
        return max(level, self.anneal_from ** (1 - u) * level**u)

    def denoise_step(
        self, stats: Statistics, F: torch.Tensor, sigma2: float, prior, gamma, noise=None
    ) -> torch.Tensor:
        """Closed-form step, then the prior's posterior mean: F <- (1 - g) F_ml + g E[x | F_ml].

        The closed-form estimate F_ml is modelled as the image plus white noise of variance
        sigma^2 / (mean per-pixel coverage), the curvature of Q (eq. 16); E[x | F_ml] is the
        prior's MMSE denoiser at that noise (Tweedie's formula for a score prior). For a Gaussian
        prior and uniform coverage this is exactly the MAP M-step, argmax_F Q(F) + log p(F).
        """
        F_ml = self.closed_form(stats, F)
        if prior is None or gamma == 0:
            return F_ml
        noise = (
            self.denoise_noise(stats, sigma2, self.anneal_iterations) if noise is None else noise
        )
        x = F_ml.reshape(1, 1, self.L, self.L)
        denoised = prior.posterior_mean(x, noise).reshape(self.L, self.L).to(F)
        return (1 - gamma) * F_ml + gamma * denoised

    def gamma_at(self, tau: int) -> float:
        """The prior weight gamma^(tau) of eq. (18)."""
        if self.gamma == "constant" or self.iterations == 1:
            return self.gamma_max
        return self.gamma_max * min(tau / (self.iterations - 1), 1.0)

    def _prior_score(self, prior: Prior, F: torch.Tensor, t: float) -> torch.Tensor:
        s = prior(F.reshape(1, 1, self.L, self.L), t)
        if tuple(s.shape) != (1, 1, self.L, self.L):
            raise ValueError(
                f"the prior must map (B, 1, L, L) to (B, 1, L, L); for L = {self.L} it returned "
                f"shape {tuple(s.shape)}"
            )
        return s.reshape(self.L, self.L).to(F)

    def log_prior(self, prior: Prior, F: torch.Tensor, nodes: int = 8) -> float:
        """log p(F) - log p(0) by integrating the score along the segment from 0 to F.

        A score prior gives no log-density; ranking restarts only needs differences, and the line
        integral of the score (Gauss-Legendre, ``nodes`` points) is that difference for a
        conservative score.
        """
        u, wq = np.polynomial.legendre.leggauss(nodes)
        total = 0.0
        for ui, wi in zip((u + 1) / 2, wq / 2, strict=True):
            total += wi * float((self._prior_score(prior, ui * F, self.prior_t) * F).sum())
        return total

    # --------------------------------------------------------------------------------------------
    # The loop
    # --------------------------------------------------------------------------------------------
    def _validate_image(self, name, x):
        x = torch.as_tensor(x, device=self.device, dtype=self.dtype)
        if x.shape[-2:] != (self.L, self.L):
            raise ValueError(
                f"{name} must be ({self.L}, {self.L}) images, got shape {tuple(x.shape)}"
            )
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
    ) -> EMResult:
        """Run EM from each initial guess and keep the best (approximate-EM paper, Section 3).

        Args:
            data: (N, N) measurement, a .npy / .mrc path, or a list of these (see ``prepare``),
                or what ``prepare`` returned for them.
            init: (L, L) initial guess, or (R, L, L) for R restarts.
            prior: callable ``score(x: (B, 1, L, L), t: float) -> (B, 1, L, L)`` in measurement
                units; needs ``m_step="gradient"``, or ``"denoise"`` with a
                ``posterior_mean(y, noise)`` method as ``priors.ScorePrior`` has.
            truth: (L, L) true image, to record the error along the iterations.
            callback: called after every iteration with that iteration's history dict: ``restart``,
                ``iteration``, ``loglik`` (at the E-step's estimate), ``delta`` (||F_new - F||),
                ``sigma``, ``gamma``, ``lr``, ``empty_mass`` (rho's mass on shifts that leave the
                patch empty), ``noise`` (the denoiser's noise level with ``m_step="denoise"``) and
                ``error`` (when truth is given); the callback's copy also holds ``estimate``, the
                (L, L) new iterate.
            comm: for a run across processes, ``mtd.TorchDistributed()`` (see ``e_step``); every
                process passes the same data and gets the same result.

        Returns:
            ``EMResult`` of the restart with the highest log-likelihood (plus gamma * log-prior).
        """
        if prior is not None and self.m_step == "closed_form":
            raise ValueError(
                'a prior needs m_step="gradient" or "denoise"; the closed-form M-step has no '
                "prior term"
            )
        if prior is not None and self.m_step == "denoise" and not hasattr(prior, "posterior_mean"):
            raise ValueError(
                'm_step="denoise" needs a prior with posterior_mean(y, noise) (priors.ScorePrior '
                "and AnalyticGaussianPrior have one); a bare score function has not"
            )
        inits = self._validate_image("init", init)
        if inits.ndim not in (2, 3):
            raise ValueError(f"init must be (L, L) or (R, L, L), got shape {tuple(inits.shape)}")
        inits = inits.reshape(-1, self.L, self.L)
        if truth is not None:
            truth = self._validate_image("truth", truth)
            if truth.ndim != 2:
                raise ValueError(f"truth must be one (L, L) image, got shape {tuple(truth.shape)}")
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
        for r, F0 in enumerate(inits):
            res = self._fit_one(data, F0, prior, truth, callback, r, comm)
            score = float(res.loglik[-1])
            if prior is not None:
                score += self.gamma_at(len(res.history) - 1) * self.log_prior(prior, res.estimate)
            results.append(res)
            scores.append(score)
        best = int(np.argmax(scores))
        result = results[best]
        result.restart, result.dropped = best, dropped
        result.scores = torch.tensor(scores, device="cpu")
        return result

    def _initial_sigma2(self, data: Patches) -> float:
        # The patches' mean power: an upper bound on sigma^2 that the M-steps then lower.
        return max(float(data.energy.sum()) / (data.D * self.L**2), 1e-12)

    def _subset(self, data: Patches, generator: torch.Generator) -> torch.Tensor | None:
        """Stochastic EM (stochastic-EM paper, Algorithm 1): floor(S D) patches drawn uniformly."""
        if self.stochastic >= 1:
            return None
        n = max(1, math.floor(self.stochastic * data.D))
        return torch.randperm(data.D, generator=generator, device="cpu")[:n].sort().values

    def _fit_one(self, data, F, prior, truth, callback, restart, comm) -> EMResult:
        L = self.L
        F = F.clone()
        rho = torch.full((2 * L, 2 * L), 1.0 / (4 * L * L), dtype=self.dtype, device=self.device)
        sigma2 = self.sigma**2 if self.sigma is not None else self._initial_sigma2(data)
        generator = torch.Generator().manual_seed(self.seed + restart)
        empty = torch.zeros(2 * L, 2 * L, dtype=torch.bool, device=self.device)
        empty[L, :] = empty[:, L] = True  # l_x = L or l_y = L: the shifted copy misses the patch
        history, logliks, converged = [], [], False
        stochastic = self.stochastic < 1
        for tau in range(self.iterations + (self.polish if stochastic else 0)):
            # Stochastic EM draws its patches for the first `iterations`, then polishes on all.
            subset = self._subset(data, generator) if tau < self.iterations else None
            stats = self.e_step(data, F, rho.log(), sigma2, subset, comm)
            gamma = self.gamma_at(tau)
            noise = float("nan")
            if self.m_step == "closed_form":
                F_new = self.closed_form(stats, F)
            elif self.m_step == "denoise":
                noise = self.denoise_noise(stats, sigma2, tau)
                F_new = self.denoise_step(stats, F, sigma2, prior, gamma, noise)
            else:  # eq. (18) of the score-prior paper, `steps` times from the E-step's F
                F_new = F
                for _ in range(self.steps):
                    step = self.grad_q(stats, F_new, sigma2)
                    if prior is not None:
                        step = step + gamma * self._prior_score(prior, F_new, self.prior_t)
                    F_new = F_new + self.lr * step
            if self.rho_mode == "estimate":
                rho = stats.omega.sum(0) / stats.D  # eq. (18) of the approximate-EM paper
            if self.sigma is None:  # sigma^2 maximising Q at the new F
                sigma2 = max(float(self.residual(stats, F_new)) / (stats.D * L * L), 1e-12)
            delta = float(torch.linalg.vector_norm(F_new - F))
            entry = {
                "restart": restart,
                "iteration": tau,
                "loglik": float(stats.loglik),
                "delta": delta,
                "sigma": math.sqrt(sigma2),
                "gamma": gamma if prior is not None else 0.0,
                "lr": self.lr if self.m_step == "gradient" else float("nan"),
                "empty_mass": float(rho[empty].sum()),
                "noise": noise,
            }
            if truth is not None:
                entry["error"] = relative_error(truth, F_new, self.K)
            history.append(entry)
            logliks.append(float(stats.loglik))
            F = F_new
            if callback is not None:
                callback({**entry, "estimate": F})
            if not math.isfinite(delta):
                hint = f"; lower lr ({self.lr})" if self.m_step == "gradient" else ""
                raise FloatingPointError(
                    f"EM diverged at iteration {tau} (non-finite estimate){hint}"
                )
            if delta < self.tol:
                converged = True
                break
        logliks.append(float(self.e_step(data, F, rho.log(), sigma2, comm=comm).loglik))
        return EMResult(
            estimate=F,
            rho=rho,
            sigma=math.sqrt(sigma2),
            loglik=torch.tensor(logliks, dtype=torch.float64, device="cpu"),
            history=history,
            converged=converged,
            restart=restart,
        )
