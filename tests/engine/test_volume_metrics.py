"""Measuring a volume (issue 13, item 5): alignment over SO(3) x mirror x shifts, the error after
alignment, the Fourier shell correlation and its crossings, and the volume's files.

Each claim is checked against something the code does not compute itself: an analytic volume
evaluated at transformed coordinates, brute-force shifted copies, exact permutations of the grid,
the closed-form FSC of a sharp low-pass and the 1 / sqrt(n) spread of independent noise.
"""

from __future__ import annotations

import math

import mrcfile
import numpy as np
import pytest
import torch

from mtd.forward.volumes import shepp_logan
from mtd.io.files import read_volume, write_volume
from mtd.metrics.fsc import fsc, fsc_crossing, shell_index
from mtd.metrics.volumes import (
    VolumeAlignment,
    _padded_size,
    _shift_errors,
    align_volume,
    mirror_volume,
    transform_volume,
    volume_error,
)
from mtd.plots.volumes import save_fsc_plot, save_volume_figure
from mtd.so3 import (
    axis_rotation,
    ball_mask,
    geodesic_distance,
    grid_points,
    random_rotations,
    rotate_volume,
)

L = 11

# A chiral test volume: four Gaussian blobs (s.d. 1.1 voxels) of distinct weights on the vertices
# of a tetrahedron, so no rotation or reflection maps it onto itself.
CENTRES = 2.2 / math.sqrt(3) * np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]])
WEIGHTS = np.array([1.0, 0.75, 0.5, 0.3])
SD = 1.1


def blobs(P: np.ndarray) -> np.ndarray:
    """The test volume's analytic function at points P (..., 3)."""
    return sum(
        w * np.exp(-0.5 * ((P - c) ** 2).sum(-1) / SD**2)
        for c, w in zip(CENTRES, WEIGHTS, strict=True)
    )


def coords(n: int = L) -> np.ndarray:
    return grid_points(n).numpy().reshape(n, n, n, 3)


def transformed_copy(R: np.ndarray, s: np.ndarray, mirror: bool) -> np.ndarray:
    """The estimate E whose alignment is (R, s, mirror): E_m(R^T (p - s)) = T(p), so
    E_m(q) = T(R q + s), and E(q) = E_m(-q) when mirrored; evaluated exactly, not resampled."""
    P = coords()
    return blobs((-P if mirror else P) @ R.T + s)


