"""The MTD forward model (DESIGN section 3): plant rotated copies of an image in noise; read and
write.

Randomness comes from one ``numpy.random.Generator`` (PCG64) seeded by ``seed``, drawn in a fixed
order (positions, rotations, noise) and in float64, so the same seed gives the same bytes on every
machine.
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mtd.rotations import Rotations, _bilinear_table, mirror

MRC_SUFFIXES = (".mrc", ".mrcs", ".map")


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
        _plant(out, copies, self.positions)
        return out

    def save(self, path) -> Path:
        """Write the measurement (not the truth) as .npy or .mrc; see ``write_micrograph``."""
        return write_micrograph(path, self.data)


def _max_copies(N: int, L: int, gap: int) -> int:
    """How many corners in {0..N-L}^2 fit at pairwise Chebyshev distance >= gap (a lattice)."""
    return ((N - L) // gap + 1) ** 2


def _place(N: int, L: int, p: int, gap: int, rng: np.random.Generator) -> np.ndarray:
    """Random sequential placement of p corners whose pairs differ by >= gap in row or in column.

    Candidates are uniform on {0..N-L}^2; a bucket grid of cell side ``gap`` holds at most one
    corner per cell, so a candidate is checked against the 3 x 3 neighbouring cells only. If random
    placement jams, it falls back to a random subset of the densest lattice, shifted at random.
    """
    W = N - L + 1
    cells = (W + gap - 1) // gap
    owner = -np.ones(
        (cells + 2, cells + 2), dtype=np.int64
    )  # one-cell border avoids bounds checks
    pos = np.empty((p, 2), dtype=np.int64)
    n, misses = 0, 0
    max_misses = 200 * max(p, 100)
    while n < p and misses < max_misses:
        for r, c in rng.integers(0, W, size=(4096, 2)):
            cr, cc = r // gap + 1, c // gap + 1
            near = owner[cr - 1 : cr + 2, cc - 1 : cc + 2].ravel()
            near = near[near >= 0]
            if near.size and np.any(
                (np.abs(pos[near, 0] - r) < gap) & (np.abs(pos[near, 1] - c) < gap)
            ):
                misses += 1
                continue
            owner[cr, cc] = n
            pos[n] = r, c
            n += 1
            if n == p:
                break
    if n == p:
        return pos
    per_axis = (N - L) // gap + 1
    cells_idx = rng.choice(per_axis * per_axis, size=p, replace=False)
    slack = (N - L) - (per_axis - 1) * gap
    offset = rng.integers(0, slack + 1, size=2)
    return np.stack([cells_idx // per_axis, cells_idx % per_axis], 1) * gap + offset


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


def _plant(data: torch.Tensor, copies: torch.Tensor, positions: torch.Tensor) -> None:
    L = copies.shape[-1]
    ar = torch.arange(L, device=positions.device)
    rows = (positions[:, 0, None, None] + ar[None, :, None]).expand(-1, L, L)
    cols = (positions[:, 1, None, None] + ar[None, None, :]).expand(-1, L, L)
    data.index_put_((rows, cols), copies, accumulate=True)


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
    cap = _max_copies(N, L, gap)
    if p > cap:
        raise ValueError(
            f"density {density} asks for p = {p} copies of a {L} x {L} image in {N} x {N}, but "
            f"at most "
            f"{cap} fit with separation={separation!r} (density <= {cap * L * L / (N * N):.4g})"
        )
    rng = np.random.default_rng(seed)
    positions = torch.from_numpy(_place(N, L, p, gap, rng))
    if rotation == "discrete":
        angles = torch.from_numpy(rng.integers(0, K, size=p)).double() * (2 * math.pi / K)
    else:
        angles = torch.from_numpy(rng.uniform(0, 2 * math.pi, size=p))
    reflections = torch.from_numpy(rng.random(p) < 0.5) if reflect else None
    sigma = math.sqrt(energy / (snr * L * L))
    data = torch.from_numpy(rng.standard_normal((N, N)))
    data.mul_(sigma)
    _plant(data, _copies(image, angles, K, rotation, reflections, basis), positions)
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


def expand_paths(spec, key: str = "path") -> list[str]:
    """The files of a path, a list of paths, or glob patterns (each sorted), in order.

    Args:
        spec: a path or a sequence of paths / patterns.
        key: the config key named when a pattern matches nothing.
    """
    items = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    paths = []
    for item in map(str, items):
        found = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not found:
            raise FileNotFoundError(f"{key}: no file matches {item}")
        paths += found
    return paths


def read_micrograph(path) -> torch.Tensor:
    """Read a 2-D measurement from .npy or .mrc (.mrcs, .map).

    Returns:
        (N0, N1) tensor in the file's floating dtype (float32 for MRC).
    """
    array = np.array(open_micrograph(path))  # the checks of the file, then one read
    if not np.isfinite(array).all():
        raise ValueError(f"{path} has {int((~np.isfinite(array)).sum())} non-finite values")
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(array))


def open_array(path, what: str = "measurement") -> np.ndarray:
    """Memory-map a .npy or .mrc file read-only, of any shape: nothing is read until it is sliced.

    Args:
        what: what the file should hold, for the error messages.

    Returns:
        read-only ``numpy.memmap`` (an MRC file stays open while it is referenced).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file at {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, EOFError, OSError) as e:  # empty, truncated or not a .npy file
            raise ValueError(
                f"{path} is not a readable .npy file ({type(e).__name__}: {e})"
            ) from e
    if suffix in MRC_SUFFIXES:
        import mrcfile

        try:
            mrc = mrcfile.mmap(path, mode="r", permissive=True)
        except ValueError as e:
            raise ValueError(f"{path} is not a readable MRC file ({e})") from e
        if mrc.data is None:
            raise ValueError(f"{path} is not a readable MRC file")
        return mrc.data
    raise ValueError(f"unknown {what} format {suffix!r} of {path}: use .npy or .mrc")


