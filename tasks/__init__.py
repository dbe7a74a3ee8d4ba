"""The commands' orchestration: Hydra configs read into typed settings, W&B, progress, files.

Each top-level script (``reconstruct.py``, ``pick.py``, ``denoise.py``, ``train.py``,
``report.py``) composes its config and calls one function here, which tests call directly with
a composed config. The engine (``mtd``) and the priors (``priors``) never import this package.

    config       the typed reader of a composed config (every value checked before any work)
    settings     the commands' typed settings
    errors       the errors a user gets as one line (exit status 2), and the commands' wrapper
    checks       the run-level checks: the run directory, the initial guess's scale, stochastic
                 EM's floor, the checkpoint's identity
    inputs       a reconstruction's inputs: the prior, the measurement, the group, the guesses
    tracking     W&B: offline without credentials, one run per reconstruction, its logging
    reconstruct  the reconstruction of any object (images, steerable images, volumes)
    after_em     picking and denoising after EM
    pick, denoise, train, report   the other commands
"""

from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent


def register_project_resolver() -> None:
    """``${project:PATH}`` in configs: a file shipped with the project, wherever the command is run
    from (registered when this package is imported, before Hydra composes a config)."""
    OmegaConf.register_new_resolver("project", lambda p="": str(ROOT / p), replace=True)


register_project_resolver()
