"""Rotations in 3-D: a near-uniform SO(3) grid, Haar-random rotations, trilinear rotation of
volumes, and Euler angles in RELION's convention (docs/design.md).

Conventions (shared with ``mtd.groups.projections`` and the volume metrics):

- A volume V is a real (L, L, L) tensor; array axis a is coordinate axis a: voxel [i0, i1, i2] sits
  at p = (i0 - c, i1 - c, i2 - c), c = (L - 1) / 2. Its support is the ball |p| <= L / 2.
- A rotation R is a (3, 3) float64 orthogonal matrix with det +1 acting on coordinate vectors p in
  that axis order; the rotated volume is (R . V)(p) = V(R^T p).
- The projection at R integrates (R . V) along axis 0 (``mtd.groups.tomography``); image rows
  are axis 1, columns axis 2. So the rotation by phi about axis 0,

      R_phi = [[1, 0, 0], [0, cos phi, -sin phi], [0, sin phi, cos phi]],

  turns the projection by phi counter-clockwise like ``mtd.rotate`` / ``torch.rot90`` (row axis
  pointing down): P(R_phi . V) = rotate(P V, phi) (tests/engine/test_volume.py).

RELION's Euler angles (rlnAngleRot, rlnAngleTilt, rlnAnglePsi, degrees, ZYZ). RELION's matrix
A(rot, tilt, psi) = Rz(psi)^T Ry(tilt)^T Rz(rot)^T acts on (x, y, z) with x the image column, y the
image row and z the projection direction, and its projector samples the volume at A^T (x, y, z)
(the volume rotated by A, then integrated along z). Our axes are (z, y, x) = (0, 1, 2), so with J
the axis reversal (J p = p[::-1]),

    R = J A J,    i.e.  R[a, b] = A[2 - a, 2 - b],

and the array axis order (z, y, x) is that of an MRC volume as ``mrcfile`` reads it.
"""

from __future__ import annotations

import math

import numpy as np
import torch


# ------------------------------------------------------------------------------------------------
# Euler angles
# ------------------------------------------------------------------------------------------------
def relion_matrix(rot, tilt, psi) -> np.ndarray:
    """RELION's ``Euler_angles2matrix``: the (n, 3, 3) matrices A of ZYZ angles in degrees.

    A transcription of RELION's src/euler.cpp, in its (x, y, z) axes.

    Args:
        rot, tilt, psi: (n,) or scalars, degrees.

    Returns:
        (n, 3, 3) float64.
    """
    a, b, g = (
        np.radians(np.atleast_1d(np.asarray(v, dtype=np.float64))) for v in (rot, tilt, psi)
    )
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    A = np.empty((len(a), 3, 3))
    A[:, 0, 0], A[:, 0, 1], A[:, 0, 2] = cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb
    A[:, 1, 0], A[:, 1, 1], A[:, 1, 2] = -sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb
    A[:, 2, 0], A[:, 2, 1], A[:, 2, 2] = sc, ss, cb
    return A


def _reverse_axes(M):
    return M[..., ::-1, ::-1] if isinstance(M, np.ndarray) else M.flip(-1, -2)


def euler_to_matrix(angles) -> torch.Tensor:
    """Our rotations R = J A J from RELION's (rot, tilt, psi) in degrees.

    Args:
        angles: (n, 3) or (3,) degrees (rlnAngleRot, rlnAngleTilt, rlnAnglePsi).

    Returns:
        (n, 3, 3) float64 (or (3, 3) for one triple).
    """
    ang = np.asarray(torch.as_tensor(angles, dtype=torch.float64).cpu())
    if ang.shape[-1:] != (3,) or ang.ndim > 2:
        raise ValueError(f"angles must be (n, 3) or (3,) degrees, got shape {ang.shape}")
    one = ang.ndim == 1
    ang = ang.reshape(-1, 3)
    R = torch.from_numpy(_reverse_axes(relion_matrix(ang[:, 0], ang[:, 1], ang[:, 2])).copy())
    return R[0] if one else R


def matrix_to_euler(R) -> torch.Tensor:
    """RELION's (rot, tilt, psi) in degrees of our rotations (inverse of ``euler_to_matrix``).

    tilt in [0, 180]; rot, psi in (-180, 180]. At tilt 0 or 180 (gimbal lock) rot is 0 and psi
    carries the whole in-plane angle, as RELION's ``Euler_matrix2angles``.

    Args:
        R: (n, 3, 3) or (3, 3).

    Returns:
        (n, 3) float64 (or (3,) for one matrix).
    """
    R = torch.as_tensor(R, dtype=torch.float64).cpu()
    one = R.ndim == 2
    A = _reverse_axes(R.reshape(-1, 3, 3).numpy())
    sb = np.hypot(A[:, 0, 2], A[:, 1, 2])
    tilt = np.arctan2(sb, A[:, 2, 2])
    regular = sb > 16 * np.finfo(np.float32).eps
    rot = np.where(regular, np.arctan2(A[:, 2, 1], A[:, 2, 0]), 0.0)
    psi = np.where(
        regular,
        np.arctan2(A[:, 1, 2], -A[:, 0, 2]),
        np.where(
            A[:, 2, 2] > 0,
            np.arctan2(-A[:, 1, 0], A[:, 0, 0]),
            np.arctan2(A[:, 1, 0], -A[:, 0, 0]),
        ),
    )
    tilt = np.where(regular, tilt, np.where(A[:, 2, 2] > 0, 0.0, np.pi))
    out = torch.from_numpy(np.degrees(np.stack([rot, tilt, psi], 1)))
    return out[0] if one else out


