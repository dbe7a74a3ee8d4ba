"""The engine beside a real competing job: default threads against OMP_NUM_THREADS=1 (issue 28).

    python -m tests.benchmarks.bench_load                # the three cases, a real job as the load
    python -m tests.benchmarks.bench_load --load spin    # a spinning process as the load
    python -m tests.benchmarks.bench_load --repeats 7 --cases mnist gemm
    python -m tests.benchmarks.bench_load --job          # only the competing job, until Ctrl-C

Every figure is measured in this one run. Each measurement is a fresh Python process (the same
start-up both ways, as a user's script), timing one case after two warm-up iterations:

- ``mnist``: L = 28, N = 308, K = 4, an MNIST digit, ``mtd.ApproximateEM(mtd.Rotations(28, 4))``
  (FFT form, 121 patches, one worker);
- ``volume``: L = 11, K = 576 (``mtd.groups.projections(11)``), the default volume run's 500
  patches per stochastic E-step (FFT form, two workers);
- ``gemm``: L = 5, N = 1000, K = 8, a U[0, 1] image (GEMM form, 40,000 patches, two workers);
- ``bare``: no engine, 200 products of (200, 200) float64 matrices on one thread
  (``torch.set_num_threads(1)``) per iteration: what the job costs a thread on the other core
  (shared caches and memory), the reference for the engine's one-worker cases;
- ``shared``: the same products in pieces of 10 shared out over the engine's workers
  (``mtd.parallel.ordered_map``, one worker per core): the floor of the two-worker cases, work
  with no Python between its ops and no sums, beside a job that holds one of the two cores.

"iteration" is the median over ``--iterations`` of one E-step and the closed-form M-step, called
from Python as a user does; "fit" is ``em.fit`` of ``--iterations`` iterations, per iteration.
Each runs in a child process started as is ("default": torch's own threads) and with
``OMP_NUM_THREADS=1``, quiet and "loaded": beside the competing job, started once by this
benchmark and paused (SIGSTOP) for the quiet rounds. The job is real work on one core: a Python
process with one thread running torch FFTs and NumPy matrix products (``--load work``), or
``--load spin``, a bare spinning loop. Rounds alternate the load state and shuffle the order of
the variants, so a slow spell of the shared machine falls on all of them alike. Printed: medians
[min-max] over ``--repeats`` rounds, loaded / quiet and default / OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

import numpy as np

from tests.benchmarks.bench_threads import SPIN, Case, Spinners

CASES = ("mnist", "volume", "gemm", "bare", "shared")
ITERATIONS = {
    "mnist": 10,
    "volume": 3,
    "gemm": 5,
    "bare": 10,
    "shared": 10,
}  # timed per process: about 0.2-5 s each
VARIANTS = ("default", "OMP_NUM_THREADS=1")


def job() -> None:
    """The competing job: torch FFTs and NumPy matrix products on one thread, until killed."""
    if any(os.environ.get(k) != "1" for k in ONE_THREAD):
        # Thread pools are sized when torch and NumPy load (this module imports both): start
        # afresh with the environment set, or the NumPy products take a second core.
        os.execve(sys.executable, JOB, {**os.environ, **ONE_THREAD})
    import torch

    torch.set_num_threads(1)
    a = torch.randn(256, 256, dtype=torch.float64)
    m = np.random.default_rng(0).random((300, 300))
    while True:
        for _ in range(20):
            a = torch.fft.ifft2(torch.fft.fft2(a)).real
        for _ in range(5):
            m = m @ m
            m /= np.abs(m).max()


ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
JOB = [sys.executable, "-m", "tests.benchmarks.bench_load", "--job"]


def build(case: str):
    """(em, prepared data, x, log_rho, sigma2, subset) of one case, float64 on the CPU."""
    if case != "volume":  # bench_threads' cases: an MNIST digit (L = 28), U[0, 1] (L = 5)
        c = Case(*((28, 308, 4) if case == "mnist" else (5, 1000, 8)))
        return c.em, c.patches, c.x, c.log_rho, c.sigma2, None
    import torch

    import mtd
    from mtd.forward import volumes

    L, dt = 11, torch.float64
    truth = volumes.shepp_logan(L)
    meas = volumes.simulate_volume(truth, 1100, density=0.15, snr=3.5, seed=0)
    em = mtd.ApproximateEM(mtd.groups.projections(L), sigma=meas.sigma, dtype=dt)
    subset = torch.arange(500)  # the default run's 5% of its 10,000 patches
    log_rho = torch.full((2 * L, 2 * L), -np.log(4.0 * L * L), dtype=dt)
    x = em.group.restrict(truth.to(dt))
    return em, em.prepare(meas.data), x, log_rho, float(meas.sigma) ** 2, subset


def child(case: str, iterations: int) -> None:
    """Time one case in this process; print {"iteration": s, "fit": s per iteration} as JSON."""
    import torch

    import mtd

    if case in ("bare", "shared"):
        return bare(iterations, case == "shared")
    em, data, x, log_rho, sigma2, subset = build(case)

    def iteration():
        stats = em.e_step(data, x, log_rho, sigma2, subset)
        em.closed_form(stats, x)

    for _ in range(2):
        iteration()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        iteration()
        times.append(time.perf_counter() - start)
    em.iterations, em.tol = iterations, 0.0
    if subset is not None:  # the default volume run's stochastic EM
        em.stochastic = mtd.Stochastic(len(subset) / data.D)
    start = time.perf_counter()
    em.fit(data, x)
    fit = (time.perf_counter() - start) / iterations
    print(
        json.dumps(
            {"iteration": statistics.median(times), "fit": fit, "threads": torch.get_num_threads()}
        )
    )


def bare(iterations: int, shared: bool) -> None:
    """The ``bare`` and ``shared`` cases: matrix products on one thread, or shared out over the
    engine's workers in pieces of 10 (``mtd.parallel``), timed as ``child`` times an engine."""
    import torch

    from mtd import parallel
    from mtd.em.threads import DEFAULT_THREADS

    torch.set_num_threads(1)
    a = torch.randn(200, 200, dtype=torch.float64)

    def piece(_) -> None:
        for _ in range(10):
            a @ a

    times = []
    with parallel.sharing(DEFAULT_THREADS if shared else 1):
        for _ in range(iterations + 2):
            start = time.perf_counter()
            for _ in parallel.ordered_map(piece, range(20)):
                pass
            times.append(time.perf_counter() - start)
    t = statistics.median(times[2:])
    print(json.dumps({"iteration": t, "fit": t, "threads": torch.get_num_threads()}))


