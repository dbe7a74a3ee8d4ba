"""The forward model, the rotation operators, file I/O and the error metric."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

import mtd
from tests.reference import equations as ref


# ------------------------------------------------------------------------------------------------
# Rotations
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("L", [4, 5, 28])
def test_k4_rotations_are_exact_rot90(L):
    x = torch.randn(L, L, dtype=torch.float64)
    R = mtd.Rotations(L, 4)
    for k in range(4):
        assert torch.equal(R(x)[k], torch.rot90(x, k))
    assert R.is_permutation


@pytest.mark.parametrize("L,angle", [(5, 0.3), (6, 2 * math.pi / 8), (7, 4.0)])
def test_interpolated_rotation_matches_plain_loop(L, angle):
    x = np.random.default_rng(0).standard_normal((L, L))
    ours = mtd.rotate(torch.from_numpy(x), angle).numpy()
    np.testing.assert_allclose(ours, ref.rotate(x, angle), atol=1e-12)


@pytest.mark.parametrize("L,K", [(5, 8), (4, 3), (6, 4)])
def test_adjoint_and_normal_matrix(L, K):
    R = mtd.Rotations(L, K)
    x = torch.randn(L, L, dtype=torch.float64)
    y = torch.randn(K, L, L, dtype=torch.float64)
    assert torch.allclose((R(x) * y).sum(), (x * R.adjoint(y)).sum())  # <R x, y> = <x, R^T y>
    c = torch.rand(K, L, L, dtype=torch.float64)
    dense = torch.stack(
        [R(e.reshape(L, L)).reshape(K, -1) for e in torch.eye(L * L, dtype=torch.float64)], -1
    )
    expected = sum(dense[k].T @ torch.diag(c[k].reshape(-1)) @ dense[k] for k in range(K))
    assert torch.allclose(R.normal_matrix(c), expected)


# ------------------------------------------------------------------------------------------------
# Simulation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("separation,gap", [("well", 9), ("arbitrary", 5)])
def test_plants_exactly_p_copies_with_the_separation_rule(separation, gap):
    image = torch.rand(5, 5, dtype=torch.float64) + 0.1
    meas = mtd.simulate(image, 200, density=0.1, separation=separation, seed=3)
    p = round(0.1 * 200**2 / 25)
    assert meas.positions.shape == (p, 2) and meas.angles.shape == (p,)
    pos = meas.positions
    assert pos.min() >= 0 and pos.max() <= 200 - 5
    d = (pos[:, None] - pos[None]).abs()
    apart = (d[..., 0] >= gap) | (d[..., 1] >= gap)
    assert apart[~torch.eye(p, dtype=torch.bool)].all()


def test_clean_measurement_holds_rotated_copies(digits):
    image = digits[3]
    meas = mtd.simulate(image, 308, snr=1.0, K=4, seed=1)
    clean = meas.clean()
    for (r, c), angle in zip(meas.positions.tolist(), meas.angles.tolist(), strict=True):
        k = round(angle / (math.pi / 2)) % 4
        assert torch.equal(clean[r : r + 28, c : c + 28], torch.rot90(image, k))
    assert clean.sum() == pytest.approx(len(meas.angles) * float(image.sum()))
    noise = meas.data - clean
    assert float(noise.std()) == pytest.approx(meas.sigma, rel=0.02)
    assert meas.sigma == pytest.approx(math.sqrt(float(image.square().sum()) / (1.0 * 28 * 28)))


def test_continuous_rotations_use_the_interpolated_operator():
    image = torch.rand(7, 7, dtype=torch.float64)
    meas = mtd.simulate(image, 100, snr=math.inf, rotation="continuous", seed=4)
    assert not torch.allclose(meas.angles / (math.pi / 2), (meas.angles / (math.pi / 2)).round())
    (r, c), angle = meas.positions[0].tolist(), float(meas.angles[0])
    assert torch.allclose(meas.data[r : r + 7, c : c + 7], mtd.rotate(image, angle))


def test_same_seed_same_bytes_other_seed_other_data():
    image = torch.rand(5, 5, dtype=torch.float64)
    a, b = mtd.simulate(image, 80, seed=11), mtd.simulate(image, 80, seed=11)
    assert a.data.numpy().tobytes() == b.data.numpy().tobytes()
    assert torch.equal(a.positions, b.positions) and torch.equal(a.angles, b.angles)
    assert not torch.equal(a.data, mtd.simulate(image, 80, seed=12).data)


def test_too_many_copies_says_how_many_fit():
    with pytest.raises(ValueError, match=r"at most 36 fit"):
        mtd.simulate(torch.ones(5, 5), 50, density=0.5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"N": 4}, "N must be an integer >= L"),
        ({"snr": 0.0}, "snr must be > 0"),
        ({"density": -0.1}, "density must be"),
        ({"rotation": "random"}, "rotation must be"),
        ({"separation": "close"}, "separation must be"),
    ],
)
def test_simulate_refuses_bad_arguments(kwargs, match):
    args = {"image": torch.ones(5, 5), "N": 50, **kwargs}
    with pytest.raises(ValueError, match=match):
        mtd.simulate(**args)


def test_simulate_refuses_non_square_or_blank_image():
    with pytest.raises(ValueError, match="square"):
        mtd.simulate(torch.ones(5, 4), 50)
    with pytest.raises(ValueError, match="all zeros"):
        mtd.simulate(torch.zeros(5, 5), 50)


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".npy", ".mrc"])
def test_write_read_round_trip(tmp_path, suffix):
    meas = mtd.simulate(torch.rand(5, 5), 60, seed=1)
    path = meas.save(tmp_path / f"m{suffix}")
    back = mtd.read_micrograph(path)
    expected = meas.data if suffix == ".npy" else meas.data.float()
    assert back.shape == (60, 60) and torch.equal(back, expected.to(back.dtype))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"m{suffix}"]  # no temporary left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # the user's umask, not a private 0600


def test_read_refuses_bad_files(tmp_path):
    np.save(tmp_path / "cube.npy", np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="2-D"):
        mtd.read_micrograph(tmp_path / "cube.npy")
    bad = np.zeros((6, 6))
    bad[1, 1] = np.inf
    np.save(tmp_path / "inf.npy", bad)
    with pytest.raises(ValueError, match="non-finite"):
        mtd.read_micrograph(tmp_path / "inf.npy")
    with pytest.raises(FileNotFoundError):
        mtd.read_micrograph(tmp_path / "missing.mrc")
    with pytest.raises(ValueError, match="unknown measurement format"):
        mtd.write_micrograph(tmp_path / "m.tif", np.zeros((4, 4)))


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        mtd.write_micrograph(tmp_path / "m.npy", np.zeros((4, 4)))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# Error metric
# ------------------------------------------------------------------------------------------------
def test_relative_error_is_rotation_invariant_and_optionally_shift_invariant(digits):
    x = digits[5]
    assert mtd.relative_error(x, torch.rot90(x, 3)) == 0.0
    assert mtd.relative_error(x, 2 * x) == pytest.approx(1.0)
    assert mtd.relative_error(x, torch.rot90(x, 1), K=1) > 0.5
    shifted = torch.roll(
        x, (1, -2), (0, 1)
    )  # the digit's border is empty, so rolling is translating
    assert mtd.relative_error(x, shifted) > 0.3
    assert mtd.relative_error(x, shifted, max_shift=2) == 0.0