# ------------------------------------------------------------------------------------------------
# Grids and random rotations
# ------------------------------------------------------------------------------------------------
def healpix_centres(nside: int) -> tuple[np.ndarray, np.ndarray]:
    """Centres of the 12 nside^2 equal-area HEALPix pixels (ring scheme; Gorski et al., ApJ 622,
    759 (2005), eqs. 4-9).

    Returns:
        (z, phi): cos of the polar angle and the azimuth, (12 nside^2,) each.
    """
    if int(nside) != nside or nside < 1:
        raise ValueError(f"nside must be an integer >= 1, got {nside!r}")
    n = int(nside)
    z, phi = [], []
    for i in range(1, n):  # north polar cap, rings 1..n-1, 4i pixels each
        j = np.arange(1, 4 * i + 1)
        z.append(np.full(4 * i, 1 - i * i / (3.0 * n * n)))
        phi.append(np.pi / (2 * i) * (j - 0.5))
    for i in range(n, 3 * n + 1):  # equatorial belt, 4n pixels per ring
        j = np.arange(1, 4 * n + 1)
        s = (i - n + 1) % 2
        z.append(np.full(4 * n, 4.0 / 3 - 2.0 * i / (3 * n)))
        phi.append(np.pi / (2 * n) * (j - s / 2))
    for i in range(n - 1, 0, -1):  # south polar cap, mirror of the north
        j = np.arange(1, 4 * i + 1)
        z.append(np.full(4 * i, -(1 - i * i / (3.0 * n * n))))
        phi.append(np.pi / (2 * i) * (j - 0.5))
    return np.concatenate(z), np.concatenate(phi)


def hopf_grid(resolution: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A near-uniform SO(3) grid of 72 * 8^r rotations (HEALPix x circle, the Hopf fibration's
    construction of Yershova et al., IJRR 29(7), 2010), with its quadrature weights.

    The viewing directions are the centres of the 12 * 4^r equal-area HEALPix pixels (nside = 2^r),
    the in-plane angle psi takes 6 * 2^r equally spaced values; the rotation is RELION's
    (rot, tilt, psi) = (phi, arccos z, psi), as RELION samples orientations. The Haar measure in
    ZYZ angles is d(rot) d(cos tilt) d(psi), which every cell (one HEALPix pixel times one psi
    interval) holds equally: the quadrature weights are 1 / K.

    Args:
        resolution: r >= 0 (K = 72, 576, 4608, ...).

    Returns:
        rotations (K, 3, 3) float64, weights (K,) float64 summing to 1.
    """
    if int(resolution) != resolution or resolution < 0:
        raise ValueError(f"resolution must be an integer >= 0, got {resolution!r}")
    r = int(resolution)
    z, phi = healpix_centres(2**r)
    n_psi = 6 * 2**r
    psi = (np.arange(n_psi) + 0.5) * (2 * np.pi / n_psi)
    rot = np.repeat(phi, n_psi)
    tilt = np.repeat(np.arccos(np.clip(z, -1, 1)), n_psi)
    psi = np.tile(psi, len(z))
    R = euler_to_matrix(np.degrees(np.stack([rot, tilt, psi], 1)))
    K = len(R)
    return R, torch.full((K,), 1.0 / K, dtype=torch.float64)


def _haar(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3, 3) Haar-uniform rotations from ``rng``: unit quaternions from N(0, I_4) draws."""
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        1,
    )


