"""The forward model: copies of an image or projections of a volume planted in noise."""

from mtd.forward.images import Measurement, random_image, simulate
from mtd.forward.volumes import VolumeMeasurement, shepp_logan, simulate_volume

__all__ = [
    "Measurement",
    "VolumeMeasurement",
    "random_image",
    "shepp_logan",
    "simulate",
    "simulate_volume",
]
