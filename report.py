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
from hydra.utils import instantiate

import mtd
from run_checks import is_none


def run_group(cfg: dict, L: int) -> mtd.TransformSet:
    """The transformations a run searched, from its summary's config (em.group, em.K).

    Summaries written before em.group existed searched the rotations of measurement.K (4 when
    absent).
    """
    em = cfg["em"]
    if "group" in em:
        return instantiate(em["group"])(L)
    return mtd.Rotations(L, int(cfg["measurement"].get("K", 4)))


# Keys that vary from target to target (or from noise draw to noise draw) inside one experiment;
# every other config value defines the experiment. Where files go and how W&B logs are no part of
# it either.
PER_RUN = {"measurement": ("index", "snr", "seed", "save"), "": ("seed", "tags", "image_every")}
NOT_THE_EXPERIMENT = (
    "paths",
    "logger",
    "hydra",
    "launcher",
    "device",
    "crop",
    "task_name",
    "stochastic_min_patches",  # a warning's threshold, not the experiment
    "pick",  # picking and denoising after EM leave its estimate as it is
    "picking",
    "denoise",
    "denoising",
)


def checkpoint_identity(cfg: dict, summary: dict) -> dict:
    """Which prior a run used: its path and, where recorded (or still on disk), size and hash."""
    if "checkpoint" in summary:  # recorded by reconstruct.py when the run started
        return summary["checkpoint"]
    ckpt = cfg.get("ckpt")
    if is_none(ckpt):
        return {"path": None}
    path = Path(str(ckpt))
    return {"path": str(ckpt), "bytes": path.stat().st_size if path.is_file() else None}


def experiment_key(cfg: dict, summary: dict) -> str:
    """Everything in a run's config that defines its experiment, as canonical JSON: all of it but
    the target (measurement.index), the SNR (the table's column), the noise draw, where files go
    and the logger; with the checkpoint's identity instead of its path alone."""
    kept = {k: v for k, v in cfg.items() if k not in NOT_THE_EXPERIMENT and k not in PER_RUN[""]}
    kept["measurement"] = {
        k: v for k, v in cfg.get("measurement", {}).items() if k not in PER_RUN["measurement"]
    }
    if not is_none(kept.get("ckpt")):
        kept["measurement"].pop("reference_ckpt", None)  # only used with ckpt=none
    kept["ckpt"] = checkpoint_identity(cfg, summary)
    em = kept.get("em")
    if isinstance(em, dict) and is_none(em.get("refine_K")):  # no refinement: as before the keys
        kept["em"] = em = {
            k: v for k, v in em.items() if k not in ("refine_K", "refine_iterations")
        }
    m_step = em.get("m_step") if isinstance(em, dict) else None
    if isinstance(m_step, dict):  # its seed is the run's; no completions: as before the key
        drop = ("seed",) + (("complete_draws",) if m_step.get("complete_draws") == 0 else ())
        kept["em"] = {**em, "m_step": {k: v for k, v in m_step.items() if k not in drop}}
    return json.dumps(kept, sort_keys=True, default=str)


def load_runs(folders: list[Path]) -> tuple[list[dict], dict]:
    """One dict per simulated run with errors: preset, snr, index, target, experiment (key),
    errors {variant: e}, shifted, seconds, folder, config.

    Returns:
        (runs, skipped): skipped counts the summaries left out, by reason.
    """
    runs, seen, skipped = [], set(), defaultdict(list)
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
                skipped["no truth, so no errors"].append(path.parent)
                continue
            if "snr" not in s["measurement"]:  # a measurement file with a truth image
                skipped["measurement=file (no SNR to tabulate it under)"].append(path.parent)
                continue
            shifted = {k[12:]: v for k, v in m.items() if k.startswith("error_shift/")}
            runs.append(
                {
                    "preset": cfg["em"]["name"] + (" (oracle)" if cfg.get("oracle") else ""),
                    "snr": float(s["measurement"]["snr"]),
                    "index": int(cfg["measurement"]["index"]),
                    "target": json.dumps(s["measurement"].get("target"), default=str),
                    "experiment": experiment_key(cfg, s),
                    "errors": errors,
                    "shifted": shifted,
                    "seconds": sum(v for k, v in m.items() if k.startswith("seconds/")),
                    "times": {k[8:]: v for k, v in m.items() if k.startswith("seconds/")},
                    "iterations": {k[11:]: v for k, v in m.items() if k.startswith("iterations/")},
                    "N": s["measurement"].get("N"),
                    "folder": path.parent,
                    "config": cfg,
                }
            )
    return runs, dict(skipped)


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def _short(value) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 40 else "..." + text[-37:]


