"""Particle picking against SNR on simulated MNIST micrographs: F1, AUPRC and the paper's measures.

    python -m tests.benchmarks.bench_picking                     # the README table
    python -m tests.benchmarks.bench_picking --snr 10 1 0.1 --targets 0 --figure fig8.png

For each SNR and held-out digit (``priors/pretrained/mnist.ckpt``'s targets, ``ScorePrior.target``)
one micrograph is simulated (N = 22 L, density 0.1, K = 4 rot90 rotations, seeded) and the EM
estimate is made as ``python reconstruct.py`` makes it with its default preset (``em=mnist``: the
closed-form step then the prior's denoiser, annealed, rho estimated, sigma known, 40 iterations,
the mean of ten training digits as the initial guess), composed from ``configs/reconstruct.yaml``.
The pickers, each scored against the planted centres (``mtd.picking.picking_metrics``: F1 at the
picker's own operating point by Hungarian matching within L / 2, and the average precision over
its ranked candidates) and with the stochastic-EM paper's patch measures (empty-patch F1 and shift
accuracy within one pixel; the always-empty classifier's F1 beside them):

- ``tm_true``: template matching (NCC) with the true digit's K rotations, the oracle;
- ``tm_em``: template matching with the EM estimate's;
- ``post_em``: posterior picking with the EM estimate, its rho and sigma (``pick_posterior``,
  the patches' evidence combined, the default);
- ``post_em_nms``: the same per patch (Algorithm 2, non-maximum suppression);
- ``post_true``: posterior picking with the true digit (rho and sigma by EM with the digit fixed);
- ``tm_denoised`` / ``tm_guided``: template matching with the true digit on the denoised
  micrograph, unguided and guided (``denoise.py``), when its function can be imported; its
  operating point the largest NCC on the same denoiser's output for a micrograph of pure noise;
- ``tm_em_denoised`` / ``tm_em_guided``: the same with the EM estimate's templates.

The table gives the mean over the targets; ``--json`` writes every number.
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
from mtd import picking
from tasks import inputs  # (importing tasks registers the configs' ${project:...})
from tasks.settings import reconstruct_settings

ROOT = Path(__file__).resolve().parents[2]

PICKERS = (
    "tm_true", "tm_em", "post_em", "post_em_nms", "post_true",
    "tm_denoised", "tm_guided", "tm_em_denoised", "tm_em_guided",
)  # fmt: skip


def compose_reconstruct(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        return compose("reconstruct", overrides=["logger=none", *overrides])


def em_estimate(s, meas, prior, device, use_prior: bool = True):
    """The EM estimate as reconstruct.py's configured prior run makes it; ``s`` the run's
    settings (``tasks.settings.reconstruct_settings``), ``use_prior=False`` (the override
    ``+em.use_prior=false``): EM without the prior."""
    import hydra

    from tasks.reconstruct import search_m_steps, searching

    L = meas.L
    group = hydra.utils.instantiate(s.em.group)(L)
    m_step = hydra.utils.instantiate(s.em.m_step)
    em = inputs.build_em(s, group, m_step, meas.sigma, device)
    init = inputs.initial_guess(s, L, prior, meas.image, group)
    patches = em.prepare(meas.data)
    if use_prior and searching(s):  # the prior run's search, as reconstruct.py runs it
        start = em.fit(patches, init) if s.em.search_from_no_prior else None
        em, res = mtd.em.search(em, patches, init, prior, search_m_steps(s, em), start)
    else:
        res = em.fit(patches, init, prior=prior if use_prior else None)
    return em, patches, res


def denoiser(ckpt=None):
    """``priors.denoise.denoise_micrograph(micrograph, sigma, estimate or None)`` (the score-based
    micrograph denoiser, unguided without an estimate, its default guidance with one) with its
    tile prior (``ckpt``, default the shipped one), or None without that checkpoint."""
    from priors import denoise

    ckpt = ckpt or denoise.DEFAULT_CKPT
    if not Path(str(ckpt)).is_file():
        return None
    return lambda micrograph, sigma, estimate: denoise.denoise_micrograph(
        micrograph, sigma, estimate, ckpt=str(ckpt)
    )


def _score(picks, truth, source, post=None, templates=None) -> dict:
    m = picking.picking_metrics(picks, truth["centres"])
    pt = picking.patch_truth(
        source, truth["corners"], clean=truth["clean"], energy=truth["energy"]
    )
    if post is not None:
        pred_empty, pred_shift = post.score() <= 0, post.shift
    else:
        pred_empty, pred_shift = picking.patch_predictions(picks, source, templates)
    m.update(picking.patch_metrics(pred_empty, pred_shift, pt, source.L))
    return m


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--snr", type=float, nargs="+", default=[10, 3, 1, 0.5, 0.2, 0.1, 0.05, 0.02])
    p.add_argument("--targets", type=int, nargs="+", default=[0, 1])
    p.add_argument("--N", type=int, default=None, help="micrograph side (default 22 L)")
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--em", default="mnist", help="the reconstruct.py em preset")
    p.add_argument(
        "--override", nargs="*", default=[], help="reconstruct.py overrides, e.g. em.restarts=11"
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write every number here")
    p.add_argument("--figure", default=None, help="a PNG like the paper's Fig. 8")
    p.add_argument("--denoise-ckpt", default=None, help="the denoiser's tile prior")
    p.add_argument("--no-denoise", action="store_true", help="skip the denoised columns")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cpu")
    cfg = compose_reconstruct([f"em={args.em}", *args.override])
    s, use_prior = reconstruct_settings(cfg), cfg.em.get("use_prior", True)
    prior = inputs.load_prior(s, device)
    denoise_fn = None if args.no_denoise else denoiser(args.denoise_ckpt)
    rows, start_all = [], time.perf_counter()
    for snr in args.snr:
        for target in args.targets:
            truth_img, where = prior.target(target, s.measurement.target_seed)
            L = truth_img.shape[-1]
            N = args.N or 22 * L
            seed = args.seed + 1000 * target + int(round(100 * math.log10(snr) + 500))
            meas = mtd.simulate(truth_img, N, density=args.density, snr=snr, K=4, seed=seed)
            truth = picking.truth_of(meas)
            group = mtd.Rotations(L, 4)
            t0 = time.perf_counter()
            em, patches, res = em_estimate(s, meas, prior, device, use_prior)
            em_seconds = time.perf_counter() - t0
            error = mtd.relative_error(meas.image, res.estimate, group=group)
            shifted = mtd.relative_error(meas.image, res.estimate, max_shift=3, group=group)
            row = {"snr": snr, "target": where, "copies": len(meas.angles), "N": N}
            row.update({"em_error": error, "em_error_shift": shifted, "em_seconds": em_seconds})
            source = patches.source
            t0 = time.perf_counter()
            tm = picking.template_match(meas.data, group, meas.image)
            row["tm_true"] = _score(tm, truth, source, templates=group.templates(meas.image))
            seen = picking.in_frame_of(truth, res.estimate, group)  # the EM pickers' frame
            tm = picking.template_match(meas.data, group, res.estimate)
            row["tm_em"] = _score(tm, seen, source, templates=group.templates(res.estimate))
            picks, post = picking.pick_posterior(
                em, patches, res.estimate, res.rho.log(), res.sigma**2
            )
            row["post_em"] = _score(picks, seen, source, post)
            picks, post = picking.pick_posterior(
                em, patches, res.estimate, res.rho.log(), res.sigma**2, combine="nms"
            )
            row["post_em_nms"] = _score(picks, seen, source, post)
            log_rho, s2 = picking.fit_rho_sigma(em, patches, meas.image, sigma=meas.sigma)
            picks, post = picking.pick_posterior(em, patches, meas.image, log_rho, s2)
            row["post_true"] = _score(picks, truth, source, post)
            if denoise_fn is not None:
                # The NCC's white-noise threshold does not hold on a denoised micrograph (its
                # flat background made false picks: precision 0.7-0.8 at SNR >= 0.5); the
                # operating point is the largest NCC the same denoiser's output on a micrograph
                # of pure noise gives, as posterior picking's noise threshold.
                gen = torch.Generator().manual_seed(seed)
                noise = torch.randn(meas.data.shape, generator=gen, dtype=torch.float64)
                noise = noise.to(meas.data) * meas.sigma
                for name, guide in (("denoised", None), ("guided", res.estimate)):
                    clean = denoise_fn(meas.data, meas.sigma, guide)
                    blank = denoise_fn(noise, meas.sigma, guide)
                    for who, x, t in (("tm", meas.image, truth), ("tm_em", res.estimate, seen)):
                        tm = picking.template_match(blank, group, x, threshold=0.0)
                        level = float(tm.scores.max())
                        tm = picking.template_match(clean, group, x, threshold=level)
                        row[f"{who}_{name}"] = _score(tm, t, source, templates=group.templates(x))
            row["pick_seconds"] = time.perf_counter() - t0
            rows.append(row)
            shown = " ".join(
                f"{k} {row[k]['f1']:.2f}/{row[k]['ap']:.2f}" for k in PICKERS if k in row
            )
            print(f"SNR {snr:g} {where}: EM error {error:.3f} / {shifted:.3f} "
                  f"({em_seconds:.1f} s); {shown}", flush=True)  # fmt: skip
    minutes = (time.perf_counter() - start_all) / 60
    print(table(rows, args, minutes))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    if args.figure:
        figure(rows, args.figure)


def mean(rows, key, field):
    vals = [r[key][field] for r in rows if key in r and not math.isnan(r[key][field])]
    return float(np.mean(vals)) if vals else float("nan")


def table(rows, args, minutes) -> str:
    present = [k for k in PICKERS if any(k in r for r in rows)]
    missing = [k for k in PICKERS if k not in present]
    patch = [k for k in ("post_true", "post_em", "tm_true", "tm_em") if k in present]
    head = "| SNR | EM error / up to 3 px | "
    head += " | ".join(f"{k} F1 / best F1 / AP" for k in present)
    head += " | empty F1: " + " / ".join(patch) + " / always"
    head += " | shift acc.: " + " / ".join(patch) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for snr in args.snr:
        rs = [r for r in rows if r["snr"] == snr]
        cells = [
            f"{snr:g}",
            f"{np.mean([r['em_error'] for r in rs]):.3f} / "
            f"{np.mean([r['em_error_shift'] for r in rs]):.3f}",
        ]
        cells += [
            f"{mean(rs, k, 'f1'):.2f} / {mean(rs, k, 'best_f1'):.2f} / {mean(rs, k, 'ap'):.2f}"
            for k in present
        ]
        cells.append(
            " / ".join(f"{mean(rs, k, 'empty_f1'):.3f}" for k in patch)
            + f" / {mean(rs, patch[0], 'empty_f1_always'):.3f}"
        )
        cells.append(" / ".join(f"{mean(rs, k, 'shift_accuracy'):.2f}" for k in patch))
        lines.append("| " + " | ".join(cells) + " |")
    copies = sum(r["copies"] for r in rows) // max(len(args.snr), 1)
    lines.append(
        f"\n{len(args.targets)} held-out digits x {len(args.snr)} SNRs, {copies} copies per SNR, "
        f"N = {rows[0]['N']}, density {args.density}, K = 4; "
        f"{' '.join([f'em={args.em}', *args.override])}; {minutes:.1f} min in all."
        + (f" Not run (--no-denoise or no denoiser): {', '.join(missing)}." if missing else "")
    )
    return "\n".join(lines)


def figure(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    snrs = sorted({r["snr"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for key in PICKERS:
        if not any(key in r for r in rows):
            continue
        by = [[r for r in rows if r["snr"] == s] for s in snrs]
        for ax, field in zip(axes, ("empty_f1", "shift_accuracy", "f1"), strict=True):
            ax.plot(snrs, [mean(b, key, field) for b in by], "o-", label=key)
    axes[0].plot(snrs, [mean([r for r in rows if r["snr"] == s], "post_em", "empty_f1_always")
                        for s in snrs], "k--", label="always empty")  # fmt: skip
    titles = ("F1 of empty-patch detection", "shift accuracy (+-1 px)", "picking F1 (L / 2)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("SNR")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
