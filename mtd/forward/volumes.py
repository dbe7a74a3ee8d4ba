"""Volumes for the stochastic-EM paper's model: the 3-D Shepp-Logan phantom and the copy model of
its micrographs (projections at random rotations, ``simulate_volume``). (Frequency marching,
Section III-D, is the group's: ``Projections``' schedule, which the EM loop advances through
``TransformSet.start_iteration``.)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mtd.forward.measurement import Measurement, simulate_copies
from mtd.groups.tomography import project
from mtd.so3 import _haar, ball_mask, grid_points

# The 3-D Shepp-Logan head phantom with Toft's higher-contrast intensities ("Modified
# Shepp-Logan"), the table of M. Schabel's phantom3d (MATLAB Central File Exchange 9416, after
# P. Toft, "The Radon Transform", 1996, pp. 199-200, and Kak & Slaney, "Principles of Computerized
# Tomographic Imaging", 1988): intensity A, semi-axes (a, b, c) along (x, y, z), centre
# (x0, y0, z0) and ZXZ Euler angles (phi, theta, psi) in degrees, on the cube [-1, 1]^3.
SHEPP_LOGAN_3D = np.array(
    [
        # A      a       b      c      x0     y0      z0    phi  theta  psi
        [1.0, 0.6900, 0.920, 0.810, 0.00, 0.0000, 0.00, 0.0, 0.0, 0.0],
        [-0.8, 0.6624, 0.874, 0.780, 0.00, -0.0184, 0.00, 0.0, 0.0, 0.0],
        [-0.2, 0.1100, 0.310, 0.220, 0.22, 0.0000, 0.00, -18.0, 0.0, 10.0],
        [-0.2, 0.1600, 0.410, 0.280, -0.22, 0.0000, 0.00, 18.0, 0.0, 10.0],
        [0.1, 0.2100, 0.250, 0.410, 0.00, 0.3500, -0.15, 0.0, 0.0, 0.0],
        [0.1, 0.0460, 0.046, 0.050, 0.00, 0.1000, 0.25, 0.0, 0.0, 0.0],
        [0.1, 0.0460, 0.046, 0.050, 0.00, -0.1000, 0.25, 0.0, 0.0, 0.0],
        [0.1, 0.0460, 0.023, 0.050, -0.08, -0.6050, 0.00, 0.0, 0.0, 0.0],
        [0.1, 0.0230, 0.023, 0.020, 0.00, -0.6060, 0.00, 0.0, 0.0, 0.0],
        [0.1, 0.0230, 0.046, 0.020, 0.06, -0.6050, 0.00, 0.0, 0.0, 0.0],
    ]
)
# The original intensities of Shepp & Logan (1974), the rest of the table unchanged.
SHEPP_LOGAN_ORIGINAL = np.array([1.0, -0.98, -0.02, -0.02, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01])


def _zxz(phi: float, theta: float, psi: float) -> np.ndarray:
    """Rz(phi) Rx(theta) Rz(psi), angles in degrees, acting on (x, y, z)."""

    def rz(a):
        c, s = math.cos(a), math.sin(a)
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])

    def rx(a):
        c, s = math.cos(a), math.sin(a)
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])

    return rz(math.radians(phi)) @ rx(math.radians(theta)) @ rz(math.radians(psi))


def ellipsoids(L: int, table: np.ndarray) -> torch.Tensor:
    """The sum of constant ellipsoids of ``table`` (rows as ``SHEPP_LOGAN_3D``) on the L^3 grid.

    Voxel p (``mtd.so3`` convention, axes (z, y, x)) sits at (x, y, z) = (p2, p1, p0) / c with
    c = (L - 1) / 2, the cube [-1, 1]^3 of phantom3d's grid. A voxel is inside ellipsoid e when
    |D^-1 E^T ((x, y, z) - centre)| <= 1, D = diag(a, b, c), E the ZXZ rotation.

    Returns:
        (L, L, L) float64.
    """
    if int(L) != L or L < 2:
        raise ValueError(f"L must be an integer >= 2, got {L!r}")
    L = int(L)
    table = np.asarray(table, dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != 10:
        raise ValueError(f"an ellipsoid table has 10 columns per row, got shape {table.shape}")
    xyz = grid_points(L).numpy()[:, ::-1] / ((L - 1) / 2)
    out = np.zeros(L**3)
    for A, a, b, c, x0, y0, z0, phi, theta, psi in table:
        E = _zxz(phi, theta, psi)
        local = (xyz - np.array([x0, y0, z0])) @ E  # rows: E^T (x - centre)
        inside = ((local / np.array([a, b, c])) ** 2).sum(1) <= 1
        out[inside] += A
    out[np.abs(out) < 1e-12] = 0  # 1 - 0.8 - 0.2 is not 0 in floating point
    return torch.from_numpy(out.reshape(L, L, L))


def shepp_logan(L: int = 11, modified: bool = True) -> torch.Tensor:
    """The 3-D Shepp-Logan phantom at L^3 (``SHEPP_LOGAN_3D``), zero outside the ball |p| <= L/2.

    Args:
        L: side.
        modified: Toft's higher-contrast intensities (the usual choice, default); False for the
            original 1974 intensities (nearly flat inside the skull at small L).

    Returns:
        (L, L, L) float64.
    """
    table = SHEPP_LOGAN_3D.copy()
    if not modified:
        table[:, 0] = SHEPP_LOGAN_ORIGINAL
    return ellipsoids(L, table) * ball_mask(L)


class VolumeProjections:
    """The copy model of a volume (``mtd.forward.measurement``; the stochastic-EM paper, eqs. 2-3):
    tomographic projections at Haar-random rotations, or at rotations drawn uniformly from a
    ``grid`` (the EM's model omega ~ Unif(Omega^K) of Section III-A, exact for a grid it
    searches). They are planted with the EM's own operator (``mtd.groups.project``): the paper's
    "second method", which follows the model of Section II exactly.

    Args:
        volume: (L, L, L) volume (``shepp_logan(11)``); values outside the ball are projected too.
        grid: None, or (K, 3, 3) rotations.
    """

    def __init__(self, volume, grid=None):
        volume = torch.as_tensor(volume, dtype=torch.float64, device="cpu")
        if volume.ndim != 3 or len(set(volume.shape)) != 1:
            raise ValueError(f"volume must be cubic (L, L, L), got shape {tuple(volume.shape)}")
        if not torch.isfinite(volume).all():
            raise ValueError("volume has non-finite values")
        if grid is not None:
            grid = torch.as_tensor(grid, dtype=torch.float64).cpu()
            if grid.ndim != 3 or tuple(grid.shape[1:]) != (3, 3) or len(grid) == 0:
                raise ValueError(
                    f"grid must be (K, 3, 3) rotations with K >= 1, got {tuple(grid.shape)}"
                )
        self.truth, self.L, self.grid = volume, volume.shape[0], grid

    def draw(self, rng: np.random.Generator, p: int) -> dict:
        if self.grid is None:
            return {"rotations": torch.from_numpy(_haar(rng, p))}
        return {"rotations": self.grid[torch.from_numpy(rng.integers(0, len(self.grid), p))]}

    def render(self, poses: dict, block: int = 2048) -> torch.Tensor:
        rotations = poses["rotations"]
        parts = [
            project(self.truth, rotations[s : s + block]) for s in range(0, len(rotations), block)
        ]
        return torch.cat(parts) if parts else torch.zeros(0, self.L, self.L, dtype=torch.float64)

    def energy(self, copies: torch.Tensor) -> float:
        """mean_t ||I_t||^2 over the planted projections (eq. 4)."""
        if len(copies) == 0:
            raise ValueError(
                f"no projection of side {self.L} planted (p = 0): the SNR of eq. (4) is "
                "undefined; raise the density or N"
            )
        energy = float(copies.square().sum((1, 2)).mean())
        if energy == 0:
            raise ValueError("the volume's projections are all zero: the SNR is undefined")
        return energy


def simulate_volume(
    volume,
    N: int,
    density: float = 0.1,
    snr: float = 1.0,
    separation: str = "well",
    seed: int = 0,
    grid=None,
) -> Measurement:
    """Simulate a micrograph (eqs. 2-5 of the stochastic-EM paper; ``simulate_copies``):
    T = round(density N^2 / L^2) projections of ``volume`` (``VolumeProjections``) at random
    positions, in white Gaussian noise with sigma = sqrt(mean_t ||I_t||^2 / (snr L^2)) (eq. 4;
    snr = inf adds no noise). Separation as ``simulate_copies`` ("well": what the patch model
    needs, eq. (5) asks it in both axes; "arbitrary": the paper's Section IV-C).

    Returns:
        ``Measurement`` (``.volume``, ``.rotations``).
    """
    model = VolumeProjections(volume, grid)
    return simulate_copies(model, N, density, snr, separation, seed)