def experiment_names(runs: list[dict]) -> dict[str, str]:
    """{experiment key: its name}: the preset, and where two experiments share a preset the
    config values that tell them apart (e.g. ``ckpt.bytes=320608``)."""
    by_preset = defaultdict(set)
    for r in runs:
        by_preset[r["preset"]].add(r["experiment"])
    names = {}
    for preset, keys in by_preset.items():
        if len(keys) == 1:
            names[next(iter(keys))] = preset
            continue
        flat = {k: _flatten(json.loads(k)) for k in keys}
        fields = sorted(set().union(*flat.values()))
        differ = [f for f in fields if len({_short(flat[k].get(f)) for k in keys}) > 1]
        for k in keys:
            shown = ", ".join(f"{f}={_short(flat[k].get(f))}" for f in differ[:3])
            names[k] = f"{preset} ({shown}{', ...' if len(differ) > 3 else ''})"
    return names


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


# ------------------------------------------------------------------------------------------------
# The approximate-EM paper's Figures 2-4 (runs of the steerable basis, em=steerable)
# ------------------------------------------------------------------------------------------------
# Its Fig. 2 as stored with the paper: mean error of 40 trials at these SNRs (L = 5, 10
# Fourier-Bessel coefficients, density 0.04, continuous angles, K = 8, N = 2500, EM started from
# the autocorrelation estimate).
PAPER_FIG2_SNR = (1.0, 1.4, 2.0, 2.9, 4.1, 5.8, 8.3, 17.0)
PAPER_FIG2 = {
    "EM": (0.220, 0.145, 0.083, 0.031, 0.021, 0.019, 0.020, 0.023),
    "autocorrelation": (0.253, 0.189, 0.137, 0.077, 0.058, 0.056, 0.038, 0.025),
}
# The quantities the paper's figures sweep: the SNR (Fig. 2), the measurement side N (Fig. 3,
# plotted against N^2) and K, the rotations EM searches (Fig. 4).
AXES = ("snr", "N", "K")
AXIS_TITLE = {"snr": "SNR", "N": "N^2", "K": "K"}
# Where each axis lives in a run's config (em.group.K is em.K's interpolation).
AXIS_KEYS = {"N": (("measurement", "N"),), "K": (("em", "K"), ("em", "group", "K"))}


def is_steerable(cfg: dict) -> bool:
    """Whether a run searched the steerable basis's exact rotations (em=steerable)."""
    group = cfg.get("em", {}).get("group", {})
    return isinstance(group, dict) and "steerable" in str(group.get("_target_", ""))


def axis_values(run: dict) -> dict:
    """{"snr", "N", "K"} of one run: its SNR, measurement side and the rotations EM searched."""
    return {"snr": run["snr"], "N": int(run["N"]), "K": int(run["config"]["em"]["K"])}


# Config keys added after runs were recorded, with the value that keeps the old behaviour: a run
# without the key and one with this value did the same thing (null and false are such values for
# every key).
ADDED_KEY_DEFAULTS = {"em.group.selection": "lambda", "em.refine_iterations": 50}


# What decides a steerable run's estimate and error (the rest, e.g. the W&B group that names the
# sweep or particle picking after EM, does not).
EXPERIMENT_KEYS = ("measurement", "em", "autocorrelation", "ac", "ckpt", "oracle", "dtype")


