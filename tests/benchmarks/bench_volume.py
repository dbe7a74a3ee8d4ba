"""A volume from micrographs (issue 13): the speed of one EM iteration at the stochastic-EM
paper's per-iteration work, and the Shepp-Logan run end to end.

    python -m tests.benchmarks.bench_volume speed        # 14,796 patches of 11 x 11, K = 552
    python -m tests.benchmarks.bench_volume speed --patches 740 --repeats 3
    python -m tests.benchmarks.bench_volume e2e          # Shepp-Logan 11^3, SNR 3.5, S = 0.05
    python -m tests.benchmarks.bench_volume e2e --separation arbitrary

speed: the paper's iteration (Section IV-A) is an E-step over floor(0.05 * 295,936) = 14,796
patches of 11 x 11 against K = 552 rotations and 4L^2 shifts, then the M-step. Measured on
``--patches`` patches of a simulated micrograph (K = 552 Haar-random rotations: the cost does not
depend on which rotations) and extrapolated linearly in the patches (the E-step is a loop over
chunks of patches; the M-step's CG does not depend on the patch count). Printed: wall and CPU
seconds per E-step and M-step (median of ``--repeats``), the bare batched correlations the E-step
rests on (one pass of the correlation form over every chunk and template block, one thread: the
logits alone, and the logits with the back-projection of the statistics, the E-step's second
batched correlation), the
template blocks and the chunk's work buffer, and the process's peak resident memory above its
baseline.

e2e: the paper's Shepp-Logan experiment scaled to this machine: the 3-D Shepp-Logan phantom at
11^3, SNR 3.5 (eq. 4), well separated (or arbitrary spacing), projections at Haar-random rotations
(planted with the EM's own projector: the paper's second method), the Hopf grid of K = 576
rotations, stochastic EM with S = 0.05 (Algorithm 1), sigma known, frequency marching lmax 6 -> 8
-> 10, from N(0, 1) random starts (the best log-likelihood kept) and from the true volume. The
error is after alignment over SO(3), the mirror image and shifts
(``mtd.metrics.measure_volume``) when that module is importable, else the unaligned error,
and the FSC crossings. ``--bandlimited-truth`` plants the phantom projected onto the last band
(l <= 10), the paper's "second method"; without it the phantom itself, whose best approximation in
that band is ``phantom_band_error`` away (the floor of the error).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import time


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def speed(patches: int, K: int, repeats: int, dtype: str, method: str, target: int) -> dict:
    import torch

    import mtd
    from mtd import so3
    from mtd.forward import volumes as mv
    from mtd.groups import tomography as pj
    from mtd.parallel import limit_threads

    L = 11
    dt = getattr(torch, dtype)
    side = math.ceil(math.sqrt(patches)) * L
    V = mv.shepp_logan(L)
    meas = mv.simulate_volume(V, side, density=0.15, snr=3.5, seed=0)
    start = time.perf_counter()
    group = pj.Projections(L, so3.random_rotations(K, seed=0), bandlimit=10)
    build = time.perf_counter() - start
    em = mtd.ApproximateEM(group, sigma=meas.sigma, compute=mtd.Compute(method=method), dtype=dt)
    data = em.prepare(meas.data[:side, :side])
    subset = torch.arange(patches)  # exactly `patches` of them, as a stochastic E-step would
    x = em.group.restrict(V.to(dt))
    log_rho = torch.full((2 * L, 2 * L), 1.0 / (4 * L * L), dtype=dt).log()
    sigma2 = meas.sigma**2
    base = peak_rss_bytes()
    e_times, m_times, bare_times, both_times = [], [], [], []
    cpu = {"e": [], "m": [], "bare": [], "both": []}

    def timed(key, times, fn):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - t)
        cpu[key].append(time.process_time() - c)
        return out

    def bare(adjoint: bool):
        # The two batched correlations the E-step rests on, one pass over every chunk and block:
        # the logits (patches against templates) and, with ``adjoint``, the back-projection
        # (weights against patches, the accumulator of the M-step's statistics).
        estep = em.estep
        plan = estep._plan(data, x, log_rho, sigma2)
        chunks = estep._chunks(data, subset, None)
        form = estep.form
        acc = [form.accumulator(b.stop - b.start) for b in plan["blocks"]]
        with limit_threads(1):
            for held, local, _ in estep._held_chunks(data, chunks, form):
                for p, a in zip(plan["prepared"], acc, strict=True):
                    c = form.correlate(held, local, p)
                    if adjoint:
                        ones = torch.ones(len(c), dtype=c.dtype, device=c.device)
                        form.accumulate(held, local, c, ones, a)

    for _ in range(repeats):
        stats = timed("e", e_times, lambda: em.e_step(data, x, log_rho, sigma2, subset=subset))
        timed("m", m_times, lambda stats=stats: em.closed_form(stats, x))
        timed("bare", bare_times, lambda: bare(False))
        timed("both", both_times, lambda: bare(True))
    chunk, blocks = em.estep.chunking(data.D)
    work = em.estep.form.work
    e, m, bare_s, both_s = (
        statistics.median(v) for v in (e_times, m_times, bare_times, both_times)
    )
    e_cpu, m_cpu, bare_cpu, both_cpu = (
        statistics.median(cpu[k]) for k in ("e", "m", "bare", "both")
    )
    scale = target / patches
    return {
        "patches": patches,
        "K": K,
        "L": L,
        "dtype": dtype,
        "method": em.estep.method,
        "blocks": len(blocks),
        "block": blocks[0].stop - blocks[0].start,
        "chunk": chunk,
        "work_bytes": 0 if work is None else work.numel() * work.element_size(),
        "peak_rss_above_baseline": peak_rss_bytes() - base,
        "build_seconds": build,
        "estep_seconds": e,
        "estep_cpu_seconds": e_cpu,
        "bare_correlation_seconds": bare_s,
        "bare_correlation_cpu_seconds": bare_cpu,
        "estep_over_bare_cpu": e_cpu / bare_cpu,
        "bare_correlation_and_back_projection_seconds": both_s,
        "bare_correlation_and_back_projection_cpu_seconds": both_cpu,
        "estep_over_bare_both_cpu": e_cpu / both_cpu,
        "mstep_seconds": m,
        "mstep_cpu_seconds": m_cpu,
        "cg_iterations": em.group.cg_history[-1],
        "torch_threads": torch.get_num_threads(),
        "extrapolated_to": target,
        "extrapolated_iteration_seconds": e * scale + m,
        # On a machine whose cores other processes share, the process's CPU seconds over the
        # cores it could use bound what the wall clock of a quiet machine would be.
        "extrapolated_iteration_cpu_seconds": e_cpu * scale + m_cpu,
        "paper_seconds": 45 * 60,
    }


def e2e(args) -> dict:
    import numpy as np
    import torch

    import mtd
    from mtd import so3
    from mtd.forward import volumes as mv
    from mtd.groups import tomography as pj

    try:
        from mtd.metrics.measure import measure_volume
    except ImportError:  # the metrics helper's module, when committed
        measure_volume = None
    L = 11
    dt = getattr(torch, args.dtype)
    V = mv.shepp_logan(L)
    lmaxes = [int(s) for s in args.lmax.split(",")]
    top = pj.Projections(L, torch.eye(3, dtype=torch.float64)[None], bandlimit=lmaxes[-1])
    floor = float((top.restrict(V) - V).norm() / V.norm())  # the best the last band can do
    if args.bandlimited_truth:  # the paper's second method: the phantom expanded to l_max
        V = top.restrict(V)
    meas = mv.simulate_volume(
        V, args.N, density=args.density, snr=args.snr, separation=args.separation, seed=args.seed
    )
    R, w = so3.hopf_grid(args.grid)
    stages = [int(s) for s in args.stages.split(",")]
    schedule, it = [], 0
    for lm, n in zip(lmaxes, stages, strict=True):
        schedule.append((it, lm))
        it += n
    group = pj.Projections(
        L, R, w, schedule=schedule, cg_tol=args.cg_tol, cg_iterations=args.cg_iterations
    )
    em = mtd.ApproximateEM(
        group,
        sigma=meas.sigma,
        iterations=it,
        tol=0,
        stochastic=mtd.Stochastic(args.fraction, seed=args.seed),
        dtype=dt,
    )
    data = em.prepare(meas.data)
    rng = np.random.default_rng(args.seed + 1)
    inits = torch.from_numpy(rng.standard_normal((args.restarts, L, L, L)))
    out = {
        "L": L,
        "N": args.N,
        "patches": data.D,
        "patches_per_iteration": math.floor(args.fraction * data.D),
        "projections": len(meas.positions),
        "density": args.density,
        "snr": args.snr,
        "sigma": meas.sigma,
        "separation": args.separation,
        "K": group.K,
        "schedule": schedule,
        "iterations": it,
        "restarts": args.restarts,
        "dtype": args.dtype,
        "aligned": measure_volume is not None,
        "bandlimited_truth": args.bandlimited_truth,
        "phantom_band_error": floor,
    }
    for name, init in (("random", inits), ("truth", V)):
        log = []

        def record(entry, log=log):
            log.append({k: entry[k] for k in ("iteration", "loglik", "delta", "restart")})

        start = time.perf_counter()
        res = em.fit(data, init.to(dt), truth=V.to(dt), callback=record)  # (marching: the group)
        seconds = time.perf_counter() - start
        est = res.estimate.double().cpu()
        entry = {
            "seconds": seconds,
            "seconds_per_iteration": seconds / (it * (len(init) if init.ndim == 4 else 1)),
            "restart": res.restart,
            "unaligned_error": float((est - V).norm() / V.norm()),
            "loglik": float(res.loglik[-1]),
            "cg_iterations": em.group.cg_history[-it:],
        }
        if measure_volume is not None:
            al, curve = measure_volume(V, est)
            entry["aligned_error"] = al.error
            entry["mirror"] = al.mirror
            entry["fsc"] = curve.to_dict() if hasattr(curve, "to_dict") else None
        if args.save:
            np.save(f"{args.save}_{name}.npy", est.numpy())
        out[name] = entry
        print(json.dumps({name: entry}, default=str), flush=True)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--patches", type=int, default=740, help="patches measured (5%% of 14,796)")
    s.add_argument("--target", type=int, default=14796, help="patches extrapolated to")
    s.add_argument("--K", type=int, default=552)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--dtype", default="float32")
    s.add_argument("--method", default="auto")
    e = sub.add_parser("e2e")
    e.add_argument("--N", type=int, default=1100, help="micrograph side (D = (N / 11)^2 patches)")
    e.add_argument("--density", type=float, default=0.15)
    e.add_argument("--snr", type=float, default=3.5)
    e.add_argument("--separation", default="well")
    e.add_argument("--fraction", type=float, default=0.05, help="stochastic EM's S")
    e.add_argument("--grid", type=int, default=1, help="Hopf grid resolution (K = 72 * 8^r)")
    e.add_argument("--lmax", default="6,8,10", help="frequency marching's band limits")
    e.add_argument("--stages", default="8,6,6", help="iterations at each band limit")
    e.add_argument("--restarts", type=int, default=2, help="N(0, 1) random starts")
    e.add_argument("--cg-tol", type=float, default=1e-4)
    e.add_argument("--cg-iterations", type=int, default=30)
    e.add_argument("--dtype", default="float32")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument(
        "--bandlimited-truth",
        action="store_true",
        help="truth = the phantom projected onto the last band (the paper's second method)",
    )
    e.add_argument("--save", default="", help="write the estimates to <save>_{random,truth}.npy")
    a = p.parse_args(argv)
    if a.what == "speed":
        out = speed(a.patches, a.K, a.repeats, a.dtype, a.method, a.target)
    else:
        out = e2e(a)
    print(json.dumps(out, default=str))
    return out


if __name__ == "__main__":
    main()
