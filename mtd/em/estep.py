"""The E-step as a stream of posteriors, and the consumers that reduce it (DESIGN section 4).

For every patch m, shift l and template k (the templates of a ``TransformSet``) the E-step needs
the posterior w_m(l, k) (eq. 11 / 14 of the approximate-EM paper). Nothing stores all of them
(D x K x 4L^2 numbers): ``EStep.posteriors`` yields them chunk by chunk, one chunk of patches
against one block of templates at a time, and consumers reduce them as they pass:

- ``StatisticsSum``: the sufficient statistics of the M-step (omega, b, c, the log-likelihood);
- ``PatchSummary``: per-patch summaries for picking (empty mass, the best shift and template).

The chunk of patches is bounded by the correlation form's element budget (sized for the cache;
when one patch's K x 4L^2 logits exceed it, a larger one sized for memory); when the K templates
do not fit in that at once (K in the thousands), they are cut into blocks and each patch's
log-sum-exp streams across the blocks: a first pass keeps every patch's running max and
sum, a second pass yields the normalised posteriors block by block.
"""

from __future__ import annotations

import contextlib
import copy
import math
import queue
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mtd import parallel
from mtd.em.likelihood import Form, choose_method, make_form, template_energy
from mtd.em.patches import PatchSource
from mtd.em.statistics import PatchSummaries, PatchSummary, Statistics, StatisticsSum
from mtd.em.threads import DEFAULT_THREADS, chunk_work, resolve_threads
from mtd.groups.base import TransformSet
from mtd.parallel import limit_threads, sharing

# Streamed E-steps read and transform patches a piece of chunks at a time: at most this many bytes
# of patch transforms in memory per worker.
_STREAM_BLOCK_BYTES = 32 << 20
# Workers share the chunks only where each gets at least this many: measured on 2 cores
# (tests/benchmarks/bench_threads.py), the L = 28, N = 308 case's 7 chunks ran no faster on two
# workers than on one thread, while 29 (L = 11) and 62 (L = 5) ran 1.5-1.9x faster.
_MIN_CHUNKS_PER_WORKER = 4
# With template blocks, chunks hold at least this many patches, so that the correlations stay
# matrix products rather than one patch's matrix-vector products.
_MIN_BLOCKED_PATCHES = 8


@dataclass
class Compute:
    """How the E-step runs (nothing here changes its result beyond rounding).

    Args:
        method: "auto", "fft" or "gemm" (the cross-correlation form; "auto" picks by L).
        chunk_size: patches per E-step chunk; None picks one from the sizes and the device.
        stream: hold the patch transforms in memory (False) or stream the patches from the
            measurement a block at a time in every E-step (True: memory bounded by the block,
            not by N); None streams measurements given as files and holds in-memory ones.
        threads: "auto": chunks too small to gain from intra-op threads run on one, shared out
            among the cores where there are enough of them (``EStep.workers``), bigger chunks on
            torch's default threads (``mtd.em.threads.threads_for``); or an integer: that many
            intra-op threads and no workers.
    """

    method: str = "auto"
    chunk_size: int | None = None
    stream: bool | None = None
    threads: int | str = "auto"

    def __post_init__(self):
        if self.method not in ("auto", "fft", "gemm"):
            raise ValueError(f"method must be one of auto, fft, gemm, got {self.method!r}")
        c = self.chunk_size
        if c is not None and (int(c) != c or c < 1):
            raise ValueError(f"chunk_size must be an integer >= 1 or None, got {c!r}")
        resolve_threads(self.threads, 0)  # validates


@dataclass
class Patches:
    """A measurement (or several) ready for the E-steps (``EStep.prepare``).

    Attributes:
        source: the ``PatchSource`` the patches are read from.
        energy: (D,) ||M_m||^2 of every patch.
        l1_max: the largest sum_ij |M_m[i, j]| over the patches (bounds how far a patch's
            logits can spread, see ``EStep._templates``).
        held: the form's transform of all patches when held in memory, None when they are
            streamed block by block.
    """

    source: PatchSource
    energy: torch.Tensor
    l1_max: float
    held: object | None

    @property
    def D(self) -> int:
        return self.source.D