def measure(case: str, variant: str, iterations: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if variant != "default":
        env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "tests.benchmarks.bench_load", "--child", case]
    out = subprocess.run(
        [*command, "--iterations", str(iterations)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(ts: list) -> str:
    ms = [1e3 * t for t in ts]
    return f"{statistics.median(ms):7.1f} [{min(ms):.1f}-{max(ms):.1f}]"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="rounds per variant (median, range)")
    p.add_argument(
        "--iterations", type=int, help=f"timed iterations per process (default {ITERATIONS})"
    )
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--load", choices=("work", "spin"), default="work")
    p.add_argument("--job", action="store_true", help="run the competing job only")
    p.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.job:
        return job()
    if args.child:
        return child(args.child, args.iterations or ITERATIONS[args.child])
    if args.repeats < 1 or (args.iterations is not None and args.iterations < 1):
        p.error(f"--repeats and --iterations must be >= 1, got {args.repeats}, {args.iterations}")
    command = JOB if args.load == "work" else SPIN
    print(f"{os.cpu_count()} CPUs; load: {args.load} ({' '.join(command)})")
    load = Spinners(1, command)
    times = {}
    order = random.Random(0)
    try:
        for r in range(args.repeats):
            for on in (False, True) if r % 2 == 0 else (True, False):
                load.load(on)
                runs = [(c, v) for c in args.cases for v in VARIANTS]
                order.shuffle(runs)
                for c, v in runs:
                    got = measure(c, v, args.iterations or ITERATIONS[c])
                    for key in ("iteration", "fit"):
                        times.setdefault((c, v, on, key), []).append(got[key])
            print(f"round {r + 1}/{args.repeats} done", file=sys.stderr)
    finally:
        load.close()
    each = args.iterations or ", ".join(f"{c} {ITERATIONS[c]}" for c in args.cases)
    print(f"ms, median [min-max] of {args.repeats} processes; iterations per process: {each}")
    head = f"{'case':<7} {'':9} {'variant':<18} {'quiet':>22} {'loaded':>22} loaded/quiet"
    print(head + "  default/OMP=1 (quiet, loaded)")
    for c in args.cases:
        for key in ("iteration",) if c in ("bare", "shared") else ("iteration", "fit"):
            med = {}
            for v in VARIANTS:
                q, l = times[c, v, False, key], times[c, v, True, key]
                med[v] = statistics.median(q), statistics.median(l)
                ratio = med[v][1] / med[v][0]
                line = f"{c:<7} {key:9} {v:<18} {fmt(q):>22} {fmt(l):>22} {ratio:10.2f}x"
                if v == VARIANTS[1]:
                    d, o = med[VARIANTS[0]], med[VARIANTS[1]]
                    line += f"  {d[0] / o[0]:.2f}x, {d[1] / o[1]:.2f}x"
                print(line)


if __name__ == "__main__":
    main()
