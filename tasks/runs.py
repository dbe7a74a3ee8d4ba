"""The runs of sweeps: every ``summary.json`` under some folders, read into the rows of the
tables, each with the experiment it belongs to (everything in its config but the target, the
SNR, the noise draw, where files go and the logger; the checkpoint by its size and hash)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from hydra.utils import instantiate

import mtd
from tasks.config import is_none

# Where the factories of configs/em/group/ lived when older runs were recorded: their summaries
# name them so, and their runs are the same experiments as today's.
LEGACY_TARGETS = {
    "mtd.steerable.steerable": "mtd.groups.steerable",
    "mtd.projection.projections": "mtd.groups.projections",
}


def canonical(value):
    """A config (dict) with every ``_target_`` under today's name (``LEGACY_TARGETS``)."""
    if isinstance(value, dict):
        return {
            k: LEGACY_TARGETS.get(v, v) if k == "_target_" else canonical(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


def run_group(cfg: dict, L: int) -> mtd.TransformSet:
    """The transformations a run searched, from its summary's config (em.group, em.K).

    Summaries written before em.group existed searched the rotations of measurement.K (4 when
    absent).
    """
    em = canonical(cfg["em"])
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


def recorded_checkpoint(cfg: dict, summary: dict) -> dict:
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
    cfg = canonical(cfg)
    kept = {k: v for k, v in cfg.items() if k not in NOT_THE_EXPERIMENT and k not in PER_RUN[""]}
    kept["measurement"] = {
        k: v for k, v in cfg.get("measurement", {}).items() if k not in PER_RUN["measurement"]
    }
    if not is_none(kept.get("ckpt")):
        kept["measurement"].pop("reference_ckpt", None)  # only used with ckpt=none
    kept["ckpt"] = recorded_checkpoint(cfg, summary)
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
