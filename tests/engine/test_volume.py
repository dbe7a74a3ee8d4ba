"""Volumes from micrographs (issue 13): SO(3) grids, projections, the volume simulator, EM.

Closed forms and brute force: Haar moments and the covering radius of the grid, RELION's Euler
matrices by their defining product, the projection of an anisotropic Gaussian (a closed-form line
integral), the adjoint identity, the E-step against tests/reference/equations.py's loops, the
M-step's normal equations against autograd of Q.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import optimize

import mtd
from mtd import so3
from mtd.forward import volumes as mv
from mtd.groups import tomography as pj
from tests.reference import equations as ref
from tests.reference.test_exact import assert_statistics_equal


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


# ------------------------------------------------------------------------------------------------
# The E-step and the M-step over projection templates
# ------------------------------------------------------------------------------------------------
def _tiny_volume_case(L=5, K=6, n=3, snr=2.0, seed=0, bandlimit=None):
    """A float64 micrograph of n x n whole patches of projections, a group of K random rotations,
    a random estimate and shift distribution."""
    rng = np.random.default_rng(seed)
    R = so3.random_rotations(K, seed=seed)
    group = pj.Projections(L, R, bandlimit=bandlimit)
    truth = group.restrict(torch.from_numpy(rng.uniform(0, 1, (L, L, L))))
    meas = mv.simulate_volume(truth, n * L + 1, density=0.2, snr=snr, seed=seed)
    data = meas.data.numpy()[: n * L, : n * L]
    x = truth + 0.3 * group.restrict(torch.from_numpy(rng.standard_normal((L, L, L))))
    rho = rng.uniform(0.5, 1.5, (2 * L, 2 * L))
    return group, data, x, rho / rho.sum(), meas.sigma


def _explicit(group, x):
    """The templates as a list of arrays, for tests/reference/equations.py's loops."""
    T = pj.project(group.restrict(x), group.rotations).numpy()
    return lambda F, K: list(T)


@pytest.mark.parametrize("method", ["fft", "gemm"])
@pytest.mark.parametrize("blocks", [False, True])
def test_e_step_over_projections_equals_brute_force(method, blocks):
    group, data, x, rho, sigma = _tiny_volume_case(bandlimit=None if blocks else 2)
    em = mtd.ApproximateEM(
        group, compute=mtd.Compute(method=method, chunk_size=2), dtype=torch.float64
    )
    if blocks:  # a budget below K x 4L^2: the log-sum-exp streams across template blocks
        em.estep.form.cpu_chunk_elements = em.estep.form.cpu_max_elements = 2 * 2 * 4 * group.L**2
        assert len(em.estep.chunking(9)[1]) == 3
    patches = em.prepare(data)
    stats = em.e_step(patches, x, torch.from_numpy(np.log(rho)), sigma**2)
    patch_list = ref.patches(data, group.L)
    w, loglik = ref.e_step(
        patch_list, x.numpy(), rho, sigma, group.K, templates=_explicit(group, x)
    )
    assert_statistics_equal(stats, w, loglik, patch_list)


class _Rank:
    """One rank of a world of ``world_size`` whose all-reduce is left to the test."""

    def __init__(self, rank, world_size):
        self.rank, self.world_size = rank, world_size

    def all_reduce(self, tensor):
        return tensor


