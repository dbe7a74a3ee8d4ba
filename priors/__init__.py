"""priors: score-based diffusion priors (VP-SDE, networks, losses, Lightning training, loading)."""

from priors.nets import ScoreAdapter
from priors.prior import AnalyticGaussianPrior, ScorePrior
from priors.sde import VPSDE

__all__ = ["AnalyticGaussianPrior", "ScoreAdapter", "ScorePrior", "VPSDE"]
