"""Collect reconstruction runs into the paper's table and figures: ``python report.py DIR ...``.

Reads every ``summary.json`` under the given folders (the sweep folders of
``python reconstruct.py -m experiment=...``), prints the mean relative error per preset, SNR and
variant (with / without prior) as a Markdown table, and writes into the first folder
``errors.png`` (mean error against SNR, as Figs. 3 and 4 of the score-prior paper) and
``estimates_<preset>_snr<S>.png`` (truth / without / with prior for every target at one SNR, as
Fig. 5).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate

import mtd


def run_group(cfg: dict, L: int) -> mtd.TransformSet:
    """The transformations a run searched, from its summary's config (em.group, em.K).

    Summaries written before em.group existed searched the rotations of measurement.K (4 when
    absent).
    """
    em = cfg["em"]
    if "group" in em:
        return instantiate(em["group"])(L)
    return mtd.Rotations(L, int(cfg["measurement"].get("K", 4)))


def load_runs(folders: list[Path]) -> list[dict]:
    """One dict per run: preset, snr, index, errors {variant: e}, seconds, folder, config."""
    runs, seen = [], set()
    for folder in folders:
        for path in sorted(folder.rglob("summary.json")):
            if path.resolve() in seen:  # overlapping folders: count each run once
                continue
            seen.add(path.resolve())
            s = json.loads(path.read_text())
            cfg, m = s["config"], s["metrics"]
            errors = {
                k[6:]: v for k, v in m.items() if k.startswith("error/") and k != "error/init"
            }
            if not errors:
                continue
            shifted = {k[12:]: v for k, v in m.items() if k.startswith("error_shift/")}
            runs.append(
                {
                    "preset": cfg["em"]["name"] + (" (oracle)" if cfg.get("oracle") else ""),
                    "snr": float(s["measurement"]["snr"]),
                    "index": int(cfg["measurement"]["index"]),
                    "errors": errors,
                    "shifted": shifted,
                    "seconds": sum(v for k, v in m.items() if k.startswith("seconds/")),
                    "folder": path.parent,
                    "config": cfg,
                }
            )
    return runs


def table(runs: list[dict], key: str = "errors") -> tuple[str, dict]:
    """Markdown table of mean errors and the means themselves {(preset, variant): {snr: mean}}."""
    cells = defaultdict(lambda: defaultdict(list))
    for r in runs:
        for variant, e in r[key].items():
            cells[(r["preset"], variant)][r["snr"]].append(e)
    snrs = sorted({r["snr"] for r in runs})
    means = {key: {snr: float(np.mean(v)) for snr, v in by.items()} for key, by in cells.items()}
    lines = [
        "| preset | prior | " + " | ".join(f"SNR {s:g}" for s in snrs) + " | targets |",
        "|---|---|" + "---|" * len(snrs) + "---|",
    ]
    for (preset, variant), by in sorted(cells.items()):
        row = [f"{means[(preset, variant)][s]:.3f}" if s in by else "-" for s in snrs]
        n = sorted({len(v) for v in by.values()})
        lines.append(
            f"| {preset} | {'with' if variant == 'prior' else 'without'} | "
            + " | ".join(row)
            + f" | {'/'.join(map(str, n))} |"
        )
    return "\n".join(lines), means


def plot_errors(means: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for (preset, variant), by in sorted(means.items()):
        snrs = sorted(by)
        label = f"{preset}, {'with' if variant == 'prior' else 'without'} prior"
        ax.plot(snrs, [by[s] for s in snrs], "o-" if variant == "prior" else "s--", label=label)
    ax.set_xlabel("SNR")
    ax.set_ylabel("mean relative error")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_estimates(runs: list[dict], snr: float, preset: str, path: Path) -> None:
    """Rows truth / without / with prior, one column per target, each estimate at the element of
    its run's group that its error is measured at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = sorted(
        (r for r in runs if r["snr"] == snr and r["preset"] == preset), key=lambda r: r["index"]
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
            if name != "truth":
                img = mtd.align(truth, img, group=group)
            ax.imshow(img.numpy(), cmap="gray")
            if j == 0:
                ax.set_title(name.replace("_", " "), fontsize=8, loc="left")
    fig.suptitle(f"{preset}, SNR {snr:g}", fontsize=9)
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
    runs = load_runs(args.folders)
    if not runs:
        p.error(
            "no summary.json with errors under the given folders (only simulated runs have them)"
        )
    text, means = table(runs)
    seconds = sum(r["seconds"] for r in runs)
    print(
        "Mean relative error (the paper's: minimised over each run's group, em/group and em.K)\n"
    )
    print(text)
    if all(r["shifted"] for r in runs):
        shift = json.loads((runs[0]["folder"] / "summary.json").read_text())["config"]["max_shift"]
        print(f"\nMinimised over the group and translations by up to {shift} pixels\n")
        print(table(runs, "shifted")[0])
    print(f"\n{len(runs)} runs, {seconds:.0f} s of EM in all")
    out = args.folders[0]
    plot_errors(means, out / "errors.png")
    snr = args.snr if args.snr is not None else max(r["snr"] for r in runs)
    for preset in sorted({r["preset"] for r in runs}):
        plot_estimates(runs, snr, preset, out / f"estimates_{preset}_snr{snr:g}.png")
    print(f"figures: {out / 'errors.png'}, {out}/estimates_*_snr{snr:g}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