@dataclass
class Posterior:
    """The posteriors of one chunk of patches over one block of templates.

    ``w * scale[:, None]`` (broadcast over the layout) is w_m(l, k) of eq. (11). ``w`` is in the
    form's layout and lives in its work buffer: a consumer reads it before the next item.

    Attributes:
        held: the form's transform of the chunk's patches (indexed by ``local``).
        local: the chunk's patches in ``held`` (a slice or an int64 tensor).
        index: the positions of the chunk's patches among all patches (a slice, or a (B,) int64
            tensor).
        block: the templates of this item.
        w: (B, *layout) posteriors up to the per-patch factor ``scale``.
        scale: (B,) that factor.
        loglik: (B,) log p(M_m | x, rho, sigma) of each patch (over all templates).
        first, last: whether this is the chunk's first / last template block.
    """

    form: Form
    held: object
    local: object
    index: torch.Tensor
    block: slice
    w: torch.Tensor
    scale: torch.Tensor
    loglik: torch.Tensor
    first: bool
    last: bool

    def weights(self) -> torch.Tensor:
        """(B, k, 2L, 2L) the normalised posteriors over (template, shift) of the block."""
        k = self.block.stop - self.block.start
        w = self.form.from_layout(self.w, k)
        return w * self.scale.view(-1, 1, 1, 1)


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


def _norms(patches: torch.Tensor) -> tuple[torch.Tensor, float]:
    """||M_m||^2 of (B, L, L) patches, (B,), and their largest sum_ij |M_m[i, j]|."""
    flat = patches.reshape(len(patches), -1)
    return flat.square().sum(1), float(flat.abs().sum(1).max()) if len(flat) else 0.0


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


