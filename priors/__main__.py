"""``python -m priors export TRAINED.ckpt OUT.ckpt``: keep what inference needs (EMA weights)."""

import argparse

from priors.prior import ScorePrior, export_ema

parser = argparse.ArgumentParser(prog="python -m priors", description=__doc__)
sub = parser.add_subparsers(dest="command", required=True)
exp = sub.add_parser("export", help="write an EMA-only copy of a checkpoint")
exp.add_argument("checkpoint")
exp.add_argument("out")
args = parser.parse_args()
path = export_ema(args.checkpoint, args.out)
prior = ScorePrior.from_checkpoint(path)  # check that it loads
print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {prior.meta['name']} prior")
