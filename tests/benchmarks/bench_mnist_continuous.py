"""MNIST digits at continuous angles: the steerable basis against bilinear rotations, with and
without the shipped score prior, on the same measurements.

    python -m tests.benchmarks.bench_mnist_continuous                      # the README's table
    python -m tests.benchmarks.bench_mnist_continuous --targets 0 --snrs 0.5   # one cell, ~1 min
    python -m tests.benchmarks.bench_mnist_continuous --n 300 --K 32 --json out.json
    # the same table from parts run side by side:
    python -m tests.benchmarks.bench_mnist_continuous --targets 0 1 2 --json a.json &
    python -m tests.benchmarks.bench_mnist_continuous --targets 3 4 --json b.json
    python -m tests.benchmarks.bench_mnist_continuous --from-json a.json b.json

For every held-out digit of the checkpoint and every SNR one measurement is simulated,
``mtd.simulate(digit, N, density, snr, rotation="continuous", seed)``: bilinear-interpolated copies
at angles uniform on [0, 2 pi), the natural continuous rotation of a pixel digit, which neither
model below reproduces exactly (fair to both). On it, from the same initial guess (em=mnist's: the
mean of ten training digits, none a target) and with the same M-step and iteration budget
(em=mnist's annealed ``Denoise``; without the prior it is the closed-form EM):

- ``steerable``: ``mtd.Steerable(mtd.FBBasis(28, n or bandlimit), K)``, the unknown the digit's
  Fourier-Bessel coefficients, rotated exactly by 2 pi k / K; the prior's denoiser acts on the
  evaluated image, its missing noise outside the basis's span completed by ``--complete-draws``
  white draws (em=steerable_mnist's), and is projected back onto the basis (``mtd.em.msteps``);
- ``bilinear``: ``mtd.Rotations(28, K)``, today's pixel unknown with K bilinear rotations.

Errors, the same rule for both: the relative pixel error against the raw digit, minimised over
a fine grid of ``--orbit-angles`` rotations of the estimate's image, every one done by the same
operator, ``ShearRotations`` (a quarter turn, then three FFT shears: unitary, no interpolation;
1-3% from the exact rotation of a band-limited digit, where bilinear interpolation is 11% off),
and the same up to a translation by ``--max-shift`` pixels. Each method's own rotation would not
be fair: bilinear interpolation smooths, and the minimum over its angles finds the smoothing that
removes most noise (a digit plus white noise at relative error 0.96 scores 0.61 over 720 bilinear
rotations), while the steerable rotation is exact; that error is the ``own`` column. The steerable
error includes the basis's truncation of the digit (``floor``: ||digit - B B^+ digit|| /
||digit||). ``eq19`` is the steerable coefficient error against the band-limited digit over the
same angle grid (eq. 19 of the approximate-EM paper; what ``reconstruct.py`` reports as
``error/<variant>`` for a steerable group).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import mtd
from priors import ScorePrior

ROOT = Path(__file__).resolve().parents[2]
INIT_INDICES = (1, 3, 5, 7, 9, 11, 13, 15, 17, 19)  # em=mnist's init digits (configs/em)


class ErrorOrbit(mtd.TransformSet):
    """A group that only scores errors: ``mtd.relative_error`` minimises over its ``orbit``; no
    engine fits with it, so it has no templates, adjoint, normal equations or poses."""

    def _not_an_engine_group(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} only scores errors (its orbit)")

    templates = adjoint = normal_solve = poses = _not_an_engine_group


class SteerableImages(ErrorOrbit):
    """Band-limited pixel images under the exact rotations of a ``Steerable``'s fine angle grid.

    The pixel-space view of ``Steerable.orbit``, so that ``mtd.relative_error`` scores a steerable
    estimate's image against the raw digit (and up to translations) like a pixel estimate.
    """

    def __init__(self, steerable: mtd.Steerable):
        super().__init__()
        self.steerable = steerable
        self.L, self.K, self.shape = steerable.L, steerable.K, (steerable.L, steerable.L)

    def orbit(self, x: torch.Tensor) -> torch.Tensor:
        s = self.steerable
        return s.to_image(s.orbit(s.from_image(x)))


class ShearRotations(ErrorOrbit):
    """Images rotated counter-clockwise by ``angles`` about ((L-1)/2, (L-1)/2), without smoothing.

    A quarter turn (``torch.rot90``, exact) brings the rest of the angle into [-pi/4, pi/4], which
    three shears x-y-x by -tan(phi/2), sin(phi), -tan(phi/2) complete (Unser et al. 1995), each a
    phase ramp along one axis of the image zero-padded to 2L (a unitary map there: no
    interpolation averages pixels, so the noise of an estimate is not smoothed away).
    """

    def __init__(self, L: int, angles: int):
        super().__init__()
        self.L, self.K, self.shape = L, angles, (L, L)
        self.angles = torch.arange(angles, dtype=torch.float64) * (2 * math.pi / angles)

    def orbit(self, x: torch.Tensor) -> torch.Tensor:
        L = self.L
        P, lo = 2 * L, L // 2
        padded = torch.zeros(P, P, dtype=torch.float64, device=x.device)
        padded[lo : lo + L, lo : lo + L] = x
        quarter = torch.round(self.angles / (math.pi / 2)).long()
        rest = (self.angles - quarter * (math.pi / 2)).to(x.device)
        turns = torch.stack([torch.rot90(padded, q, dims=(-2, -1)) for q in range(4)])
        images = turns[(quarter % 4).to(x.device)]  # (A, P, P)
        offset = torch.arange(P, dtype=torch.float64, device=x.device) - (P - 1) / 2
        freq = torch.fft.fftfreq(P, dtype=torch.float64, device=x.device)

        def shear(img, amount, dim):  # dim -1: out[y, x] = in[y, x - amount (y - c)]
            ramp = offset[:, None] * freq[None, :] if dim == -1 else freq[:, None] * offset
            phase = torch.exp(2j * math.pi * amount[:, None, None] * ramp)
            return torch.fft.ifft(torch.fft.fft(img, dim=dim) * phase, dim=dim).real

        a, b = -torch.tan(rest / 2), torch.sin(rest)
        out = shear(shear(shear(images, a, -1), b, -2), a, -1)
        return out[:, lo : lo + L, lo : lo + L]


def initial_image(path: Path, indices=INIT_INDICES) -> torch.Tensor:
    """em=mnist's initial guess: the mean of ten training digits in [0, 1], (L, L) float64."""
    with np.load(path) as f:
        digits = f["images"][list(indices)].astype(np.float64) / 255
    return torch.from_numpy(digits).mean(0)


