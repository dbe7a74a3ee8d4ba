"""Denoise a micrograph: ``python denoise.py micrograph=PATH sigma=S [estimate=PATH guidance=L]``.

Hydra composes ``configs/denoise.yaml``; ``tasks.denoise.denoise(cfg)`` does the work
(docs/picking.md).
"""

import hydra

from tasks.denoise import denoise
from tasks.errors import run_command


@hydra.main(version_base="1.3", config_path="configs", config_name="denoise")
def main(cfg) -> None:
    summary = run_command(denoise, cfg)
    shown = {k: round(v, 4) for k, v in summary.get("metrics", {}).items()}
    print(f"denoised: {summary['outputs']['mrc']} ({summary['seconds']:.1f} s) {shown}")


if __name__ == "__main__":
    main()
