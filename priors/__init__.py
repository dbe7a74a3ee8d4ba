"""priors: score-based diffusion priors (VP-SDE, networks, losses, Lightning training, loading)."""

from priors.prior import AnalyticGaussianPrior, ScorePrior
from priors.sde import VPSDE

__all__ = ["AnalyticGaussianPrior", "ScorePrior", "VPSDE"]
