"""The micrograph denoiser against SNR: raw, unguided and guided PSNR, and what lambda does.

    python -m tests.benchmarks.bench_denoise                       # the README table
    python -m tests.benchmarks.bench_denoise --snr 3 0.5 --targets 0 --no-em

For each SNR and held-out digit (``priors/pretrained/mnist.ckpt``'s targets, never seen by either
prior) one micrograph is simulated (N = 11 L as the approximate-EM paper, density 0.1, K = 4 rot90
rotations, seeded as ``bench_picking``; ``--rotation continuous`` for angles U[0, 2 pi),
which the EM's K = 4 rotations and the reference's K do not hold exactly) and the EM estimate
is made as ``python reconstruct.py`` makes it (its default preset ``em=mnist``, sigma known).
The micrograph is then denoised with ``priors/pretrained/mnist_micrograph.ckpt``
(``priors.denoise.MicrographDenoiser``):

- ``raw``: the noisy micrograph itself;
- ``lambda = 0``: the learned score alone (Tweedie's posterior mean over blended tiles);
- ``lambda = w``: guided by the EM estimate's reference density, eq. (G1) of priors/denoise.py,
  x_hat = (1 - w) E_theta[x | y] + w E_ref[x | y] (computed once each: the blend is linear);
- ``oracle=w``: guided by the true digit instead of the estimate (an upper bound, not a method).

Scores against the clean micrograph: PSNR (peak = the clean maximum) and relative error; and
template matching (NCC with the true digit's rotations, ``mtd.picking.template_match``) on each
micrograph: average precision (AUPRC) and F1 (best along the PR curve, matching within L / 2).
The tables give means over the targets; ``--json`` writes every number.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

import mtd
from priors.denoise import (
    MicrographDenoiser,
    ReferenceDensity,
    expected_empty,
    psnr,
    relative_error,
)
from priors.prior import ScorePrior
from tasks import inputs  # (importing tasks registers the configs' ${project:...})
from tasks.settings import reconstruct_settings

ROOT = Path(__file__).resolve().parents[2]


def compose_reconstruct(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        return compose("reconstruct", overrides=["logger=none", *overrides])


def em_estimate(s, meas, prior, device) -> torch.Tensor:
    """The EM estimate as reconstruct.py's configured prior run makes it, (L, L); ``s`` the
    run's settings (``tasks.settings.reconstruct_settings``)."""
    import hydra

    L = meas.L
    group = hydra.utils.instantiate(s.em.group)(L)
    m_step = hydra.utils.instantiate(s.em.m_step)
    em = inputs.build_em(s, group, m_step, meas.sigma, device)
    init = inputs.initial_guess(s, L, prior, meas.image, group)
    return em.fit(em.prepare(meas.data), init, prior=prior).estimate


