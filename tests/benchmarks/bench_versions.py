"""Seconds per EM iteration of two versions of the engine, measured in one interleaved run.

    python -m tests.benchmarks.bench_versions                  # 0409806 (before issue 11) vs now
    python -m tests.benchmarks.bench_versions --base 0409806 --rounds 7 --cases a b --repeats 5

The base commit is checked out with ``git worktree add --detach`` into a temporary folder (removed
at the end; the working tree here is not touched) and compared with this working tree ("new"). Each
round runs, for every case, one fresh process per version (``mtd`` imported from the version's
tree: ``tests.benchmarks.external.import_package``), the order of the two alternating from round to
round so that neither always runs second (warm caches, a load spike of the shared machine). A
process times one case: seconds per iteration (E-step + closed-form M-step + rho update, as
``bench_em.engine_iteration``), the median of ``--repeats`` (by case: ``REPEATS``) after one
warm-up iteration, at torch's default number of threads. The cases:

- (a) L = 28, N = 308, K = 4, float64: an MNIST digit (assets/mnist_digits.npz / 255) in
  ``mtd.simulate(image, N, density=0.1, snr=1.0, K=K, seed=0)`` (bench_em's first case);
- (b) L = 5, N = 1000, K = 8, float64: a U[0, 1] image (bench_em's second case);
- (c) L = 5, K = 16, float32, N = 2048: N x N noise in a memory-mapped .npy, streamed
  (``stream=True``; bench_scale at one size).

Printed per case: the median and range over the rounds of each version, and new / old as the
median of the per-round ratios (< 1: the new engine is faster). Both versions must compute the
same thing: each process also returns the E-step's log-likelihood and the norm of the closed-form
estimate, and these must agree to ``--rtol64`` (float64) and ``--rtol32`` (float32).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.benchmarks.bench_scale import write_noise
from tests.benchmarks.external import import_package

ROOT = Path(__file__).resolve().parents[2]

# name: (L, N, K, dtype, streamed)
CASES = {
    "a": (28, 308, 4, "float64", False),
    "b": (5, 1000, 8, "float64", False),
    "c": (5, 2048, 16, "float32", True),
}
# Timed iterations per process by case (after the warm-up): fewer where one iteration takes long
# and is itself an average over many chunks (c: 513 chunks of 326 patches).
REPEATS = {"a": 5, "b": 3, "c": 2}


def measure(tree: str, case: str, repeats: int, npy: str | None, threads: int | None) -> dict:
    """Runs in the child process, with ``mtd`` imported from ``tree``: time one case's iteration.

    ``threads``: None leaves torch's default (and the new engine its own policy); an integer pins
    both versions' intra-op threads to it (set before mtd is imported; the new engine's
    ``Compute(threads=...)`` where it has one).
    """
    import dataclasses

    import numpy as np
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    mtd = import_package("mtd", tree)

    if not Path(mtd.__file__).resolve().is_relative_to(Path(tree).resolve()):
        raise RuntimeError(f"imported mtd from {mtd.__file__}, not from {tree}")
    new = hasattr(mtd, "TransformSet")  # the issue-11 API (group-action seam)
    L, N, K, dtype, streamed = CASES[case]
    dt = getattr(torch, dtype)
    sigma = 1.0 if streamed else None
    if new:
        kw = {"stream": True} if streamed else {}
        if threads is not None and "threads" in {f.name for f in dataclasses.fields(mtd.Compute)}:
            kw["threads"] = threads
        compute = mtd.Compute(**kw)
        em = mtd.ApproximateEM(mtd.Rotations(L, K), sigma=sigma, compute=compute, dtype=dt)
        method, chunk = em.estep.method, lambda D: em.estep.chunking(D)[0]
    else:
        em = mtd.ApproximateEM(L, K=K, sigma=sigma, stream=True if streamed else None, dtype=dt)
        method, chunk = em.method, em._chunk
    rng = np.random.default_rng(0)
    if streamed:
        data, sigma = npy, 1.0
        F = rng.uniform(0, 1, (L, L))
        log_rho = torch.full((2 * L, 2 * L), 1.0 / (4 * L * L), dtype=dt).log()
    else:
        if L == 28:
            with np.load(ROOT / "assets" / "mnist_digits.npz") as f:
                image = f["images"][10].astype(np.float64) / 255.0
        else:
            image = rng.uniform(0, 1, (L, L))
        meas = mtd.simulate(image, N, density=0.1, snr=1.0, K=K, seed=0)
        data, sigma = meas.data.numpy(), meas.sigma
        F = image + 0.1 * rng.standard_normal((L, L))
        rho = np.full((2 * L, 2 * L), 1.0 / (4 * L * L))
        log_rho = torch.as_tensor(np.log(rho), dtype=dt)
    patches = em.prepare(data)
    F = torch.as_tensor(F, dtype=dt)
    out = {}

    def iteration():
        stats = em.e_step(patches, F, log_rho, sigma**2)
        est = em.closed_form(stats, F)
        (stats.omega.sum(0) / stats.D).log()
        out["loglik"], out["norm"] = float(stats.loglik), float(torch.linalg.norm(est))

    iteration()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        iteration()
        times.append(time.perf_counter() - start)
    return {
        "seconds": statistics.median(times),
        "D": patches.D,
        "method": method,
        "chunk": chunk(patches.D),
        "threads": torch.get_num_threads(),
        # What the E-step runs on: the new engine's thread policy where it has one.
        "estep_threads": em.estep.threads(patches.D)
        if new and hasattr(em.estep, "threads")
        else torch.get_num_threads(),
        "mtd": str(Path(mtd.__file__).parent),
        **out,
    }


def run_child(tree: Path, case: str, repeats: int, npy: Path, threads: int | None) -> dict:
    spec = {"tree": str(tree), "case": case, "repeats": repeats, "npy": str(npy)}
    spec = json.dumps({**spec, "threads": threads})
    cmd = [sys.executable, "-m", "tests.benchmarks.bench_versions", "--child", spec]
    # The child imports nothing of mtd before ``measure`` imports the version's from its tree.
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{tree.name} case {case} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="0409806", help="the old version's commit")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument(
        "--repeats", type=int, help=f"timed iterations per process (default by case: {REPEATS})"
    )
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--rtol64", type=float, default=1e-9)
    p.add_argument("--rtol32", type=float, default=1e-5)
    p.add_argument(
        "--threads",
        type=int,
        help="pin both versions' intra-op threads to this (default: torch's, and the new "
        "engine's own thread policy)",
    )
    p.add_argument("--json", help="also write every process's result to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)  # child mode: a JSON spec
    args = p.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        keys = ("tree", "case", "repeats", "npy", "threads")
        print(json.dumps(measure(*(spec[k] for k in keys))))
        return
    for name in ("rounds", "repeats", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    repeats = {c: args.repeats or REPEATS[c] for c in CASES}
    base = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", args.base],
        capture_output=True,
        text=True,
    )
    if base.returncode:
        raise ValueError(f"--base {args.base!r} is not a commit of {ROOT}: {base.stderr.strip()}")
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "mtd"],
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    runs = {c: {"old": [], "new": []} for c in args.cases}
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = Path(tmp) / "base"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old_tree), args.base],
            check=True,
            capture_output=True,
        )
        try:
            npy = Path(tmp) / "noise.npy"
            write_noise(npy, CASES["c"][1])  # bench_scale's measurement, same seed
            trees = {"old": old_tree, "new": ROOT}
            for r in range(args.rounds):
                order = ("old", "new") if r % 2 == 0 else ("new", "old")
                for case in args.cases:
                    for version in order:
                        runs[case][version].append(
                            run_child(trees[version], case, repeats[case], npy, args.threads)
                        )
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)],
                check=False,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    first = runs[args.cases[0]]["new"][0]
    pinned = "pinned" if args.threads else "default; the new engine's own policy in its E-step"
    print(
        f"old: {base.stdout.strip()}, new: {head} + working tree ({len(dirty)} uncommitted in "
        f"mtd/); {first['threads']} torch "
        f"threads ({pinned}); {args.rounds} rounds; per process the median of "
        f"{', '.join(f'{c}: {repeats[c]}' for c in args.cases)} iterations after one warm-up"
    )
    print(
        f"{'case':<28} {'D':>7} {'form':>5} {'old ms (range)':>22} {'new ms (range)':>22} "
        f"{'new/old':>8} {'threads':>7}  same result"
    )
    for case in args.cases:
        L, N, K, dtype, streamed = CASES[case]
        old, new = runs[case]["old"], runs[case]["new"]
        # Same work: patches, correlation form and chunks; same numbers, every run.
        for key in ("D", "method", "chunk"):
            if {o[key] for o in old} != {n[key] for n in new}:
                raise AssertionError(
                    f"case {case}: {key} differs: old {old[0][key]}, new {new[0][key]}"
                )
        rtol = args.rtol64 if dtype == "float64" else args.rtol32
        worst = 0.0
        for o, n in zip(old, new, strict=True):
            for key in ("loglik", "norm"):
                rel = abs(n[key] - o[key]) / abs(o[key])
                worst = max(worst, rel)
                if not rel <= rtol:
                    raise AssertionError(
                        f"case {case}: {key} old {o[key]!r} new {n[key]!r} (rel {rel:.2e} > "
                        f"{rtol:.0e})"
                    )
        t_old = [1e3 * o["seconds"] for o in old]
        t_new = [1e3 * n["seconds"] for n in new]
        ratio = statistics.median(n / o for n, o in zip(t_new, t_old, strict=True))
        label = f"({case}) L={L} N={N} K={K} {dtype}{' stream' if streamed else ''}"
        print(
            f"{label:<28} {old[0]['D']:>7} {old[0]['method']:>5} "
            f"{statistics.median(t_old):>8.2f} ({min(t_old):.2f}-{max(t_old):.2f}) "
            f"{statistics.median(t_new):>8.2f} ({min(t_new):.2f}-{max(t_new):.2f}) "
            f"{ratio:>7.3f}x {old[0]['estep_threads']:>3}/{new[0]['estep_threads']:<3}  "
            f"rel {worst:.1e} <= {rtol:.0e}"
        )


if __name__ == "__main__":
    main()
