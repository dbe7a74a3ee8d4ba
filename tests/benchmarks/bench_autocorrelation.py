"""Autocorrelation analysis on the approximate-EM paper's setting: error by eq. (19) and seconds.

    python -m tests.benchmarks.bench_autocorrelation                       # SNR 5, 2; N = 1000
    python -m tests.benchmarks.bench_autocorrelation --snr 1 1.4 2 2.9 4.1 5.8 8.3 17 --N 2500
    python -m tests.benchmarks.bench_autocorrelation --sigma fit --weights entries
    python -m tests.benchmarks.bench_autocorrelation --em 200    # + EM from AC / from random

The paper's image model: entries U[0, 1] scaled to ||F|| = 10, expanded in the first 10 FB
coefficients (L = 5), copies at uniform angles and density 0.04, SNR from the raw image's norm
(``snr_of="raw"``, as the paper's code). Seed s draws the image (numpy default_rng(s)), the
measurement (simulate(seed=s)) and the fit's starts (seed=s). Printed per SNR: mean and median
error over the seeds (eq. 19, minimised over 720 angles), median seconds of a fit (the
autocorrelations of the measurement included), and the paper's Figure 2 value (N = 2500).
With ``--em T``: EM (mtd.Steerable, K = 8, closed form, sigma known, float64, at most T
iterations) from the AC estimate and from one N(0, 1) start (em=steerable's init): errors,
iterations and seconds of each, and the mean error after 10, 25, 50, 100 iterations.
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


def one(args, basis, group, snr: float, seed: int) -> dict:
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
    out = {
        "error": mtd.relative_error(m.coefficients, result.coefficients, group=group),
        "seconds": time.perf_counter() - start,
        "gamma": result.gamma,
        "sigma_ratio": result.sigma / m.sigma,
    }
    if args.em:
        em = mtd.ApproximateEM(
            mtd.Steerable(basis, args.K),
            sigma=m.sigma,
            iterations=args.em,
            tol=args.tol,
            dtype=torch.float64,
        )
        patches = em.prepare(m.data)
        gen = torch.Generator().manual_seed(seed)
        random = torch.randn(basis.n, generator=gen, dtype=torch.float64)
        for name, init in (("ac", result.coefficients), ("random", random)):
            start = time.perf_counter()
            res = em.fit(patches, init, truth=m.coefficients)
            out[f"em_{name}"] = (
                mtd.relative_error(m.coefficients, res.estimate, group=group),
                len(res.history),
                time.perf_counter() - start,
                [h["error"] for h in res.history],
            )
    return out


def run(args) -> list[dict]:
    basis = mtd.FBBasis(args.L, n=args.n)
    group = mtd.Steerable(basis, 8)
    rows = []
    for snr in args.snr:
        runs = [one(args, basis, group, snr, seed) for seed in args.seeds]
        errors = [r["error"] for r in runs]
        row = {
            "snr": snr,
            "mean_error": float(np.mean(errors)),
            "median_error": float(np.median(errors)),
            "errors": [round(e, 4) for e in errors],
            "median_seconds": float(np.median([r["seconds"] for r in runs])),
            "gamma": float(np.mean([r["gamma"] for r in runs])),
            "sigma_ratio": float(np.mean([r["sigma_ratio"] for r in runs])),
            "paper_fig2": PAPER_FIG2.get(snr),
        }
        for name in ("em_ac", "em_random") if args.em else ():
            e, it, t, curves = zip(*(r[name] for r in runs), strict=True)
            for k in (10, 25, 50, 100):  # the error along the iterations (the last if stopped)
                row[f"{name}_error_at_{k}"] = float(
                    np.mean([c[min(k, len(c)) - 1] for c in curves])
                )
            row[f"{name}_mean_error"] = float(np.mean(e))
            row[f"{name}_errors"] = [round(x, 4) for x in e]
            row[f"{name}_iterations"] = float(np.median(it))
            row[f"{name}_median_seconds"] = float(np.median(t))
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
    p.add_argument("--em", type=int, default=0, help="EM iterations (0: no EM)")
    p.add_argument("--K", type=int, default=8, help="EM rotations")
    p.add_argument("--tol", type=float, default=1e-5, help="EM stopping tolerance")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args)
    n = len(args.seeds)
    print(f"\n| SNR | AC error (mean of {n} seeds) | median | s / fit | paper Fig. 2 (N = 2500) |")
    print("|---|---|---|---|---|")
    for r in rows:
        paper = "" if r["paper_fig2"] is None else f"{r['paper_fig2']:.3f}"
        print(
            f"| {r['snr']:g} | {r['mean_error']:.3f} | {r['median_error']:.3f} | "
            f"{r['median_seconds']:.1f} | {paper} |"
        )
    if args.em:
        print(
            "\n| SNR | EM from AC: error | iterations | s "
            "| EM from random: error | iterations | s |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['snr']:g} | {r['em_ac_mean_error']:.3f} | {r['em_ac_iterations']:.0f} | "
                f"{r['em_ac_median_seconds']:.1f} | {r['em_random_mean_error']:.3f} | "
                f"{r['em_random_iterations']:.0f} | {r['em_random_median_seconds']:.1f} |"
            )


if __name__ == "__main__":
    main()
