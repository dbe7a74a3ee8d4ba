"""Volumes for the stochastic-EM paper's model: the 3-D Shepp-Logan phantom and the micrograph
simulator (eqs. 1-5). (Frequency marching, Section III-D, is the group's: ``Projections``'
schedule, which the EM loop advances through ``TransformSet.start_iteration``.)

The simulator draws from one ``numpy.random.Generator`` (PCG64) seeded by ``seed``, in a fixed
order (positions, rotations, noise) and in float64, so the same seed gives the same bytes
everywhere. It plants the projections with the EM's own operator (``mtd.groups.tomography.project``):
the paper's "second method", which follows the model of Section II exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mtd.forward.placement import max_copies, place, plant
from mtd.groups.tomography import project
from mtd.io.files import write_micrograph
from mtd.so3 import _haar, ball_mask, grid_points, matrix_to_euler

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


# ------------------------------------------------------------------------------------------------
# The micrograph simulator
# ------------------------------------------------------------------------------------------------
@dataclass
class VolumeMeasurement:
    """A simulated micrograph of projections of a volume, and its truth.

    Attributes:
        data: (N, N) float64 noisy micrograph.
        sigma: noise standard deviation.
        snr: eq. (4) of the stochastic-EM paper: mean_t ||I_t||_F^2 / (L^2 sigma^2) over the
            planted projections I_t.
        volume: (L, L, L) float64 the volume f.
        positions: (T, 2) int64 top-left corners (row, column) of the projections.
        rotations: (T, 3, 3) float64 the rotation of each projection (``mtd.so3`` convention).
        separation: "well" or "arbitrary".
        density: the density gamma asked for, T L^2 / N^2 (rounded to whole projections).
        seed: the seed it was drawn with.
    """

    data: torch.Tensor
    sigma: float
    snr: float
    volume: torch.Tensor
    positions: torch.Tensor
    rotations: torch.Tensor
    separation: str
    density: float
    seed: int

    @property
    def L(self) -> int:
        return self.volume.shape[0]

    @property
    def angles(self) -> torch.Tensor:
        """(T, 3) RELION (rot, tilt, psi) in degrees of the rotations (``mtd.so3``)."""
        return matrix_to_euler(self.rotations)

    def clean(self) -> torch.Tensor:
        """The micrograph without noise, rebuilt from the truth."""
        out = torch.zeros_like(self.data)
        _plant_projections(out, self.volume, self.rotations, self.positions)
        return out

    def save(self, path) -> Path:
        """Write the micrograph (not the truth) as .npy or .mrc (``mtd.write_micrograph``)."""
        return write_micrograph(path, self.data)


def _plant_projections(out, volume, rotations, positions, block: int = 2048) -> torch.Tensor:
    """Add the projections of ``volume`` at ``rotations`` at ``positions``; returns their
    ||I_t||^2 (T,)."""
    norms = []
    for s in range(0, len(rotations), block):  # bounded memory for many copies
        images = project(volume, rotations[s : s + block])
        norms.append(images.square().sum((1, 2)))
        plant(out, images, positions[s : s + block])
    return torch.cat(norms) if norms else torch.zeros(0, dtype=torch.float64)


def simulate_volume(
    volume,
    N: int,
    density: float = 0.1,
    snr: float = 1.0,
    separation: str = "well",
    seed: int = 0,
    grid=None,
) -> VolumeMeasurement:
    """Simulate a micrograph (eqs. 2-3 of the stochastic-EM paper): projections of ``volume`` at
    Haar-random rotations, at random positions, in white Gaussian noise.

    Exactly T = round(density N^2 / L^2) projections are placed one by one at uniform positions
    (``mtd.forward.placement.place``). separation="well": any two top-left corners differ by at least
    2L - 1 pixels in row or in column, so no L x L patch meets two projections (what the patch
    model needs; eq. (5) asks it in both axes); "arbitrary": projections only do not overlap (the
    paper's Section IV-C). sigma = sqrt(mean_t ||I_t||^2 / (snr L^2)) (eq. 4) over the planted
    projections; snr = inf adds no noise.

    Args:
        volume: (L, L, L) volume (``shepp_logan(11)``); values outside the ball are projected too.
        N: side of the square micrograph.
        density: gamma = T L^2 / N^2.
        snr: eq. (4).
        separation: "well" or "arbitrary".
        seed: seed of all the randomness.
        grid: None for Haar-random rotations, or (K, 3, 3) rotations to draw uniformly from (the
            EM's model omega ~ Unif(Omega^K) of Section III-A, exact for a grid it searches).

    Returns:
        ``VolumeMeasurement``.
    """
    volume = torch.as_tensor(volume, dtype=torch.float64, device="cpu")
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ValueError(f"volume must be cubic (L, L, L), got shape {tuple(volume.shape)}")
    if not torch.isfinite(volume).all():
        raise ValueError("volume has non-finite values")
    L = volume.shape[0]
    if int(N) != N or N < L:
        raise ValueError(f"N must be an integer >= L = {L}, got {N!r}")
    N = int(N)
    if separation not in ("well", "arbitrary"):
        raise ValueError(f"separation must be 'well' or 'arbitrary', got {separation!r}")
    if not (math.isfinite(density) and density > 0):
        raise ValueError(f"density must be a finite number > 0, got {density!r}")
    if not snr > 0:
        raise ValueError(f"snr must be > 0 (inf for no noise), got {snr!r}")
    T = round(density * N * N / (L * L))
    gap = 2 * L - 1 if separation == "well" else L
    cap = max_copies(N, L, gap)
    if T < 1:
        raise ValueError(
            f"density {density} places no projection of side {L} in {N} x {N} (T = 0): the SNR "
            "of eq. (4) is undefined"
        )
    if T > cap:
        raise ValueError(
            f"density {density} asks for T = {T} projections of side {L} in {N} x {N}, but at "
            f"most {cap} fit with separation={separation!r} "
            f"(density <= {cap * L * L / (N * N):.4g})"
        )
    if grid is not None:
        grid = torch.as_tensor(grid, dtype=torch.float64).cpu()
        if grid.ndim != 3 or tuple(grid.shape[1:]) != (3, 3) or len(grid) == 0:
            raise ValueError(
                f"grid must be (K, 3, 3) rotations with K >= 1, got {tuple(grid.shape)}"
            )
    rng = np.random.default_rng(seed)
    positions = torch.from_numpy(place(N, L, T, gap, rng))
    if grid is None:
        rotations = torch.from_numpy(_haar(rng, T))
    else:
        rotations = grid[torch.from_numpy(rng.integers(0, len(grid), T))]
    noise = torch.from_numpy(rng.standard_normal((N, N)))
    data = torch.zeros(N, N, dtype=torch.float64)
    norms = _plant_projections(data, volume, rotations, positions)
    energy = float(norms.mean())
    if energy == 0:
        raise ValueError("the volume's projections are all zero: the SNR is undefined")
    sigma = math.sqrt(energy / (snr * L * L))
    data += sigma * noise
    return VolumeMeasurement(
        data, sigma, float(snr), volume, positions, rotations, separation, float(density), seed
    )
