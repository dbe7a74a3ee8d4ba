"""Pick particles in a micrograph: ``python pick.py micrograph=PATH estimate=PATH [method=...]``.

Hydra composes ``configs/pick.yaml``; ``pick(cfg)`` does the work and can be called from tests.
With ``method=posterior`` the patches' posteriors under the estimate give the picks (the
stochastic-EM paper, Section IV-B, ``mtd.picking.pick_posterior``: by default the evidence of
the patches a copy touches added up, ``combine=nms`` Algorithm 2 per patch; rho and sigma by EM
with the estimate held fixed unless given); with ``method=template`` normalised
cross-correlation with the estimate's templates does (``mtd.picking.template_match``). Writes
``picks.star``, ``picks.png`` and ``summary.json`` (the metrics when ``truth=`` gives the true
centres) into the run directory.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import mtd
from mtd import picking
from mtd.io.files import write_summary
from run_checks import USER_ERRORS, integer, is_none, user_error_exit
from run_checks import threshold as threshold_of

METHODS = ("posterior", "template")
GROUPS = ("rotations", "dihedral", "steerable")


def build_group(name: str, L: int, K: int) -> mtd.TransformSet:
    if name == "rotations":
        return mtd.Rotations(L, K)
    if name == "dihedral":
        return mtd.Dihedral(L, K)
    if name == "steerable":
        return mtd.groups.steerable(L, K)
    raise ValueError(f"group must be one of {GROUPS}, got {name!r}")


def read_truth(path, names: list[str]) -> dict:
    """True centres from a STAR file (rlnCoordinateY the row); rlnMicrographName, when there,
    says which micrograph (matched by file name)."""
    table = mtd.io.read_star(path)
    if "rlnCoordinateX" not in table or "rlnCoordinateY" not in table:
        raise ValueError(f"truth: {path} has no rlnCoordinateX / rlnCoordinateY columns")
    centres = np.stack([table["rlnCoordinateY"], table["rlnCoordinateX"]], 1).astype(float)
    mic = None
    if "rlnMicrographName" in table and len(names) > 1:
        base = [Path(n).name for n in names]
        mic = np.array([base.index(Path(str(n)).name) for n in table["rlnMicrographName"]])
    return {"centres": centres, "micrograph": mic}


def pick(cfg: DictConfig, out_dir=None) -> dict:
    """Run the configured picking; write its outputs into ``out_dir``.

    Returns:
        The metrics (``picks``, ``candidates``, and with a truth precision, recall, f1, ap,
        best_f1, empty_f1, shift_accuracy, ...) and ``seconds``.
    """
    out = Path(out_dir if out_dir is not None else cfg.paths.output_dir)
    # Everything that can be wrong is checked before the work starts.
    if cfg.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {cfg.method!r}")
    if cfg.combine not in picking.COMBINE:
        raise ValueError(f"combine must be one of {picking.COMBINE}, got {cfg.combine!r}")
    spec = list(cfg.micrograph) if OmegaConf.is_list(cfg.micrograph) else str(cfg.micrograph)
    paths = mtd.io.files.expand_paths(spec, "micrograph")
    shapes = [tuple(mtd.open_micrograph(p).shape) for p in paths]
    stack = mtd.read_images(cfg.estimate)
    x = stack[0]
    L = x.shape[-1] if is_none(cfg.L) else int(cfg.L)
    if x.shape[-1] != L:
        raise ValueError(f"estimate {cfg.estimate} is {x.shape[-1]} x {x.shape[-1]}; L = {L}")
    for p, shape in zip(paths, shapes, strict=True):
        if min(shape) < L:
            raise ValueError(f"{p}: the micrograph {shape} is smaller than one patch (L = {L})")
    K = int(cfg.K)
    group = build_group(cfg.group, L, K)
    out.mkdir(parents=True, exist_ok=True)
    star = mtd.io.check_star_path(out / cfg.star)
    truth = None if is_none(cfg.truth) else read_truth(cfg.truth, paths)
    if truth is not None:  # the copies' L x L frames, for the patch-level measures
        truth["corners"] = np.rint(truth["centres"] - (L - 1) / 2).astype(np.int64)
    sigma = None if is_none(cfg.sigma) else float(cfg.sigma)
    if sigma is not None and not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0 or null, got {cfg.sigma!r}")
    radius = None if is_none(cfg.radius) else float(cfg.radius)
    named = {"posterior": ("noise",), "template": ("noise", "auto")}[cfg.method]
    threshold = threshold_of(cfg, "threshold", named)
    noise_draws = integer(cfg, "noise_draws", 1)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    dtype = getattr(torch, cfg.dtype)
    data = paths if len(paths) > 1 else paths[0]
    unknown = group.from_image(x)

    start = time.perf_counter()
    em = mtd.ApproximateEM(
        group, sigma=sigma, compute=mtd.Compute(chunk_size=cfg.chunk_size), device=device,
        dtype=dtype,
    )  # fmt: skip
    patches = em.prepare(data)
    post, templates, info = None, None, {}
    if cfg.method == "posterior":
        log_rho, sigma2 = picking.fit_rho_sigma(
            em, patches, unknown, sigma, cfg.rho, int(cfg.rho_iterations)
        )
        picks, post = picking.pick_posterior(
            em, patches, unknown, log_rho, sigma2, cfg.empty_rule,
            None if is_none(cfg.merge_radius) else float(cfg.merge_radius), threshold,
            float(cfg.empty_energy), float(cfg.detect_energy), int(cfg.seed), noise_draws,
            cfg.combine,
        )  # fmt: skip
        info = {
            "sigma": math.sqrt(sigma2),
            "empty_mass": float(log_rho.exp()[mtd.em.empty_shifts(L)].sum()),
            "threshold": picks.info["threshold"],
        }
    else:
        picks = picking.template_match(
            data, group, unknown,
            min_distance=None if is_none(cfg.min_distance) else float(cfg.min_distance),
            threshold=threshold,
            n_picks=None if is_none(cfg.n_picks) else int(cfg.n_picks),
            device=device, dtype=dtype, seed=int(cfg.seed), noise_draws=noise_draws,
        )  # fmt: skip
        templates = group.templates(unknown.to(torch.float64))
        info = {"threshold": picks.info["threshold"]}
    metrics = picking.picking_outputs(
        out, picks, data, patches.source, post, truth, radius, cfg.empty_rule,
        float(cfg.empty_energy), templates, star.name,
        None if is_none(cfg.figure) else str(cfg.figure),
    )  # fmt: skip
    metrics["seconds"] = time.perf_counter() - start
    summary = {
        "metrics": metrics,
        "picking": info,
        "micrographs": [{"path": p, "shape": list(s)} for p, s in zip(paths, shapes, strict=True)],
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_summary(out / "summary.json", summary)
    return metrics


@hydra.main(version_base="1.3", config_path="configs", config_name="pick")
def main(cfg: DictConfig) -> None:
    try:
        metrics = pick(cfg)
    except USER_ERRORS as e:
        user_error_exit(e)
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}
    print(f"picks: {shown}")


if __name__ == "__main__":
    main()
