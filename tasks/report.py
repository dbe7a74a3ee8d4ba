"""Collect reconstruction runs into the paper's table and figures: ``python report.py DIR ...``.

Reads every ``summary.json`` under the given folders (the sweep folders of
``python reconstruct.py -m experiment=...``), prints the mean relative error ± its standard
deviation per experiment (everything in a run's config but the target, the SNR, the noise seed and
where files go; the checkpoint by its size and hash), SNR and variant (with / without prior) as a
Markdown table with the number of distinct targets and of runs, and writes into the first folder
``errors.png`` (mean error against SNR, as Figs. 3 and 4 of the score-prior paper) and
``estimates_<preset>_snr<S>.png`` (truth / without / with prior for every target at one SNR, as
Fig. 5).

Runs of the steerable basis (``em=steerable``, the approximate-EM paper's experiments) also get
that paper's figures, one per quantity a sweep varies with the rest held: against the SNR
(Fig. 2, ``experiment=steerable_snr``, with the paper's stored values beside ours), against the
measurement size N^2 (Fig. 3, ``experiment=steerable_size``, with the fitted log-log slopes of
error and time, the paper's -1/2 and 1) and against K, the rotations EM searches (Fig. 4,
``experiment=steerable_K``): tables of the mean error and time of EM (and of the autocorrelation
baseline where the runs recorded ``error/autocorrelation``) and ``steerable_<snr|N|K>.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import mtd
from tasks.report_steerable import steerable_report
from tasks.runs import experiment_names, load_runs, run_group


def variant_label(variant: str) -> str:
    """The table's prior column: with / without for EM's variants, the method's name for the
    rest (e.g. the autocorrelation baseline)."""
    return {"prior": "with", "no_prior": "without"}.get(variant, variant)


def table(runs: list[dict], key: str = "errors") -> tuple[str, dict]:
    """Markdown table of mean errors +- their standard deviation over runs, one row per
    experiment and variant, and the means {(experiment name, variant): {snr: mean}}.

    The targets column counts distinct targets (a target run twice, e.g. with another noise
    seed, is one target); the runs column counts runs.
    """
    names = experiment_names(runs)
    cells = defaultdict(lambda: defaultdict(list))
    targets = defaultdict(lambda: defaultdict(set))
    for r in runs:
        for variant, e in r[key].items():
            row = (names[r["experiment"]], variant)
            cells[row][r["snr"]].append(e)
            targets[row][r["snr"]].add((r["target"], r["index"]))
    snrs = sorted({r["snr"] for r in runs})
    means = {k: {snr: float(np.mean(v)) for snr, v in by.items()} for k, by in cells.items()}
    # Standard deviation over the runs of a cell (ddof = 1; a single run has none).
    spread = {
        k: {snr: float(np.std(v, ddof=1)) if len(v) > 1 else None for snr, v in by.items()}
        for k, by in cells.items()
    }
    lines = [
        "| experiment | prior | " + " | ".join(f"SNR {s:g}" for s in snrs) + " | targets | runs |",
        "|---|---|" + "---|" * len(snrs) + "---|---|",
    ]
    for (name, variant), by in sorted(cells.items()):
        row = []
        for s in snrs:
            if s not in by:
                row.append("-")
                continue
            sd = spread[(name, variant)][s]
            row.append(f"{means[(name, variant)][s]:.3f}" + ("" if sd is None else f" ± {sd:.3f}"))
        n_targets = sorted({len(t) for t in targets[(name, variant)].values()})
        n_runs = sorted({len(v) for v in by.values()})
        lines.append(
            f"| {name} | {variant_label(variant)} | "
            + " | ".join(row)
            + f" | {'/'.join(map(str, n_targets))} | {'/'.join(map(str, n_runs))} |"
        )
    return "\n".join(lines), means


def plot_errors(means: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for (preset, variant), by in sorted(means.items()):
        snrs = sorted(by)
        label = f"{preset}, " + (
            f"{variant_label(variant)} prior" if variant in ("prior", "no_prior") else variant
        )
        ax.plot(snrs, [by[s] for s in snrs], "o-" if variant == "prior" else "s--", label=label)
    ax.set_xlabel("SNR")
    ax.set_ylabel("mean relative error")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_estimates(runs: list[dict], snr: float, name: str, path: Path) -> None:
    """Rows truth / without / with prior, one column per run of experiment ``name`` (as
    ``experiment_names`` calls it) at ``snr``, each estimate at the element of its run's group
    that its error is measured at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = experiment_names(runs)
    chosen = sorted(
        (r for r in runs if r["snr"] == snr and names[r["experiment"]] == name),
        key=lambda r: r["index"],
    )
    if not chosen:
        return
    rows = ["truth", "no_prior", "prior"]
    fig, axes = plt.subplots(3, len(chosen), figsize=(1.2 * len(chosen), 3.9), squeeze=False)
    for j, r in enumerate(chosen):
        truth = torch.from_numpy(np.load(r["folder"] / "truth.npy"))
        group = run_group(r["config"], truth.shape[-1])
        for i, name in enumerate(rows):
            ax = axes[i, j]
            ax.axis("off")
            file = r["folder"] / ("truth.npy" if name == "truth" else f"estimate_{name}.npy")
            if not file.is_file():
                continue
            img = torch.from_numpy(np.load(file)).double()
            # A non-image unknown (basis coefficients) is written already aligned to the truth
            # (reconstruct.py); images are aligned here.
            if name != "truth" and tuple(group.shape) == tuple(truth.shape):
                img = mtd.align(truth, img, group=group)
            ax.imshow(img.numpy(), cmap="gray")
            if j == 0:
                ax.set_title(name.replace("_", " "), fontsize=8, loc="left")
    fig.suptitle(f"{name}, SNR {snr:g}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python report.py", description=__doc__.splitlines()[0])
    p.add_argument(
        "folders", type=Path, nargs="+", help="sweep folders holding summary.json files"
    )
    p.add_argument(
        "--snr", type=float, default=None, help="SNR of the estimates figure (default: highest)"
    )
    args = p.parse_args(argv)
    missing = [str(f) for f in args.folders if not f.is_dir()]
    if missing:
        p.error(f"not folders: {', '.join(missing)}")
    runs, skipped = load_runs(args.folders)
    left_out = "; ".join(f"{len(v)} {why}" for why, v in skipped.items())
    if not runs:
        p.error(
            "nothing to tabulate: no simulated run with errors under the given folders"
            + (f" (left out: {left_out})" if left_out else " (no summary.json found)")
        )
    text, means = table(runs)
    seconds = sum(r["seconds"] for r in runs)
    print(
        "Mean relative error (the paper's: minimised over each run's group, em/group and em.K)\n"
    )
    print(text)
    print("\n(mean ± standard deviation over the runs of each cell)")
    if all(r["shifted"] for r in runs):
        shift = json.loads((runs[0]["folder"] / "summary.json").read_text())["config"]["max_shift"]
        print(f"\nMinimised over the group and translations by up to {shift} pixels\n")
        print(table(runs, "shifted")[0])
    print(f"\n{len(runs)} runs, {seconds:.0f} s of EM in all")
    if left_out:
        print(f"left out: {left_out}")
    out = args.folders[0]
    plot_errors(means, out / "errors.png")
    snr = args.snr if args.snr is not None else max(r["snr"] for r in runs)
    names = experiment_names(runs)
    for preset in sorted({r["preset"] for r in runs}):
        # One figure per experiment; a preset run as several experiments gets them numbered.
        chosen = sorted({names[r["experiment"]] for r in runs if r["preset"] == preset})
        for j, name in enumerate(chosen):
            stem = preset if len(chosen) == 1 else f"{preset}_{j}"
            path = out / f"estimates_{stem}_snr{snr:g}.png"
            plot_estimates(runs, snr, name, path)
            if len(chosen) > 1:
                print(f"{path.name}: {name}")
    print(f"figures: {out / 'errors.png'}, {out}/estimates_*_snr{snr:g}.png")
    figures = steerable_report(runs, out)
    if figures:
        print("the approximate-EM paper's figures: " + ", ".join(str(f) for f in figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
