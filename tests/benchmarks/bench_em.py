"""Seconds per EM iteration: the engine against a straightforward implementation and the bare FFT.

    python -m tests.benchmarks.bench_em              # the engine issue's two cases, float64
    python -m tests.benchmarks.bench_em --dtype float32
    python -m tests.benchmarks.bench_em --methods    # FFT against GEMM by L (choose_method's rule)
    python -m tests.benchmarks.bench_em --device cuda --dtype float32   # the engine on a GPU

Everything is measured in this one run, on the same inputs:

- engine: one iteration = E-step (streamed statistics) + closed-form M-step + rho update, the
  median of several repeats, taken in turns with the two bare references below.
- straightforward: ``tests.reference.equations.iteration`` (NumPy, a Python loop over patches
  and shifts, as research code does it), the median of three runs: on all patches for (a), on n
  and 2n patches scaled to all D patches for (b); that it computes the engine's iteration is
  checked by tests/reference/test_exact.py.
- bare, two references, each the batched transforms alone (one call per chunk, nothing else):
  "FFT" is the plain rfft2 / irfft2 pair of the (D, K, 2L, 2L) correlations, what any FFT
  implementation of the iteration must run; "own" is the cheapest form of the transforms the
  engine itself runs: the complex FFTs of the (D, K/2, 2L, 2L) packed correlations (two real
  transforms for the price of one), or the products (D, L^2+1) x (L^2+1, 4KL^2) and
  (L^2, D) x (D, 4KL^2) of the GEMM form.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import mtd
from mtd.em.likelihood import choose_method
from tests.reference import equations as ref

ASSETS = Path(__file__).resolve().parents[2] / "assets"


def timed(fns: dict, repeats: int, device="cpu", warm_up=True) -> dict:
    """Median seconds of each fn() over repeats, after one warm-up call each (GPU work waited
    for). The functions take turns, so that a slow spell of a shared machine falls on all of
    them alike and their ratios stay meaningful."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = {name: [] for name in fns}
    for fn in fns.values() if warm_up else ():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def case_image(L: int, rng: np.random.Generator) -> np.ndarray:
    if L == 28:
        with np.load(ASSETS / "mnist_digits.npz") as f:
            return f["images"][10].astype(np.float64) / 255.0
    return rng.uniform(0, 1, (L, L))  # the approximate-EM paper's images


def engine_iteration(em: mtd.ApproximateEM, data, F, rho, sigma):
    corr = em.prepare(data)
    F = torch.as_tensor(F, dtype=em.dtype, device=em.device)
    log_rho = torch.as_tensor(np.log(rho), dtype=em.dtype, device=em.device)

    def one():
        stats = em.e_step(corr, F, log_rho, sigma**2)
        em.closed_form(stats, F)
        (stats.omega.sum(0) / stats.D).log()

    return one, corr.D


