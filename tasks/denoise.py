"""Denoise a micrograph: ``denoise(cfg)`` (``python denoise.py micrograph=PATH sigma=S``).

The denoised micrograph is Tweedie's posterior mean under the tile prior of ``ckpt``, over
overlapping blended tiles, optionally guided by a target estimate (``priors.denoise``). Writes
``<stem>_denoised.mrc``, ``.png`` and ``.json`` (settings, seconds, and PSNR / relative error
against ``clean=`` when given) beside the micrograph, each whole or not at all.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import mtd
from priors.denoise import MicrographDenoiser, ReferenceDensity, expected_empty, figure, metrics_of
from priors.prior import ScorePrior
from tasks.inputs import resolve_device
from tasks.settings import denoise_settings


def _share(value: float, key: str, closed: bool = True) -> float:
    if not (0 <= value <= 1 if closed else 0 <= value < 1):
        raise ValueError(f"{key} must be a number in [0, 1{']' if closed else ')'}, got {value!r}")
    return value


def denoise(cfg: DictConfig) -> dict:
    """Run the configured denoising; write its outputs. Returns the summary."""
    s, d = denoise_settings(cfg)  # everything that can be wrong is checked before the work
    micrographs = mtd.MicrographSource(s.micrograph, key="micrograph")
    if len(micrographs) != 1:
        raise ValueError(f"micrograph: denoise.py takes one micrograph, got {len(micrographs)}")
    source, micrograph = Path(micrographs.names[0]), micrographs[0]  # memory-mapped: by tile
    if not s.sigma > 0:
        raise ValueError(f"sigma must be a finite number > 0, got {s.sigma!r}")
    guidance = _share(d.guidance, "guidance")
    estimate = None
    if s.estimate is not None:
        estimate = mtd.read_images(s.estimate)[0]
        if s.L is not None and estimate.shape[-1] != s.L:
            raise ValueError(
                f"estimate {s.estimate} is {estimate.shape[-1]} x {estimate.shape[-1]}; L = {s.L}"
            )
    elif guidance > 0:
        raise ValueError(f"guidance={guidance} needs estimate=PATH (the target estimate)")
    clean = None
    if s.clean is not None:
        clean = mtd.read_micrograph(s.clean)
        if tuple(clean.shape) != tuple(micrograph.shape):
            raise ValueError(
                f"clean {s.clean} has shape {tuple(clean.shape)}, the micrograph "
                f"{tuple(micrograph.shape)}"
            )
    out = source.parent if s.out_dir is None else Path(s.out_dir)
    if not out.is_dir():
        raise ValueError(f"out_dir {out} is not an existing folder")
    paths = {k: out / f"{source.stem}{s.suffix}.{k}" for k in ("mrc", "png", "json")}
    if source.resolve() == paths["mrc"].resolve():
        raise ValueError(f"the output {paths['mrc']} would overwrite the micrograph")
    device, dtype = resolve_device(s.device), getattr(torch, s.dtype)
    prior = ScorePrior.from_checkpoint(d.ckpt, device=device, dtype=dtype)
    T = prior.image_size
    reference = None
    if estimate is not None:
        if d.empty is None:
            empty = expected_empty(_share(d.density, "density"), T, estimate.shape[-1])
        else:
            empty = _share(d.empty, "empty", closed=False)
        reference = ReferenceDensity(estimate.to(device=device, dtype=dtype), T, d.K, empty)
    denoiser = MicrographDenoiser(
        prior, s.sigma, reference, guidance, d.stride, d.batch_size, device, dtype
    )

    start = time.perf_counter()
    result = denoiser(micrograph)
    seconds = time.perf_counter() - start
    summary = {
        "micrograph": str(source),
        "shape": list(micrograph.shape),
        "sigma": float(s.sigma),
        "guidance": float(guidance),
        "diffusion_time": denoiser.t,
        "tile": T,
        "seconds": seconds,
        "outputs": {k: str(p) for k, p in paths.items()},
    }
    panels = [("raw", np.asarray(micrograph, dtype=np.float64))]
    if clean is not None:
        summary["metrics"] = metrics_of(clean, torch.from_numpy(panels[0][1]), result)
    panels.append((f"denoised (lambda = {guidance:g})", result.numpy()))
    if clean is not None:
        panels.append(("clean", clean.double().numpy()))
    # The run's settings (the paths group needs Hydra's runtime, which a composed config lacks).
    summary["config"] = {
        k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
        for k, v in cfg.items()
        if k not in ("paths", "hydra")
    }
    mtd.write_micrograph(paths["mrc"], result)
    if s.figure:
        figure(paths["png"], panels)
    else:
        summary["outputs"].pop("png")
    mtd.io.write_summary(paths["json"], summary)
    return summary
