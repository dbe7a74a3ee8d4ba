"""Seconds per EM iteration with exact continuous rotations: the engine against dense NumPy.

    python -m tests.benchmarks.bench_steerable               # the approximate-EM paper's setting
    python -m tests.benchmarks.bench_steerable --threads 1   # everything on one thread
    python -m tests.benchmarks.bench_steerable --no-memory   # skip the peak-memory children

The setting is the approximate-EM paper's (Section 3): L = 5, the image's first n = 10
Fourier-Bessel coefficients (``mtd.FBBasis(5, n=10)``), N = 1000 (D = 40000 patches), density
0.04, angles uniform on [0, 2 pi), K = 8 rotations searched, float64. The paper's own Python code
takes about 50 CPU-seconds per EM iteration there; its M-step einsum dominates and it holds
4 K N^2 numbers per array (the posterior of every patch, shift and rotation).

One EM iteration, measured in this one run on the same inputs (the same coefficients, a
non-uniform rho, the true sigma):

- ours: ``ApproximateEM(Steerable(FBBasis(5, n=10), 8))``: ``e_step`` (the streamed statistics)
  + the closed-form M-step in the coefficients (eq. 16) + rho (eq. 18).
- numpy: the iteration written from the paper's equations the way its code runs it, every array
  dense over all patches x all shifts x all rotations: for each (rotation, shift) the eq. (10)
  residuals of all patches into one (K, 4L^2, D) log-likelihood array, its softmax with rho
  (eq. 11), then the linear system (16) in the coefficients assembled over the full posterior
  array: per (rotation, shift) an einsum of all patches with that operator's matrix
  C T_l Z B R_k (the back-projections) and the posterior-weighted normal matrices.
- numpy-gemm (context): the same dense arrays with the two big contractions as BLAS matrix
  products ((K 4L^2, L^2) x (L^2, D) and (K 4L^2, D) x (D, L^2)); the best the dense layout does.
- paper (with ``--paper-code DIR``, a clone of the paper's code, github.com/krshay/MTD-2D-EM; none
  of it is in this repository): one iteration of its own EM (``Utils/EM_funcs.py``, one process:
  its likelihoods over every (rotation, shift), the posterior, its ``z_step`` and rho) on the same
  patches, with its own expansion of the same image in its first 10 coefficients. Its basis is
  not ours (a table of nu <= 2 functions on a disk of radius L // 2 + 1), so its update is not
  compared, only timed. It is run under NumPy 2 with the aliases it needs (``np.int``,
  ``np.complex_``, ``csr_matrix.H``) restored.

Before timing, the three updates (coefficients, rho, log-likelihood) are checked to agree (to
1e-8 relative in float64). Times are medians over the repeats, taken in turns so that a slow
spell of a shared machine falls on all of them alike. Peak memory: each iteration once more in a
fresh child process, the resident high-water mark above the child's resident size after setup
(Linux: /proc/self/status VmHWM; a process's own peak, so no other run's memory is counted).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import mtd
from tests.benchmarks.external import import_package

ROOT = Path(__file__).resolve().parents[2]

try:  # to pin NumPy's BLAS with --threads (numpy-gemm); optional
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None


# ------------------------------------------------------------------------------------------------
# The case
# ------------------------------------------------------------------------------------------------
def make_case(L: int, N: int, K: int, n: int, density: float, snr: float, seed: int) -> dict:
    """The measurement, the basis and one EM iterate (alpha, rho, sigma) to run an iteration at."""
    basis = mtd.FBBasis(L, n=n)
    image = mtd.random_image(L, seed=seed)  # U[0, 1] entries, ||F|| = 10 (the paper's images)
    meas = mtd.simulate(
        image,
        N,
        density=density,
        snr=snr,
        rotation="continuous",
        basis=basis,
        snr_of="raw",
        seed=seed,
    )
    rng = np.random.default_rng(seed + 1)
    alpha = basis.expand(meas.image).numpy() + 0.3 * rng.standard_normal(basis.n)
    # A non-uniform rho, so that a shift convention differing between the two would show.
    rho = rng.uniform(0.5, 1.5, (2 * L, 2 * L))
    rho /= rho.sum()
    return {
        "basis": basis,
        "image": image,
        "data": meas.data.numpy(),
        "alpha": alpha,
        "rho": rho,
        "sigma": meas.sigma,
        "L": L,
        "K": K,
    }


def patches_of(M: np.ndarray, L: int) -> np.ndarray:
    """(D, L^2) the non-overlapping L x L patches (eq. 5), row by row."""
    n0, n1 = M.shape[0] // L, M.shape[1] // L
    blocks = M[: n0 * L, : n1 * L].reshape(n0, L, n1, L).transpose(0, 2, 1, 3)
    return blocks.reshape(n0 * n1, L * L).copy()


# ------------------------------------------------------------------------------------------------
# The dense NumPy iteration (the approximate-EM paper's equations, its code's layout)
# ------------------------------------------------------------------------------------------------
def dense_operators(B: np.ndarray, R: np.ndarray, L: int) -> np.ndarray:
    """A[k, l] = C T_l Z B R_k, the (L^2, n) matrix from coefficients to patch (eqs. 3, 6, 7).

    (T_l Z X)[i, j] = (Z X)[(i + l_x) mod 2L, (j + l_y) mod 2L] (eq. 7); C keeps the top-left
    L x L. Built once from the basis (as the paper's code precomputes its shifted bases).

    Args:
        B: (L^2, n) the basis sampled on the grid.
        R: (K, n, n) the rotations by 2 pi k / K on the coefficients (eq. 3).

    Returns:
        (K, 4 L^2, L^2, n), shifts l = l_x 2L + l_y.
    """
    P = 2 * L
    sel = np.zeros((P * P, L * L, L * L))
    for lx in range(P):
        for ly in range(P):
            for i in range(L):
                for j in range(L):
                    a, b = (i + lx) % P, (j + ly) % P
                    if a < L and b < L:
                        sel[lx * P + ly, i * L + j, a * L + b] = 1.0
    BR = np.einsum("qn,knm->kqm", B, R)  # (K, L^2, n): the rotated bases
    return np.einsum("lpq,kqn->klpn", sel, BR)


def _posterior(ll: np.ndarray, rho: np.ndarray, sigma: float, L: int):
    """Eq. (11) from the (K, S, D) log-likelihoods: posterior, and the approximate log-lik."""
    K, S, D = ll.shape
    a = ll + (np.log(rho).reshape(1, S, 1) - math.log(K))  # prior rho[l] / K (eq. 12)
    top = a.max(axis=(0, 1))
    e = np.exp(a - top)
    total = e.sum(axis=(0, 1))
    W = e / total
    const = 0.5 * L * L * math.log(2 * math.pi * sigma**2)  # the Gaussian's normalisation
    loglik = float((top + np.log(total)).sum()) - D * const
    return W, loglik


def numpy_iteration(P, alpha, rho, sigma, A, AtA, L):
    """One EM iteration with dense (K, 4L^2, D) arrays, per (rotation, shift) as the paper's code.

    Args:
        P: (D, L^2) patches.
        alpha: (n,) coefficients; rho: (2L, 2L); sigma: noise std.
        A: (K, S, L^2, n) ``dense_operators``; AtA: (K, S, n, n) their A^T A.

    Returns:
        (alpha', rho', log-likelihood at alpha).
    """
    K, S = A.shape[:2]
    D = len(P)
    X = A @ alpha  # (K, S, L^2): every rotated, shifted, cropped template
    ll = np.empty((K, S, D))  # 4 K N^2 numbers
    for k in range(K):
        for s in range(S):  # eq. (10) for all patches at once
            r = P - X[k, s]
            ll[k, s] = -np.einsum("mp,mp->m", r, r) / (2 * sigma**2)
    W, loglik = _posterior(ll, rho, sigma, L)
    del ll
    lhs = np.zeros(AtA.shape[-2:])
    rhs = np.zeros(A.shape[-1])
    for k in range(K):
        for s in range(S):  # eq. (16): sum_m w A^T (M_m - A alpha) = 0, assembled over (k, l)
            rhs += W[k, s] @ np.einsum("mp,pn->mn", P, A[k, s])
            lhs += W[k, s].sum() * AtA[k, s]
    rho_new = W.sum(axis=(0, 2)).reshape(2 * L, 2 * L) / D  # eq. (18)
    return np.linalg.solve(lhs, rhs), rho_new, loglik


def numpy_gemm_iteration(P, alpha, rho, sigma, A, AtA, L, energy):
    """``numpy_iteration`` with the two big contractions as BLAS products (same dense arrays)."""
    K, S, Q, n = A.shape
    X = (A @ alpha).reshape(K * S, Q)
    # ||M - X||^2 = ||M||^2 - 2 M.X + ||X||^2: one (K S, L^2) x (L^2, D) product.
    ll = (X @ P.T) * 2 - (X * X).sum(1)[:, None] - energy[None, :]
    ll /= 2 * sigma**2
    W, loglik = _posterior(ll.reshape(K, S, -1), rho, sigma, L)
    del ll
    back = W.reshape(K * S, -1) @ P  # (K S, L^2): all back-projections in one product
    rhs = np.einsum("sq,sqn->n", back, A.reshape(K * S, Q, n))
    lhs = np.einsum("s,snm->nm", W.sum(2).reshape(-1), AtA.reshape(K * S, n, n))
    rho_new = W.sum(axis=(0, 2)).reshape(2 * L, 2 * L) / len(P)
    return np.linalg.solve(lhs, rhs), rho_new, loglik


# ------------------------------------------------------------------------------------------------
# Ours
# ------------------------------------------------------------------------------------------------
def paper_iteration(root: str, case: dict):
    """One EM iteration of the paper's own code at ``root`` (see the module docstring)."""
    np.int, np.complex, np.complex_ = int, complex, np.complex128  # removed in NumPy 2
    import scipy.sparse

    if not hasattr(scipy.sparse.csr_matrix, "H"):
        scipy.sparse.csr_matrix.H = property(lambda self: self.conj().T)
    import_package("Utils", root)  # the paper's code (a folder of modules, not installed)
    from Utils import EM_funcs as E
    from Utils.fb_funcs import expand_fb

    L, K = case["L"], case["K"]
    F = case["image"].numpy()
    B, z, _, kvals, nu = expand_fb(F, 10)
    M = case["data"]
    N = M.shape[0] // L * L
    Nd = (N // L) ** 2
    Ms = M[:N, :N].reshape(N // L, L, N // L, L).transpose(1, 3, 0, 2).reshape(L, L, Nd)
    Bk = np.zeros((2 * L - 1, 2 * L - 1, nu), dtype=complex)
    for i in range(nu):
        Bk[:, :, i] = np.fft.fft2(np.pad(np.reshape(B[:, i], (L, L)), L // 2))
    PP = E.PsiPsi(E.rearangeB(B), L, K, nu, kvals)
    BCTZs = E.calcB_CTZs(B, K, L, kvals)
    sigma2 = case["sigma"] ** 2
    rho = case["rho"]
    Phi, Ls = E.calc_Phi(K), E.calc_shifts(L)
    pairs = np.empty((K * 4 * L * L, 2), dtype=object)  # its list of (phi, l), as it splits it
    for i, (phi, shift) in enumerate(E.set_Phi_Ls(Phi, Ls)):
        pairs[i, 0], pairs[i, 1] = phi, shift

    def one():  # EM_funcs.EM's loop body, the pool's work in one process
        S = E.calc_pMm_l_phi_z(Ms, pairs, z, kvals, Bk, L)
        S = np.real(np.reshape(S, (K, 2 * L, 2 * L, Nd)))
        p = np.exp(-(S - np.min(S, axis=(0, 1, 2))) / (2 * sigma2))
        p = p / np.sum(p, axis=(0, 1, 2))
        weighted = np.einsum("Pijm,ij->Pijm", p, rho)
        post = weighted / np.sum(weighted, axis=(0, 1, 2))
        y, A = E.partial_z_step(post, Ms, BCTZs, Phi, Ls, K, nu, kvals, sigma2, PP)
        return np.linalg.inv(A) @ y, np.sum(post, axis=(0, 3)) / Nd

    return one


def engine(case: dict, dtype, device, threads):
    em = mtd.ApproximateEM(
        mtd.Steerable(case["basis"], case["K"]),
        sigma=case["sigma"],
        iterations=1,
        compute=mtd.Compute(threads=threads),
        dtype=dtype,
        device=device,
    )
    data = em.prepare(case["data"])
    alpha = torch.as_tensor(case["alpha"], dtype=dtype, device=device)
    log_rho = torch.as_tensor(np.log(case["rho"]), dtype=dtype, device=device)
    sigma2 = case["sigma"] ** 2

    def one():
        stats = em.e_step(data, alpha, log_rho, sigma2)
        new = em.closed_form(stats, alpha)
        return new, stats.omega.sum(0) / stats.D, stats.loglik  # eq. (18)

    return em, data, one


def setup(which: str, case: dict, dtype, device, threads):
    """The function timing ``which`` runs, and what to report about its memory bound."""
    L, basis = case["L"], case["basis"]
    if which == "ours":
        em, data, one = engine(case, dtype, device, threads)
        chunk, blocks = em.estep.chunking(data.D)
        bound = em.estep.form.chunk_elements() * torch.finfo(dtype).bits // 8
        return one, {"D": data.D, "chunk": chunk, "method": em.estep.method, "bound": bound}
    B = basis.matrix.numpy()
    R = basis.rotation(torch.arange(case["K"], dtype=torch.float64) * (2 * math.pi / case["K"]))
    A = dense_operators(B, R.numpy(), L)
    AtA = np.einsum("kspn,kspm->ksnm", A, A)
    P = patches_of(case["data"], L)
    a, rho, sigma = case["alpha"], case["rho"], case["sigma"]
    if which == "numpy":
        return (lambda: numpy_iteration(P, a, rho, sigma, A, AtA, L)), {}
    energy = (P * P).sum(1)
    return (lambda: numpy_gemm_iteration(P, a, rho, sigma, A, AtA, L, energy)), {}


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------
def timed(fns: dict, repeats: dict, device="cpu") -> dict:
    """Median wall and CPU seconds of each fn() over its repeats, in turns (warmed up by the
    agreement check, which has called every fn once). CPU seconds are the process's (all its
    threads): on a loaded machine they are what the iteration costs, the wall time what it
    waited."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for r in range(max(repeats.values())):
        for name, fn in fns.items():
            if r < repeats[name]:
                sync()
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                sync()
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return {
        name: (statistics.median(times[name]), statistics.median(cpu[name]), len(times[name]))
        for name in fns
    }


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_child(args, which: str) -> int | None:
    """Peak resident bytes of one ``which`` iteration above its process's size after setup."""
    cmd = [
        sys.executable,
        "-m",
        "tests.benchmarks.bench_steerable",
        "--memory-child",
        which,
        *_case_args(args),
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        print(f"  (peak memory of {which} not measured: {out.stderr.strip()[-200:]})")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def _case_args(args) -> list[str]:
    out = [
        f"--{k}={getattr(args, k)}"
        for k in ("L", "N", "K", "n", "density", "snr", "seed", "dtype", "device")
    ]
    return out + ([f"--threads={args.threads}"] if args.threads is not None else [])


def memory_child(args, which: str) -> None:
    case = make_case(args.L, args.N, args.K, args.n, args.density, args.snr, args.seed)
    fn, _ = setup(which, case, getattr(torch, args.dtype), args.device, threads_of(args))
    base = _status("VmRSS")
    try:  # reset the high-water mark to the present size (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        fn()
        peak = _status("VmHWM") - base
    except OSError:
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - max(before, base)
    print(json.dumps({"peak": peak}))


def threads_of(args):
    return "auto" if args.threads is None else args.threads


def check_same(outs: dict, tol: float) -> float:
    """Largest relative difference of (alpha', rho', loglik) between ours and the references."""
    a0, r0, l0 = (np.asarray(torch.as_tensor(v).double().cpu()) for v in outs["ours"])
    worst = 0.0
    for name, (a, r, ll) in outs.items():
        if name == "ours":
            continue
        d = max(
            np.linalg.norm(a - a0) / np.linalg.norm(a0),
            np.abs(r - r0).max() / np.abs(r0).max(),
            abs(float(ll) - float(l0)) / abs(float(l0)),
        )
        if not d <= tol:
            raise AssertionError(f"{name} and ours disagree: relative difference {d:.3g} > {tol}")
        worst = max(worst, d)
    return worst


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--L", type=int, default=5)
    p.add_argument("--N", type=int, default=1000)
    p.add_argument("--K", type=int, default=8)
    p.add_argument("--n", type=int, default=10, help="Fourier-Bessel coefficients")
    p.add_argument("--density", type=float, default=0.04)
    p.add_argument("--snr", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype",
        default="float64",
        choices=["float32", "float64"],
        help="of ours (the agreement check runs in float64 first)",
    )
    p.add_argument("--device", default="cpu", help="of ours")
    p.add_argument("--repeats", type=int, default=7, help="of ours and numpy-gemm (>= 5)")
    p.add_argument("--numpy-repeats", type=int, default=3, help="of the dense NumPy iteration")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="pin ours (Compute(threads=n)) and NumPy's BLAS to n threads (default: "
        "the engine's own policy, NumPy at its default)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument(
        "--paper-code",
        default=None,
        help="a clone of github.com/krshay/MTD-2D-EM: time its own EM iteration beside ours",
    )
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.numpy_repeats < 1:
        raise ValueError("--repeats and --numpy-repeats must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        if threadpool_limits is not None:
            threadpool_limits(args.threads)
    if args.memory_child:
        return memory_child(args, args.memory_child)
    dtype = getattr(torch, args.dtype)
    load0 = os.getloadavg()[0]  # the machine may be shared: the load says how much
    case = make_case(args.L, args.N, args.K, args.n, args.density, args.snr, args.seed)
    where = args.device if args.device != "cpu" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, numpy {np.__version__}, {where}, ours in {args.dtype}")
    print(
        f"L = {args.L}, N = {args.N}, K = {args.K}, n = {args.n} FB coefficients, density "
        f"{args.density}, continuous angles, SNR {args.snr:g} (raw image)"
    )
    fns, info = {}, {}
    for which in ("ours", "numpy-gemm", "numpy"):
        fns[which], info[which] = setup(which, case, dtype, args.device, threads_of(args))
    # The same update first (float64), then the times.
    check = dict(fns)
    if args.paper_code:  # timed, not compared (its basis is its own)
        fns["paper"] = paper_iteration(str(Path(args.paper_code).resolve()), case)
    if dtype != torch.float64 or args.device != "cpu":
        check["ours"] = setup("ours", case, torch.float64, "cpu", threads_of(args))[0]
    start = time.perf_counter()
    outs = {name: fn() for name, fn in check.items()}
    print(
        f"same update (alpha', rho', loglik), largest relative difference "
        f"{check_same(outs, 1e-8):.1e}  ({time.perf_counter() - start:.0f} s)"
    )
    repeats = {"ours": args.repeats, "numpy-gemm": args.repeats, "numpy": args.numpy_repeats}
    if "paper" in fns:
        fns["paper"]()  # warm up (imports, caches), as the check has the others
        repeats["paper"] = args.numpy_repeats
    t = timed(fns, repeats, args.device)
    mem = {} if args.no_memory else {w: peak_child(args, w) for w in fns if w != "paper"}
    D, K, L = info["ours"]["D"], args.K, args.L
    dense = K * 4 * L * L * D * 8
    print(
        f"D = {D} patches; a dense (K, 4L^2, D) array = {dense / 2**20:.0f} MiB "
        "(4 K N^2 numbers);\n"
        f"ours: form {info['ours']['method']}, chunks of {info['ours']['chunk']} patches, "
        f"budget {info['ours']['bound'] / 2**20:.0f} MiB"
    )
    print(
        f"{'':<11} {'s/iteration':>12} {'x ours':>7} {'CPU-s/it.':>10} {'x ours':>7} "
        f"{'repeats':>8} {'peak MiB':>9}"
    )
    for name in fns:
        sec, cpu, reps = t[name]
        peak = mem.get(name)
        peak_s = f"{peak / 2**20:>9.0f}" if peak is not None else f"{'-':>9}"
        print(
            f"{name:<11} {sec:>12.4f} {sec / t['ours'][0]:>6.0f}x {cpu:>10.4f} "
            f"{cpu / t['ours'][1]:>6.0f}x {reps:>8} {peak_s}"
        )
    print(
        "numpy: dense arrays, per (rotation, shift) einsums as the paper's code; numpy-gemm: "
        "the same\ndense arrays, the contractions as BLAS products"
        + ("; paper: the paper's own code, its basis" if "paper" in fns else "")
        + ". Medians over the repeats."
    )
    speedup = t["numpy"][0] / t["ours"][0]
    print(
        f"ours is {speedup:.0f}x faster per iteration than the dense NumPy iteration in wall time,"
        f" {t['numpy'][1] / t['ours'][1]:.0f}x in CPU time "
        f"(issue 12 asks >= 300x); 1-min load average {load0:.1f} at the "
        f"start, {os.getloadavg()[0]:.1f} at the end"
    )
    if "paper" in t:
        print(
            f"ours is {t['paper'][0] / t['ours'][0]:.0f}x faster per iteration than the paper's "
            f"own code in wall time, {t['paper'][1] / t['ours'][1]:.0f}x in CPU time"
        )
    return {"t": t, "mem": mem, "speedup": speedup}


if __name__ == "__main__":
    main()
