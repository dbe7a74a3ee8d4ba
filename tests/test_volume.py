"""Volumes from micrographs (issue 13): SO(3) grids, projections, the volume simulator, EM.

Closed forms and brute force: Haar moments and the covering radius of the grid, RELION's Euler
matrices by their defining product, the projection of an anisotropic Gaussian (a closed-form line
integral), the adjoint identity, the E-step against tests/reference.py's loops, the M-step's
normal equations against autograd of Q.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import optimize

import mtd
from mtd import projection as pj
from mtd import so3
from tests import reference as ref  # noqa: F401 (the E-step tests below)


# ------------------------------------------------------------------------------------------------
# SO(3)
# ------------------------------------------------------------------------------------------------
def _orthogonal(R):
    eye = torch.eye(3, dtype=torch.float64)
    return float((R.transpose(-1, -2) @ R - eye).abs().max()), torch.linalg.det(R)


@pytest.mark.parametrize("r", [0, 1])
def test_hopf_grid_is_rotations_with_equal_weights(r):
    R, w = so3.hopf_grid(r)
    assert R.shape == (72 * 8**r, 3, 3)
    err, det = _orthogonal(R)
    assert err < 1e-12 and torch.allclose(det, torch.ones_like(det))
    assert torch.allclose(w, torch.full_like(w, 1 / len(R))) and float(w.sum()) == pytest.approx(1)
    # No rotation twice.
    d = so3.geodesic_distance(R[:, None], R[None]) + 10 * torch.eye(len(R), dtype=torch.float64)
    assert float(d.min()) > 0.1


def test_hopf_grid_integrates_low_degree_wigner_d_and_covers_so3():
    # Haar: E[R] = 0 (the l = 1 Wigner-D matrix) and E[R_ij R_kl] = delta_ik delta_jl / 3 (l <= 2).
    R, w = so3.hopf_grid(1)
    first = torch.einsum("n,nij->ij", w, R)
    second = torch.einsum("n,nij,nkl->ijkl", w, R, R)
    eye = torch.eye(3, dtype=torch.float64)
    haar = torch.einsum("ik,jl->ijkl", eye, eye) / 3
    assert float(first.abs().max()) < 1e-12
    assert float((second - haar).abs().max()) < 0.015
    # Covering radius: no K balls of radius t cover SO(3) unless K (t - sin t) / pi >= 1 (the Haar
    # measure of a ball); a near-uniform grid covers within a small factor of that bound.
    K = len(R)
    bound = optimize.brentq(lambda t: K * (t - math.sin(t)) / math.pi - 1, 1e-6, math.pi)
    probes = so3.random_rotations(2000, seed=5)
    covering = float(so3.geodesic_distance(probes[:, None], R[None]).min(1).values.max())
    assert bound < covering < 1.5 * bound
    # Nearest-neighbour distances nearly equal (a random set of K has a spread of ~10x).
    d = so3.geodesic_distance(R[:, None], R[None]) + 10 * torch.eye(K, dtype=torch.float64)
    nn = d.min(1).values
    assert float(nn.max() / nn.min()) < 1.1


def test_random_rotations_are_haar_and_seeded():
    R = so3.random_rotations(20000, seed=3)
    err, det = _orthogonal(R)
    assert err < 1e-12 and float(det.min()) > 0
    assert torch.equal(R, so3.random_rotations(20000, seed=3))
    assert not torch.equal(R[:5], so3.random_rotations(5, seed=4))
    # E[R] = 0, E[R_00^2] = 1/3, and the rotation angle's density (1 - cos t) / pi: E[t] = pi/2 +
    # 2/pi.
    n = len(R)
    assert float(R.mean(0).abs().max()) < 5 / math.sqrt(n)
    assert float(R[:, 0, 0].square().mean()) == pytest.approx(1 / 3, abs=5 / math.sqrt(n))
    angle = so3.geodesic_distance(torch.eye(3, dtype=torch.float64), R)
    assert float(angle.mean()) == pytest.approx(math.pi / 2 + 2 / math.pi, abs=5 / math.sqrt(n))


def _passive(axis, a):
    """RELION's rotation matrices of its Euler angles (passive: coordinates of rotated axes)."""
    c, s = math.cos(a), math.sin(a)
    if axis == "z":
        return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])
    return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])


