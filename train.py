"""Train a score prior: ``python train.py data=mnist`` or ``python train.py data=gaussian``.

Hydra composes ``configs/train.yaml``; ``tasks.train.train(cfg)`` does the work
(docs/training.md).
"""

import hydra

from tasks.errors import run_command
from tasks.train import report, train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg) -> None:
    report(*run_command(train, cfg))


if __name__ == "__main__":
    main()
