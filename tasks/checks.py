"""The reconstruction's run-level checks, made before any long work: the run directory, the
initial guess's scale, stochastic EM's patches per iteration; and the checkpoint's identity for
summary.json.

Each check names the key, the value and what is allowed. The types of the config's values are
``tasks.config``'s; the engine's own checks (``mtd``) are not repeated here: these are the ones
only the run can make, because they need the config.
"""

from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path

import numpy as np
import torch

from mtd.io.source import MicrographSource
from tasks.config import is_none

# check_scale: an initial guess peaking at more than this many times the measurement's peak is on
# another scale (a 0-255 digit against MNIST measurements at SNR 0.1-10: 45-200 times; the
# presets' guesses: below 1).
SCALE_RATIO = 10.0


def checkpoint_identity(ckpt) -> dict:
    """What summary.json records of the prior, so that report.py never averages runs of two
    different checkpoints: its path, size in bytes and SHA-256 (None for ckpt=none)."""
    if is_none(ckpt):
        return {"path": None}
    path = Path(str(ckpt))
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def check_run_dir(out: Path) -> None:
    """Refuse a run directory that already holds a finished run (its summary.json): a run never
    writes into another run's directory. A folder left by an interrupted run (no summary.json)
    is reused."""
    if (out / "summary.json").exists():
        raise ValueError(
            f"the run directory {out} already holds a finished run (summary.json); outputs never "
            "overwrite another run: point hydra.run.dir (or paths.output_dir) at a new folder, "
            "or delete that one"
        )


def check_scale(init: torch.Tensor, source: MicrographSource, what: str) -> float:
    """Warn when the initial guess is on another scale than the measurement (e.g. 0-255 grey
    levels against a measurement in [0, 1]): EM then starts, and often stays, far off.

    The measurement's scale is its largest absolute value over an evenly strided sample of at most
    about 10^6 pixels (memory-mapped files read only those); the guess's, its largest absolute
    value. The measurement's peak is at least about a copy's (copies plus noise), so a guess
    peaking at more than SCALE_RATIO times it is on another scale. A guess far below it is not
    flagged: at low SNR the noise alone makes the measurement's peak many times the image's.

    Returns:
        The ratio of the two peaks.
    """
    data = source[0]
    step = max(1, int(math.sqrt(data.shape[0] * data.shape[1] / 1e6)))
    sample = data[::step, ::step]
    sample = sample if torch.is_tensor(sample) else torch.from_numpy(np.array(sample))
    peak_data = float(sample.abs().max())
    peak_init = float(init.abs().max())
    ratio = peak_init / peak_data if peak_data > 0 else math.inf
    if ratio > SCALE_RATIO:
        print(
            f"warning: the initial guess ({what}) peaks at {peak_init:.4g}, the measurement at "
            f"{peak_data:.4g}: {ratio:.3g} times its scale; EM expects the guess in the "
            "measurement's units (images stored as 0-255 grey levels: divide by 255)",
            file=sys.stderr,
        )
    return ratio


def patch_count(source: MicrographSource, L: int) -> int:
    """D, the number of non-overlapping L x L patches of all the micrographs."""
    return sum((n0 // L) * (n1 // L) for n0, n1 in source.shapes)


def check_stochastic(fraction: float, least: int, D: int) -> None:
    """Warn when stochastic EM draws fewer patches per iteration than ``stochastic_min_patches``.

    Measured (docs/benchmarks.md): em=mnist at SNR 1 on 121 patches, 40 stochastic iterations and
    a polish of 10, three targets: with 12, 24 or 36 patches per iteration the estimate with the
    prior ends worse than its initial guess for some target (at 12: 1.11 and 1.25 against 0.78
    and 0.82); from 60 on every target ends below its initial guess, and from 85 on within 0.01
    of EM on all patches.
    """
    if fraction == 1 or not 0 < fraction < 1:  # off, or refused with its message by mtd
        return
    per_iteration = round(fraction * D)
    if per_iteration < least:
        print(
            f"warning: em.stochastic={fraction:g} draws {per_iteration} of the measurement's {D} "
            f"patches per iteration; below {least} (stochastic_min_patches) stochastic EM was "
            f"measured to end worse than its initial guess: use em.stochastic >= "
            f"{min(1.0, math.ceil(100 * least / D) / 100):g} (1: off) on data this small",
            file=sys.stderr,
        )
