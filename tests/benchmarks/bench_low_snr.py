"""Low SNR: the error against the number of copies, with and without the prior, as a user runs it.

    python -m tests.benchmarks.bench_low_snr                          # the table and figure
    python -m tests.benchmarks.bench_low_snr --snr 0.05 --copies 640 --seeds 1 2 3 4 5 6 7 8 9 10 \
        --truth-start

Micrographs come from a simulator of this file, independent of ``mtd.simulate`` (numpy only):
``copies`` copies of a held-out digit of the shipped checkpoint (``ScorePrior.target``), each
turned by a uniform multiple of 90 degrees (``np.rot90``), their corners drawn uniformly and
kept at least 2 L apart in rows or columns (rejection sampling), on an N x N micrograph with
N = ceil(sqrt(copies L^2 / density)), plus white noise of sigma = ||x|| / (L sqrt(SNR)). Each is
reconstructed as the README's check runs it: ``reconstruct(cfg)`` with ``measurement=file
measurement.path=micrograph.npy measurement.L=28 measurement.sigma=S`` and the truth for the
error, the default checkpoint and preset (``em=mnist``: its search on). The errors are up to
rotation and a ``max_shift``-pixel shift (the issue's measure; ``error_shift/*``).

The table gives the median over ``--seeds`` (one micrograph each). ``--truth-start`` also runs the
prior run started from the true digit (``em.init=file``, the search's M-steps, no start from EM
without the prior) and counts the seeds where the default run's score (log-likelihood + gamma
log-prior) comes within 1 nat per 1,000 patches of it: the search reached the truth-started
basin. ``--pick`` adds posterior picking after EM (``pick=true``) and its F1 beside template
matching with the true digit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from tests.benchmarks.bench_picking import compose_reconstruct

L = 28


def simulate(digit: np.ndarray, copies: int, snr: float, seed: int, density: float = 0.1):
    """(micrograph (N, N), sigma, corners (copies, 2)): rot90 copies of ``digit`` (L, L), corners
    >= 2 L apart in rows or columns, white noise of SNR ``snr`` (||x||^2 / (L^2 sigma^2))."""
    side = digit.shape[0]
    N = math.ceil(math.sqrt(copies * side * side / density))
    rng = np.random.default_rng(seed)
    corners: list[tuple[int, int]] = []
    for _ in range(1000 * copies):
        if len(corners) == copies:
            break
        r, c = rng.integers(0, N - side + 1, size=2)
        if all(abs(r - a) >= 2 * side or abs(c - b) >= 2 * side for a, b in corners):
            corners.append((int(r), int(c)))
    else:
        raise RuntimeError(f"{copies} copies do not fit {N} x {N} at 2 L apart")
    clean = np.zeros((N, N))
    for r, c in corners:
        clean[r : r + side, c : c + side] += np.rot90(digit, int(rng.integers(4)))
    sigma = float(np.sqrt((digit**2).sum() / (side * side * snr)))
    return clean + sigma * rng.standard_normal((N, N)), sigma, np.array(corners)


def reconstruct_file(work: Path, name: str, micrograph, sigma: float, truth, overrides=()) -> dict:
    """``reconstruct`` on ``micrograph`` saved as a file, its summary.json as a dict (the run's
    progress bars go to ``<name>.log``)."""
    from tasks.reconstruct import reconstruct

    path, truth_path = work / f"{name}.npy", work / "truth.npy"
    np.save(path, micrograph)
    np.save(truth_path, truth)
    out = work / name
    cfg = compose_reconstruct(
        [
            f"paths.output_dir={out}", "measurement=file", f"measurement.path={path}",
            f"measurement.L={L}", f"measurement.sigma={sigma!r}",
            f"measurement.truth={truth_path}", *overrides,
        ]
    )  # fmt: skip
    with open(work / f"{name}.log", "w") as log, contextlib.redirect_stdout(log):
        reconstruct(cfg, out)
    path.unlink()  # (2,560 copies: 160 MB)
    return json.loads((out / "summary.json").read_text())


def best_score(summary: dict) -> float:
    return summary["runs"]["prior"]["score"]  # the estimate's, after any continuation


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--snr", type=float, nargs="+", default=[0.05, 0.02])
    p.add_argument("--copies", type=int, nargs="+", default=[160, 640, 2560])
    p.add_argument("--target", type=int, default=0, help="the held-out digit")
    p.add_argument("--seeds", type=int, nargs="+", default=[1], help="one micrograph each")
    p.add_argument("--truth-start", action="store_true", help="also EM from the true digit")
    p.add_argument("--pick", action="store_true", help="posterior picking after EM, its F1")
    p.add_argument("--override", nargs="*", default=[], help="reconstruct.py overrides")
    p.add_argument("--figure", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None, help="every row, one JSON per line")
    args = p.parse_args(argv)

    from tasks import inputs
    from tasks.settings import reconstruct_settings

    s = reconstruct_settings(compose_reconstruct(args.override))
    prior = inputs.load_prior(s, inputs.resolve_device("cpu"))
    truth = prior.target(args.target, 0)[0].numpy()
    rows, start = [], time.perf_counter()
    sink = open(args.json, "a") if args.json else None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for snr in args.snr:
            for copies in args.copies:
                for seed in args.seeds:
                    row = one(work, truth, snr, copies, seed, args)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if sink:
                        print(json.dumps(row), file=sink, flush=True)
    print(table(rows, args, (time.perf_counter() - start) / 60))
    if args.figure:
        figure(rows, args.figure)


def one(work: Path, truth, snr: float, copies: int, seed: int, args) -> dict:
    """One micrograph's runs: the default (with and without the prior) and, with
    ``--truth-start``, the prior run from the true digit."""
    micrograph, sigma, corners = simulate(truth, copies, snr, seed)
    D = (micrograph.shape[0] // L) ** 2  # the non-overlapping patches EM sees
    name = f"snr{snr:g}_copies{copies}_seed{seed}"
    over = [*args.override, *(["pick=true"] if args.pick else [])]
    summary = reconstruct_file(work, name, micrograph, sigma, truth, over)
    m, runs = summary["metrics"], summary["runs"]
    row = {
        "snr": snr, "copies": copies, "seed": seed, "N": micrograph.shape[0], "patches": D,
        "prior": m["error_shift/prior"], "no_prior": m["error_shift/no_prior"],
        "error_prior": m["error/prior"], "error_no_prior": m["error/no_prior"],
        "seconds_prior": m["seconds/prior"], "seconds_no_prior": m["seconds/no_prior"],
        "candidate": runs["prior"]["restart"], "scores": runs["prior"]["scores"],
    }  # fmt: skip
    if args.pick:
        row.update(pick_f1(work / name / "picks.star", micrograph, truth, corners))
    if args.truth_start:
        from_truth = reconstruct_file(
            work, f"{name}_truth_start", micrograph, sigma, truth,
            [*args.override, "em.init=file", f"em.init_file={work / 'truth.npy'}",
             "em.search_from_no_prior=false", "compare=false"],
        )  # fmt: skip
        row["truth_score"] = best_score(from_truth)
        row["truth_start"] = from_truth["metrics"]["error_shift/prior"]
        row["gap"] = row["truth_score"] - best_score(summary)
        row["found"] = row["gap"] <= D / 1000
    return row


def pick_f1(star: Path, micrograph, truth, corners) -> dict:
    """F1 (Hungarian within L / 2) of the run's posterior picks (``pick=true``: picks.star) and
    of template matching with the true digit at its noise threshold, the oracle."""
    import torch

    import mtd
    from mtd import picking

    centres = corners + (L - 1) / 2
    table = mtd.io.read_star(star)
    picks = np.stack([table["rlnCoordinateY"], table["rlnCoordinateX"]], 1)
    hits = int(picking.match(picks, centres, L / 2).sum())
    f1 = 2 * hits / (len(picks) + len(centres))
    tm = picking.template_match(micrograph, mtd.Rotations(L, 4), torch.from_numpy(truth.copy()))
    return {
        "pick_f1": f1,
        "picks": len(picks),
        "tm_true_f1": picking.picking_metrics(tm, centres)["f1"],
    }


def table(rows: list[dict], args, minutes: float) -> str:
    """Markdown: the median over seeds of each (SNR, copies)."""
    lines = [
        f"error up to rotation and a 3-pixel shift, held-out digit {args.target}, "
        f"{minutes:.1f} min",
        "| SNR | copies | without prior | with prior | prior s / no-prior s | kept |"
        + (" picking F1 / template F1 (true digit) |" if args.pick else "")
        + (" found (of seeds) | median gap (nats) |" if args.truth_start else ""),
        "|---|---|---|---|---|---|"
        + ("---|" if args.pick else "")
        + ("---|---|" if args.truth_start else ""),
    ]
    for snr in args.snr:
        for copies in args.copies:
            group = [r for r in rows if r["snr"] == snr and r["copies"] == copies]
            med = lambda k, group=group: float(np.median([r[k] for r in group]))  # noqa: E731
            cost = med("seconds_prior") / med("seconds_no_prior")
            kept = ",".join(str(r["candidate"]) for r in group)
            line = (
                f"| {snr:g} | {copies} | {med('no_prior'):.3f} | {med('prior'):.3f} | "
                f"{cost:.1f} | {kept} |"
            )
            if args.pick:
                line += f" {med('pick_f1'):.2f} / {med('tm_true_f1'):.2f} |"
            if args.truth_start:
                found = sum(r["found"] for r in group)
                line += f" {found} of {len(group)} | {med('gap'):.1f} |"
            lines.append(line)
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> None:
    """Error against copies, one panel per SNR, with and without the prior."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    snrs = sorted({r["snr"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(snrs), figsize=(4.5 * len(snrs), 3.6), squeeze=False)
    for ax, snr in zip(axes[0], snrs, strict=True):
        for key, label in (("no_prior", "without prior"), ("prior", "with prior")):
            by = {}
            for r in rows:
                if r["snr"] == snr:
                    by.setdefault(r["copies"], []).append(r[key])
            copies = sorted(by)
            ax.plot(copies, [np.median(by[c]) for c in copies], "o-", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("copies")
        ax.set_title(f"SNR {snr:g}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("error up to rotation and shift")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
