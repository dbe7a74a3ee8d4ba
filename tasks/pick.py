"""Pick particles in a micrograph with a given estimate: ``pick(cfg)`` (``python pick.py``).

With ``method=posterior`` the patches' posteriors under the estimate give the picks (the
stochastic-EM paper, Section IV-B, ``mtd.picking.pick_posterior``: by default the evidence of the
patches a copy touches added up, ``combine=nms`` Algorithm 2 per patch; rho and sigma by EM with
the estimate held fixed unless given); with ``method=template`` normalised cross-correlation with
the estimate's templates does (``mtd.picking.template_match``). Writes ``picks.star``,
``picks.png`` and ``summary.json`` (the metrics when ``truth=`` gives the true centres) into the
run directory.
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
from tasks import ROOT
from tasks.inputs import resolve_device
from tasks.settings import pick_settings

GROUPS = ROOT / "configs" / "em" / "group"


def group_named(name: str, L: int, K: int) -> mtd.TransformSet:
    """The group ``configs/em/group/<name>.yaml`` (the registry reconstruct.py's em/group uses)
    with K rotations, at side L."""
    names = sorted(p.stem for p in GROUPS.glob("*.yaml"))
    if name not in names:
        raise ValueError(f"group must be one of {', '.join(names)}, got {name!r}")
    node = OmegaConf.create({"K": K, "group": OmegaConf.load(GROUPS / f"{name}.yaml")})
    if "K" not in node.group:
        raise ValueError(f"group={name} is not a group of K rotations of an image")
    return hydra.utils.instantiate(node.group)(L)


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
    s, options = pick_settings(cfg)  # everything that can be wrong is checked before the work
    out = Path(out_dir if out_dir is not None else cfg.paths.output_dir)
    if s.method == "posterior" and options.threshold == "auto":
        raise ValueError("threshold=auto is template matching's (method=template)")
    source = mtd.MicrographSource(s.micrograph, key="micrograph")
    x = mtd.read_images(s.estimate)[0]
    L = x.shape[-1] if s.L is None else s.L
    if x.shape[-1] != L:
        raise ValueError(f"estimate {s.estimate} is {x.shape[-1]} x {x.shape[-1]}; L = {L}")
    for name, shape in zip(source.names, source.shapes, strict=True):
        if min(shape) < L:
            raise ValueError(f"{name}: the micrograph {shape} is smaller than one patch (L = {L})")
    group = group_named(s.group, L, s.K)
    out.mkdir(parents=True, exist_ok=True)
    star = mtd.io.check_star_path(out / s.star)
    truth = None if s.truth is None else read_truth(s.truth, source.names)
    if truth is not None:  # the copies' L x L frames, for the patch-level measures
        truth["corners"] = np.rint(truth["centres"] - (L - 1) / 2).astype(np.int64)
    if s.sigma is not None and not s.sigma > 0:
        raise ValueError(f"sigma must be a finite number > 0 or null, got {s.sigma!r}")
    device, dtype = resolve_device(s.device), getattr(torch, s.dtype)
    unknown = group.from_image(x)

    start = time.perf_counter()
    em = mtd.ApproximateEM(
        group, sigma=s.sigma, compute=mtd.Compute(chunk_size=s.chunk_size), device=device,
        dtype=dtype,
    )  # fmt: skip
    patches = em.prepare(source)
    post, templates, info = None, None, {}
    if s.method == "posterior":
        log_rho, sigma2 = picking.fit_rho_sigma(
            em, patches, unknown, s.sigma, s.rho, s.rho_iterations
        )
        picks, post = picking.pick_posterior(
            em, patches, unknown, log_rho, sigma2, options, s.seed
        )
        info = {
            "sigma": math.sqrt(sigma2),
            "empty_mass": float(log_rho.exp()[mtd.em.empty_shifts(L)].sum()),
            "threshold": picks.info["threshold"],
        }
    else:
        picks = picking.template_match(
            source, group, unknown, options.min_distance, options.threshold, options.n_picks,
            device=device, dtype=dtype, seed=s.seed, noise_draws=options.noise_draws,
        )  # fmt: skip
        templates = group.templates(unknown.to(torch.float64))
        info = {"threshold": picks.info["threshold"]}
    metrics = picking.picking_outputs(
        out, picks, source, patches.source, post, truth, options.radius, options.empty_rule,
        options.empty_energy, templates, star.name, s.figure,
    )  # fmt: skip
    metrics["seconds"] = time.perf_counter() - start
    summary = {
        "metrics": metrics,
        "picking": info,
        "micrographs": [
            {"path": n, "shape": list(p)} for n, p in zip(source.names, source.shapes, strict=True)
        ],
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    mtd.io.write_summary(out / "summary.json", summary)
    return metrics