def test_volume_statistics_streamed_from_files_and_split_over_ranks_equal_in_memory(tmp_path):
    # The streaming and distributed paths are the 2-D engine's, unchanged: a volume's micrograph
    # split over two files and streamed in small chunks, or its chunks shared out among three
    # ranks (partial sums), gives the in-memory statistics.
    group, data, x, rho, sigma = _tiny_volume_case(n=4)
    log_rho = torch.from_numpy(np.log(rho))

    def em(**kw):
        compute = mtd.Compute(**{"method": "fft", "chunk_size": 3, **kw})
        return mtd.ApproximateEM(group, compute=compute, dtype=torch.float64)

    full = em(stream=False).e_step(em().prepare(data), x, log_rho, sigma**2)
    np.save(tmp_path / "a.npy", data[: 2 * group.L])
    np.save(tmp_path / "b.npy", data[2 * group.L :])
    streamed = em(stream=True, chunk_size=2)
    files = streamed.prepare([tmp_path / "a.npy", tmp_path / "b.npy"])
    assert files.held is None and files.D == 16  # memory-mapped, read chunk by chunk
    stats = streamed.e_step(files, x, log_rho, sigma**2)
    engine = em()
    patches = engine.prepare(data)
    parts = [engine.e_step(patches, x, log_rho, sigma**2, comm=_Rank(r, 3)) for r in range(3)]
    for name in ("omega", "b", "c", "loglik", "energy"):
        torch.testing.assert_close(
            getattr(stats, name), getattr(full, name), rtol=1e-12, atol=1e-12
        )
        total = sum(getattr(p, name) for p in parts)
        torch.testing.assert_close(total, getattr(full, name), rtol=1e-12, atol=1e-12)
    assert all(float(p.loglik) != 0 for p in parts)  # every rank had chunks of its own


def _q_direct(group, x, w, patch_list, sigma):
    """Q(x) of eq. (25), the x-dependent part, summed over patches, shifts and rotations directly
    (torch, differentiable): sum w_m(l, k) (-||M_m - C T_l Z P_k x||^2 / 2 sigma^2)."""
    L = group.L
    T = group.templates(x)  # (K, L, L)
    G = torch.zeros(group.K, 2 * L, 2 * L, dtype=x.dtype)
    G[:, :L, :L] = T
    w = torch.from_numpy(w)
    total = 0
    for lx in range(2 * L):
        for ly in range(2 * L):
            crop = torch.roll(G, (-lx, -ly), (1, 2))[:, :L, :L]  # (K, L, L)
            for m, M in enumerate(patch_list):
                r = torch.from_numpy(M)[None] - crop
                total = total - (w[m, :, lx, ly] * r.square().sum((1, 2))).sum() / (2 * sigma**2)
    return total


@pytest.mark.parametrize("bandlimit", [None, 2])
def test_normal_equations_are_the_gradient_of_q_and_cg_solves_them(bandlimit):
    group, data, x, rho, sigma = _tiny_volume_case(K=4, n=2, bandlimit=bandlimit)
    em = mtd.ApproximateEM(group, dtype=torch.float64)
    patch_list = ref.patches(data, group.L)
    w, _ = ref.e_step(patch_list, x.numpy(), rho, sigma, group.K, templates=_explicit(group, x))
    stats = em.e_step(em.prepare(data), x, torch.from_numpy(np.log(rho)), sigma**2)
    g = em.group
    rhs = g.adjoint(stats.b)
    # grad Q = (sum_k P_k^T b_k - sum_k P_k^T diag(c_k) P_k x) / sigma^2, by autograd of eq. (25).
    y = x + 0.1 * g.restrict(torch.randn(x.shape, dtype=torch.float64))
    y.requires_grad_(True)
    (auto,) = torch.autograd.grad(_q_direct(g, y, w, patch_list, sigma), y)
    y = y.detach()
    normal = (rhs - g.normal_apply(stats.c, y)) / sigma**2
    assert torch.allclose(normal, auto, rtol=1e-9, atol=1e-9 * float(auto.abs().max()))
    assert torch.allclose(
        em.grad_q(stats, y, sigma**2), auto, rtol=1e-9, atol=1e-9 * float(auto.abs().max())
    )
    # CG: the solution satisfies the system, is the dense least-squares solution on U, and Q's
    # gradient vanishes there.
    g.cg_tol, g.cg_iterations = 1e-12, 500
    sol = em.closed_form(stats, x)
    assert float((g.normal_apply(stats.c, sol) - rhs).norm()) < 1e-9 * float(rhs.norm())
    B = (
        g.basis
        if bandlimit is not None
        else torch.eye(group.L**3, dtype=torch.float64)[:, g.mask.reshape(-1)]
    )
    cols = torch.stack([g.normal_apply(stats.c, b.reshape(x.shape)).reshape(-1) for b in B.T], 1)
    A = B.T @ cols  # the normal matrix in U's coordinates
    dense = B @ torch.linalg.lstsq(A, B.T @ rhs.reshape(-1)).solution
    assert torch.allclose(sol.reshape(-1), dense, atol=1e-8 * float(dense.abs().max()))
    sol.requires_grad_(True)
    (grad,) = torch.autograd.grad(_q_direct(g, sol, w, patch_list, sigma), sol)
    assert float(grad.abs().max()) < 1e-7 * float(auto.abs().max())


