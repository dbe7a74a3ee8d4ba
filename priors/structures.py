"""Density maps of real protein structures: the training data of a 3-D prior.

Atomic models become (L, L, L) maps the way the reconstruction sees a volume:

1. **Atoms** (``load_atoms``): the first model of a PDB / mmCIF file read by ``gemmi``, hydrogens,
   waters and ligands removed; each atom weighted by its atomic number Z (the electron count, the
   usual low-resolution proxy for its scattering power).
2. **Placement**: centred on the Z-weighted centroid and scaled so that the farthest atom lies at
   ``fill`` L voxels from the centre (0.45 L by default: the molecule fills the ball |p| <= L / 2
   of ``mtd.so3``); the voxel size that implies is recorded (Angstrom per voxel). Coordinates (x,
   y, z) go to the array axes (2, 1, 0): an MRC volume's (z, y, x) order (``mtd.so3``), so the
   molecule keeps its hand.
3. **Rendering** (``render``): every atom an isotropic Gaussian of ``width`` voxels and integral
   Z, sampled at the voxel centres; the Gaussian is separable, so one map is a matrix product over
   the atoms, (L, n) x (n, L^2).
4. **Band limit** (``BandLimit``): the orthogonal projection onto the span of the ball's 3-D
   Fourier-Bessel functions with l <= ``lmax`` (``mtd.groups.tomography``: the subspace the volume
   EM works in at the end of its frequency marching).
5. **Units**: each map scaled to unit root-mean-square over the ball's voxels (network units; the
   prior's ``units`` carry them to the measurement's).

Augmentation (``VolumeDataModule``): Haar-random rotations of the atoms (and Gaussian shifts of
``shift`` voxels) before rendering, so a rotated map is rendered exactly, not resampled: the EM's
estimate has an arbitrary pose. Structures, not only rotations, are held out, by name.

The structures are those the ``mdanalysistests`` package ships (``structure_files``): the single
chains of its ``dssp/`` set, of many folds, and adenylate kinase open and closed.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import TensorDataset

from priors.data import SeededLoaders

# Held out by default: adenylate kinase in both conformations (a protein none of the training
# chains is) and four chains of the dssp set, one of each size class.
HELD_OUT = ("adk_open", "adk_closed", "1ahsA", "2xcjA", "3nbkA", "4gcnA")
# Files of the dssp set that are not a protein chain to learn from.
_SKIP = ("1mr1D_failing", "wrong_hydrogens")


def structure_files() -> dict[str, Path]:
    """The protein structures of ``mdanalysistests``, by name (file name without extensions).

    Raises:
        ValueError: the package is not installed.
    """
    try:
        import MDAnalysisTests
    except ImportError as e:
        raise ValueError(
            "the 3-D prior's structures come from the mdanalysistests package: pip install "
            "mdanalysistests"
        ) from e
    data = Path(MDAnalysisTests.__file__).parent / "data"
    files = {p.name.split(".")[0]: p for p in sorted((data / "dssp").glob("*.pdb.gz"))}
    files = {k: v for k, v in files.items() if k not in _SKIP}
    for name in ("adk_open", "adk_closed"):
        files[name] = data / f"{name}.pdb"
    return files


def load_atoms(path) -> tuple[np.ndarray, np.ndarray]:
    """The heavy atoms of a structure's first model: coordinates (n, 3) in Angstrom as (x, y, z),
    and atomic numbers (n,)."""
    import gemmi

    st = gemmi.read_structure(str(path))
    st.setup_entities()
    st.remove_hydrogens()
    st.remove_ligands_and_waters()
    xyz, z = [], []
    for chain in st[0]:
        for residue in chain:
            for atom in residue:
                xyz.append((atom.pos.x, atom.pos.y, atom.pos.z))
                z.append(atom.element.atomic_number)
    if not xyz:
        raise ValueError(f"{path}: no protein atoms in its first model")
    return np.asarray(xyz, np.float64), np.asarray(z, np.float64)


def place(xyz: np.ndarray, weights: np.ndarray, L: int, fill: float) -> tuple[np.ndarray, float]:
    """Atoms in voxel coordinates p = (z, y, x) / voxel_size about the weighted centroid, the
    farthest at ``fill`` L voxels. Returns p (n, 3) and the voxel size in Angstrom."""
    centred = xyz - (weights[:, None] * xyz).sum(0) / weights.sum()
    voxel = float(np.linalg.norm(centred, axis=1).max()) / (fill * L)
    return centred[:, ::-1] / voxel, voxel


def render(p: torch.Tensor, weights: torch.Tensor, L: int, width: float) -> torch.Tensor:
    """sum_a w_a N(p; p_a, width^2 I_3) at the voxel centres of ``mtd.so3`` (i - (L - 1) / 2).

    Args:
        p: (n, 3) atom positions in voxels, or (B, n, 3) for B maps at once.
        weights: (n,) integrals of the atoms.
        L: box side.
        width: the Gaussians' standard deviation in voxels.

    Returns:
        (L, L, L), or (B, L, L, L); float64 if p is.
    """
    batch = p.ndim == 3
    p = p if batch else p[None]
    grid = torch.arange(L, dtype=p.dtype, device=p.device) - (L - 1) / 2
    norm = (2 * math.pi * width**2) ** -0.5  # per axis: the product is the 3-D normalisation
    g = norm * torch.exp(-((grid - p[..., None]) ** 2) / (2 * width**2))  # (B, n, 3, L)
    a = g[:, :, 0] * weights.to(p)[:, None]  # (B, n, L)
    bc = torch.einsum("bnj,bnk->bnjk", g[:, :, 1], g[:, :, 2]).flatten(2)  # (B, n, L^2)
    out = torch.bmm(a.transpose(1, 2), bc).reshape(-1, L, L, L)
    return out if batch else out[0]


class BandLimit:
    """The orthogonal projector onto the ball's 3-D Fourier-Bessel span with l <= lmax (the
    volume EM's subspace, ``mtd.groups.tomography``), and the unit-RMS scaling over the ball."""

    def __init__(self, L: int, lmax: int, radial: float | None = None):
        from mtd.groups.tomography import fourier_bessel_functions, orthonormal_basis
        from mtd.so3 import ball_mask

        self.L, self.lmax = int(L), int(lmax)
        self.mask = ball_mask(self.L) > 0
        Q = torch.from_numpy(orthonormal_basis(fourier_bessel_functions(self.L, lmax, radial)))
        Q[~self.mask.reshape(-1)] = 0
        self.Q = Q

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        """(..., L, L, L) band-limited and scaled to unit RMS over the ball's voxels."""
        flat = V.reshape(-1, self.L**3).to(self.Q)
        flat = (flat @ self.Q) @ self.Q.T
        rms = flat[:, self.mask.reshape(-1)].square().mean(1, keepdim=True).sqrt()
        return (flat / rms.clamp_min(1e-300)).reshape(V.shape)


