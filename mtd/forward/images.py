"""The MTD forward model (DESIGN section 3): plant rotated copies of an image in noise; read and
write.

Randomness comes from one ``numpy.random.Generator`` (PCG64) seeded by ``seed``, drawn in a fixed
order (positions, rotations, noise) and in float64, so the same seed gives the same bytes on every
machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mtd.forward.placement import max_copies, place, plant
from mtd.groups.rotations import Rotations, _bilinear_table, mirror
from mtd.io.files import write_micrograph


@dataclass
class Measurement:
    """A simulated measurement and its truth.

    Attributes:
        data: (N, N) float64 noisy measurement.
        sigma: noise standard deviation.
        snr: ||F||^2 / (L^2 sigma^2).
        image: (L, L) float64 planted image F.
        positions: (p, 2) int64 top-left corners (row, column) of the copies.
        angles: (p,) float64 rotation of each copy in radians, counter-clockwise.
        K: number of discrete rotations (for rotation="discrete").
        rotation: "discrete" or "continuous".
        separation: "well" or "arbitrary".
        seed: the seed it was drawn with.
        reflections: (p,) bool, whether each copy is the mirror image (rotated after mirroring);
            None when the simulation planted no mirror images.
        coefficients: (n,) the image's coefficients in the steerable basis its copies were
            rotated in (``simulate(basis=...)``), else None.
    """

    data: torch.Tensor
    sigma: float
    snr: float
    image: torch.Tensor
    positions: torch.Tensor
    angles: torch.Tensor
    K: int
    rotation: str
    separation: str
    seed: int
    reflections: torch.Tensor | None = None
    coefficients: torch.Tensor | None = None

    @property
    def L(self) -> int:
        return self.image.shape[-1]

    @property
    def N(self) -> int:
        return self.data.shape[-1]

    def clean(self, basis=None) -> torch.Tensor:
        """(N, N) the measurement without noise, rebuilt from the truth (and the basis the
        simulation rotated the copies in, if any)."""
        if self.coefficients is not None and basis is None:
            raise ValueError(
                "this measurement's copies were rotated in a steerable basis: call clean(basis)"
            )
        out = torch.zeros_like(self.data)
        copies = _copies(self.image, self.angles, self.K, self.rotation, self.reflections, basis)
        plant(out, copies, self.positions)
        return out

    def save(self, path) -> Path:
        """Write the measurement (not the truth) as .npy or .mrc; see ``write_micrograph``."""
        return write_micrograph(path, self.data)


def _copies(
    image: torch.Tensor, angles: torch.Tensor, K: int, rotation: str, reflections=None, basis=None
) -> torch.Tensor:
    """(p, L, L) rotated copies: the EM's operators for discrete angles, else bilinear; with a
    steerable ``basis``, the band-limited image rotated exactly (eq. 3) at every angle.

    A copy with ``reflections[i]`` true is the rotated mirror image, R mirror(F) (the order of
    ``mtd.Dihedral``'s templates).
    """
    if reflections is not None:
        out = _copies(image, angles, K, rotation, basis=basis)
        flipped = _copies(mirror(image), angles, K, rotation, basis=basis)
        return torch.where(reflections.view(-1, 1, 1), flipped, out)
    if basis is not None:
        coef = basis.expand(image)
        out = torch.empty(len(angles), *image.shape, dtype=image.dtype, device=image.device)
        for s in range(0, len(angles), 4096):  # bounded memory for many copies
            rotated = basis.rotation(angles[s : s + 4096]).to(image) @ coef  # (b, n)
            out[s : s + 4096] = basis.evaluate(rotated)
        return out
    L = image.shape[-1]
    if rotation == "discrete":
        k = torch.round(angles * K / (2 * math.pi)).long() % K
        return Rotations(L, K).to(device=image.device, dtype=image.dtype)(image)[k]
    out = torch.empty(len(angles), L, L, dtype=image.dtype, device=image.device)
    flat = image.reshape(-1)
    for s in range(0, len(angles), 4096):  # bounded memory for many copies
        index, weight = _bilinear_table(L, angles[s : s + 4096])
        out[s : s + 4096] = (flat[index] * weight.to(image.dtype)).sum(-1).reshape(-1, L, L)
    return out


def simulate(
    image,
    N: int,
    density: float = 0.1,
    snr: float = 1.0,
    K: int = 4,
    rotation: str = "discrete",
    separation: str = "well",
    seed: int = 0,
    reflect: bool = False,
    basis=None,
    snr_of: str = "planted",
) -> Measurement:
    """Simulate an MTD measurement (eq. 1 of both papers).

    Exactly ``p = round(density * N^2 / L^2)`` copies of ``image`` are planted at random positions,
    each rotated by a random angle: k * 2*pi/K with k uniform (rotation="discrete"; exact rot90 for
    K = 4) or uniform on [0, 2*pi) (rotation="continuous"). With separation="well" any two copies'
    top-left corners differ by at least 2L - 1 pixels in row or in column, so no L x L window
    touches two copies; with separation="arbitrary" copies only must not overlap. White Gaussian
    noise of variance sigma^2 with sigma = sqrt(||F||^2 / (snr L^2)) is added (snr = inf: no
    noise). With ``reflect`` every copy is the mirror image with probability 1/2, mirrored before
    it is rotated (the transformations ``mtd.Dihedral`` searches).

    With a steerable ``basis`` (``mtd.FBBasis``), the approximate-EM paper's forward model: the
    image is replaced by its band-limited expansion in the basis (``Measurement.image``, and its
    ``coefficients``), and every copy is that image rotated exactly by its angle (eq. 3).

    Args:
        image: (L, L) image F.
        N: side of the square measurement.
        density: fraction of the measurement covered by copies, p L^2 / N^2.
        snr: signal-to-noise ratio ||F||^2 / (L^2 sigma^2).
        K: number of discrete rotations.
        rotation: "discrete" or "continuous".
        separation: "well" or "arbitrary".
        seed: seed of all the randomness.
        reflect: plant mirror images too (drawn after the rotations, so ``reflect=False`` gives
            the same bytes as before the option existed).
        basis: an ``mtd.FBBasis`` of side L, or None (copies rotated by the pixel operators).
        snr_of: with a basis, "planted" (the SNR of the band-limited image) or "raw" (from the
            norm of the image given, as the approximate-EM paper's code computes it).

    Returns:
        ``Measurement`` with the data and the truth.
    """
    image = torch.as_tensor(image, dtype=torch.float64, device="cpu")
    if image.ndim != 2 or image.shape[0] != image.shape[1]:
        raise ValueError(f"image must be a square 2-D array, got shape {tuple(image.shape)}")
    if not torch.isfinite(image).all():
        raise ValueError("image has non-finite values")
    L = image.shape[0]
    if int(N) != N or N < L:
        raise ValueError(f"N must be an integer >= L = {L}, got {N!r}")
    N = int(N)
    if int(K) != K or K < 1:
        raise ValueError(f"K must be an integer >= 1, got {K!r}")
    if rotation not in ("discrete", "continuous"):
        raise ValueError(f"rotation must be 'discrete' or 'continuous', got {rotation!r}")
    if separation not in ("well", "arbitrary"):
        raise ValueError(f"separation must be 'well' or 'arbitrary', got {separation!r}")
    if not (math.isfinite(density) and density >= 0):
        raise ValueError(f"density must be a finite number >= 0, got {density!r}")
    if not snr > 0:
        raise ValueError(f"snr must be > 0 (inf for no noise), got {snr!r}")
    if snr_of not in ("planted", "raw"):
        raise ValueError(f"snr_of must be 'planted' or 'raw', got {snr_of!r}")
    coefficients, raw = None, image
    if basis is not None:
        if basis.L != L:
            raise ValueError(f"basis is for {basis.L} x {basis.L} images, the image is {L} x {L}")
        coefficients = basis.expand(image)
        image = basis.evaluate(coefficients)
    energy = float((raw if snr_of == "raw" else image).square().sum())
    if energy == 0:
        raise ValueError("image is all zeros: its SNR is undefined")
    p = round(density * N * N / (L * L))
    gap = 2 * L - 1 if separation == "well" else L
    cap = max_copies(N, L, gap)
    if p > cap:
        raise ValueError(
            f"density {density} asks for p = {p} copies of a {L} x {L} image in {N} x {N}, but "
            f"at most "
            f"{cap} fit with separation={separation!r} (density <= {cap * L * L / (N * N):.4g})"
        )
    rng = np.random.default_rng(seed)
    positions = torch.from_numpy(place(N, L, p, gap, rng))
    if rotation == "discrete":
        angles = torch.from_numpy(rng.integers(0, K, size=p)).double() * (2 * math.pi / K)
    else:
        angles = torch.from_numpy(rng.uniform(0, 2 * math.pi, size=p))
    reflections = torch.from_numpy(rng.random(p) < 0.5) if reflect else None
    sigma = math.sqrt(energy / (snr * L * L))
    data = torch.from_numpy(rng.standard_normal((N, N)))
    data.mul_(sigma)
    plant(data, _copies(image, angles, K, rotation, reflections, basis), positions)
    return Measurement(
        data,
        sigma,
        float(snr),
        image,
        positions,
        angles,
        int(K),
        rotation,
        separation,
        seed,
        reflections,
        coefficients,
    )


def random_image(L: int, seed: int = 0, norm: float = 10.0) -> torch.Tensor:
    """The approximate-EM paper's random target: entries i.i.d. U[0, 1], scaled to ||F|| = norm.

    (Section 3 of the paper: L = 5, norm 10; it then keeps the image's first 10 Fourier-Bessel
    coefficients, which ``simulate(basis=mtd.FBBasis(L, n=10))`` does.)

    Returns:
        (L, L) float64.
    """
    if int(L) != L or L < 1:
        raise ValueError(f"L must be an integer >= 1, got {L!r}")
    if not (math.isfinite(norm) and norm > 0):
        raise ValueError(f"norm must be a finite number > 0, got {norm!r}")
    image = torch.from_numpy(np.random.default_rng(seed).uniform(0, 1, (int(L), int(L))))
    return image * (norm / float(image.norm()))