def test_trilinear_transform_is_so3_rotate_volume():
    """transform_volume(order=1) at s = 0 is mtd.so3's rotate_volume: one convention."""
    V = torch.randn(L, L, L, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for R in random_rotations(3, seed=1):
        assert torch.allclose(transform_volume(V, R, order=1), rotate_volume(V, R), atol=1e-12)


def test_cubic_transform_exact_on_the_grid_and_close_off_it():
    """An integer shift is the zero-filled shift exactly; a rotation of the analytic volume is
    matched to a few per cent by the cubic spline (1-3 %), far better than trilinear (11 %)."""
    V = torch.randn(L, L, L, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = transform_volume(V, torch.eye(3, dtype=torch.float64), torch.tensor([1.0, -2.0, 0.0]))
    want = torch.zeros_like(V)
    want[1:, :-2, :] = V[:-1, 2:, :]  # out(p) = V(p - s), zero where p - s leaves the cube
    assert torch.allclose(out, want, atol=1e-9)
    T = torch.from_numpy(blobs(coords()))
    R = random_rotations(1, seed=3)[0]
    s = np.array([0.3, -0.4, 0.2])
    # exact: T(R^T (p - s)) at every voxel
    exact = torch.from_numpy(blobs((coords() - s) @ R.numpy()))
    cubic = volume_error(exact, transform_volume(T, R, torch.from_numpy(s), order=3))
    linear = volume_error(exact, transform_volume(T, R, torch.from_numpy(s), order=1))
    assert cubic < 0.04 and linear > 2.5 * cubic, (cubic, linear)


def test_mirror_is_the_inversion():
    P = coords()
    E = torch.from_numpy(blobs(P))
    assert torch.allclose(mirror_volume(E), torch.from_numpy(blobs(-P)), atol=1e-12)


def test_shift_errors_equal_brute_force_shifted_copies():
    """The FFT masked errors at every integer shift equal sum W (t - C(p - s))^2 by loops."""
    n, m = 5, 2
    g = torch.Generator().manual_seed(4)
    t, C = (torch.randn(n, n, n, dtype=torch.float64, generator=g) for _ in range(2))
    W = ball_mask(n) ** 2
    N = _padded_size(n, m)
    lags = torch.arange(-m, m + 1, dtype=torch.float64)
    got = _shift_errors(
        torch.fft.fftn(W * t, s=(N,) * 3),
        torch.fft.fftn(W, s=(N,) * 3),
        float((W * t * t).sum()),
        C[None],
        lags,
    )[0]
    for a in range(-m, m + 1):
        for b in range(-m, m + 1):
            for c in range(-m, m + 1):
                S = torch.zeros_like(C)
                src = [slice(max(-d, 0), n - max(d, 0)) for d in (a, b, c)]
                dst = [slice(max(d, 0), n - max(-d, 0)) for d in (a, b, c)]
                S[tuple(dst)] = C[tuple(src)]
                want = float((W * (t - S) ** 2).sum())
                assert got[a + m, b + m, c + m] == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("seed, mirror", [(10, True), (11, False)])
def test_alignment_recovers_rotation_mirror_and_shift(seed, mirror):
    """A random rotation, the mirror and a sub-voxel shift of the chiral volume are recovered:
    the grid lands within a cell (576 rotations, ~15 degrees), the refinement to 1e-2 rad (1e-3
    measured) and 5e-2 voxel, and the error is the resampling's alone."""
    R = random_rotations(1, seed=seed)[0].numpy()
    s = np.random.default_rng(seed).uniform(-1, 1, 3)
    T = blobs(coords())
    E = transformed_copy(R, s, mirror)
    al = align_volume(T, E, max_shift=2)
    assert al.mirror == mirror
    assert float(geodesic_distance(al.rotation, torch.from_numpy(R))) < 1e-2
    assert np.abs(np.array(al.shift) - s).max() < 5e-2
    at_truth = volume_error(
        T,
        transform_volume(
            mirror_volume(torch.from_numpy(E)) if mirror else torch.from_numpy(E),
            torch.from_numpy(R),
            torch.from_numpy(s),
        ),
    )
    assert al.error <= at_truth + 1e-3 and al.error < 0.03, (al.error, at_truth)
    assert al.grid_error > al.error
    assert torch.allclose(
        al.aligned,
        transform_volume(
            mirror_volume(torch.from_numpy(E)) if al.mirror else torch.from_numpy(E),
            al.rotation,
            torch.tensor(al.shift),
        ),
    )


def test_a_warm_start_refines_without_the_grid():
    """From a previous alignment 0.15 rad and 0.4 voxel off (an EM iteration ago), the
    refinement alone recovers the transform, and reports no grid error."""
    R = random_rotations(1, seed=12)[0].numpy()
    s = np.array([0.5, -0.3, 0.1])
    T, E = blobs(coords()), transformed_copy(R, s, mirror=True)
    off = (axis_rotation(2, 0.15) @ torch.from_numpy(R)).numpy()
    prev = VolumeAlignment(None, off, True, tuple(s + [0.4, 0.0, -0.4]), math.nan, None)
    al = align_volume(T, E, start=prev)
    assert al.mirror and al.grid_error is None
    assert float(geodesic_distance(al.rotation, torch.from_numpy(R))) < 1e-2
    assert np.abs(np.array(al.shift) - s).max() < 5e-2


def test_the_error_is_measured_inside_the_ball():
    """What lies outside |p| <= L/2 (the corners of the cube) counts for nothing."""
    T = torch.from_numpy(blobs(coords()))
    r = torch.linalg.vector_norm(torch.from_numpy(coords()), dim=-1)
    junk = T + 5.0 * (r > L / 2 + 0.5)  # the corners only, away from the ball's edge
    assert volume_error(T, junk) == 0.0
    al = align_volume(T, junk, rotations=torch.eye(3, dtype=torch.float64)[None])
    assert al.error < 1e-6 and al.mask == "ball |p| <= 5.5 voxels"
    assert volume_error(T, junk, mask_radius=L) > 1.0


def test_exact_copies_align_to_zero_error():
    """The volume itself, and the Shepp-Logan phantom mirrored and turned by a quarter turn (an
    exact permutation of the voxels), align with error ~0 at the inverse rotation."""
    T = torch.from_numpy(blobs(coords()))
    al = align_volume(T, T)
    assert al.error < 1e-6 and not al.mirror
    assert float(geodesic_distance(al.rotation, torch.eye(3, dtype=torch.float64))) < 1e-5

    S = shepp_logan(L)
    R = axis_rotation(1, math.pi / 2) @ axis_rotation(0, math.pi / 2)
    E = mirror_volume(rotate_volume(S, R))  # E(q) = S(-R^T q): E_m = R . S
    assert torch.equal(torch.sort(E.reshape(-1)).values, torch.sort(S.reshape(-1)).values)
    al = align_volume(S, E)
    assert al.mirror and al.error < 1e-4, al.error
    assert float(geodesic_distance(al.rotation, R.T)) < 1e-4
    assert max(abs(v) for v in al.shift) < 1e-4


def test_fsc_of_a_volume_with_itself_is_one():
    V = torch.from_numpy(blobs(coords())) + 0.1 * torch.randn(
        L, L, L, dtype=torch.float64, generator=torch.Generator().manual_seed(5)
    )
    for mask in ("soft", "ball", None):
        curve = fsc(V, V, voxel_size=1.7, mask=mask)
        assert np.allclose(curve.fsc, 1.0, atol=1e-12)
        assert curve.resolution(0.5) is None and curve.resolution(0.143) is None
    assert len(curve.fsc) == L // 2 + 1
    # shell 0 is the mean; shell 1 = the integer k with 0.5 <= |k| < 1.5: 6 on the axes, 12 on
    # the face diagonals (|k| = sqrt 2); the corners (sqrt 3) round to shell 2
    assert curve.n_voxels[0] == 1 and curve.n_voxels[1] == 18
    assert curve.frequency[-1] == pytest.approx((L // 2) / (L * 1.7))
    assert np.allclose(fsc(V, -3 * V).fsc, -1.0)  # the sign survives, the scale does not
    W = torch.randn(L, L, L, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    assert np.allclose(fsc(V, W).fsc, fsc(W, V).fsc)


def test_soft_mask_profile():
    """1 inside radius - edge, 0 outside radius, 1/2 half-way along the cosine edge."""
    m = ball_mask(L, radius=5.0, edge=2.0)
    r = torch.linalg.vector_norm(torch.from_numpy(coords()), dim=-1)
    assert torch.all(m[r <= 3.0] == 1) and torch.all(m[r >= 5.0] == 0)
    band = (r > 3.0) & (r < 5.0)
    assert torch.allclose(m[band], 0.5 * (1 + torch.cos(math.pi * (r[band] - 3.0) / 2.0)))
    assert torch.equal(ball_mask(L), (r <= L / 2).double())


@pytest.mark.parametrize("n, cut", [(11, 3), (10, 2)])
def test_fsc_of_a_sharp_low_pass_crosses_halfway(n, cut):
    """B = A with every shell beyond ``cut`` removed: FSC = 1 up to it and 0 after, so the
    threshold c is crossed at shell cut + 1 - c, frequency (cut + 1 - c) / (n voxel_size)."""
    A = torch.randn(n, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    B = torch.fft.ifftn(torch.fft.fftn(A) * (shell_index(n) <= cut)).real
    v = 2.5
    curve = fsc(A, B, voxel_size=v, mask=None)
    assert np.allclose(curve.fsc[: cut + 1], 1.0) and np.allclose(curve.fsc[cut + 1 :], 0.0)
    for c in (0.5, 0.143):
        f = (cut + 1 - c) / (n * v)
        assert curve.crossings[c][0] == pytest.approx(f)
        assert curve.resolution(c) == pytest.approx(1 / f)
    if n % 2 == 0:
        assert curve.frequency[-1] == pytest.approx(1 / (2 * v))  # Nyquist


def test_fsc_of_independent_noise_is_near_zero_with_one_over_root_n_spread():
    """For independent white noise, FSC(r) has mean 0 and s.d. 1 / sqrt(n_r), n_r the shell's
    Fourier voxels (the Hermitian pairs halve the terms and double each one's weight)."""
    n = 16
    g = torch.Generator().manual_seed(7)
    z = []
    for _ in range(30):
        a, b = (torch.randn(n, n, n, dtype=torch.float64, generator=g) for _ in range(2))
        curve = fsc(a, b, mask=None)
        z.append(curve.fsc[2:] * np.sqrt(curve.n_voxels[2:]))
    z = np.array(z)
    assert abs(z.mean()) < 0.15
    assert 0.85 < z.std() < 1.15, z.std()
    masked = fsc(a, b)  # the soft mask: still near 0 at every shell past the first
    assert np.all(np.abs(masked.fsc[2:]) < 5 / np.sqrt(masked.n_voxels[2:]))


def test_fsc_crossing_edges():
    f = np.array([0.0, 0.1, 0.2])
    assert fsc_crossing(f, [1.0, 0.9, 0.8], 0.5) is None
    assert fsc_crossing(f, [0.2, 0.9, 0.8], 0.5) == 0.0
    assert fsc_crossing(f, [1.0, 0.6, 0.4], 0.5) == pytest.approx(0.15)


def test_volume_files_round_trip_and_figures(tmp_path):
    V = torch.from_numpy(blobs(coords()))
    write_volume(tmp_path / "v.mrc", V, voxel_size=3.25)
    with mrcfile.open(tmp_path / "v.mrc") as mrc:
        assert np.array_equal(mrc.data, V.numpy().astype(np.float32))
        assert float(mrc.voxel_size.x) == pytest.approx(3.25)
        assert float(mrc.voxel_size.z) == pytest.approx(3.25)
    back, size = read_volume(tmp_path / "v.mrc")
    assert size == pytest.approx(3.25) and np.allclose(back, V.numpy(), atol=1e-6)
    write_volume(tmp_path / "v.npy", V)
    back, size = read_volume(tmp_path / "v.npy")
    assert size is None and np.array_equal(back, V.numpy())

    E = V + 0.05 * torch.randn(L, L, L, dtype=torch.float64, generator=torch.Generator())
    save_volume_figure(
        tmp_path / "vol.png", V, {"estimate_no_prior": E}, {"estimate_no_prior": 0.1}
    )
    save_fsc_plot(tmp_path / "fsc.png", {"no prior": fsc(V, E, voxel_size=3.25)})
    for name in ("vol.png", "fsc.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fsc.png",
        "v.mrc",
        "v.npy",
        "vol.png",
    ]  # no temporary file left


def test_bad_input_is_refused_before_work(tmp_path):
    V = torch.zeros(L, L, L, dtype=torch.float64) + 1.0
    with pytest.raises(ValueError, match="cubic"):
        align_volume(torch.zeros(L, L, L + 1), V)
    with pytest.raises(ValueError, match="shape"):
        align_volume(V, torch.zeros(L + 2, L + 2, L + 2))
    with pytest.raises(ValueError, match="non-finite"):
        fsc(V, V * float("nan"))
    with pytest.raises(ValueError, match="rotations"):
        align_volume(V, V, rotations=torch.zeros(0, 3, 3))
    with pytest.raises(ValueError, match="max_shift"):
        align_volume(V, V, max_shift=L)
    with pytest.raises(ValueError, match="voxel_size"):
        fsc(V, V, voxel_size=0)
    with pytest.raises(ValueError, match="mask"):
        fsc(V, V, mask="square")
    with pytest.raises(ValueError, match="format"):
        write_volume(tmp_path / "v.txt", V)
    with pytest.raises(ValueError, match="voxel_size"):
        write_volume(tmp_path / "v.mrc", V, voxel_size=-1)