def test_cg_keeps_what_the_coverage_does_not_reach():
    L = 5
    R = so3.random_rotations(3, seed=1)
    g = pj.Projections(L, R, cg_tol=1e-12, cg_iterations=300)
    x = g.restrict(torch.randn(L, L, L, dtype=torch.float64))
    c = torch.zeros(3, L, L, dtype=torch.float64)
    assert torch.equal(g.normal_solve(c, torch.zeros_like(x), x), x)  # no coverage: x itself
    # Coverage from the first rotation only: the solution moves only in the range of P_0^T, so
    # its part orthogonal to that range (what the data cannot see) is x's.
    c[0] = 1.0
    V = g.restrict(torch.randn(L, L, L, dtype=torch.float64))
    rhs = g.normal_apply(c, V)
    sol = g.normal_solve(c, rhs, x)
    assert torch.allclose(pj.project(sol, R[:1]), pj.project(V, R[:1]), atol=1e-8)
    # The change lies in range(P_0^T): its projection onto the orthogonal complement is zero.
    Bt = torch.stack(
        [
            g.restrict(pj.back_project(e.reshape(1, L, L), R[:1])).reshape(-1)
            for e in torch.eye(L * L, dtype=torch.float64)
        ],
        1,
    )
    Qr, _ = torch.linalg.qr(Bt)
    change = (sol - x).reshape(-1)
    assert float((change - Qr @ (Qr.T @ change)).norm()) < 1e-8 * float(change.norm())


# ------------------------------------------------------------------------------------------------
# Phantom, simulator, EM
# ------------------------------------------------------------------------------------------------
def test_shepp_logan_is_its_ellipsoid_table_inside_the_ball():
    V = mv.shepp_logan(11)
    assert V.shape == (11, 11, 11) and V.dtype == torch.float64
    assert float(V[so3.ball_mask(11) == 0].abs().max()) == 0
    # The centre lies in ellipsoids 1 and 2 only: 1 - 0.8; the original intensities: 1 - 0.98.
    assert float(V[5, 5, 5]) == pytest.approx(0.2)
    assert float(mv.shepp_logan(11, modified=False)[5, 5, 5]) == pytest.approx(0.02)
    # One ellipsoid of the table, by its definition at a fine grid: its volume 4/3 pi a b c.
    L = 41
    one = mv.ellipsoids(L, [[1.0, 0.5, 0.3, 0.2, 0.1, -0.1, 0.0, 30.0, 20.0, 10.0]])
    voxel = (2 / (L - 1)) ** 3
    assert float(one.sum()) * voxel == pytest.approx(4 / 3 * math.pi * 0.5 * 0.3 * 0.2, rel=0.03)
    # Axes: the table's x is our axis 2 (columns), y axis 1 (rows), z axis 0.
    blob = mv.ellipsoids(L, [[1.0, 0.1, 0.1, 0.1, 0.5, 0.0, 0.0, 0, 0, 0]])
    where = torch.nonzero(blob).double().mean(0) - (L - 1) / 2
    assert torch.allclose(where, torch.tensor([0.0, 0.0, 0.5 * (L - 1) / 2], dtype=torch.float64))


