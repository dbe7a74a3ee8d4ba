"""Autocorrelation analysis on the approximate-EM paper's setting: error by eq. (19) and seconds.

    python -m tests.benchmarks.bench_autocorrelation                       # SNR 5, 2; N = 1000
    python -m tests.benchmarks.bench_autocorrelation --snr 1 1.4 2 2.9 4.1 5.8 8.3 17 --N 2500
    python -m tests.benchmarks.bench_autocorrelation --sigma fit --weights entries

The paper's image model: entries U[0, 1] scaled to ||F|| = 10, expanded in the first 10 FB
coefficients (L = 5), copies at uniform angles and density 0.04, SNR from the raw image's norm
(``snr_of="raw"``, as the paper's code). Seed s draws the image (numpy default_rng(s)), the
measurement (simulate(seed=s)) and the fit's starts (seed=s). Printed per SNR: mean and median
error over the seeds (eq. 19, minimised over 720 angles), median seconds of a fit (the
autocorrelations of the measurement included), and the paper's Figure 2 value (N = 2500).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import mtd
from mtd import autocorrelation as ac

PAPER_FIG2 = {
    1: 0.253,
    1.4: 0.189,
    2: 0.137,
    2.9: 0.077,
    4.1: 0.058,
    5.8: 0.056,
    8.3: 0.038,
    17: 0.025,
}


def run(args) -> list[dict]:
    basis = mtd.FBBasis(args.L, n=args.n)
    group = mtd.Steerable(basis, 8)
    rows = []
    for snr in args.snr:
        errors, seconds, gammas, sigmas = [], [], [], []
        for seed in args.seeds:
            raw = np.random.default_rng(seed).uniform(size=(args.L, args.L))
            image = torch.from_numpy(args.norm * raw / np.linalg.norm(raw))
            m = mtd.simulate(
                image,
                args.N,
                density=args.density,
                snr=snr,
                rotation="continuous",
                basis=basis,
                snr_of="raw",
                seed=seed,
            )
            start = time.perf_counter()
            result = ac.fit(
                m.data,
                basis,
                sigma=m.sigma if args.sigma == "known" else None,
                starts=args.starts,
                seed=seed,
                weights=args.weights,
                iterations=args.iterations,
            )
            seconds.append(time.perf_counter() - start)
            errors.append(mtd.relative_error(m.coefficients, result.coefficients, group=group))
            gammas.append(result.gamma)
            sigmas.append(result.sigma / m.sigma)
        row = {
            "snr": snr,
            "mean_error": float(np.mean(errors)),
            "median_error": float(np.median(errors)),
            "errors": [round(e, 4) for e in errors],
            "median_seconds": float(np.median(seconds)),
            "gamma": float(np.mean(gammas)),
            "sigma_ratio": float(np.mean(sigmas)),
            "paper_fig2": PAPER_FIG2.get(snr),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--snr", type=float, nargs="+", default=[5.0, 2.0])
    p.add_argument("--N", type=int, default=1000)
    p.add_argument("--L", type=int, default=5)
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--norm", type=float, default=10.0)
    p.add_argument("--density", type=float, default=0.04)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--sigma", choices=["known", "fit"], default="known")
    p.add_argument("--starts", type=int, default=5)
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--weights", default="noise")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args)
    print(
        f"\n| SNR | AC error (mean over {len(args.seeds)} seeds) | median | s / fit | paper "
        f"Fig. 2 (N = 2500) |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        paper = "" if r["paper_fig2"] is None else f"{r['paper_fig2']:.3f}"
        print(
            f"| {r['snr']:g} | {r['mean_error']:.3f} | {r['median_error']:.3f} | "
            f"{r['median_seconds']:.1f} | {paper} |"
        )


if __name__ == "__main__":
    main()
