"""One simulator for every kind of object (DESIGN section 3; the stochastic-EM paper, eqs. 1-5):
copies of the object, each in a random pose, placed at random under a separation rule, in white
Gaussian noise; and the ``Measurement`` it returns, with the truth and every copy's true pose.

What a copy is comes from a *copy model* (``mtd.forward.images.ImageCopies``: rotated, possibly
mirrored copies of an image; ``mtd.forward.volumes.VolumeProjections``: tomographic projections
of a volume), with four members:

    truth         the object, (L, L) or (L, L, L)
    draw(rng, p)  the p copies' poses, drawn from ``rng`` after the positions: a dict of
                  ``angles`` / ``reflections`` / ``rotations``
    render(poses) the (p, L, L) copies
    energy(copies) the signal energy of the SNR, ||F||^2 (an image) or mean_t ||I_t||^2 (eq. 4)

Randomness comes from one ``numpy.random.Generator`` (PCG64) seeded by ``seed``, drawn in a fixed
order (positions, poses, noise) and in float64, so the same seed gives the same bytes on every
machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mtd.forward.placement import max_copies, place, plant
from mtd.io.files import write_micrograph
from mtd.so3 import matrix_to_euler


@dataclass
class Measurement:
    """A simulated measurement and its truth.

    Attributes:
        data: (N, N) float64 noisy measurement.
        sigma: noise standard deviation.
        snr: the copy model's energy / (L^2 sigma^2).
        truth: the object: (L, L) float64 image F (band-limited when its copies were rotated in
            a steerable basis) or (L, L, L) float64 volume.
        positions: (p, 2) int64 top-left corners (row, column) of the copies.
        separation: "well" or "arbitrary".
        density: the density asked for, p L^2 / N^2 (rounded to whole copies).
        seed: the seed it was drawn with.
        model: the copy model that rendered the copies (rebuilds them: ``clean``).
        angles: (p,) float64 in-plane rotation of each copy in radians, counter-clockwise
            (images), else None.
        reflections: (p,) bool, whether each copy is the mirror image (rotated after mirroring);
            None when the simulation planted no mirror images.
        rotations: (p, 3, 3) float64 the rotation of each projection (volumes, ``mtd.so3``'s
            convention), else None.
    """

    data: torch.Tensor
    sigma: float
    snr: float
    truth: torch.Tensor
    positions: torch.Tensor
    separation: str
    density: float
    seed: int
    model: object
    angles: torch.Tensor | None = None
    reflections: torch.Tensor | None = None
    rotations: torch.Tensor | None = None

    @property
    def L(self) -> int:
        return self.truth.shape[-1]

    @property
    def N(self) -> int:
        return self.data.shape[-1]

    @property
    def image(self) -> torch.Tensor:
        """The (L, L) image (an image measurement's truth)."""
        if self.truth.ndim != 2:
            raise AttributeError("a measurement of a volume has no image: its truth is .volume")
        return self.truth

    @property
    def volume(self) -> torch.Tensor:
        """The (L, L, L) volume (a volume measurement's truth)."""
        if self.truth.ndim != 3:
            raise AttributeError("a measurement of an image has no volume: its truth is .image")
        return self.truth

    @property
    def K(self) -> int | None:
        """The discrete rotations of an image's copies (None for a volume)."""
        return getattr(self.model, "K", None)

    @property
    def rotation(self) -> str | None:
        """ "discrete" or "continuous" for an image's copies (None for a volume)."""
        return getattr(self.model, "rotation", None)

    @property
    def coefficients(self) -> torch.Tensor | None:
        """(n,) the image's coefficients in the steerable basis its copies were rotated in
        (``simulate(basis=...)``), else None."""
        return getattr(self.model, "coefficients", None)

    @property
    def euler_angles(self) -> torch.Tensor:
        """(p, 3) RELION (rot, tilt, psi) in degrees of a volume's projections (``mtd.so3``)."""
        if self.rotations is None:
            raise AttributeError("the copies of an image have no 3-D rotations")
        return matrix_to_euler(self.rotations)

    @property
    def copy_energy(self) -> float:
        """The energy of one copy, as the picking metrics count it: ||F||^2 of an image, the
        mean ||I_t||^2 of a volume's planted projections."""
        if self.truth.ndim == 2:
            return float(self.truth.square().sum())
        return float(self.model.render(self._poses()).square().sum((1, 2)).mean())

    def _poses(self) -> dict:
        poses = {"angles": self.angles, "reflections": self.reflections}
        return {**poses, "rotations": self.rotations}

    def clean(self) -> torch.Tensor:
        """(N, N) the measurement without noise, rebuilt from the truth and the poses."""
        out = torch.zeros_like(self.data)
        plant(out, self.model.render(self._poses()), self.positions)
        return out

    def save(self, path) -> Path:
        """Write the measurement (not the truth) as .npy or .mrc; see ``write_micrograph``."""
        return write_micrograph(path, self.data)


def check_placement(N, L: int, density, snr, separation: str) -> int:
    """N as an int, with the checks every simulation shares (one line naming the value)."""
    if int(N) != N or N < L:
        raise ValueError(f"N must be an integer >= L = {L}, got {N!r}")
    if separation not in ("well", "arbitrary"):
        raise ValueError(f"separation must be 'well' or 'arbitrary', got {separation!r}")
    if not (math.isfinite(density) and density >= 0):
        raise ValueError(f"density must be a finite number >= 0, got {density!r}")
    if not snr > 0:
        raise ValueError(f"snr must be > 0 (inf for no noise), got {snr!r}")
    return int(N)


def simulate_copies(
    model, N: int, density: float, snr: float, separation: str = "well", seed: int = 0
) -> Measurement:
    """Plant ``p = round(density N^2 / L^2)`` copies of ``model.truth`` and add white noise.

    Positions (``mtd.forward.placement.place``): with separation="well" any two copies' top-left
    corners differ by at least 2L - 1 pixels in row or in column, so no L x L patch touches two
    copies (what the patch model needs); with "arbitrary" copies only must not overlap. The poses
    are ``model.draw``'s; sigma = sqrt(model.energy(copies) / (snr L^2)) (snr = inf: no noise).

    Args:
        model: the copy model (module docstring).
        N: side of the square measurement.
        density: p L^2 / N^2.
        snr: the signal-to-noise ratio of the model's energy.
        separation: "well" or "arbitrary".
        seed: seed of all the randomness.

    Returns:
        ``Measurement``.
    """
    L = model.L
    N = check_placement(N, L, density, snr, separation)
    p = round(density * N * N / (L * L))
    gap = 2 * L - 1 if separation == "well" else L
    cap = max_copies(N, L, gap)
    if p > cap:
        raise ValueError(
            f"density {density} asks for p = {p} copies of side {L} in {N} x {N}, but at most "
            f"{cap} fit with separation={separation!r} (density <= {cap * L * L / (N * N):.4g})"
        )
    rng = np.random.default_rng(seed)
    positions = torch.from_numpy(place(N, L, p, gap, rng))
    poses = model.draw(rng, p)
    data = torch.from_numpy(rng.standard_normal((N, N)))
    copies = model.render(poses)
    sigma = math.sqrt(model.energy(copies) / (snr * L * L))
    data.mul_(sigma)
    plant(data, copies, positions)
    return Measurement(
        data, sigma, float(snr), model.truth, positions, separation, float(density), seed,
        model, **poses,
    )  # fmt: skip
