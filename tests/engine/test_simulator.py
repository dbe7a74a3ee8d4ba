"""The simulator against hand-made measurements: SNR, planted copies, and EM on data it never made.

Every expected value here comes from NumPy (np.rot90, scipy's bilinear rotation in
``tests.reference.equations.rotate``, a placement written out by hand), never from the
simulator's own rebuild (``Measurement.clean``) or its operators.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mtd
from tests.reference import equations as ref


def hand_planted(image: np.ndarray, meas: mtd.Measurement, copy) -> np.ndarray:
    """(N, N) the noise-free measurement rebuilt by NumPy: ``copy(image, angle, reflected)`` added
    at every returned position."""
    out = np.zeros((meas.N, meas.N))
    L = image.shape[0]
    reflections = meas.reflections
    for i, ((r, c), angle) in enumerate(
        zip(meas.positions.tolist(), meas.angles.tolist(), strict=True)
    ):
        flipped = bool(reflections[i]) if reflections is not None else False
        out[r : r + L, c : c + L] += copy(image, angle, flipped)
    return out


def rot90_copy(image, angle, flipped):
    src = np.fliplr(image) if flipped else image
    return np.rot90(src, round(angle / (math.pi / 2)) % 4)


def bilinear_copy(image, angle, flipped):
    return ref.rotate(np.fliplr(image).copy() if flipped else image, angle)


def discrete(K):
    """A copy turned by the multiple of 2 pi / K nearest the returned angle (the angles are
    float32 for now: see test_discrete_angles_are_float64_multiples_of_two_pi_over_k)."""

    def copy(image, angle, flipped):
        k = round(angle * K / (2 * math.pi)) % K
        return bilinear_copy(image, 2 * math.pi * k / K, flipped)

    return copy


# ------------------------------------------------------------------------------------------------
# SNR = ||F||^2 / (L^2 sigma^2) (DESIGN section 3), measured on the noise itself
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("snr", [0.1, 0.5, 4.0, 25.0])
def test_snr_is_the_ratio_of_image_power_to_noise_power(snr):
    # The noise is the measurement less the copies planted by hand; its empirical power over
    # N^2 = 90,000 pixels fixes the SNR to 1.5% (4 standard errors). A sigma of another formula
    # (say sqrt(||F||^2 / L^2) / snr, equal to this one only at snr = 1) misses it by a factor
    # snr at least 10% away from 1.
    rng = np.random.default_rng(7)
    L = 7
    image = rng.uniform(0, 2, (L, L))
    meas = mtd.simulate(image, 300, density=0.05, snr=snr, K=4, seed=3)
    noise = meas.data.numpy() - hand_planted(image, meas, rot90_copy)
    power = np.square(image).sum() / (L * L)
    measured_snr = power / noise.var()
    assert measured_snr == pytest.approx(snr, rel=0.015)
    assert abs(noise.mean()) < 4 * meas.sigma / 300  # zero-mean white noise
    # The returned sigma is the one of the definition, and the one in the data.
    assert power / meas.sigma**2 == pytest.approx(snr, rel=1e-12)
    assert noise.std() == pytest.approx(meas.sigma, rel=0.008)
    assert meas.snr == snr


def test_infinite_snr_is_noise_free():
    rng = np.random.default_rng(8)
    image = rng.uniform(0, 1, (5, 5))
    meas = mtd.simulate(image, 80, snr=math.inf, seed=1)
    assert meas.sigma == 0
    np.testing.assert_array_equal(meas.data.numpy(), hand_planted(image, meas, rot90_copy))


# ------------------------------------------------------------------------------------------------
# The copies sit at the returned positions, turned by the returned angles
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "K,rotation,reflect",
    [
        (4, "discrete", False),
        (4, "discrete", True),
        (8, "discrete", False),
        (4, "continuous", True),
    ],
)
def test_copies_are_planted_at_the_returned_positions_and_angles(K, rotation, reflect):
    rng = np.random.default_rng(9)
    L = 6
    image = rng.uniform(0, 1, (L, L))
    meas = mtd.simulate(
        image, 150, density=0.08, snr=math.inf, K=K, rotation=rotation, reflect=reflect, seed=4
    )
    p = len(meas.angles)
    assert p == round(0.08 * 150**2 / L**2) and meas.positions.shape == (p, 2)
    if rotation == "discrete":  # multiples of 2 pi / K, each of them drawn
        k = meas.angles.numpy() * K / (2 * math.pi)
        np.testing.assert_allclose(k, np.round(k), atol=1e-12)
        assert set(np.round(k).astype(int) % K) == set(range(K))
    else:
        assert not np.allclose(meas.angles.numpy() % (math.pi / 2), 0)
    if reflect:
        assert 0.25 < float(meas.reflections.double().mean()) < 0.75
    copy = {"continuous": bilinear_copy, "discrete": rot90_copy if K == 4 else discrete(K)}
    copy = copy[rotation]
    np.testing.assert_allclose(meas.data.numpy(), hand_planted(image, meas, copy), atol=1e-12)


def test_discrete_angles_are_float64_multiples_of_two_pi_over_k():
    meas = mtd.simulate(np.ones((5, 5)), 60, K=8, seed=0)
    assert meas.angles.dtype == torch.float64
    k = torch.round(meas.angles * 8 / (2 * math.pi))
    assert torch.equal(meas.angles, k * (2 * math.pi / 8))


# ------------------------------------------------------------------------------------------------
# The engine on measurements the simulator did not make
# ------------------------------------------------------------------------------------------------
def hand_measurement(image, corners, ks, N, sigma, seed):
    """(N, N): np.rot90(image, k) added at each top-left corner, plus N(0, sigma^2) noise."""
    L = image.shape[0]
    data = np.random.default_rng(seed).standard_normal((N, N)) * sigma
    for (r, c), k in zip(corners, ks, strict=True):
        data[r : r + L, c : c + L] += np.rot90(image, k)
    return data


def test_e_step_on_a_hand_made_measurement_equals_brute_force():
    # Three copies by hand, one inside a patch, two cut by patch borders (L = 4, 3 x 3 patches).
    L, K = 4, 4
    rng = np.random.default_rng(10)
    image = rng.uniform(0, 1, (L, L))
    data = hand_measurement(image, [(0, 0), (5, 2), (8, 7)], [0, 1, 3], 3 * L, 0.4, seed=11)
    F = image + 0.3 * rng.standard_normal((L, L))
    rho = rng.uniform(0.5, 1.5, (2 * L, 2 * L))
    rho /= rho.sum()
    patch_list = ref.patches(data, L)
    w, loglik = ref.e_step(patch_list, F, rho, 0.4, K)
    omega, b, c = ref.statistics(w, patch_list, K)
    for method in ("fft", "gemm"):
        em = mtd.ApproximateEM(
            mtd.Rotations(L, K), compute=mtd.Compute(method=method), dtype=torch.float64
        )
        stats = em.e_step(
            em.prepare(data), torch.from_numpy(F), torch.from_numpy(np.log(rho)), 0.4**2
        )
        np.testing.assert_allclose(stats.omega.numpy(), omega, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(stats.b.numpy(), b, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(stats.c.numpy(), c, rtol=1e-9, atol=1e-12)
        assert float(stats.loglik) == pytest.approx(loglik, rel=1e-10)


def test_em_recovers_an_image_from_a_hand_made_measurement():
    # 64 copies on a lattice of corners 2L apart (well separated), random rot90 turns, SNR 25
    # by the definition: EM from a blurred start recovers the image.
    L = 5
    rng = np.random.default_rng(12)
    image = rng.uniform(0, 1, (L, L))
    sigma = math.sqrt(np.square(image).sum() / (25.0 * L * L))
    corners = [(2 * L * i + 1, 2 * L * j + 3) for i in range(8) for j in range(8)]
    data = hand_measurement(image, corners, rng.integers(0, 4, 64), 16 * L + 5, sigma, seed=13)
    init = torch.full((L, L), float(image.mean()), dtype=torch.float64)
    init += 0.2 * torch.from_numpy(rng.standard_normal((L, L)))
    em = mtd.ApproximateEM(mtd.Rotations(L, 4), iterations=100, dtype=torch.float64)
    res = em.fit(data[: 16 * L, : 16 * L], init)
    assert mtd.relative_error(image, init) > 0.15
    assert mtd.relative_error(image, res.estimate) < 0.03
    assert res.sigma == pytest.approx(sigma, rel=0.05)
