"""Pick particles in a micrograph: ``python pick.py micrograph=PATH estimate=PATH [method=...]``.

Hydra composes ``configs/pick.yaml``; ``tasks.pick.pick(cfg)`` does the work (docs/picking.md).
"""

import hydra

from tasks.errors import run_command
from tasks.pick import pick


@hydra.main(version_base="1.3", config_path="configs", config_name="pick")
def main(cfg) -> None:
    metrics = run_command(pick, cfg)
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}
    print(f"picks: {shown}")


if __name__ == "__main__":
    main()
