"""After EM: particles picked from the posteriors at the estimate, and the measurement denoised
with a score prior of clean tiles, guided by the estimate (``pick=true``, ``denoise=true``)."""

from __future__ import annotations

from pathlib import Path

from mtd import picking
from priors import denoise as denoising
from tasks.inputs import Inputs
from tasks.settings import Reconstruct


def pick_after_em(s: Reconstruct, out: Path, em, res, patches, inputs: Inputs) -> dict:
    """Particles picked from the E-step's posteriors at the estimate of ``res`` (the stochastic-EM
    paper, Section IV-B; ``picking.*``): picks.star and picks.png in ``out``, and the pick/*
    metrics; with a simulated truth also template matching (``picking.template``: with the true
    object and with the estimate, at the noise threshold) beside it."""
    o, group = s.picking, em.group
    picks, post = picking.pick_posterior(
        em, patches, res.estimate, res.rho.log(), res.sigma**2, o, seed=s.seed
    )
    meas = inputs.simulated
    truth = None if meas is None else picking.truth_of(meas)
    seen = truth  # an image's patch measures in its own frame (it is the image up to a shift)
    if truth is not None and group.is_image:
        seen = picking.in_frame_of(truth, res.estimate, group, s.max_shift or 0)
    found = picking.picking_outputs(
        out, picks, inputs.source, patches.source, post, seen, o.radius, o.empty_rule,
        o.empty_energy,
    )  # fmt: skip
    metrics = {f"pick/{k}": value for k, value in found.items()}
    if truth is not None and o.template:  # the standard baseline beside it
        for name, x in (("true", group.from_image(meas.truth)), ("estimate", res.estimate)):
            tm = picking.template_match(
                inputs.source, group, x.to(res.estimate), o.min_distance, n_picks=o.n_picks,
                seed=s.seed, noise_draws=o.noise_draws,
            )  # fmt: skip
            scores = picking.picking_metrics(tm, truth["centres"], radius=o.radius)
            metrics.update({f"pick_template_{name}/{k}": value for k, value in scores.items()})
    return metrics


def denoise_after_em(s: Reconstruct, out: Path, inputs: Inputs, sigma: float, estimate, device):
    """The measurement denoised by the tile prior ``denoising.ckpt`` (Tweedie over blended tiles),
    guided by the run's estimate with weight ``denoising.guidance``: denoised.mrc / .png in
    ``out`` (denoised_<i> for several micrographs) and the denoise/* metrics (PSNR, relative
    error against the clean micrograph of a simulation)."""
    d = s.denoising
    out.mkdir(parents=True, exist_ok=True)
    clean = None if inputs.simulated is None else inputs.simulated.clean()
    several = len(inputs.source) > 1
    metrics = {}
    for i, micrograph in enumerate(inputs.source):
        found = denoising.denoise_outputs(
            out, micrograph, float(sigma), estimate, d.guidance, clean=clean,
            name=f"denoised_{i}" if several else "denoised", ckpt=d.ckpt, K=d.K,
            density=d.density, empty=d.empty, stride=d.stride, batch_size=d.batch_size,
            device=device,
        )  # fmt: skip
        suffix = f"_{i}" if several else ""
        metrics.update({f"{k}{suffix}": value for k, value in found.items()})
    return metrics