def run_cell(truth, snr, groups, init, prior, args) -> list[dict]:
    """Every (group, prior or not) EM on one simulated measurement of ``truth``."""
    meas = mtd.simulate(
        truth, args.N, density=args.density, snr=snr, rotation="continuous", seed=args.seed
    )
    rows, shear = [], ShearRotations(truth.shape[-1], args.orbit_angles)
    for name, (group, scorer) in groups.items():
        x0 = group.from_image(init)
        for with_prior in (False, True):
            m_step = mtd.Denoise(
                noise_scale=args.noise_scale,
                complete_draws=args.complete_draws,  # steerable only (bilinear: nothing drawn)
                seed=args.seed,
                anneal_from=args.anneal_from,
                anneal_iterations=args.anneal_iterations,
            )
            em = mtd.ApproximateEM(
                group,
                m_step,
                sigma=meas.sigma,  # known, as in the score-prior paper's MNIST setting
                rho="estimate",
                iterations=args.iterations,
                dtype=torch.float64,
            )
            start = time.perf_counter()
            res = em.fit(meas.data, x0, prior=prior if with_prior else None)
            seconds = time.perf_counter() - start
            image = group.to_image(res.estimate)
            row = {
                "group": name,
                "prior": with_prior,
                "snr": snr,
                "seconds": seconds,
                "iterations": len(res.history),
                "error": mtd.relative_error(truth, image, group=shear),
                "error_shift": mtd.relative_error(
                    truth, image, group=shear, max_shift=args.max_shift
                ),
                "error_own": mtd.relative_error(truth, image, group=scorer),
                "estimate": image.tolist(),
            }
            if name == "steerable":
                fine = mtd.Steerable(group.basis, group.K, orbit_angles=args.orbit_angles)
                row["eq19"] = mtd.relative_error(group.from_image(truth), res.estimate, group=fine)
            rows.append(row)
    return rows


def table(rows: list[dict], snrs, floor: float) -> str:
    """Markdown: mean error per (method, prior) and SNR, then up to translation, then time."""

    def cell(group, prior, snr, key):
        vals = [r[key] for r in rows if (r["group"], r["prior"], r["snr"]) == (group, prior, snr)]
        return statistics.mean(vals) if vals else math.nan

    head = " | ".join(f"SNR {s:g}" for s in snrs)
    lines = [
        f"| method | {head} | up to translation, SNR {' / '.join(f'{s:g}' for s in snrs)} "
        "| own rotation | eq. 19 (coefficients) | s / run |",
        "|---|" + "---|" * (len(snrs) + 4),
    ]
    for group in ("bilinear", "steerable"):
        for prior in (False, True):
            sel = [r for r in rows if (r["group"], r["prior"]) == (group, prior)]
            if not sel:
                continue
            err = " | ".join(f"{cell(group, prior, s, 'error'):.3f}" for s in snrs)
            shift = " / ".join(f"{cell(group, prior, s, 'error_shift'):.3f}" for s in snrs)
            own = " / ".join(f"{cell(group, prior, s, 'error_own'):.3f}" for s in snrs)
            eq19 = (
                " / ".join(f"{cell(group, prior, s, 'eq19'):.3f}" for s in snrs)
                if group == "steerable"
                else "-"
            )
            secs = statistics.median(r["seconds"] for r in sel)
            name = f"{group}, {'with' if prior else 'without'} prior"
            lines.append(f"| {name} | {err} | {shift} | {own} | {eq19} | {secs:.1f} |")
    lines.append(f"\nMean truncation floor of the basis on these digits: {floor:.3f}.")
    return "\n".join(lines)


