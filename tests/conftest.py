"""Shared fixtures: the project's real configs composed for tests, real MNIST digits shipped with
the project, a tiny Gaussian prior, seeded generators."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

import mtd
import tasks  # noqa: F401  (the ${project:...} resolver of the configs)

from .helpers import ROOT, write_gaussian_ckpt

ASSETS = ROOT / "assets"


def _test_overrides(name: str, root, out) -> list[str]:
    """What a test run of each command needs: files under the test's folder, no W&B, the CPU."""
    out = str(out if out is not None else root / "out")
    if name == "reconstruct":
        return [f"paths.output_dir={out}", "logger=none"]
    if name == "pick":
        return [f"paths.output_dir={out}"]
    if name == "train":
        return [
            f"paths.output_dir={root}",
            f"paths.data_dir={root / 'data'}",
            "trainer=cpu",
            "trainer.log_every_n_steps=1",  # the tests' runs are a few batches long
            "logger=none",
            "data.num_workers=0",
        ]
    return []


@pytest.fixture(scope="session")
def compose(tmp_path_factory):
    """``compose(name, *overrides, root=None, out=None, bare=False)``: the real
    ``configs/<name>.yaml`` composed as Hydra does for the command, with what a test run needs:
    outputs in ``out`` or ``root/out`` (``root`` None: a new temporary folder), no logger
    (``bare``: nothing added)."""

    def make(name, *overrides, root=None, out=None, bare=False, return_hydra_config=False):
        root = tmp_path_factory.mktemp(name) if root is None else root
        added = [] if bare else _test_overrides(name, root, out)
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
            return hydra_compose(
                name, overrides=[*added, *overrides], return_hydra_config=return_hydra_config
            )

    return make


@pytest.fixture
def no_em(monkeypatch):
    """EM that fails if it starts: what must be refused before the long work is."""

    def fail(*args, **kwargs):
        raise AssertionError("EM started")

    monkeypatch.setattr(mtd.ApproximateEM, "fit", fail)


@pytest.fixture
def gauss_ckpt(tmp_path):
    """A tiny untrained Gaussian prior's checkpoint, as train.py writes one."""
    return write_gaussian_ckpt(tmp_path / "gauss.ckpt")


@pytest.fixture(scope="session")
def digits() -> torch.Tensor:
    """(20, 28, 28) float64 real MNIST digits in [0, 1], two per class (assets/)."""
    with np.load(ASSETS / "mnist_digits.npz") as f:
        return torch.from_numpy(f["images"].astype(np.float64) / 255.0)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need CUDA: skipped, with the reason, where torch sees no GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
