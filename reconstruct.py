"""Reconstruct an object from an MTD measurement: ``python reconstruct.py [ckpt=PATH|none] ...``.

Hydra composes ``configs/reconstruct.yaml``; ``tasks.reconstruct.reconstruct(cfg)`` does the work
(tests call it directly): EM with and without the score prior from the same initial guess, the
errors, the files and the W&B run (docs/reconstructing.md).
"""

import hydra
import torch

from tasks.errors import run_command
from tasks.reconstruct import print_errors, reconstruct


@hydra.main(version_base="1.3", config_path="configs", config_name="reconstruct")
def main(cfg) -> None:
    metrics = run_command(reconstruct, cfg)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return  # rank 0 reports
    print_errors(metrics, cfg.paths.output_dir)


if __name__ == "__main__":
    main()
