"""Denoise a micrograph: ``python denoise.py micrograph=PATH sigma=S [estimate=PATH guidance=L]``.

Hydra composes ``configs/denoise.yaml``; ``denoise(cfg)`` does the work and can be called from
tests. The denoised micrograph is Tweedie's posterior mean under the tile prior of ``ckpt``, over
overlapping blended tiles, optionally guided by a target estimate (``priors.denoise``). Writes
``<stem>_denoised.mrc``, ``.png`` and ``.json`` (settings, seconds, and PSNR / relative error
against ``clean=`` when given) beside the micrograph, each whole or not at all.
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
from mtd.io.files import write_summary
from priors.denoise import (
    MicrographDenoiser,
    ReferenceDensity,
    expected_empty,
    figure,
    metrics_of,
)
from priors.prior import ScorePrior
from run_checks import USER_ERRORS, is_none, register_project_resolver, user_error_exit

register_project_resolver()


def _number(cfg, key: str, low: float, high: float, closed_high: bool = True) -> float:
    value = cfg[key]
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and low <= value and (value <= high if closed_high else value < high)
    if not ok:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"{key} must be a number in [{low}, {high}{bracket}, got {value!r}")
    return float(value)


def denoise(cfg: DictConfig) -> dict:
    """Run the configured denoising; write its outputs. Returns the summary."""
    # Everything that can be wrong is checked before the work starts.
    source = Path(str(cfg.micrograph))
    micrograph = mtd.open_micrograph(source)  # memory-mapped: read tile by tile
    if is_none(cfg.sigma):
        raise ValueError("sigma is required: the micrograph's noise standard deviation")
    sigma = cfg.sigma
    if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    guidance = _number(cfg, "guidance", 0.0, 1.0)
    estimate = None
    if not is_none(cfg.estimate):
        estimate = mtd.read_images(cfg.estimate)[0]
        if not is_none(cfg.L) and estimate.shape[-1] != int(cfg.L):
            raise ValueError(
                f"estimate {cfg.estimate} is {estimate.shape[-1]} x {estimate.shape[-1]}; "
                f"L = {cfg.L}"
            )
    elif guidance > 0:
        raise ValueError(f"guidance={guidance} needs estimate=PATH (the target estimate)")
    clean = None
    if not is_none(cfg.clean):
        clean = mtd.read_micrograph(cfg.clean)
        if tuple(clean.shape) != tuple(micrograph.shape):
            raise ValueError(
                f"clean {cfg.clean} has shape {tuple(clean.shape)}, the micrograph "
                f"{tuple(micrograph.shape)}"
            )
    out = source.parent if is_none(cfg.out_dir) else Path(str(cfg.out_dir))
    if not out.is_dir():
        raise ValueError(f"out_dir {out} is not an existing folder")
    stem = source.stem + str(cfg.suffix)
    paths = {k: out / f"{stem}.{k}" for k in ("mrc", "png", "json")}
    if source.resolve() == paths["mrc"].resolve():
        raise ValueError(f"the output {paths['mrc']} would overwrite the micrograph")
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    dtype = getattr(torch, str(cfg.dtype), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a torch floating dtype name, got {cfg.dtype!r}")
    prior = ScorePrior.from_checkpoint(cfg.ckpt, device=device, dtype=dtype)
    T = prior.image_size
    reference = None
    if estimate is not None:
        if is_none(cfg.empty):
            empty = expected_empty(_number(cfg, "density", 0.0, 1.0), T, estimate.shape[-1])
        else:
            empty = _number(cfg, "empty", 0.0, 1.0, closed_high=False)
        if isinstance(cfg.K, bool) or int(cfg.K) != cfg.K or cfg.K < 1:
            raise ValueError(f"K must be an integer >= 1, got {cfg.K!r}")
        reference = ReferenceDensity(estimate.to(device=device, dtype=dtype), T, int(cfg.K), empty)
    denoiser = MicrographDenoiser(
        prior,
        float(sigma),
        reference,
        guidance,
        None if is_none(cfg.stride) else cfg.stride,
        cfg.batch_size,
        device,
        dtype,
    )

    start = time.perf_counter()
    result = denoiser(micrograph)
    seconds = time.perf_counter() - start
    summary = {
        "micrograph": str(source),
        "shape": list(micrograph.shape),
        "sigma": float(sigma),
        "guidance": guidance,
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
    if cfg.figure:
        figure(paths["png"], panels)
    else:
        summary["outputs"].pop("png")
    write_summary(paths["json"], summary)
    return summary


@hydra.main(version_base="1.3", config_path="configs", config_name="denoise")
def main(cfg: DictConfig) -> None:
    try:
        summary = denoise(cfg)
    except USER_ERRORS as e:
        user_error_exit(e)
    shown = {k: round(v, 4) for k, v in summary.get("metrics", {}).items()}
    print(f"denoised: {summary['outputs']['mrc']} ({summary['seconds']:.1f} s) {shown}")


if __name__ == "__main__":
    main()