def base_key(run: dict) -> str:
    """The part of the run's experiment key that decides its estimate (``EXPERIMENT_KEYS``),
    without the swept sizes (measurement.N, em.K): runs that differ only in the axes of
    Figs. 2-4 share it, whichever sweep ran them. Settings that were off (null, false,
    ``ADDED_KEY_DEFAULTS``) are left out, so runs recorded before such a key existed match the
    runs after; so is the autocorrelation baseline's fit (``autocorrelation``, ``ac.*``) unless EM
    started from it, since EM from other starts does not depend on it."""
    kept = {k: v for k, v in json.loads(run["experiment"]).items() if k in EXPERIMENT_KEYS}
    for keys in AXIS_KEYS.values():
        for path in keys:
            node = kept
            for k in path[:-1]:
                node = node.get(k, {}) if isinstance(node, dict) else {}
            if isinstance(node, dict):
                node.pop(path[-1], None)
    if kept.get("em", {}).get("init") != "autocorrelation":
        # The baseline's fit (autocorrelation=true, ac.*) leaves EM from other starts as it was.
        kept.pop("ac", None)
        kept.pop("autocorrelation", None)
    flat = {
        k: v
        for k, v in _flatten(kept).items()
        if v is not None and v is not False and ADDED_KEY_DEFAULTS.get(k, ()) != v
    }
    return json.dumps(flat, sort_keys=True, default=str)