def picking_scores(micrograph, meas) -> dict:
    """Template matching with the true digit on ``micrograph``: {ap, f1 (best on the curve)}."""
    from mtd import picking

    group = mtd.Rotations(meas.L, 4)
    picks = picking.template_match(torch.as_tensor(micrograph), group, meas.image)
    m = picking.picking_metrics(picks, picking.truth_of(meas)["centres"])
    return {"ap": m["ap"], "f1": m["best_f1"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--snr", type=float, nargs="+", default=[3, 1, 0.5, 0.2, 0.1, 0.05, 0.02])
    p.add_argument("--targets", type=int, nargs="+", default=[0, 1])
    p.add_argument("--N", type=int, default=None, help="micrograph side (default 11 L)")
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument(
        "--rotation", default="discrete", choices=["discrete", "continuous"], help="of the copies"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    p.add_argument("--ckpt", default=str(ROOT / "priors/pretrained/mnist_micrograph.ckpt"))
    p.add_argument("--K", type=int, default=16, help="rotations of the reference density")
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--em", default="mnist", help="the reconstruct.py em preset")
    p.add_argument("--no-em", action="store_true", help="skip EM: only the oracle guidance")
    p.add_argument("--no-picking", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write every number here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    s = reconstruct_settings(compose_reconstruct([f"em={args.em}"]))
    em_prior = inputs.load_prior(s, device)
    tiles = ScorePrior.from_checkpoint(args.ckpt)
    T = tiles.image_size
    rows, start_all = [], time.perf_counter()
    for snr in args.snr:
        for target in args.targets:
            truth_img, where = em_prior.target(target, s.measurement.target_seed)
            L = truth_img.shape[-1]
            N = args.N or 11 * L
            seed = args.seed + 1000 * target + int(round(100 * math.log10(snr) + 500))
            meas = mtd.simulate(
                truth_img, N, density=args.density, snr=snr, K=4, rotation=args.rotation, seed=seed
            )
            clean = meas.clean()
            row = {"snr": snr, "target": where, "sigma": meas.sigma, "N": N}
            row["copies"] = len(meas.angles)
            t0 = time.perf_counter()
            plain = MicrographDenoiser(tiles, meas.sigma, stride=args.stride)
            e_theta = plain(meas.data)
            row["denoise_seconds"] = time.perf_counter() - t0
            empty = expected_empty(args.density, T, L)
            refs = {"oracle": meas.image}
            if not args.no_em:
                t0 = time.perf_counter()
                refs["em"] = em_estimate(s, meas, em_prior, device)
                row["em_seconds"] = time.perf_counter() - t0
                # up to a translation by 3 pixels, as reconstruct.py's error_shift (the reference
                # density searches every shift, so a shifted estimate guides as well)
                row["em_error"] = mtd.relative_error(meas.image, refs["em"], K=4, max_shift=3)
            outs = {"raw": meas.data, "lambda=0": e_theta}
            for name, est in refs.items():
                ref = ReferenceDensity(est.float(), T, args.K, empty)
                e_ref = MicrographDenoiser(tiles, meas.sigma, ref, 1.0, stride=args.stride)(
                    meas.data
                )
                for lam in args.lambdas:
                    key = f"lambda={lam:g}" if name == "em" else f"oracle={lam:g}"
                    outs[key] = (1 - lam) * e_theta + lam * e_ref
            for key, x in outs.items():
                m = {"psnr": psnr(clean, x), "rel": relative_error(clean, x)}
                if not args.no_picking and not key.startswith("oracle"):
                    m.update(picking_scores(x, meas))
                row[key] = m
            rows.append(row)
            shown = " ".join(f"{k} {v['psnr']:.1f}" for k, v in row.items() if isinstance(v, dict))
            print(f"SNR {snr:g} {where}: PSNR {shown}", flush=True)
    minutes = (time.perf_counter() - start_all) / 60
    print(table(rows, args, minutes))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))


def mean(rows, key, field):
    vals = [r[key][field] for r in rows if key in r and field in r[key]]
    return float(np.mean(vals)) if vals else float("nan")


def table(rows, args, minutes) -> str:
    keys = [k for k in rows[0] if isinstance(rows[0][k], dict)]
    psnr_keys = keys
    head = "| SNR | sigma | EM error (3 px) | " + " | ".join(psnr_keys) + " |"
    lines = ["PSNR (dB) / relative error against the clean micrograph", "", head]
    lines.append("|" + "---|" * (head.count("|") - 1))
    for snr in args.snr:
        rs = [r for r in rows if r["snr"] == snr]
        em = [r["em_error"] for r in rs if "em_error" in r]
        cells = [f"{snr:g}", f"{np.mean([r['sigma'] for r in rs]):.3f}"]
        cells.append(f"{np.mean(em):.3f}" if em else "-")
        cells += [f"{mean(rs, k, 'psnr'):.1f} / {mean(rs, k, 'rel'):.2f}" for k in psnr_keys]
        lines.append("| " + " | ".join(cells) + " |")
    pick_keys = [k for k in keys if "ap" in rows[0][k]]
    if pick_keys:
        head = "| SNR | " + " | ".join(pick_keys) + " |"
        lines += ["", "Template matching with the true digit: AP / best F1", "", head]
        lines.append("|" + "---|" * (head.count("|") - 1))
        for snr in args.snr:
            rs = [r for r in rows if r["snr"] == snr]
            cells = [f"{snr:g}"]
            cells += [f"{mean(rs, k, 'ap'):.2f} / {mean(rs, k, 'f1'):.2f}" for k in pick_keys]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        f"\n{len(args.targets)} held-out digits x {len(args.snr)} SNRs, {rows[0]['copies']} "
        f"copies each (N = {rows[0]['N']}, density {args.density}, {args.rotation} rotations"
        f"{' (K = 4)' if args.rotation == 'discrete' else ''}), reference K = "
        f"{args.K}; {minutes:.1f} min in all."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