class EStep:
    """Patches x templates x shifts: the posteriors of eq. (11), streamed (see the module doc).

    Args:
        group: the ``TransformSet`` whose templates are searched (on ``device``, ``dtype``).
        compute: ``Compute`` options.
        device, dtype: of the computation.
    """

    def __init__(self, group: TransformSet, compute: Compute, device, dtype):
        self.group, self.compute = group, compute
        self.L, self.K = group.L, group.K
        self.device, self.dtype = torch.device(device), dtype
        method = choose_method(self.L) if compute.method == "auto" else compute.method
        self.method = method
        self.form = make_form(method, self.L, self.device, dtype)

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
            data: a ``mtd.io.MicrographSource``, or what makes one: an (N0, N1) measurement
                (tensor or array), the path of a .npy / .mrc file (memory-mapped), a glob, or a
                list of these treated as one data set.

        Returns:
            ``Patches``.
        """
        source = PatchSource(data, self.L, self.dtype, self.device)
        stream = self.compute.stream
        if stream is None:
            stream = source.micrographs.on_disk
        with self.limit(source.D):
            if not stream:
                patches = source.read(slice(0, source.D))
                _check_finite(patches)
                return Patches(source, *_norms(patches), self.form.transform(patches))
            energy = torch.empty(source.D, dtype=self.dtype, device=self.device)
            l1_max = 0.0
            block = max(1, _STREAM_BLOCK_BYTES // (8 * self.L * self.L))
            for start in range(0, source.D, block):
                patches = source.read(slice(start, min(start + block, source.D)))
                _check_finite(patches)
                energy[start : start + len(patches)], block_l1 = _norms(patches)
                l1_max = max(l1_max, block_l1)
        return Patches(source, energy, l1_max, None)

    def chunking(self, D: int) -> tuple[int, list[slice]]:
        """Patches per chunk and the template blocks, from the form's element budget.

        Returns:
            (patches per chunk, blocks): slices of the K templates, each a multiple of the form's
            pairing except the last.
        """
        K, shifts = self.K, 4 * self.L * self.L
        budget = self.form.chunk_elements()
        chunk = self.compute.chunk_size
        if K * shifts <= budget:
            size = K  # every template in one block (a user's chunk_size may exceed the budget)
        else:  # many templates: chunks as large as memory allows (the form's second budget)
            budget = max(budget, self.form.max_elements())
            if K * shifts * min(chunk or 1, D) <= budget:
                size = K  # all templates in one block, the chunk (a user's too) within it
            else:
                chunk = chunk or _MIN_BLOCKED_PATCHES
                pair = self.form.pair
                size = max(pair, budget // (min(chunk, D) * shifts) // pair * pair)
        blocks = [slice(s, min(s + size, K)) for s in range(0, K, size)]
        if chunk is not None:
            return min(chunk, D), blocks
        most = max(1, min(D, budget // (size * shifts)))
        # Equal chunks: D = 121 in chunks of at most 20 is 7 chunks of 18 or fewer, not a last
        # chunk of one patch that costs the per-chunk overhead for nothing.
        return math.ceil(D / math.ceil(D / most)), blocks

    def threads(self, D: int) -> int:
        """Intra-op threads for the E-steps on D patches (``Compute.threads``)."""
        chunk, blocks = self.chunking(D)
        size = max(b.stop - b.start for b in blocks)
        work = chunk_work(max(chunk, 1), size, self.L)
        return resolve_threads(self.compute.threads, work, self.device)

    @contextlib.contextmanager
    def limit(self, D: int, used: int | None = None) -> Iterator[int]:
        """Run a block at the threads of an iteration on D patches, ``used`` of them per E-step.

        The whole iteration, not only the chunk loop, runs at the chunks' intra-op threads: the
        templates, the patch transforms, the M-step, the log-likelihood. Where the chunks run on
        one thread (every default CPU chunk), every op does: at torch's default threads each
        would split over a core that another process holds and wait for it at its barrier
        (issue 28: the templates alone took 5-25 ms of a 15 ms E-step beside a competing job).
        Where the chunks are shared out over workers (``workers``), so is every step that comes
        in independent pieces (``mtd.parallel.ordered_map``: the chunks, a volume's rotation
        blocks in the templates and the M-step's CG), and their sums are added in the pieces'
        order: with the other ops on one thread, an iteration gives the same bytes on one
        worker or many. Where big chunks run on intra-op threads, so does everything.

        Args:
            D: the patches of the data set.
            used: patches per E-step (stochastic EM's subset); None: all D.

        Yields:
            The intra-op threads of the block.
        """
        chunk, _ = self.chunking(D)
        workers = self.workers(D, -(-(D if used is None else used) // chunk))
        with sharing(workers), limit_threads(self.threads(D)) as n:
            yield n

    def _chunks(self, data: Patches, subset: torch.Tensor | None, comm) -> list:
        """The patch indices of this process's chunks: slices of all patches, or of ``subset``."""
        chunk, _ = self.chunking(data.D)
        if subset is None:
            chunks = [slice(s, min(s + chunk, data.D)) for s in range(0, data.D, chunk)]
        else:
            chunks = [subset[s : s + chunk] for s in range(0, len(subset), chunk)]
        if comm is not None:  # every rank takes every world_size-th chunk
            chunks = chunks[comm.rank :: comm.world_size]
        return chunks

    def _pieces(self, data: Patches, chunks: list, form: Form) -> list[list]:
        """Runs of chunks read and transformed together: in memory, each chunk alone; streamed,
        as many as ``_STREAM_BLOCK_BYTES`` of transforms hold. Fixed by the sizes, not by the
        workers, so the sums over them are the same whoever computes which (``statistics``)."""
        if data.held is not None:
            return [[c] for c in chunks]
        block = max(1, _STREAM_BLOCK_BYTES // form.bytes_per_patch())
        pieces, n = [], 0
        for c in chunks:
            if not pieces or n + _count(c) > block:
                pieces.append([])
                n = 0
            pieces[-1].append(c)
            n += _count(c)
        return pieces

    def _held_chunks(self, data: Patches, chunks: list, form: Form) -> Iterator[tuple]:
        """Yield (held, local index, global index) chunk by chunk.

        In memory the transforms are there; streamed, a piece of chunks (``_pieces``) is read
        and transformed at a time (one read and one transform call per piece, memory bounded
        by ``_STREAM_BLOCK_BYTES`` per worker). The indices are slices or int64 tensors on the
        engine's device.
        """
        if data.held is not None:
            for index in chunks:
                index = index if isinstance(index, slice) else index.to(self.device)
                yield data.held, index, index
            return
        for piece in self._pieces(data, chunks, form):
            index = torch.cat([_as_index(c) for c in piece]).to(self.device)
            held, offset = form.transform(data.source.read(index)), 0
            for c in piece:
                local = slice(offset, offset + _count(c))
                offset = local.stop
                yield held, local, index[local]

    # --------------------------------------------------------------------------------------------
    # Templates and the bounds on the logits
    # --------------------------------------------------------------------------------------------
    def padded(self, x: torch.Tensor, block: slice | None = None) -> torch.Tensor:
        """G_k = Z T_k(x): (k, 2L, 2L), the templates in the top-left corner."""
        L = self.L
        T = self.group.templates(x, block)
        G = torch.zeros(len(T), 2 * L, 2 * L, dtype=T.dtype, device=T.device)
        G[:, :L, :L] = T
        return G

    def _templates(self, data: Patches, x, log_rho, sigma2, blocks: list[slice]) -> tuple:
        """The iteration's prepared templates per block, and bounds on every patch's logits.

        Returns:
            (prepared, (low, high, spread)): ``correlate`` on block j gives the logits
            log p(M_m | l, k, x) + log rho(l) + log pi_k + ||M_m||^2 / (2 sigma^2) + (L^2 / 2)
            log(2 pi sigma^2): the patch's own term -||M_m||^2 / (2 sigma^2) of eq. (10) and the
            Gaussian normalisation are left out (they cancel in the posterior; the callers add
            them where they need the likelihood itself). Every patch's largest logit lies in
            [low, high], and its logits within ``spread`` below that.
        """
        L = self.L
        G = self.padded(x)
        inv = 1.0 / (2.0 * sigma2)
        log_w = self.group.log_weights().to(device=G.device, dtype=G.dtype).view(-1, 1, 1)
        # Patch-independent part of eq. (10): -e(l,k) / 2 sigma^2 and the prior of (l, k) (eq. 12).
        bias = -template_energy(G, L) * inv + log_rho + log_w
        # correlate(): c / sigma^2 + bias
        prepared = [self.form.prepare(G[b], 2 * inv, bias[b]) for b in blocks]
        # A logit is (||M||^2 - ||M - C T_l G_k||^2) / 2 sigma^2 + log rho(l) + log pi_k: at most
        # ||M||^2 / 2 sigma^2 + max log rho + max log pi, and at shifts with l_x = L or l_y = L
        # the crop is all padding, so the largest is at least their log rho + max log pi.
        top_w = float(log_w.max())
        high = float(data.energy.max()) * inv + float(log_rho.max()) + top_w
        low = max(float(log_rho[L].max()), float(log_rho[:, L].max())) + top_w
        # Over (l, k) each patch pixel meets every value of G (its zero padding included), so a
        # patch's correlations spread at most (max G - min G) sum_i |M_m[i]|, its logits at most
        # that over sigma^2 plus the bias's spread. The FFT form's padding template (odd blocks)
        # is -inf: no bound.
        if any(isinstance(p, tuple) and p[2] for p in prepared):
            return prepared, (low, high, math.inf)
        spread = 2 * inv * (G.max() - G.min()) * data.l1_max + bias.max() - bias.min()
        return prepared, (low, high, float(spread))

    # --------------------------------------------------------------------------------------------
    # The stream
    # --------------------------------------------------------------------------------------------
    def posteriors(
        self,
        data: Patches,
        x: torch.Tensor,
        log_rho: torch.Tensor,
        sigma2: float,
        subset: torch.Tensor | None = None,
        comm=None,
    ) -> Iterator[tuple[Posterior, torch.Tensor]]:
        """Yield (``Posterior``, the chunk's patch energies (B,)) for every chunk and block.

        Args:
            data: the prepared patches (``prepare``).
            x: the current unknown (the group's ``shape``).
            log_rho: (2L, 2L) log of the current shift distribution.
            sigma2: noise variance.
            subset: sorted int64 indices of the patches to use (stochastic EM), or None for all.
            comm: ``mtd.TorchDistributed`` (or any object with rank and world_size): this process
                takes every world_size-th chunk.
        """
        with limit_threads(self.threads(data.D)):  # one chunk loop: its threads throughout
            plan = self._plan(data, x, log_rho, sigma2)
            yield from self._stream(plan, data, self._chunks(data, subset, comm), self.form)

    def _plan(self, data: Patches, x, log_rho, sigma2) -> dict:
        """What every chunk of one E-step shares: template blocks, prepared templates, passes."""
        L = self.L
        _, blocks = self.chunking(data.D)
        prepared, bounds = self._templates(data, x, log_rho, sigma2, blocks)
        # Log-sum-exp without the passes it does not need (each is one pass over every chunk);
        # across template blocks the running max and sum always shift and clamp (``_stream``).
        shift, clamp, floor = _log_sum_exp_passes(self.dtype, self.K * 4 * L * L, *bounds)
        norm = -0.5 * L * L * math.log(2 * math.pi * sigma2)
        return {
            "blocks": blocks,
            "prepared": prepared,
            "shift": shift,
            "clamp": clamp,
            "floor": floor,
            "norm": norm,
            "sigma2": sigma2,
        }

    def _stream(self, plan: dict, data: Patches, chunks: list, form: Form):
        """The posteriors of ``chunks`` (see ``posteriors``), correlated with ``form``."""
        blocks, prepared, norm = plan["blocks"], plan["prepared"], plan["norm"]
        shift, clamp, floor, sigma2 = plan["shift"], plan["clamp"], plan["floor"], plan["sigma2"]
        single = len(blocks) == 1
        for held, local, index in self._held_chunks(data, chunks, form):
            energy = data.energy[index]
            own = norm - energy / (2 * sigma2)  # the patch's own term and the normalisation
            if single:
                logits = form.correlate(held, local, prepared[0])
                e = logits.view(logits.shape[0], -1)
                if shift:
                    top = e.amax(1, keepdim=True)
                    e.sub_(top)
                if clamp:
                    e.clamp_(min=floor)
                # exp(x) unnormalised: the 1 / sum is folded into the (small) reductions of the
                # consumers instead of a pass over the (B, K * 4L^2) array.
                total = e.exp_().sum(1)
                lse = total.log() + own
                if shift:
                    lse += top.view(-1)
                post = Posterior(
                    form, held, local, index, blocks[0], logits, total.reciprocal(), lse,
                    True, True,
                )  # fmt: skip
                yield post, energy
                continue
            # Pass 1: every patch's log-sum-exp over all blocks, streamed (running max and sum).
            top = total = None
            for p in prepared:
                e = form.correlate(held, local, p)
                e = e.view(e.shape[0], -1)
                # A block may hold only -inf logits for a patch (zero prior weights): keep the
                # max finite, so that -inf - max is -inf, not NaN.
                m = e.amax(1).clamp_(min=torch.finfo(e.dtype).min)
                if top is None:
                    top, total = m, e.sub_(m[:, None]).clamp_(min=floor).exp_().sum(1)
                    continue
                new = torch.maximum(top, m)
                total = total * (top - new).exp()
                total += e.sub_(new[:, None]).clamp_(min=floor).exp_().sum(1)
                top = new
            log_total = top + total.log()
            lse = log_total + own
            ones = torch.ones_like(total)
            # Pass 2: the normalised posteriors, block by block.
            for j, p in enumerate(prepared):
                logits = form.correlate(held, local, p)
                e = logits.view(logits.shape[0], -1)
                e.sub_(log_total[:, None]).clamp_(min=floor).exp_()
                last = j == len(prepared) - 1
                yield (
                    Posterior(
                        form, held, local, index, blocks[j], logits, ones, lse, j == 0, last
                    ),
                    energy,
                )

    def statistics(
        self,
        data: Patches,
        x: torch.Tensor,
        log_rho: torch.Tensor,
        sigma2: float,
        subset: torch.Tensor | None = None,
        comm=None,
    ) -> Statistics:
        """The sufficient statistics of the posteriors (eq. 11 / 14), chunk by chunk.

        Args: as ``posteriors``; with ``subset`` the sums over the subset are scaled by
            D / len(subset), an unbiased estimate of the sums over all patches; with ``comm`` the
            sums are all-reduced, so every process gets the statistics of all patches.

        Returns:
            ``Statistics``.
        """
        if subset is not None and len(subset) == 0:
            raise ValueError("subset holds no patch: a stochastic E-step needs at least one")
        # The templates and the sums too, not only the chunks (``limit``).
        with self.limit(data.D, None if subset is None else len(subset)):
            plan = self._plan(data, x, log_rho, sigma2)
            chunks = self._chunks(data, subset, comm)
            # Each worker correlates with a form of its own (the same tables, its own buffers).
            forms = queue.SimpleQueue()
            for form in [self.form, *self._spare_forms(parallel.workers() - 1)]:
                forms.put(form)

            def piece(chunks: list) -> StatisticsSum:
                form = forms.get()
                try:
                    total = StatisticsSum(self, plan["blocks"])
                    for post, energy in self._stream(plan, data, chunks, form):
                        total.add(post, energy)
                    return total
                finally:
                    forms.put(form)

            # One worker: the chunk loop at the policy's threads. More: each worker on one
            # core at one intra-op thread, no barrier at every op, taking the next piece when
            # free; the pieces' sums are added in their order, so the result is the same bytes
            # for any number of workers.
            total = StatisticsSum(self, plan["blocks"])  # a rank may hold no chunk
            for part in parallel.ordered_map(piece, self._pieces(data, chunks, self.form)):
                total.merge(part)
            scale = 1.0 if subset is None else data.D / len(subset)
            return total.result(data.D, comm, scale)

    def workers(self, D: int, chunks: int) -> int:
        """How many chunk loops run side by side on the CPU (``Compute.threads="auto"``).

        A chunk is sized to stay in cache, too small for every op to be split across threads:
        with two intra-op threads each op ends at a barrier, and when another process holds a
        core the thread that shares it stalls every op (``mtd.em.threads``). Instead the chunks are
        shared out, each worker running its own chunks on one thread: on a quiet machine the
        cores work side by side; under a competing load a worker slows down, none waits at
        barriers, and the workers take the next chunk when free, so the one that shares a core
        with the other process takes fewer. One worker per core, where each gets at least
        ``_MIN_CHUNKS_PER_WORKER`` chunks; one worker where the chunks are big enough to be
        split (``mtd.em.threads.PARALLEL_WORK``), off the CPU, or when ``threads`` is set. The
        sums do not depend on the workers (``limit``): the same bytes on any core count.
        """
        if self.compute.threads != "auto" or self.device.type != "cpu":
            return 1
        if self.threads(D) > 1:  # chunks big enough for intra-op threads
            return 1
        return max(1, min(DEFAULT_THREADS, chunks // _MIN_CHUNKS_PER_WORKER))

    def _spare_forms(self, n: int) -> list[Form]:
        """Forms for extra workers: the same tables, their own work buffers."""
        spare = getattr(self, "_spares", [])
        while len(spare) < n:
            form = copy.copy(self.form)
            form.work = None
            spare.append(form)
        self._spares = spare
        return spare[:n]

    def summaries(
        self, data: Patches, x: torch.Tensor, log_rho: torch.Tensor, sigma2: float, comm=None
    ) -> PatchSummaries:
        """Per-patch posterior summaries over all patches (``PatchSummaries``)."""
        summary = PatchSummary(self, data.D)
        with limit_threads(self.threads(data.D)):
            for post, energy in self.posteriors(data, x, log_rho, sigma2, comm=comm):
                summary.add(post, energy)
        return summary.result(comm)

    def log_likelihoods(self, data: Patches, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """-||M_m - C T_l Z T_k x||^2 / (2 sigma^2) for every patch, template and shift (eq. 10).

        Holds the whole (D, K, 2L, 2L) array: for inspection and tests on small cases; the EM
        never does.

        Returns:
            (D, K, 2L, 2L).
        """
        L = self.L
        sigma2 = float(sigma) ** 2
        zero = torch.zeros(2 * L, 2 * L, dtype=self.dtype, device=self.device)
        _, blocks = self.chunking(data.D)
        prepared, _ = self._templates(data, x, zero, sigma2, blocks)
        # Undo the prior term of the bias; add the patch energies back.
        log_w = self.group.log_weights().to(device=self.device, dtype=self.dtype)
        out = []
        for held, local, index in self._held_chunks(
            data, self._chunks(data, None, None), self.form
        ):
            parts = []
            for b, p in zip(blocks, prepared, strict=True):
                lg = self.form.correlate(held, local, p)
                parts.append(self.form.from_layout(lg, b.stop - b.start).clone())
            lg = torch.cat(parts, 1) - log_w.view(1, -1, 1, 1)
            out.append(lg - (data.energy[index] / (2 * sigma2)).view(-1, 1, 1, 1))
        return torch.cat(out)