def test_simulate_volume_plants_projections_at_the_truth():
    V = mv.shepp_logan(7)
    m = mv.simulate_volume(V, 140, density=0.15, snr=2.0, seed=4)
    T = round(0.15 * 140 * 140 / 49)
    assert m.positions.shape == (T, 2) and m.rotations.shape == (T, 3, 3)
    # The clean micrograph holds each projection at its corner; separation: no patch meets two.
    clean = m.clean()
    for (r, c), R in zip(m.positions[:5], m.rotations[:5], strict=True):
        image = pj.project(V, R[None])[0]
        assert torch.allclose(clean[r : r + 7, c : c + 7], image, atol=1e-12)
    d = (m.positions[:, None] - m.positions[None]).abs().amax(-1) + 10**6 * torch.eye(
        T, dtype=torch.int64
    )
    assert int(d.min()) >= 2 * 7 - 1
    # Eq. (4): sigma from the planted projections' mean power; the noise is that white noise.
    power = float(pj.project(V, m.rotations).square().sum((1, 2)).mean())
    assert m.sigma == pytest.approx(math.sqrt(power / (2.0 * 49)))
    assert float((m.data - clean).std()) == pytest.approx(m.sigma, rel=0.02)
    assert torch.equal(m.data, mv.simulate_volume(V, 140, density=0.15, snr=2.0, seed=4).data)
    arb = mv.simulate_volume(V, 140, density=0.3, snr=2.0, separation="arbitrary", seed=4)
    d = (arb.positions[:, None] - arb.positions[None]).abs().amax(-1)
    d = d + 10**6 * torch.eye(len(d), dtype=torch.int64)
    assert int(d.min()) >= 7 and int(d.min()) < 2 * 7 - 1  # touching allowed, overlap not
    # The Euler angles are RELION's of the rotations.
    assert torch.allclose(so3.euler_to_matrix(m.euler_angles), m.rotations, atol=1e-12)


def test_simulate_volume_rejects_bad_input():
    V = mv.shepp_logan(5)
    with pytest.raises(ValueError, match="cubic"):
        mv.simulate_volume(torch.zeros(5, 5, 4), 50)
    with pytest.raises(ValueError, match="non-finite"):
        mv.simulate_volume(V * math.nan, 50)
    with pytest.raises(ValueError, match="at most"):
        mv.simulate_volume(V, 50, density=0.9)
    with pytest.raises(ValueError, match="separation"):
        mv.simulate_volume(V, 50, separation="near")
    with pytest.raises(ValueError, match="p = 0"):
        mv.simulate_volume(V, 6, density=0.01)


def test_em_on_a_high_snr_volume_lowers_the_error_with_frequency_marching():
    # The model exactly: a band-limited volume, projections at rotations of the grid searched.
    L = 5
    R, w = so3.hopf_grid(0)
    group = pj.Projections(L, R, w, bandlimit=3)
    rng = np.random.default_rng(0)
    truth = group.restrict(torch.from_numpy(rng.standard_normal((L, L, L))))
    truth = truth + 0.5 * group.restrict(torch.ones(L, L, L, dtype=torch.float64))
    meas = mv.simulate_volume(truth, 30 * L, density=0.12, snr=20.0, seed=1, grid=R)
    noise = group.restrict(torch.from_numpy(rng.standard_normal((L, L, L))))
    start = truth + 0.6 * float(truth.norm()) / L**1.5 * noise
    group = pj.Projections(L, R, w, schedule=[(0, 2), (2, 3)])
    em = mtd.ApproximateEM(group, sigma=meas.sigma, iterations=6, tol=0, dtype=torch.float64)
    bands = []
    # The engine calls group.start_iteration(tau) before every iteration: the band widens inside
    # one fit, with rho and sigma carried over.
    res = em.fit(
        meas.data, start, truth=truth, callback=lambda e: bands.append(em.group.bandlimit)
    )
    err0 = float((start - truth).norm() / truth.norm())
    errors = [h["error"] for h in res.history]
    assert bands == [2, 2, 3, 3, 3, 3]  # the band each iteration ran in
    assert errors[-1] < 0.3 * err0 and errors[-1] < 0.5 * errors[1]
    assert em.group.cg_history and max(em.group.cg_history) <= em.group.cg_iterations


