"""What several test modules share: the repository's root, a tiny Gaussian prior's checkpoint,
the small Gaussian reconstruction the tests run."""

from __future__ import annotations

from pathlib import Path

import torch

from priors.nets import build_net

ROOT = Path(__file__).resolve().parents[1]
MU = (torch.arange(25, dtype=torch.float64).reshape(5, 5) * 7 % 5).tolist()


def write_gaussian_ckpt(path: Path, time: bool = True, image_size: int = 5) -> Path:
    """A checkpoint as train.py writes it (hyperparameters + EMA weights), untrained."""
    net_hp = {"name": "mlp", "image_size": image_size, "hidden": 16, "time": time}
    torch.manual_seed(0)
    net = build_net(**net_hp)
    mu = (torch.arange(image_size**2) % 5).float().tolist() if image_size != 5 else MU
    ckpt = {
        "hyper_parameters": {
            "net": net_hp,
            "sde": {"beta_min": 0.1, "beta_max": 20.0, "N": 1000},
            "data_meta": {"name": "gaussian", "image_size": image_size, "units": 1.0, "mu": mu},
        },
        "state_dict": {f"ema.{k}": v for k, v in net.state_dict().items()},
    }
    torch.save(ckpt, path)
    return path


def gaussian_image(seed=0, L=5):
    """An L x L image from N(mu, I) with mu in {0..4}^(L x L) (the score-prior paper's data), and
    mu."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randint(0, 5, (L, L), generator=g).double()
    return mu + torch.randn(L, L, generator=g, dtype=torch.float64), mu


GAUSS = (
    "em=paper_gaussian",
    "em.iterations=30",
    "measurement.snr=10",
    "measurement.N=40",
    "measurement.density=0.12",
)
