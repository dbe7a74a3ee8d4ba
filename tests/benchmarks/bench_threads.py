"""Intra-op threads of the E-step: 1 thread, 2 threads and mtd.em.threads' policy, quiet, loaded.

    python -m tests.benchmarks.bench_threads                 # the two cases of issue 11
    python -m tests.benchmarks.bench_threads --sweep         # chunk sizes: places PARALLEL_WORK
    python -m tests.benchmarks.bench_threads --repeats 15 --spinners 1

Everything is measured in this one run. One EM iteration is the E-step (``em.e_step``) and the
closed-form M-step (``em.closed_form``) on a prepared in-memory measurement, float64:

- (a) L = 28, N = 308, K = 4, an MNIST digit: FFT form, 121 patches;
- (b) L = 5, N = 1000, K = 8, a U[0, 1] image: GEMM form, 40,000 patches.

Each case runs at a fixed 1 thread, a fixed 2 threads (``torch.set_num_threads``) and the policy
(``mtd.em.threads.resolve_threads("auto", work of one chunk, "cpu")``), each "quiet" and "loaded":
with ``--spinners`` processes that this benchmark starts, each spinning on one core
(``python -c "while True: pass"``), paused (SIGSTOP) for the quiet rounds and resumed (SIGCONT)
for the loaded ones, killed at the end. The variants and cases run in a new random order in every
load state of every round, so a slow spell of a shared machine falls on all of them alike; printed
are the median and the range (min-max) of ``--repeats`` rounds, and the policy's median over the
faster fixed count's (the "best fixed" for that load state). Where the case has enough work, a
fourth variant, "big chunks", runs the policy on chunks of at least PARALLEL_WORK elements (the
form's element budget raised on that engine): the only way threads get that much work per chunk.

``--sweep`` times 1 and 2 threads, quiet and loaded, over chunk budgets (elements per chunk,
set on the engine's correlation form) of one FFT and one GEMM problem, and at the default chunks
of intermediate sizes (L = 11, 16; L = 28 with 4x the patches): the gain of two threads against
the work of a chunk, which places PARALLEL_WORK.
POSIX only (the spinners are paused and resumed by signals).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import mtd
from mtd.em.threads import DEFAULT_THREADS, PARALLEL_WORK, chunk_work, resolve_threads
from mtd.parallel import limit_threads

ASSETS = Path(__file__).resolve().parents[2] / "assets"


# --- The engine API in one place (adapt here when it changes) ---------------------------------
def make_engine(L: int, K: int, budget: int | None = None) -> mtd.ApproximateEM:
    """The engine under test: rotations by 2 pi k / K, float64, on the CPU.

    Args:
        budget: elements per chunk (patches x templates x shifts) instead of the correlation
            form's cache-sized default (set on this engine's form only, for the sweep).
    """
    em = mtd.ApproximateEM(mtd.Rotations(L, K=K), dtype=torch.float64)
    if budget is not None:
        em.estep.form.cpu_chunk_elements = budget
    return em


def engine_threads(em: mtd.ApproximateEM, threads) -> None:
    """Give the engine's own ``threads`` setting (``Compute.threads``, where it has one), so that
    an E-step that picks its threads itself runs the variant's count, not its "auto"."""
    if hasattr(em.estep.compute, "threads"):
        em.estep.compute.threads = threads


def chunk_shape(em: mtd.ApproximateEM, D: int) -> tuple[int, int]:
    """(patches per chunk, templates per block) of the engine's E-step on D patches."""
    chunk, blocks = em.estep.chunking(D)
    return chunk, max(b.stop - b.start for b in blocks)


# -----------------------------------------------------------------------------------------------


def case_image(L: int, rng: np.random.Generator) -> np.ndarray:
    if L == 28:
        with np.load(ASSETS / "mnist_digits.npz") as f:
            return f["images"][10].astype(np.float64) / 255.0
    return rng.uniform(0, 1, (L, L))  # the approximate-EM paper's images


