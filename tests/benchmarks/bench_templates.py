"""Many templates within the chunk's memory: one E-step at L = 11 for K = 16 ... 2000 rotations.

    python -m tests.benchmarks.bench_templates                  # K = 16, 128, 552, 2000
    python -m tests.benchmarks.bench_templates --K 16 2000 --N 550

When K x 4L^2 exceeds the correlation form's chunk budget the E-step cuts the templates into
blocks and streams each patch's log-sum-exp across them (``mtd.em.estep``), so the per-chunk work
buffer stays within the budget whatever K. Each K runs in a fresh process; printed per K: the
template blocks, patches per chunk, the work buffer's peak size (the chunk memory), the
process's peak resident memory above its baseline after the measurement is made (which adds the
O(K) arrays: prepared templates, accumulators, statistics), and seconds per E-step.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def one(K: int, L: int, N: int, dtype: str, repeats: int) -> dict:
    import numpy as np
    import torch

    import mtd

    dt = getattr(torch, dtype)
    rng = np.random.default_rng(0)
    image = torch.as_tensor(rng.uniform(0, 1, (L, L)))
    meas = mtd.simulate(image, N, density=0.1, snr=1.0, K=K, rotation="continuous", seed=0)
    em = mtd.ApproximateEM(mtd.Rotations(L, K), sigma=meas.sigma, dtype=dt)
    data = em.prepare(meas.data)
    F = image.to(dt)
    log_rho = torch.full((2 * L, 2 * L), 1.0 / (4 * L * L), dtype=dt).log()
    base = peak_rss_bytes()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        stats = em.e_step(data, F, log_rho, meas.sigma**2)
        times.append(time.perf_counter() - start)
    work = em.estep.form.work
    chunk, blocks = em.estep.chunking(data.D)
    return {
        "K": K,
        "D": data.D,
        "method": em.estep.method,
        "blocks": len(blocks),
        "block": blocks[0].stop - blocks[0].start,
        "chunk": chunk,
        "work_bytes": work.numel() * work.element_size(),
        "budget_bytes": em.estep.form.chunk_elements() * torch.finfo(dt).bits // 8 * 2,
        "peak": peak_rss_bytes() - base,
        "seconds": float(np.median(times)),
        "omega_sum": float(stats.omega.sum()),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--K", type=int, nargs="+", default=[16, 128, 552, 2000])
    p.add_argument("--L", type=int, default=11)
    p.add_argument("--N", type=int, default=220)
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child mode: one K
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.L, args.N, args.dtype, args.repeats)))
        return
    print(f"L = {args.L}, N = {args.N}, {args.dtype}, one E-step, each K in a fresh process")
    print(
        f"{'K':>6} {'form':>5} {'blocks':>7} {'block':>6} {'chunk':>6} {'work MB':>8} "
        f"{'peak MB':>8} {'s / E-step':>11} {'omega sum / D':>14}"
    )
    for K in args.K:
        cmd = [sys.executable, "-m", "tests.benchmarks.bench_templates", "--one", str(K)]
        cmd += ["--L", str(args.L), "--N", str(args.N), "--dtype", args.dtype]
        cmd += ["--repeats", str(args.repeats)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(
            f"{K:>6} {r['method']:>5} {r['blocks']:>7} {r['block']:>6} {r['chunk']:>6} "
            f"{r['work_bytes'] / 2**20:>8.2f} {r['peak'] / 2**20:>8.1f} {r['seconds']:>11.3f} "
            f"{r['omega_sum'] / r['D']:>14.6f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
