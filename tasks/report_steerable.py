"""The approximate-EM paper's Figures 2-4 from runs of the steerable basis (``em=steerable``):
error and time against the SNR (Fig. 2, with the paper's stored values beside ours), against
the measurement size N^2 (Fig. 3, with the fitted log-log slopes) and against K, the rotations
EM searches (Fig. 4): tables and ``steerable_<snr|N|K>.png`` (``tasks.report``)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from tasks.config import is_none
from tasks.runs import _flatten, experiment_names

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