def random_rotations(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, 3) float64 rotations drawn uniformly (Haar) on SO(3), reproducibly from ``seed``.

    Normalised Gaussian quaternions (Shoemake's uniform sampling, as the stochastic-EM paper's
    ref. [57]); numpy's PCG64, so the same seed gives the same rotations on every machine.
    """
    if int(n) != n or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    return torch.from_numpy(_haar(np.random.default_rng(seed), int(n)))


def geodesic_distance(R1: torch.Tensor, R2: torch.Tensor) -> torch.Tensor:
    """The rotation angle of R1^T R2 (radians, in [0, pi]), broadcast over leading dimensions."""
    tr = torch.einsum("...ij,...ij->...", R1, R2)
    return torch.arccos(((tr - 1) / 2).clamp(-1, 1))


def axis_rotation(axis: int, angle: float) -> torch.Tensor:
    """(3, 3) float64 rotation by ``angle`` (radians) about coordinate axis ``axis``.

    About axis 0 it is R_phi of the module docstring: the projection turns counter-clockwise.
    """
    c, s = math.cos(angle), math.sin(angle)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    R = torch.eye(3, dtype=torch.float64)
    R[i, i], R[i, j], R[j, i], R[j, j] = c, -s, s, c
    return R


# ------------------------------------------------------------------------------------------------
# Trilinear rotation of volumes
# ------------------------------------------------------------------------------------------------
def grid_points(L: int) -> torch.Tensor:
    """(L^3, 3) float64 coordinates p of the voxels in C order (the convention above)."""
    c = (L - 1) / 2
    ar = torch.arange(L, dtype=torch.float64) - c
    g = torch.meshgrid(ar, ar, ar, indexing="ij")
    return torch.stack([a.reshape(-1) for a in g], 1)


def voxel_coordinates(L: int, device=None) -> torch.Tensor:
    """(L, L, L, 3) float64 coordinates p of every voxel (``mtd.so3.grid_points``, reshaped)."""
    return grid_points(L).to(device).reshape(L, L, L, 3)


def ball_mask(L: int, radius: float | None = None, edge: float = 0.0, device=None) -> torch.Tensor:
    """(L, L, L) float64 spherical mask: 1 for |p| <= radius - edge, 0 for |p| >= radius, and a
    raised-cosine fall 0.5 (1 + cos(pi (|p| - radius + edge) / edge)) between.

    Args:
        L: side of the volume.
        radius: outer radius in voxels; None is L / 2 (the ball a volume lives in).
        edge: width of the cosine edge in voxels; 0 is the hard ball |p| <= radius.
        device: where to build it.
    """
    radius = L / 2 if radius is None else float(radius)
    if not radius > 0 or not 0 <= edge <= radius:
        raise ValueError(
            f"mask radius must be > 0 and edge in [0, radius], got radius={radius}, edge={edge}"
        )
    r = torch.linalg.vector_norm(voxel_coordinates(L, device), dim=-1)
    if edge == 0:
        return (r <= radius).to(torch.float64)
    t = ((r - (radius - edge)) / edge).clamp(0, 1)
    return 0.5 * (1 + torch.cos(math.pi * t))


def trilinear_table(L: int, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather tables of (R . V)(p) = V(R^T p) at every voxel p, trilinear, zero outside the cube.

    Sample positions within 1e-9 of the grid are snapped to it, so rotations by multiples of pi/2
    about an axis are exact permutations (as ``mtd.groups.rotations``).

    Args:
        L: volume side.
        R: (n, 3, 3) rotations (float64 on the CPU is best; any dtype is cast to float64).

    Returns:
        index (n, L^3, 8) int64 into the flattened volume, weight (n, L^3, 8) float64, on R's
        device.
    """
    R = R.to(torch.float64).reshape(-1, 3, 3)
    p = grid_points(L).to(R.device)
    c = (L - 1) / 2
    # Row vector p @ R = (R^T p)^T: the point of V that lands on p.
    s = torch.einsum("pi,nij->npj", p, R) + c  # (n, L^3, 3)
    s = torch.where((s - s.round()).abs() < 1e-9, s.round(), s)
    s0 = s.floor()
    f = s - s0
    index = torch.zeros(*s.shape[:2], 8, dtype=torch.int64, device=R.device)
    weight = torch.zeros(*s.shape[:2], 8, dtype=torch.float64, device=R.device)
    for corner in range(8):
        bits = [(corner >> (2 - a)) & 1 for a in range(3)]
        idx = s0 + torch.tensor(bits, dtype=torch.float64, device=R.device)
        w = torch.ones_like(f[..., 0])
        for a in range(3):
            w = w * (f[..., a] if bits[a] else 1 - f[..., a])
        inside = ((idx >= 0) & (idx <= L - 1)).all(-1) & (w != 0)
        flat = (idx[..., 0] * L + idx[..., 1]) * L + idx[..., 2]
        index[..., corner] = torch.where(inside, flat, 0).long()
        weight[..., corner] = torch.where(inside, w, 0)
    return index, weight


def rotate_volume(V: torch.Tensor, R) -> torch.Tensor:
    """(R . V)(p) = V(R^T p) by trilinear interpolation, zero outside the cube.

    Args:
        V: (L, L, L) volume.
        R: (3, 3) rotation, or (n, 3, 3).

    Returns:
        (L, L, L) (or (n, L, L, L)), V's dtype and device.
    """
    V = torch.as_tensor(V)
    if V.ndim != 3 or len(set(V.shape)) != 1:
        raise ValueError(f"V must be a cubic (L, L, L) volume, got shape {tuple(V.shape)}")
    R = torch.as_tensor(R, dtype=torch.float64)
    one = R.ndim == 2
    L = V.shape[0]
    index, weight = trilinear_table(L, R.cpu())
    index, weight = index.to(V.device), weight.to(device=V.device, dtype=V.dtype)
    out = (V.reshape(-1)[index] * weight).sum(-1).reshape(-1, L, L, L)
    return out[0] if one else out