class Case:
    """One prepared problem: ``iteration()`` runs one E-step + closed-form M-step."""

    def __init__(self, L: int, N: int, K: int, budget: int | None = None):
        rng = np.random.default_rng(0)
        image = case_image(L, rng)
        meas = mtd.simulate(image, N, density=0.1, snr=1.0, K=K, seed=0)
        self.em = make_engine(L, K, budget)
        self.patches = self.em.prepare(meas.data)
        self.x = torch.as_tensor(image + 0.1 * rng.standard_normal((L, L)), dtype=torch.float64)
        self.log_rho = torch.full((2 * L, 2 * L), -np.log(4.0 * L * L), dtype=torch.float64)
        self.sigma2 = float(meas.sigma) ** 2
        self.L, self.N, self.K, self.D = L, N, K, self.patches.D
        self.method = self.em.estep.method
        self.chunk, self.block = chunk_shape(self.em, self.D)
        self.work = chunk_work(self.chunk, self.block, L)
        self.chunks = -(-self.D // self.chunk)

    def iteration(self) -> None:
        stats = self.em.e_step(self.patches, self.x, self.log_rho, self.sigma2)
        self.em.closed_form(stats, self.x)

    def label(self) -> str:
        return f"L={self.L} N={self.N} K={self.K}"


SPIN = [sys.executable, "-c", "while True: pass"]


class Spinners:
    """``n`` competing processes (``command``: spinning on one core by default), paused until
    ``load(True)``."""

    def __init__(self, n: int, command: list[str] = SPIN):
        self.procs = [subprocess.Popen(command) for _ in range(n)]
        self.load(False)

    def load(self, on: bool) -> None:
        for p in self.procs:
            os.kill(p.pid, signal.SIGCONT if on else signal.SIGSTOP)
        time.sleep(0.05)  # let the scheduler see the change

    def close(self) -> None:
        for p in self.procs:
            p.kill()  # SIGKILL also ends a stopped process
            p.wait()


def timed_rounds(variants: dict, spinners: Spinners, repeats: int) -> dict:
    """Seconds of every variant fn(), quiet and loaded, ``repeats`` rounds taking turns.

    Args:
        variants: name -> fn; every fn is called once, quiet, before timing (warm-up).

    Returns:
        {(name, loaded): [seconds per round]}.
    """
    spinners.load(False)
    for fn in variants.values():
        fn()
    times = {(name, on): [] for name in variants for on in (False, True)}
    order = random.Random(0)
    for r in range(repeats):
        for on in (False, True) if r % 2 == 0 else (True, False):
            spinners.load(on)
            # A new order every round: no variant always follows the same one (a 2-thread run
            # leaves OpenMP workers spinning for a while) or runs first after a load change.
            names = list(variants)
            order.shuffle(names)
            for name in names:
                start = time.perf_counter()
                variants[name]()
                times[(name, on)].append(time.perf_counter() - start)
    spinners.load(False)
    return times


def fixed(case: Case, n: int):
    """One iteration at n threads."""

    def run():
        engine_threads(case.em, n)
        with limit_threads(n):
            case.iteration()

    return run


def with_policy(case: Case):
    """One iteration at what the E-step's threads="auto" gives: the count for one chunk's work."""
    n = resolve_threads("auto", case.work, "cpu")

    def run():
        engine_threads(case.em, "auto")
        with limit_threads(n):
            case.iteration()

    return run, n


def fmt(ts: list) -> str:
    ms = [1e3 * t for t in ts]
    return f"{statistics.median(ms):7.1f} [{min(ms):6.1f}-{max(ms):6.1f}]"


def big_chunks(c: Case) -> Case | None:
    """The case in chunks of PARALLEL_WORK elements, where it has >= 4 such chunks."""
    if c.work >= PARALLEL_WORK or c.D * c.K * 4 * c.L**2 < 4 * PARALLEL_WORK:
        return None
    budget = PARALLEL_WORK
    while True:  # equal chunks may hold a little less than the budget: raise it until they don't
        big = Case(c.L, c.N, c.K, budget=budget)
        if big.work >= PARALLEL_WORK:
            return big
        budget += PARALLEL_WORK // 16


def main_cases(spinners: Spinners, repeats: int) -> None:
    cases = [Case(28, 308, 4), Case(5, 1000, 8)]
    names = ("1 thread", "2 threads", "policy", "big chunks")
    variants, policy, bigs = {}, {}, {}
    for c in cases:
        variants[c.label(), names[0]] = fixed(c, 1)
        variants[c.label(), names[1]] = fixed(c, 2)
        variants[c.label(), names[2]], policy[c.label()] = with_policy(c)
        bigs[c.label()] = big = big_chunks(c)
        if big is not None:
            variants[c.label(), names[3]], policy[c.label(), "big"] = with_policy(big)
    times = timed_rounds(variants, spinners, repeats)
    print(
        f"ms per EM iteration (E-step + closed-form M-step), float64, median [min-max] of "
        f"{repeats} rounds; loaded: {len(spinners.procs)} spinning process(es). policy: "
        f"threads='auto' (mtd.em.threads, EStep.workers) on the default chunks; big chunks: "
        f"the policy on chunks of >= PARALLEL_WORK elements (where the case has >= 4 of them)"
    )
    for c in cases:
        big = bigs[c.label()]
        print(
            f"\n{c.label()}: {c.method}, D = {c.D}, {c.chunks} chunks of {c.chunk} patches x "
            f"{c.block} templates, work {c.work:,} elements per chunk -> policy "
            f"{policy[c.label()]} thread(s) x "
            f"{c.em.estep.workers(c.D, c.chunks)} worker(s)"
            + (
                f"; big chunks: {big.chunks} of {big.chunk} patches, work {big.work:,} -> "
                f"{policy[c.label(), 'big']} thread(s)"
                if big is not None
                else ""
            )
        )
        print(f"  {'':7}" + "".join(f"{v:>23}" for v in names) + "  policy/best fixed")
        for on in (False, True):
            t = {v: times.get(((c.label(), v), on)) for v in names}
            med = {v: statistics.median(x) for v, x in t.items() if x}
            best = min(med[names[0]], med[names[1]])
            cells = "".join(f"{fmt(t[v]) if t[v] else '-':>23}" for v in names)
            ratios = f"{med[names[2]] / best:5.2f}x"
            if t[names[3]]:
                ratios += f" (big chunks {med[names[3]] / best:4.2f}x)"
            print(f"  {'loaded' if on else 'quiet':7}{cells}  {ratios}")


def main_sweep(spinners: Spinners, repeats: int) -> None:
    # (L, N, K, elements per chunk): chunk budgets from the default to 2^23 for one FFT and one
    # GEMM problem, and the default chunks of intermediate sizes (more patches at the same
    # chunk, or other L).
    grid = [(28, 1232, 4, b) for b in (None, 1 << 20, 1 << 21, 1 << 22, 1 << 23)]
    grid += [(5, 1000, 8, b) for b in (None, 1 << 20, 1 << 21, 1 << 22, 1 << 23)]
    grid += [(28, 616, 4, None), (16, 352, 4, None), (11, 484, 4, None)]
    cases = [Case(*g) for g in grid]
    variants = {}
    for i, c in enumerate(cases):
        for n in (1, 2):
            variants[(i, n)] = fixed(c, n)
    times = timed_rounds(variants, spinners, repeats)
    print(
        f"1 and 2 threads against the work of a chunk: ms per iteration, median of {repeats} "
        f"rounds; gain = 1-thread / 2-thread median (> 1: two threads faster); "
        f"PARALLEL_WORK = {PARALLEL_WORK:,}"
    )
    print(
        f"{'case':<18} {'form':>4} {'D':>6} {'chunk':>6} {'work':>11} {'1t ms/chunk':>11} "
        f"{'quiet 1t':>9} {'2t':>8} {'gain':>5} {'loaded 1t':>10} {'2t':>8} {'gain':>5}"
    )
    for i, c in enumerate(cases):
        m = {(n, on): 1e3 * statistics.median(times[(i, n), on]) for n in (1, 2) for on in (0, 1)}
        print(
            f"{c.label():<18} {c.method:>4} {c.D:>6} {c.chunk:>6} {c.work:>11,} "
            f"{m[1, 0] / c.chunks:>11.2f} {m[1, 0]:>9.1f} {m[2, 0]:>8.1f} "
            f"{m[1, 0] / m[2, 0]:>5.2f} {m[1, 1]:>10.1f} {m[2, 1]:>8.1f} {m[1, 1] / m[2, 1]:>5.2f}"
        )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=9, help="rounds per variant (median, range)")
    p.add_argument("--spinners", type=int, default=1, help="competing processes when loaded")
    p.add_argument("--sweep", action="store_true", help="1 and 2 threads over chunk sizes")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.spinners < 1:
        p.error(f"--repeats and --spinners must be >= 1, got {args.repeats}, {args.spinners}")
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, default intra-op threads "
        f"{DEFAULT_THREADS}, PARALLEL_WORK {PARALLEL_WORK:,} elements per chunk"
    )
    spinners = Spinners(args.spinners)
    try:
        (main_sweep if args.sweep else main_cases)(spinners, args.repeats)
    finally:
        spinners.close()


if __name__ == "__main__":
    main()