def read_images(path) -> torch.Tensor:
    """(n, L, L) float64 images from a .npy / .mrc holding one (L, L) image or an (n, L, L) stack.

    Raises:
        ValueError: another shape, or non-finite values (the message names the file).
    """
    array = open_array(path, what="image")
    if array.size == 0:
        raise ValueError(f"{path} holds no values (shape {array.shape})")
    array = np.array(array)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1] != array.shape[2]:
        raise ValueError(f"{path} holds shape {array.shape}; expected (L, L) or (n, L, L) images")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ValueError(f"{path} holds dtype {array.dtype}; images hold real numbers")
    if not np.isfinite(array).all():
        raise ValueError(f"{path} has non-finite values")
    return torch.from_numpy(array.astype(np.float64))


def open_micrograph(path) -> np.ndarray:
    """Memory-map a 2-D .npy or .mrc measurement read-only: nothing is read until it is sliced.

    The checks of ``read_micrograph`` that need no pass over the data (2-D, real numbers) are done
    here; non-finite values are found when the patches are streamed (``mtd.PatchSource``).

    Returns:
        (N0, N1) read-only ``numpy.memmap`` (an MRC file stays open while it is referenced).
    """
    array = open_array(path)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"{path} holds an array of shape {array.shape}; a measurement is 2-D")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ValueError(f"{path} holds dtype {array.dtype}; a measurement holds real numbers")
    return array


def write_micrograph(path, data, voxel_size: float = 1.0) -> Path:
    """Write a 2-D measurement as .npy (its dtype) or .mrc (float32), atomically.

    The file appears whole or not at all: it is written next to ``path`` and renamed.
    """
    path = Path(path)
    array = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if array.ndim != 2:
        raise ValueError(f"a measurement is 2-D, got shape {array.shape}")
    suffix = path.suffix.lower()
    if suffix not in (".npy", *MRC_SUFFIXES):
        raise ValueError(f"unknown measurement format {suffix!r} of {path}: use .npy or .mrc")

    def write_mrc(tmp: Path) -> None:
        import mrcfile

        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(array.astype(np.float32))
            mrc.voxel_size = voxel_size
            # mrcfile labels new files with the time; a fixed label keeps runs byte-identical.
            mrc.header.label[0] = b"written by mtd"
            mrc.header.nlabl = 1

    atomic_write(path, (lambda tmp: np.save(tmp, array)) if suffix == ".npy" else write_mrc)
    return path


def atomic_write(path, write) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename: whole or absent.

    The temporary file is opened plainly (not by mkstemp, which makes 0600 files), so the file gets
    the user's umask; its suffix stays last because np.save appends .npy to any other name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_summary(path, summary: dict) -> None:
    """A run's summary as indented JSON (anything not JSON as its str), written whole."""
    text = json.dumps(summary, indent=2, default=str)
    atomic_write(path, lambda p: p.write_text(text))