def bare(L: int, K: int, D: int, method: str, dtype, chunk: int, real=False, device="cpu"):
    """The bare batched transforms of one iteration, in chunks of the engine's size.

    FFT form: the packed complex FFTs the engine runs (``real=False``), or the plain real pair
    rfft2 / irfft2 of the (D, K, 2L, 2L) correlations (``real=True``). GEMM form: the two products.
    """
    P = 2 * L
    if method == "fft":
        cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        if real:
            x = torch.randn(min(chunk, D), K, P, P, dtype=dtype, device=device)
            X = torch.fft.rfft2(x)

            def one():
                for s in range(0, D, chunk):
                    n = min(chunk, D - s)
                    torch.fft.irfft2(X[:n], s=(P, P))
                    torch.fft.rfft2(x[:n])

            return one
        x = torch.randn(min(chunk, D), (K + 1) // 2, P, P, dtype=cdtype, device=device)

        def one():
            for s in range(0, D, chunk):
                n = min(chunk, D - s)
                torch.fft.ifft2(x[:n])
                torch.fft.fft2(x[:n])

        return one
    M = torch.randn(min(chunk, D), L * L + 1, dtype=dtype, device=device)
    S = torch.randn(L * L + 1, K * P * P, dtype=dtype, device=device)

    def one():
        for s in range(0, D, chunk):
            n = min(chunk, D - s)
            c = M[:n] @ S
            M[:n, :-1].T @ c

    return one


def run_case(L, N, K, dtype, naive_patches, repeats, rng, device="cpu", threads="auto"):
    image = case_image(L, rng)
    meas = mtd.simulate(image, N, density=0.1, snr=1.0, K=K, seed=0)
    data = meas.data.numpy()
    F = image + 0.1 * rng.standard_normal((L, L))
    rho = np.full((2 * L, 2 * L), 1.0 / (4 * L * L))
    compute = mtd.Compute(threads=threads)
    em = mtd.ApproximateEM(mtd.Rotations(L, K), compute=compute, dtype=dtype, device=device)
    one, D = engine_iteration(em, data, F, rho, meas.sigma)
    fft = mtd.ApproximateEM(
        mtd.Rotations(L, K), compute=mtd.Compute(method="fft"), dtype=dtype, device=device
    )
    fft_chunk = fft.estep.chunking(D)[0]
    fns = {
        "ours": one,
        "own": bare(L, K, D, em.estep.method, dtype, em.estep.chunking(D)[0], device=device),
        "fft": bare(L, K, D, "fft", dtype, fft_chunk, True, device),
    }
    t = timed(fns, repeats, device)
    # The straightforward iteration, the median of three runs: on all patches where that takes
    # seconds; else on n and 2n patches, whose difference is the cost of n patches (the rest,
    # templates and M-step, is paid once), scaled to all D patches.
    patch_list = ref.patches(data, L)
    ref.iteration(patch_list[:1], F, rho, meas.sigma, K)  # warm-up (cached rotation matrices)
    sizes = (D,) if naive_patches is None else (naive_patches, 2 * naive_patches)
    pick = rng.permutation(len(patch_list))[: sizes[-1]]

    def naive_run(n):
        sub = [patch_list[i] for i in pick[:n]]
        return lambda: ref.iteration(sub, F, rho, meas.sigma, K)

    naive = timed({n: naive_run(n) for n in sizes}, 3, warm_up=False)
    if naive_patches is None:
        t_naive = naive[D]
    else:
        n = naive_patches
        t_naive = naive[n] + (D - n) * (naive[2 * n] - naive[n]) / n
    return {
        "case": f"L={L} N={N} K={K}",
        "D": D,
        "method": em.estep.method,
        "ours_ms": 1e3 * t["ours"],
        "fft_ms": 1e3 * t["fft"],
        "own_ms": 1e3 * t["own"],
        "naive_s": t_naive,
    }


def compare_methods(dtype, repeats, device="cpu"):
    print(f"E-step + M-step ms per iteration, N = 22 L (D = 484), K = 8, {dtype}")
    print(f"{'L':>4} {'fft':>9} {'gemm':>9}  faster   choose_method")
    rng = np.random.default_rng(0)
    for L in (3, 4, 5, 6, 7, 8, 10, 12, 16):
        data = rng.standard_normal((22 * L, 22 * L))
        F = rng.uniform(0, 1, (L, L))
        rho = np.full((2 * L, 2 * L), 1.0 / (4 * L * L))
        t = {}
        for method in ("fft", "gemm"):
            compute = mtd.Compute(method=method)
            em = mtd.ApproximateEM(
                mtd.Rotations(L, 8), compute=compute, dtype=dtype, device=device
            )
            one, _ = engine_iteration(em, data, F, rho, 1.0)
            t[method] = 1e3 * timed({method: one}, repeats, device)[method]
        best = min(t, key=t.get)
        print(f"{L:>4} {t['fft']:>9.2f} {t['gemm']:>9.2f}  {best:>6}   {choose_method(L)}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--methods", action="store_true", help="compare the FFT and GEMM forms by L")
    p.add_argument("--device", default="cpu", help="of the engine and the bare transforms")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="pin the engine (Compute(threads=n)) and the bare transforms to n intra-op threads "
        "(default: the engine's own policy, the bare transforms at torch's default)",
    )
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    where = args.device if args.device != "cpu" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {where}, {args.dtype}")
    if args.methods:
        compare_methods(dtype, args.repeats, args.device)
        return
    rng = np.random.default_rng(0)
    kw = {"repeats": args.repeats, "rng": rng, "device": args.device}
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        kw["threads"] = args.threads
    rows = [
        run_case(28, 308, 4, dtype, naive_patches=None, **kw),
        run_case(5, 1000, 8, dtype, naive_patches=500, **kw),
    ]
    print(
        f"{'case':<18} {'D':>6} {'form':>5} {'engine':>8} {'bare FFT':>9} {'ratio':>6} "
        f"{'bare own':>9} {'ratio':>6} {'plain':>7} {'speed-up':>9}"
    )
    for r in rows:
        print(
            f"{r['case']:<18} {r['D']:>6} {r['method']:>5} {r['ours_ms']:>6.1f}ms "
            f"{r['fft_ms']:>7.1f}ms {r['ours_ms'] / r['fft_ms']:>5.2f}x "
            f"{r['own_ms']:>7.1f}ms {r['ours_ms'] / r['own_ms']:>5.2f}x "
            f"{r['naive_s']:>6.1f}s {1e3 * r['naive_s'] / r['ours_ms']:>8.0f}x"
        )
    print(
        "bare FFT: rfft2 + irfft2 of the (D, K, 2L, 2L) correlations; bare own: the engine's own\n"
        "transforms alone (packed complex FFTs, or the two GEMMs); plain: the straightforward\n"
        "per-patch, per-shift NumPy iteration."
    )


if __name__ == "__main__":
    main()
