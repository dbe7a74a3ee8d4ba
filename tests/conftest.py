"""Shared fixtures: real MNIST digits shipped with the project, seeded tiny measurements."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

ASSETS = Path(__file__).resolve().parents[1] / "assets"


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
