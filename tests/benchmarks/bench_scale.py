"""Scaling of one EM iteration with the measurement size, from a file, in bounded memory.

    python -m tests.benchmarks.bench_scale                     # N = 512 ... 8192, L = 5, K = 16
    python -m tests.benchmarks.bench_scale --sizes 512 1024 --dtype float64

Each size runs in a fresh process (so its peak memory is its own): the measurement is a .npy file
of N x N noise (float32, written by this script), memory-mapped and streamed chunk by chunk
(``ApproximateEM(stream=True)``). Printed, all measured in this one run:

- seconds per EM iteration (E-step + closed-form M-step + rho), the median of ``--repeats``;
- the bare batched GEMMs of the same sizes (the two products the iteration cannot avoid) and the
  ratio of the two;
- peak resident memory above the process's baseline after imports, next to the measurement's own
  size (the memory-mapped file's pages count as resident once read);
- the fitted slope of log(time) against log(N^2) (1.0: linear in the number of pixels);
- the ratio to the straightforward NumPy implementation on L = 5, N = 1000, K = 8
  (``tests.benchmarks.bench_em``'s measurement, same dtype).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def one_size(path: str, L: int, K: int, dtype: str, repeats: int, device: str = "cpu") -> dict:
    """Runs in the child process: time and peak memory of EM iterations on one file."""
    import torch

    import mtd
    from tests.benchmarks.bench_em import bare, timed

    base = peak_rss_bytes()
    dt = getattr(torch, dtype)
    compute = mtd.Compute(stream=True)
    em = mtd.ApproximateEM(
        mtd.Rotations(L, K), sigma=1.0, compute=compute, dtype=dt, device=device
    )
    data = em.prepare(path)
    rng = np.random.default_rng(0)
    F = torch.as_tensor(rng.uniform(0, 1, (L, L)), dtype=dt, device=em.device)
    log_rho = torch.full((2 * L, 2 * L), 1.0 / (4 * L * L), dtype=dt, device=em.device).log()

    def iteration():
        stats = em.e_step(data, F, log_rho, 1.0)
        em.closed_form(stats, F)
        (stats.omega.sum(0) / stats.D).log()

    iteration()
    peak = peak_rss_bytes() - base  # the engine's alone
    chunk = em.estep.chunking(data.D)[0]
    t = timed(
        {"ours": iteration, "bare": bare(L, K, data.D, em.estep.method, dt, chunk, device=device)},
        repeats,
        device,
    )
    return {
        "D": data.D,
        "seconds": t["ours"],
        "bare": t["bare"],
        "peak": peak,
        "method": em.estep.method,
    }


def write_noise(path: Path, N: int) -> None:
    """N x N standard normal float32 in a .npy, written in row blocks (little memory here)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(N, N))
    rng = np.random.default_rng(N)
    for r in range(0, N, 1024):
        out[r : r + 1024] = rng.standard_normal((min(1024, N - r), N), dtype=np.float32)
    out.flush()
    del out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--L", type=int, default=5)
    p.add_argument("--K", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-straightforward", action="store_true")
    p.add_argument("--device", default="cpu", help="of the engine and the bare GEMMs")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child mode: the path of one measurement
    args = p.parse_args(argv)
    if args.one:
        print(
            json.dumps(one_size(args.one, args.L, args.K, args.dtype, args.repeats, args.device))
        )
        return

    import torch

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
        f"L = {args.L}, K = {args.K}, measurement streamed from a memory-mapped .npy"
    )
    print(
        f"{'N':>6} {'patches D':>10} {'s / iter':>9} {'bare s':>8} {'ratio':>6} "
        f"{'peak MB':>8} {'file MB':>8}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for N in args.sizes:
            path = Path(tmp) / f"m{N}.npy"
            write_noise(path, N)
            cmd = [
                sys.executable,
                "-m",
                "tests.benchmarks.bench_scale",
                "--one",
                str(path),
                "--L",
                str(args.L),
                "--K",
                str(args.K),
                "--dtype",
                args.dtype,
                "--repeats",
                str(args.repeats),
                "--device",
                args.device,
            ]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            r["N"], r["file"] = N, path.stat().st_size
            rows.append(r)
            print(
                f"{N:>6} {r['D']:>10} {r['seconds']:>9.3f} {r['bare']:>8.3f} "
                f"{r['seconds'] / r['bare']:>5.2f}x {r['peak'] / 2**20:>8.0f} "
                f"{r['file'] / 2**20:>8.0f}",
                flush=True,
            )
            path.unlink()
    if len(rows) > 1:
        x = np.log([r["N"] ** 2 for r in rows])
        slope = np.polyfit(x, np.log([r["seconds"] for r in rows]), 1)[0]
        print(f"log-log slope of seconds per iteration against N^2: {slope:.3f}")
    if not args.skip_straightforward:
        from tests.benchmarks.bench_em import run_case

        r = run_case(
            5,
            1000,
            8,
            getattr(torch, args.dtype),
            naive_patches=200,
            repeats=3,
            rng=np.random.default_rng(0),
            device=args.device,
        )
        print(
            f"L = 5, N = 1000, K = 8: engine {r['ours_ms']:.1f} ms, straightforward NumPy "
            f"{r['naive_s']:.1f} s: {1e3 * r['naive_s'] / r['ours_ms']:.0f}x faster"
        )


if __name__ == "__main__":
    main()