def test_relion_matrix_is_its_zyz_product_and_euler_round_trips():
    rng = np.random.default_rng(0)
    angles = np.stack(
        [rng.uniform(-180, 180, 50), rng.uniform(0.5, 179.5, 50), rng.uniform(-180, 180, 50)], 1
    )
    A = so3.relion_matrix(*angles.T)
    for a, (rot, tilt, psi) in zip(A, np.radians(angles), strict=True):
        product = _passive("z", psi) @ _passive("y", tilt) @ _passive("z", rot)
        np.testing.assert_allclose(a, product, atol=1e-14)
    R = so3.euler_to_matrix(angles)
    # Our axes (z, y, x) are RELION's (x, y, z) reversed: R[a, b] = A[2 - a, 2 - b].
    np.testing.assert_allclose(R.numpy(), A[:, ::-1, ::-1], atol=0)
    np.testing.assert_allclose(so3.matrix_to_euler(R).numpy(), angles, atol=1e-9)
    Q = so3.random_rotations(100, seed=1)
    back = so3.euler_to_matrix(so3.matrix_to_euler(Q))
    assert float((back - Q).abs().max()) < 1e-12
    # Gimbal lock: tilt 0 and 180 keep the matrix (rot folded into psi).
    for tilt in (0.0, 180.0):
        M = so3.euler_to_matrix(torch.tensor([30.0, tilt, 40.0]))
        assert float((so3.euler_to_matrix(so3.matrix_to_euler(M)) - M).abs().max()) < 1e-12
    # tilt = rot = 0: RELION's psi rotates the image; its projection direction stays axis 0.
    M = so3.euler_to_matrix(torch.tensor([0.0, 0.0, 90.0]))
    assert torch.allclose(M[:, 0], torch.tensor([1.0, 0, 0], dtype=torch.float64))


def _gaussian(L, mean, cov):
    p = so3.grid_points(L)
    d = p - mean
    return torch.exp(-0.5 * (d @ torch.linalg.inv(cov) * d).sum(1)).reshape(L, L, L)


def test_rotate_volume_moves_a_gaussian_as_the_convention_says():
    # (R . V)(p) = V(R^T p): a Gaussian at m with covariance S goes to R m with R S R^T.
    L = 21
    mean = torch.tensor([3.0, -2.0, 1.0], dtype=torch.float64)
    cov = torch.diag(torch.tensor([6.0, 3.0, 2.0], dtype=torch.float64))
    V = _gaussian(L, mean, cov)
    for R in so3.random_rotations(2, seed=2):
        ours = so3.rotate_volume(V, R)
        exact = _gaussian(L, R @ mean, R @ cov @ R.T)
        assert float((ours - exact).norm() / exact.norm()) < 0.08  # trilinear, O(h^2)
        wrong = _gaussian(L, R.T @ mean, R.T @ cov @ R)
        assert float((ours - wrong).norm() / wrong.norm()) > 0.3
    # Quarter turns about an axis are exact permutations: torch.rot90 in the (1, 2) plane.
    W = torch.rand(6, 6, 6, dtype=torch.float64)
    assert torch.equal(
        so3.rotate_volume(W, so3.axis_rotation(0, math.pi / 2)), torch.rot90(W, 1, (1, 2))
    )


# ------------------------------------------------------------------------------------------------
# Projections
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("L", [11, 16, 33])
def test_projection_of_a_gaussian_is_its_closed_form_line_integral(L):
    # int N(p; m, S) dp0 over axis 0 of the rotated blob (mean R m, covariance S' = R S R^T) is
    # sqrt(2 pi det S' / det S'_yx) exp(-(q - m'_yx)^T S'_yx^-1 (q - m'_yx) / 2).
    s = L / 33
    mean = torch.tensor([2.0, -1.5, 1.0], dtype=torch.float64) * s
    cov = torch.diag(torch.tensor([9.0, 4.0, 2.25], dtype=torch.float64)) * s * s
    V = _gaussian(L, mean, cov)
    R = so3.random_rotations(3, seed=0)
    P = pj.project(V, R)
    q = so3.grid_points(L).reshape(L, L, L, 3)[0, :, :, 1:]
    tol = {11: 0.4, 16: 0.15, 33: 0.05}[L]  # trilinear interpolation: O(h^2 / s^2)
    for k in range(3):
        S, m = R[k] @ cov @ R[k].T, R[k] @ mean
        S2, d = S[1:, 1:], q - m[1:]
        amp = math.sqrt(2 * math.pi * torch.linalg.det(S) / torch.linalg.det(S2))
        exact = amp * torch.exp(-0.5 * (d @ torch.linalg.inv(S2) * d).sum(-1))
        assert float((P[k] - exact).norm() / exact.norm()) < tol
        if L == 33:  # the mass, the integral itself
            assert float(P[k].sum()) == pytest.approx(float(exact.sum()), rel=1e-3)


