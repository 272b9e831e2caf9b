"""Finding images on disk: which files count as images, class folders, recursive listing.

Kept apart from :mod:`xpdeploy.data.sources` (which builds torch Datasets) so the torch-free device
side (calibration sets) lists folders with exactly the same rules.
"""

from __future__ import annotations

import os
from pathlib import Path

#: File name endings read as images (compared case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".webp",
    ".gif",
    ".tif",
    ".tiff",
)


def is_image(name: str) -> bool:
    """A non-hidden file name with an image extension."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def class_dirs(split_dir: Path) -> list[str]:
    """Sorted names of the (non-hidden) sub-folders: the label order."""
    with os.scandir(split_dir) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def images_under(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, links followed), sorted by relative path."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames if is_image(f))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())