def _rotations(n: int, rng: np.random.Generator) -> torch.Tensor:
    from mtd.so3 import random_rotations

    return random_rotations(n, int(rng.integers(2**31)))


class VolumeDataModule(SeededLoaders, L.LightningDataModule):
    """Density maps of real protein structures at random poses, (1, L, L, L) in network units.

    Each training structure is rendered at ``rotations`` Haar-random rotations (drawn once, from
    ``seed``), each with a Gaussian shift of ``shift`` voxels; the held-out structures at
    ``val_rotations`` for validation. ``held_out_images()`` are the held-out structures unrotated
    (the reconstruction targets a checkpoint stores).

    Args:
        L: box side (11 by default; 16 and 21 work alike).
        fill: the farthest atom's distance from the centre, in units of L.
        width: the atoms' Gaussian width in voxels.
        lmax: band limit (the volume EM's last frequency-marching stage, l <= 10).
        radial: the largest Fourier-Bessel zero kept (None: Nyquist, as the EM's subspace).
        held_out: names of the held-out structures (``structure_files``).
        rotations: poses per training structure. val_rotations: per held-out structure.
        shift: standard deviation of the random shift in voxels (0: centred).
        batch_size, num_workers, seed: loader settings; ``seed`` fixes the poses.
    """

    def __init__(
        self,
        L: int = 11,
        fill: float = 0.45,
        width: float = 1.0,
        lmax: int = 10,
        radial: float | None = None,
        held_out: list[str] | tuple[str, ...] = HELD_OUT,
        rotations: int = 256,
        val_rotations: int = 16,
        shift: float = 0.5,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        for key, value, ok in [
            ("L", L, int(L) == L and L >= 4),
            ("fill", fill, 0 < fill < 0.5),
            ("width", width, width > 0),
            ("lmax", lmax, int(lmax) == lmax and lmax >= 0),
            ("rotations", rotations, int(rotations) == rotations and rotations >= 1),
            ("val_rotations", val_rotations, int(val_rotations) == val_rotations),
            ("shift", shift, shift >= 0),
        ]:
            if not ok:
                raise ValueError(f"data.{key}={value!r} is not allowed (see VolumeDataModule)")
        self.L, self.fill, self.width = int(L), float(fill), float(width)
        self.lmax, self.radial = int(lmax), radial
        self.held_out = [str(n) for n in held_out]
        self.rotations, self.val_rotations, self.shift = int(rotations), int(val_rotations), shift
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        files = structure_files()
        unknown = sorted(set(self.held_out) - set(files))
        if unknown:
            raise ValueError(
                f"data.held_out names {unknown}, not structures of mdanalysistests; known: "
                f"{sorted(files)}"
            )
        self.files = files
        self.train_names = [n for n in files if n not in self.held_out]
        self.voxel_sizes: dict[str, float] = {}
        self.train_set = None

    def maps(self, name: str, n: int, rng: np.random.Generator | None) -> torch.Tensor:
        """Structure ``name`` rendered at n poses ((n, L, L, L) float64, network units): random
        rotations and shifts from ``rng``, or the model's own pose if rng is None (n = 1)."""
        xyz, z = load_atoms(self.files[name])
        p, voxel = place(xyz, z, self.L, self.fill)
        self.voxel_sizes[name] = voxel
        p = torch.from_numpy(p.copy())[None].expand(n, -1, -1)
        if rng is not None:
            R = _rotations(n, rng)
            shifts = torch.from_numpy(rng.normal(0, self.shift, (n, 1, 3))) if self.shift else 0
            p = torch.einsum("bij,bnj->bni", R, p) + shifts
        return self._band(render(p, torch.from_numpy(z), self.L, self.width))

    def setup(self, stage=None):
        if self.train_set is not None:
            return
        self._band = BandLimit(self.L, self.lmax, self.radial)
        rng = np.random.default_rng(self.seed)
        train = torch.cat([self.maps(n, self.rotations, rng) for n in self.train_names])
        val = torch.cat([self.maps(n, self.val_rotations, rng) for n in self.held_out])
        self.train_set = TensorDataset(train[:, None].float())
        self.val_set = TensorDataset(val[:, None].float())

    def held_out_images(self) -> torch.Tensor:
        """(n, L, L, L) the held-out structures in the model's pose (network units)."""
        self.setup()
        return torch.cat([self.maps(n, 1, None) for n in self.held_out]).float()

    def meta(self) -> dict:
        self.setup()
        return {
            "name": "volumes",
            "image_size": self.L,
            "ndim": 3,
            "units": 1.0,
            "normalisation": "ball_rms",  # each map unit RMS over the ball: a prior of shapes
            "fill": self.fill,
            "width": self.width,
            "lmax": self.lmax,
            "held_out": list(self.held_out),
            "train": list(self.train_names),
            "voxel_size": {k: round(v, 4) for k, v in self.voxel_sizes.items()},
        }
