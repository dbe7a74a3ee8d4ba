"""The forward model: copies of an object, each in a random pose, planted in noise
(``simulate_copies`` over a copy model: ``ImageCopies``, ``VolumeProjections``), phantoms."""

from mtd.forward.images import ImageCopies, random_image, simulate
from mtd.forward.measurement import Measurement, simulate_copies
from mtd.forward.volumes import VolumeProjections, shepp_logan, simulate_volume

__all__ = [
    "ImageCopies",
    "Measurement",
    "VolumeProjections",
    "random_image",
    "shepp_logan",
    "simulate",
    "simulate_copies",
    "simulate_volume",
]
