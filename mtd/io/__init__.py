"""Reading and writing what practitioners use: micrographs, images and volumes (.npy, .mrc),
coordinates (.star), a run's files and summary."""

from mtd.io.files import (
    atomic_write,
    expand_paths,
    open_micrograph,
    read_images,
    read_micrograph,
    read_volume,
    write_micrograph,
    write_summary,
    write_volume,
)
from mtd.io.outputs import write_outputs
from mtd.io.source import Micrograph, MicrographSource
from mtd.io.star import check_star_path, read_star, write_star

__all__ = [
    "Micrograph",
    "MicrographSource",
    "atomic_write",
    "check_star_path",
    "expand_paths",
    "open_micrograph",
    "read_images",
    "read_micrograph",
    "read_star",
    "read_volume",
    "write_micrograph",
    "write_outputs",
    "write_star",
    "write_summary",
    "write_volume",
]
