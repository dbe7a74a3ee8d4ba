"""The engine's demo: ``python -m mtd`` simulates a measurement of a shipped MNIST digit and
recovers it.

No prior, no Hydra, no W&B: the approximate EM of the approximate-EM paper on one measurement, with
a progress bar over iterations. Ctrl-C stops it cleanly; outputs are written only when EM has
finished.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import mtd

DIGITS = Path(__file__).resolve().parents[1] / "assets" / "mnist_digits.npz"


def main(argv=None) -> int:
    first_paragraph = " ".join(__doc__.split("\n\n")[0].split())
    p = argparse.ArgumentParser(prog="python -m mtd", description=first_paragraph)
    p.add_argument(
        "--digit", type=int, default=10, help="index into assets/mnist_digits.npz (0-19)"
    )
    p.add_argument("--snr", type=float, default=10.0)
    p.add_argument(
        "--N", type=int, default=None, help="measurement side (default 11 L, the paper's)"
    )
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for measurement.mrc, estimate.npy, truth.npy (made if missing)",
    )
    args = p.parse_args(argv)
    if args.out is not None and args.out.exists() and not args.out.is_dir():  # before EM
        p.error(f"--out must be a folder, got the existing file {args.out}")

    with np.load(DIGITS) as f:
        images = torch.from_numpy(f["images"].astype(np.float64) / 255.0)
    if not 0 <= args.digit < len(images):
        p.error(f"--digit must be in 0..{len(images) - 1}, got {args.digit}")
    truth = images[args.digit]
    # The score-prior paper's MNIST initialisation: the mean of ten other digits.
    others = [i for i in range(len(images)) if i != args.digit][:10]
    init = images[others].mean(0)
    N = args.N or 11 * truth.shape[0]
    try:  # bad values: one line naming the option (argparse's usage and exit status 2)
        meas = mtd.simulate(truth, N, density=args.density, snr=args.snr, K=args.K, seed=args.seed)
        group = mtd.Rotations(truth.shape[0], args.K)
        em = mtd.ApproximateEM(
            group, iterations=args.iterations, device=args.device, dtype=args.dtype
        )
    except ValueError as e:
        p.error(str(e))
    print(
        f"measurement {N} x {N}: {len(meas.angles)} copies of a {truth.shape[0]}-pixel digit, "
        f" SNR {args.snr:g} (sigma {meas.sigma:.4f}), K = {args.K}"
    )
    from tqdm import tqdm

    bar = tqdm(total=args.iterations, desc="EM", unit="it", file=sys.stdout)

    def show(entry):
        bar.update(1)
        bar.set_postfix(loglik=f"{entry['loglik']:.4g}", error=f"{entry['error']:.3f}")

    start = time.perf_counter()
    try:
        res = em.fit(meas.data, init, truth=truth, callback=show)
    except KeyboardInterrupt:
        bar.close()
        print("interrupted: nothing written")
        return 130
    bar.close()
    seconds = time.perf_counter() - start
    print(
        f"{len(res.history)} iterations in {seconds:.2f} s "
        f"({1e3 * seconds / len(res.history):.1f} ms each); relative error: "
        f"init {mtd.relative_error(truth, init):.3f} -> estimate "
        f"{mtd.relative_error(truth, res.estimate):.3f} (up to translation: "
        f"{mtd.relative_error(truth, res.estimate, max_shift=3):.3f}); sigma {res.sigma:.4f}"
    )
    if args.out is not None:
        meas.save(args.out / "measurement.mrc")
        mtd.write_micrograph(args.out / "estimate.npy", res.estimate.cpu())
        mtd.write_micrograph(args.out / "truth.npy", truth)
        print(f"wrote measurement.mrc, estimate.npy and truth.npy into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