def loglog_slope(x, y) -> float:
    """Least-squares slope b of log y = a + b log x (the paper's -1/2 for the error against N^2,
    1 for the time)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or np.any(x <= 0) or np.any(y <= 0):
        raise ValueError(f"a log-log slope needs >= 2 positive points, got x={x}, y={y}")
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def method_label(variant: str) -> str:
    return {"no_prior": "EM", "prior": "EM + prior"}.get(variant, variant)


def steerable_sweeps(runs: list[dict]) -> list[dict]:
    """The sweeps of Figs. 2-4 among ``runs``: for each axis (snr, N, K) and each set of values of
    the other two, the steerable runs there when they take >= 2 values of the axis.

    Returns:
        One dict per sweep: axis, held {other axis: value}, columns [(experiment name, variant)],
        cells {axis value: {column: [run, ...]}}.
    """
    chosen = [r for r in runs if is_steerable(r["config"])]
    if not chosen:
        return []
    # Experiments told apart by what is left when the axes are taken out (e.g. em.init).
    names = experiment_names([{**r, "experiment": base_key(r)} for r in chosen])
    sweeps = []
    for axis in AXES:
        held = defaultdict(list)
        for r in chosen:
            v = axis_values(r)
            held[tuple((a, v[a]) for a in AXES if a != axis)].append(r)
        for key, group in sorted(held.items()):
            if len({axis_values(r)[axis] for r in group}) < 2:
                continue
            cells = defaultdict(lambda: defaultdict(list))
            for r in group:
                for variant in r["errors"]:
                    column = (names[base_key(r)], variant)
                    cells[axis_values(r)[axis]][column].append(r)
            # EM's variants first, then the baselines (autocorrelation).
            order = {"no_prior": 0, "prior": 1}
            columns = sorted(
                {c for by in cells.values() for c in by},
                key=lambda c: (c[0], order.get(c[1], 2), c[1]),
            )
            sweeps.append(
                {"axis": axis, "held": dict(key), "columns": columns, "cells": dict(cells)}
            )
    return sweeps


def _column_title(column, columns) -> str:
    name, variant = column
    several = len({c[0] for c in columns}) > 1
    return f"{name}: {method_label(variant)}" if several else method_label(variant)


def _mean_sd(values) -> str:
    if not values:
        return "-"
    sd = f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""
    return f"{np.mean(values):.3f}{sd}"


def sweep_means(sweep: dict) -> dict:
    """{column: {"x": axis values, "error": means, "seconds": means}} over the runs of each cell
    (x is N^2 for the N axis)."""
    out = {}
    for column in sweep["columns"]:
        xs = sorted(v for v, by in sweep["cells"].items() if by.get(column))
        rs = [sweep["cells"][v][column] for v in xs]
        out[column] = {
            "x": [v * v if sweep["axis"] == "N" else v for v in xs],
            "error": [float(np.mean([r["errors"][column[1]] for r in c])) for c in rs],
            "seconds": [
                float(np.mean([r["times"].get(column[1], np.nan) for r in c])) for c in rs
            ],
        }
    return out


def refined(sweeps: list[dict]) -> str:
    """The title suffix ", refined at K = k" when every run of the sweeps refined there
    (em.refine_K), else nothing."""
    runs = [r for sw in sweeps for by in sw["cells"].values() for rs in by.values() for r in rs]
    ks = {r["config"]["em"].get("refine_K") for r in runs}
    return f", refined at K = {ks.pop()}" if len(ks) == 1 and not is_none(next(iter(ks))) else ""


def sweep_table(sweep: dict) -> str:
    """Markdown table of one sweep: per axis value the mean error ± its standard deviation over
    the runs of every method (and for the N and K axes its mean wall time and, for EM, seconds
    per iteration), the runs per cell, and for the SNR axis the paper's stored Fig. 2 values;
    under it, for the N axis, the log-log slopes of error and time against N^2 (the paper: -1/2
    and 1) and, for the K axis, of time against K (the paper: 1)."""
    axis, columns = sweep["axis"], sweep["columns"]
    timed = axis in ("N", "K")
    paper = axis == "snr"  # beside ours whatever our K and N (its K = 8, N = 2500)
    head = [AXIS_TITLE[axis] if axis != "N" else "N (N^2)"]
    for c in columns:
        title = _column_title(c, columns)
        head.append(f"{title} error")
        if timed:
            head.append(f"{title} seconds" + (" (s/it)" if c[1] in ("no_prior", "prior") else ""))
    if paper:
        head += ["paper EM (K = 8, N = 2500)", "paper autocorrelation"]
    head.append("runs")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in sorted(sweep["cells"]):
        by = sweep["cells"][v]
        row = [f"{v} ({v * v:.3g})" if axis == "N" else f"{v:g}"]
        for c in columns:
            rs = by.get(c, [])
            row.append(_mean_sd([r["errors"][c[1]] for r in rs]))
            if timed:
                secs = [r["times"][c[1]] for r in rs if c[1] in r["times"]]
                cell = f"{np.mean(secs):.1f}" if secs else "-"
                its = [r["iterations"].get(c[1]) for r in rs if c[1] in r["times"]]
                if secs and c[1] in ("no_prior", "prior") and all(its):
                    cell += f" ({np.mean([s / i for s, i in zip(secs, its, strict=True)]):.3f})"
                row.append(cell)
        if paper:
            hit = [i for i, s in enumerate(PAPER_FIG2_SNR) if abs(s - v) < 1e-9]
            for method in ("EM", "autocorrelation"):
                row.append(f"{PAPER_FIG2[method][hit[0]]:.3f}" if hit else "-")
        row.append("/".join(str(len(by.get(c, []))) for c in columns))
        lines.append("| " + " | ".join(row) + " |")
    held = ", ".join(f"{'SNR' if a == 'snr' else a} = {x:g}" for a, x in sweep["held"].items())
    text = [f"Against {AXIS_TITLE[axis]} ({held}{refined([sweep])})", "", *lines]
    means = sweep_means(sweep)
    if axis in ("N", "K"):
        slopes = []
        for c in columns:
            m = means[c]
            if len(m["x"]) < 2:
                continue
            parts = []
            if axis == "N":
                parts.append(f"error {loglog_slope(m['x'], m['error']):+.2f} (paper: -1/2)")
            # (The autocorrelation analysis takes every angle: its time has no K to follow.)
            no_k = axis == "K" and c[1] == "autocorrelation"
            if all(np.isfinite(m["seconds"])) and min(m["seconds"]) > 0 and not no_k:
                parts.append(f"time {loglog_slope(m['x'], m['seconds']):+.2f} (paper: 1)")
            if parts:
                slopes.append(f"{_column_title(c, columns)}: " + ", ".join(parts))
        if slopes:
            text += ["", f"log-log slopes against {AXIS_TITLE[axis]}: " + "; ".join(slopes)]
    return "\n".join(text)


def plot_sweep(sweep: dict | list[dict], path: Path) -> None:
    """The paper's figure of one sweep: error against the SNR with its stored Fig. 2 values
    (Fig. 2); error and time against N^2 with slopes -1/2 and 1 drawn dashed (Fig. 3); error and
    time against K, the autocorrelation baseline as horizontal lines (Fig. 4). Log-log axes.
    Several sweeps of one axis (e.g. the SNR sweep at K = 8 and 16) are drawn together, each
    labelled with the values it holds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    together = sweep if isinstance(sweep, list) else [sweep]
    sweep = together[0]
    axis, columns, means = sweep["axis"], sweep["columns"], sweep_means(sweep)
    panels = ("error",) if axis == "snr" else ("error", "seconds")
    paper = axis == "snr"  # Fig. 2 (its K = 8, N = 2500) beside ours
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, quantity in zip(axes[0], panels, strict=True):
        for one in together:
            prefix = ""
            if len(together) > 1:
                prefix = ", ".join(f"{a} = {x:g}" for a, x in one["held"].items()) + ": "
            one_means = sweep_means(one)
            for c in one["columns"]:
                m = one_means[c]
                label = prefix + _column_title(c, one["columns"]) + " (ours)"
                if axis == "K" and c[1] == "autocorrelation":  # takes all angles: no K
                    ax.axhline(np.nanmean(m[quantity]), color="r", ls="--", label=label)
                    continue
                ax.plot(m["x"], m[quantity], "o-", label=label)
        if paper:
            for method, style in (("EM", "k^--"), ("autocorrelation", "rv--")):
                ax.plot(
                    PAPER_FIG2_SNR,
                    PAPER_FIG2[method],
                    style,
                    label=f"paper {method} (K = 8, N = 2500)",
                )
        if axis == "N":  # the paper's reference slopes through the first method's middle point
            m = means[columns[0]]
            x, y = np.asarray(m["x"], float), np.asarray(m[quantity], float)
            if len(x) and np.all(np.isfinite(y)):
                slope = -0.5 if quantity == "error" else 1.0
                x0, y0 = np.exp(np.mean(np.log(x))), np.exp(np.mean(np.log(y)))
                ax.plot(x, y0 * (x / x0) ** slope, "k--", lw=1, label=f"slope {slope:g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        # The swept values themselves as the ticks (N^2 for the N axis).
        ticks = sorted(set(sweep["cells"]) | (set(PAPER_FIG2_SNR) if paper else set()))
        ticks = [t * t for t in ticks] if axis == "N" else ticks
        ax.set_xticks(ticks, [f"{t:.3g}" if axis == "N" else f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel(AXIS_TITLE[axis])
        ax.set_ylabel(
            "mean relative error (eq. 19)" if quantity == "error" else "mean wall seconds per run"
        )
        ax.legend(fontsize=7)
    common = {a: x for a, x in sweep["held"].items() if all(o["held"][a] == x for o in together)}
    held = ", ".join(f"{'SNR' if a == 'snr' else a} = {x:g}" for a, x in common.items())
    fig.suptitle(f"against {AXIS_TITLE[axis]} ({held}{refined(together)})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def steerable_report(runs: list[dict], out: Path) -> list[Path]:
    """Print the tables of the paper's Figs. 2-4 for the steerable sweeps among ``runs`` and
    write their figures ``steerable_<axis>.png`` (numbered where one axis has several, the SNR
    sweeps also drawn together in ``steerable_snr.png``) into ``out``.

    Returns:
        The figures written.
    """
    sweeps = steerable_sweeps(runs)
    written = []
    for axis in AXES:
        mine = [s for s in sweeps if s["axis"] == axis]
        for j, sweep in enumerate(mine):
            print("\n" + sweep_table(sweep))
            path = out / (
                f"steerable_{axis}.png" if len(mine) == 1 else f"steerable_{axis}_{j}.png"
            )
            plot_sweep(sweep, path)
            written.append(path)
        if axis == "snr" and len(mine) > 1:  # e.g. K = 8 and K = 16 in one Fig. 2
            plot_sweep(mine, out / "steerable_snr.png")
            written.append(out / "steerable_snr.png")
    return written


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