def test_projection_adjoint_is_exact():
    rng = torch.Generator().manual_seed(0)
    for L in (5, 8):
        R = so3.random_rotations(7, seed=L)
        V = torch.randn(L, L, L, dtype=torch.float64, generator=rng)
        Y = torch.randn(7, L, L, dtype=torch.float64, generator=rng)
        lhs = float((pj.project(V, R) * Y).sum())
        rhs = float((V * pj.back_project(Y, R)).sum())
        assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-10)
        for kwargs in ({}, {"bandlimit": 3}, {"cache_bytes": 0}):
            g = pj.Projections(L, R, **kwargs)
            for block in (None, slice(2, 5)):
                T = g.templates(V, block)
                Yb = Y[block or slice(None)]
                a, b = float((T * Yb).sum()), float((V * g.adjoint(Yb, block)).sum())
                assert a == pytest.approx(b, rel=1e-12, abs=1e-10)
    # The identity rotation is the sum along axis 0.
    V = torch.rand(5, 5, 5, dtype=torch.float64)
    assert torch.allclose(pj.project(V, torch.eye(3)[None])[0], V.sum(0), atol=1e-14)


def test_in_plane_rotation_about_axis_0_rotates_the_projection_like_mtd_rotate():
    V = torch.rand(7, 7, 7, dtype=torch.float64)
    R = so3.axis_rotation(0, math.pi / 2)
    assert torch.allclose(pj.project(V, R[None])[0], torch.rot90(V.sum(0), 1), atol=1e-13)
    # A generic angle, on a smooth blob (both interpolations are bilinear in the image plane).
    L = 21
    V = _gaussian(
        L,
        torch.tensor([0.0, 3.0, -1.0], dtype=torch.float64),
        4 * torch.eye(3, dtype=torch.float64),
    )
    phi = 0.7
    ours = pj.project(V, so3.axis_rotation(0, phi)[None])[0]
    image = mtd.rotate(V.sum(0), phi)
    assert float((ours - image).norm() / image.norm()) < 0.02
    mirrored = mtd.rotate(V.sum(0), -phi)
    assert float((ours - mirrored).norm() / mirrored.norm()) > 0.3


def test_projections_checks_its_input():
    R = so3.random_rotations(3, seed=0)
    with pytest.raises(ValueError, match="K = 0"):
        pj.Projections(5, torch.zeros(0, 3, 3))
    with pytest.raises(ValueError, match="orthogonal"):
        pj.Projections(5, R * 2)
    with pytest.raises(ValueError, match="orthogonal"):
        pj.Projections(5, -R)  # det -1: a reflection
    with pytest.raises(ValueError, match=r"\(K, 3, 3\)"):
        pj.Projections(5, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="weights"):
        pj.Projections(5, R, weights=[1, 2])
    with pytest.raises(ValueError, match="schedule"):
        pj.Projections(5, R, schedule=[(1, 4)])
    with pytest.raises(ValueError, match="cubic"):
        pj.project(torch.zeros(5, 5, 4), R)


def test_bandlimited_subspace_is_nested_in_the_ball_and_marches():
    L = 9
    R = so3.random_rotations(4, seed=0)
    g = pj.Projections(L, R, schedule=[(0, 2), (3, 4)])
    assert g.bandlimit == 2
    small = g.basis.clone()
    V = torch.randn(L, L, L, dtype=torch.float64)
    PV = g.restrict(V)
    assert torch.allclose(g.restrict(PV), PV, atol=1e-12)  # a projector
    assert float(PV[~g.mask].abs().max()) == 0  # inside the ball
    g.start_iteration(2)
    assert g.bandlimit == 2
    g.start_iteration(3)
    assert g.bandlimit == 4 and g.n > small.shape[1]
    # Nested: the l <= 2 functions lie in the l <= 4 subspace.
    assert torch.allclose(
        g.restrict(small.T.reshape(-1, L, L, L)), small.T.reshape(-1, L, L, L), atol=1e-10
    )
    # l <= lmax: a volume of degree-3 harmonics only is orthogonal to the l <= 2 subspace.
    p = so3.grid_points(L)
    r = p.norm(dim=1)
    f = (p[:, 0] * p[:, 1] * p[:, 2] * torch.cos(math.pi * r / L)).reshape(L, L, L) * g.mask
    assert float((small.T @ f.reshape(-1)).abs().max()) < 1e-10 * float(f.norm())
