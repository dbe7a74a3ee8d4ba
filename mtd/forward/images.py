"""Copies of an image (DESIGN section 3): rotated, possibly mirrored, by the EM's own operators
or exactly in a steerable basis; the approximate-EM paper's random target."""

from __future__ import annotations

import math

import numpy as np
import torch

from mtd.forward.measurement import Measurement, simulate_copies
from mtd.groups.rotations import Rotations, _bilinear_table, mirror


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


class ImageCopies:
    """The copy model of an image (``mtd.forward.measurement``): every copy rotated by a random
    angle, k 2 pi / K with k uniform ("discrete"; exact rot90 for K = 4) or uniform on [0, 2 pi)
    ("continuous"), and with ``reflect`` the mirror image with probability 1/2, mirrored before
    it is rotated (the transformations ``mtd.Dihedral`` searches). With a steerable ``basis``
    the image is its band-limited expansion (``coefficients``) and every copy is that image
    rotated exactly by its angle (eq. 3 of the approximate-EM paper). Arguments as ``simulate``.
    """

    def __init__(
        self, image, K=4, rotation="discrete", reflect=False, basis=None, snr_of="planted"
    ):
        image = torch.as_tensor(image, dtype=torch.float64, device="cpu")
        if image.ndim != 2 or image.shape[0] != image.shape[1]:
            raise ValueError(f"image must be a square 2-D array, got shape {tuple(image.shape)}")
        if not torch.isfinite(image).all():
            raise ValueError("image has non-finite values")
        L = image.shape[0]
        if int(K) != K or K < 1:
            raise ValueError(f"K must be an integer >= 1, got {K!r}")
        if rotation not in ("discrete", "continuous"):
            raise ValueError(f"rotation must be 'discrete' or 'continuous', got {rotation!r}")
        if snr_of not in ("planted", "raw"):
            raise ValueError(f"snr_of must be 'planted' or 'raw', got {snr_of!r}")
        self.coefficients, raw = None, image
        if basis is not None:
            if basis.L != L:
                raise ValueError(
                    f"basis is for {basis.L} x {basis.L} images, the image is {L} x {L}"
                )
            self.coefficients = basis.expand(image)
            image = basis.evaluate(self.coefficients)
        self._energy = float((raw if snr_of == "raw" else image).square().sum())
        if self._energy == 0:
            raise ValueError("image is all zeros: its SNR is undefined")
        self.truth, self.L, self.K, self.rotation = image, L, int(K), rotation
        self.reflect, self.basis = bool(reflect), basis

    def draw(self, rng: np.random.Generator, p: int) -> dict:
        if self.rotation == "discrete":
            angles = torch.from_numpy(rng.integers(0, self.K, size=p)).double()
            angles = angles * (2 * math.pi / self.K)
        else:
            angles = torch.from_numpy(rng.uniform(0, 2 * math.pi, size=p))
        # Drawn after the rotations, so reflect=False gives the bytes of before the option.
        reflections = torch.from_numpy(rng.random(p) < 0.5) if self.reflect else None
        return {"angles": angles, "reflections": reflections}

    def render(self, poses: dict) -> torch.Tensor:
        angles, reflections = poses["angles"], poses["reflections"]
        return _copies(self.truth, angles, self.K, self.rotation, reflections, self.basis)

    def energy(self, copies: torch.Tensor) -> float:
        """||F||^2 of the image (planted, or the raw image given with snr_of="raw")."""
        return self._energy


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
    """Simulate an MTD measurement of an image (eq. 1 of both papers; ``simulate_copies``).

    Exactly ``p = round(density * N^2 / L^2)`` copies of ``image`` (``ImageCopies``) are planted
    at random positions, in white Gaussian noise of variance sigma^2 with
    sigma = sqrt(||F||^2 / (snr L^2)) (snr = inf: no noise).

    Args:
        image: (L, L) image F.
        N: side of the square measurement.
        density: fraction of the measurement covered by copies, p L^2 / N^2.
        snr: signal-to-noise ratio ||F||^2 / (L^2 sigma^2).
        K: number of discrete rotations.
        rotation: "discrete" or "continuous".
        separation: "well" or "arbitrary".
        seed: seed of all the randomness.
        reflect: plant mirror images too.
        basis: an ``mtd.FBBasis`` of side L, or None (copies rotated by the pixel operators).
        snr_of: with a basis, "planted" (the SNR of the band-limited image) or "raw" (from the
            norm of the image given, as the approximate-EM paper's code computes it).

    Returns:
        ``Measurement`` with the data and the truth (``.image``).
    """
    model = ImageCopies(image, K, rotation, reflect, basis, snr_of)
    return simulate_copies(model, N, density, snr, separation, seed)


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