def merge(paths) -> dict:
    """The table of several ``--json`` files of one setting (e.g. targets run in parallel)."""
    parts = [json.loads(Path(path).read_text()) for path in paths]
    keys = ("K", "n", "bandlimit", "N", "density", "seed", "iterations", "snrs", "anneal_from",
            "complete_draws")  # fmt: skip
    for part in parts[1:]:
        if any(part["args"].get(k) != parts[0]["args"].get(k) for k in keys):
            raise ValueError(f"--from-json: the files' settings differ ({', '.join(keys)})")
    rows = [r for part in parts for r in part["rows"]]
    floors = {r["target"]: r.get("floor") for r in rows}
    if None in floors.values():  # files written before rows held it: from the checkpoint
        a = parts[0]["args"]
        prior = ScorePrior.from_checkpoint(a["ckpt"])
        basis = mtd.FBBasis(prior.image_size, n=a["n"], bandlimit=a["bandlimit"])
        for index in floors:
            truth, _ = prior.target(index, 0)
            residual = basis.evaluate(basis.expand(truth)) - truth
            floors[index] = float(residual.norm() / truth.norm())
    floors = [floors[r["target"]] for r in rows if r["group"] == "steerable" and not r["prior"]]
    text = table(rows, parts[0]["args"]["snrs"], statistics.mean(floors))
    targets = sorted({r["target"] for r in rows})
    print(f"targets {targets}\n{text}")
    return {"rows": rows, "table": text}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", default=str(ROOT / "priors/pretrained/mnist.ckpt"))
    p.add_argument("--init-digits", default=str(ROOT / "assets/mnist_digits.npz"))
    p.add_argument("--targets", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--snrs", type=float, nargs="+", default=[0.1, 0.5, 1.0])
    p.add_argument("--K", type=int, default=16, help="rotations searched, both methods")
    p.add_argument("--n", type=int, default=None, help="FB coefficients (default: Nyquist)")
    p.add_argument("--bandlimit", type=float, default=None, help="largest lambda kept")
    p.add_argument("--N", type=int, default=308, help="measurement side (the paper's 11 L)")
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0, help="of every measurement and completion")
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--noise-scale", type=float, default=1.0)
    p.add_argument(
        "--complete-draws",
        type=int,
        default=4,
        help="white completions of the basis image's missing noise (em=steerable_mnist's 4)",
    )
    p.add_argument("--anneal-from", type=float, default=1.0)
    p.add_argument("--anneal-iterations", type=int, default=32)
    p.add_argument("--orbit-angles", type=int, default=720, help="fine grid the error is min over")
    p.add_argument("--max-shift", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write every run's numbers here")
    p.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        help="no runs: the table of the runs these --json files hold (parts of one table)",
    )
    args = p.parse_args(argv)
    if args.from_json:
        return merge(args.from_json)
    if args.K < 1 or args.orbit_angles < 1 or args.iterations < 1:
        raise ValueError(
            f"--K, --orbit-angles and --iterations must be >= 1, got {args.K}, "
            f"{args.orbit_angles}, {args.iterations}"
        )
    torch.set_num_threads(args.threads)
    prior = ScorePrior.from_checkpoint(args.ckpt)
    L = prior.image_size
    basis = mtd.FBBasis(L, n=args.n, bandlimit=args.bandlimit)
    steerable = mtd.Steerable(basis, args.K, orbit_angles=args.orbit_angles)
    groups = {
        "bilinear": (mtd.Rotations(L, args.K), mtd.Rotations(L, args.orbit_angles)),
        "steerable": (steerable, SteerableImages(steerable)),
    }
    init = initial_image(Path(args.init_digits))
    print(f"FB basis: L = {L}, n = {basis.n}, largest lambda {basis.lam[-1]:.2f}; K = {args.K}")
    rows, floors = [], []
    for index in args.targets:
        truth, where = prior.target(index, 0)
        floors.append(float((basis.evaluate(basis.expand(truth)) - truth).norm() / truth.norm()))
        for snr in args.snrs:
            cell_rows = run_cell(truth, snr, groups, init, prior, args)
            for r in cell_rows:
                r["target"], r["floor"] = index, floors[-1]
                print(
                    f"target {index} SNR {snr:g} {r['group']:9s} prior={r['prior']!s:5s} "
                    f"error {r['error']:.3f} shift {r['error_shift']:.3f} "
                    f"({r['seconds']:.1f} s)",
                    flush=True,
                )
            rows += cell_rows
    text = table(rows, args.snrs, statistics.mean(floors))
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return {"rows": rows, "table": text}


if __name__ == "__main__":
    main()
