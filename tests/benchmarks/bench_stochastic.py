"""Stochastic EM against full EM on a large measurement: error reached and wall time.

    python -m tests.benchmarks.bench_stochastic                  # N = 3000, L = 5, K = 4, S = 0.1
    python -m tests.benchmarks.bench_stochastic --N 2000 --S 0.1 0.2

Both start from the same random guess on the same simulated measurement (a 5 x 5 U[0, 1] image,
the approximate-EM paper's, density 0.1); closed-form M-steps, rho estimated, sigma known. Full EM
runs until ||F_new - F|| < tol or ``--iterations``; stochastic EM (stochastic-EM paper,
Algorithm 1: floor(S D) patches drawn each iteration) runs ``--stochastic-iterations``, then
``--polish`` iterations on all patches (0 and 10 by default: without, the estimate keeps the
sampling noise of the last draw). Printed: relative error, iterations and wall seconds of each,
and the ratios.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import mtd


def run(em: mtd.ApproximateEM, data, init, truth) -> tuple[float, int, float]:
    start = time.perf_counter()
    res = em.fit(data, init)
    seconds = time.perf_counter() - start
    return mtd.relative_error(truth, res.estimate, em.K), len(res.history), seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--N", type=int, default=3000)
    p.add_argument("--L", type=int, default=5)
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--snr", type=float, default=1.0)
    p.add_argument("--S", type=float, nargs="+", default=[0.1])
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--stochastic-iterations", type=int, default=60)
    p.add_argument("--polish", type=int, nargs="+", default=[0, 10])
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    truth = torch.as_tensor(rng.uniform(0, 1, (args.L, args.L)))
    meas = mtd.simulate(truth, args.N, density=0.1, snr=args.snr, K=args.K, seed=args.seed)
    init = torch.as_tensor(rng.uniform(0, 1, (args.L, args.L)))
    common = dict(sigma=meas.sigma, tol=args.tol, dtype=getattr(torch, args.dtype))
    group = mtd.Rotations(args.L, args.K)
    print(
        f"N = {args.N}, L = {args.L}, K = {args.K}, SNR {args.snr:g}, "
        f"{len(meas.angles)} copies, {(args.N // args.L) ** 2} patches, {args.dtype}"
    )
    full = run(
        mtd.ApproximateEM(group, iterations=args.iterations, **common), meas.data, init, truth
    )
    print(f"full EM               error {full[0]:.4f}  {full[1]:>4} iterations  {full[2]:7.1f} s")
    for S in args.S:
        for polish in args.polish:
            em = mtd.ApproximateEM(
                group,
                iterations=args.stochastic_iterations,
                stochastic=mtd.Stochastic(S, polish=polish, seed=args.seed),
                **common,
            )
            st = run(em, meas.data, init, truth)
            print(
                f"S={S:<4g} polish {polish:<3} error {st[0]:.4f}  {st[1]:>4} iterations  "
                f"{st[2]:7.1f} s   error {st[0] / full[0]:.2f}x full EM's, in "
                f"{st[2] / full[2]:.2f}x its time"
            )


if __name__ == "__main__":
    main()