def test_volume_em_refuses_bad_input_before_work():
    L = 5
    group = pj.projections(L, resolution=0, bandlimit=2)
    em = mtd.ApproximateEM(group, sigma=1.0, iterations=1, dtype=torch.float64)
    data = torch.randn(4 * L, 4 * L, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\(5, 5, 5\)"):
        em.fit(data, torch.zeros(7, 7, 7, dtype=torch.float64))  # L of the volume != the data's
    with pytest.raises(ValueError, match="non-finite"):
        em.fit(data * math.nan, torch.zeros(L, L, L, dtype=torch.float64))
    with pytest.raises(ValueError, match="cubic"):
        mv.simulate_volume(torch.zeros(5, 5, 6), 50)
    with pytest.raises(ValueError, match="volume"):
        group.from_image(torch.zeros(L, L))
    with pytest.raises(ValueError, match="K = 0"):
        pj.Projections(L, torch.zeros(0, 3, 3))


def test_denoise_m_step_with_admm_is_the_map_step_for_a_gaussian_prior_on_volumes():
    # Projections' curvature sum_k P_k^T diag(c_k) P_k is far from a multiple of the identity, so
    # the one denoising step is not argmax Q + g log p; the ADMM rounds converge to it, inside the
    # band-limited subspace, for the Gaussian prior N(mu, I) (its posterior mean is the proximal
    # map): against the dense solve in the subspace's coordinates.
    from priors.prior import AnalyticGaussianPrior

    L, K, gamma, sigma2 = 5, 12, 0.7, 0.4
    rng = np.random.default_rng(3)
    group = pj.Projections(L, so3.random_rotations(K, seed=3), bandlimit=2)
    stats = mtd.Statistics(
        omega=torch.zeros(K, 2 * L, 2 * L, dtype=torch.float64),
        b=torch.from_numpy(rng.normal(0, 3, (K, L, L))),
        c=torch.from_numpy(rng.uniform(0.5, 4.0, (K, L, L))),
        loglik=torch.zeros((), dtype=torch.float64),
        energy=torch.zeros((), dtype=torch.float64),
        D=9,
    )
    mu = torch.from_numpy(rng.normal(0, 1, (L, L, L)))
    prior = AnalyticGaussianPrior(mu)
    Q = group.basis  # (L^3, n) orthonormal columns spanning U
    AQ = torch.stack([group.normal_apply(stats.c, q.reshape(L, L, L)).reshape(-1) for q in Q.T], 1)
    lhs = Q.T @ AQ / sigma2 + gamma * torch.eye(Q.shape[1], dtype=torch.float64)
    rhs = Q.T @ (group.adjoint(stats.b).reshape(-1) / sigma2 + gamma * mu.reshape(-1))
    expected = (Q @ torch.linalg.solve(lhs, rhs)).reshape(L, L, L)
    x0 = group.restrict(mu + 1.0)

    def step(**kw):
        m_step = mtd.Denoise(mtd.ConstantGamma(gamma), cg_tol=1e-13, cg_iterations=200, **kw)
        return m_step.step(group, stats, x0, sigma2, 0, 1, prior)[0]

    admm = step(admm_iterations=300)
    assert torch.allclose(admm, expected, atol=1e-8), (admm - expected).abs().max()
    assert torch.allclose(group.restrict(admm), admm, atol=1e-12)  # in U
    one = step()  # the single denoising step: what uniform coverage would make exact
    assert (one - expected).abs().max() > 100 * (admm - expected).abs().max()
