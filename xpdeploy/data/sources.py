"""Data sources as torch Datasets: image folders, scikit-learn's digits, synthetic noise.

Every split yields ``(pixels, label)`` with ``pixels`` a float32 (3, H, W) array made by
:func:`xpdeploy.data.preprocess.preprocess_image` and ``label`` an int, and carries ``class_names``,
``num_classes``, ``source``, ``synthetic`` and ``labels`` (every label as int64, known without
decoding an image, so a class-balanced verification set can be chosen cheaply).

**Synthetic data is for smoke runs only**: its pixels are noise and its labels are random, so no
accuracy measured on it is an accuracy; ``synthetic=True`` makes every later stage say so.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from xpdeploy.data.listing import IMAGE_EXTENSIONS, class_dirs, images_under, is_image
from xpdeploy.data.preprocess import eval_geometry, preprocess_image, to_rgb
from xpdeploy.errors import DataError

if TYPE_CHECKING:
    from collections.abc import Callable

    from xpdeploy.artifacts import DataConfig
    from xpdeploy.spec import DataConfigSection

Split = Literal["train", "val"]
T = TypeVar("T")

#: Above this many bytes of float32 pixels a digits/synthetic split preprocesses per item instead of
#: caching (digits at 224 px would need 1 GiB).
CACHE_LIMIT_BYTES = 256 * 2**20


class SourceSplit(Dataset):
    """Common attributes of every split; subclasses implement ``__getitem__``."""

    def __init__(
        self, labels: np.ndarray, class_names: list[str], source: str, synthetic: bool
    ) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.source = source
        self.synthetic = synthetic

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        raise NotImplementedError

    def load_image(self, index: int) -> Image.Image:
        """Sample ``index`` as a decoded 8-bit RGB image, before any resize or normalisation.

        For training augmentation that works on the image (random resized crop, RandAugment);
        :func:`~xpdeploy.data.preprocess.preprocess_image` of it equals ``self[index][0]``.
        """
        raise NotImplementedError

    def eval_image(self, index: int) -> np.ndarray:
        """Sample ``index`` as uint8 (H, W, 3) after the evaluation resize and crop, before the
        normalisation: what a stored image set keeps (:mod:`xpdeploy.data.image_set`);
        :func:`~xpdeploy.data.preprocess.normalize` of it equals ``self[index][0]``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(source={self.source!r}, samples={len(self)}, "
            f"classes={self.num_classes}, synthetic={self.synthetic})"
        )


class ImageFolderSplit(SourceSplit):
    """``<split>/<class>/<image>`` files, decoded lazily (ImageNet never sits in memory)."""

    def __init__(
        self,
        files: list[Path],
        labels: np.ndarray,
        class_names: list[str],
        data_config: DataConfig,
        source: str,
    ) -> None:
        super().__init__(labels, class_names, source, synthetic=False)
        self.files = files
        self.data_config = data_config

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        pixels = self._decode(index, lambda img: preprocess_image(img, self.data_config))
        return pixels, int(self.labels[index])

    def load_image(self, index: int) -> Image.Image:
        return self._decode(index, to_rgb)

    def eval_image(self, index: int) -> np.ndarray:
        return self._decode(index, lambda img: np.asarray(eval_geometry(img, self.data_config)))

    def _decode(self, index: int, use: Callable[[Image.Image], T]) -> T:
        """Open and decode file ``index`` and return ``use(image)``.

        ``use`` runs inside the same error handling as the decoding, so any file Pillow cannot
        read, whether it fails on opening, decoding or converting, gives one DataError naming it.
        """
        path = self.files[index]
        try:
            with Image.open(path) as img:
                img.load()
                return use(img)
        except DataError:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            reason = str(e).replace("\n", " ") or type(e).__name__
            raise DataError(
                f"cannot read image {path}: {reason}; replace the file or delete it"
            ) from None


class ArraySplit(SourceSplit):
    """In-memory uint8 images (N, H, W) or (N, H, W, 3), preprocessed once when small enough."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        class_names: list[str],
        data_config: DataConfig,
        source: str,
        synthetic: bool,
        cache_limit_bytes: int = CACHE_LIMIT_BYTES,
    ) -> None:
        super().__init__(labels, class_names, source, synthetic)
        self.images = images
        self.data_config = data_config
        _, h, w = data_config.input_size
        self.cache: np.ndarray | None = None
        if len(images) * 3 * h * w * 4 <= cache_limit_bytes:
            self.cache = np.empty((len(images), 3, h, w), dtype=np.float32)
            for i in range(len(images)):
                self.cache[i] = self._preprocess(i)

    def _preprocess(self, index: int) -> np.ndarray:
        return preprocess_image(Image.fromarray(self.images[index]), self.data_config)

    def load_image(self, index: int) -> Image.Image:
        return to_rgb(Image.fromarray(self.images[index]))

    def eval_image(self, index: int) -> np.ndarray:
        return np.asarray(eval_geometry(Image.fromarray(self.images[index]), self.data_config))

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        # A copy, so a caller that edits a sample in place cannot corrupt the cache.
        pixels = self.cache[index].copy() if self.cache is not None else self._preprocess(index)
        return pixels, int(self.labels[index])


# --------------------------------------------------------------------------------------------------
# Image folders


def _root(section: DataConfigSection) -> Path:
    if section.root is None:  # the spec already refuses this; kept for sections built in code
        raise DataError("data.source 'imagefolder' needs data.root; set it to the image folder")
    return Path(section.root)


def _split_dir(section: DataConfigSection, split: Split) -> Path:
    root = _root(section)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(
            f"data.root {root} {what}; set data.root to the folder holding "
            f"{section.train_dir}/ and {section.val_dir}/"
        )
    name = section.train_dir if split == "train" else section.val_dir
    folder = root / name
    if not folder.is_dir():
        with os.scandir(root) as it:
            present = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
        seen = f"(folders there: {', '.join(present[:8]) or 'none'})"
        raise DataError(
            f"{split} folder {folder} does not exist {seen}; create it as {folder}/<class>/<image> "
            f"or set data.{split}_dir to the folder's name"
        )
    return folder


def _check_same_classes(section: DataConfigSection, split: Split, classes: list[str]) -> None:
    """Labels are indices into the sorted class names, so train and val must list the same ones."""
    other: Split = "val" if split == "train" else "train"
    other_dir = _root(section) / (section.val_dir if other == "val" else section.train_dir)
    if not other_dir.is_dir():
        return
    other_classes = class_dirs(other_dir)
    if other_classes == classes:
        return
    by_split = {split: set(classes), other: set(other_classes)}
    only_train = sorted(by_split["train"] - by_split["val"])
    only_val = sorted(by_split["val"] - by_split["train"])
    raise DataError(
        f"train and val folders under {section.root} have different classes "
        f"(only in train: {_names(only_train)}; only in val: {_names(only_val)}); "
        "give both the same class folders, labels follow the sorted folder names"
    )


def _names(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _open_imagefolder(
    section: DataConfigSection, data_config: DataConfig, split: Split, num_classes: int | None
) -> ImageFolderSplit:
    folder = _split_dir(section, split)
    classes = class_dirs(folder)
    if classes:  # checked before listing the images, which takes seconds for ImageNet
        _check_same_classes(section, split, classes)
        _check_model_classes(classes, num_classes)
    files: list[Path] = []
    labels: list[int] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        found = images_under(folder / name)
        if not found:
            empty.append(name)
        files.extend(found)
        labels.extend([label] * len(found))
    if not files:
        with os.scandir(folder) as it:
            loose = sum(1 for e in it if e.is_file() and is_image(e.name))
        seen = f" (found {loose} images directly in it)" if loose else ""
        raise DataError(
            f"image folder {folder} has no class folders with images "
            f"({', '.join(IMAGE_EXTENSIONS)}){seen}; expected {folder}/<class>/<image>"
        )
    if empty:
        raise DataError(
            f"class folders without images in {folder}: {_names(empty)}; add images "
            f"({', '.join(IMAGE_EXTENSIONS)}) or remove the folders"
        )
    return ImageFolderSplit(
        files, np.asarray(labels, dtype=np.int64), classes, data_config, f"imagefolder:{folder}"
    )


# --------------------------------------------------------------------------------------------------
# digits and synthetic


def _open_digits(
    section: DataConfigSection,
    data_config: DataConfig,
    split: Split,
    num_classes: int | None,
    seed: int,
) -> ArraySplit:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # 8x8 values 0..16 -> uint8 0..255
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    targets = digits.target.astype(np.int64)
    train_idx, val_idx = train_test_split(
        np.arange(len(targets)),
        test_size=section.val_fraction,
        stratify=targets,
        random_state=seed,
    )
    idx = np.sort(train_idx if split == "train" else val_idx)
    names = [str(int(c)) for c in np.unique(targets)]
    _check_model_classes(names, num_classes)
    return ArraySplit(
        images[idx], targets[idx], names, data_config, source="digits", synthetic=False
    )


def _open_synthetic(
    section: DataConfigSection,
    data_config: DataConfig,
    split: Split,
    num_classes: int | None,
    seed: int,
) -> ArraySplit:
    classes = section.num_classes or num_classes
    if classes is None:
        raise DataError(
            "data.source 'synthetic' needs a class count but neither data.num_classes nor the "
            "model gives one; set data.num_classes: 10"
        )
    if num_classes is not None and classes > num_classes:
        raise DataError(
            f"data.num_classes is {classes} but the model has {num_classes} outputs; "
            f"set data.num_classes: {num_classes} (or leave it unset)"
        )
    _, h, w = data_config.input_size
    rng = np.random.default_rng(seed + (0 if split == "train" else 1))
    n = section.synthetic_samples
    images = rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
    labels = rng.integers(0, classes, size=n, dtype=np.int64)
    names = [f"class_{i}" for i in range(classes)]
    return ArraySplit(images, labels, names, data_config, source="synthetic", synthetic=True)


def _check_model_classes(class_names: list[str], num_classes: int | None) -> None:
    """Image folders and digits: the model must have one output per class."""
    if num_classes is None or num_classes == len(class_names):
        return
    raise DataError(
        f"data has {len(class_names)} classes ({_names(class_names, 3)}) but the model has "
        f"{num_classes} outputs; set model.kwargs.num_classes: {len(class_names)}"
    )


def open_split(
    section: DataConfigSection,
    data_config: DataConfig,
    split: Split,
    *,
    num_classes: int | None,
    seed: int,
) -> SourceSplit:
    """Open one split of the pipeline's data as a Dataset of ``(float32 (3, H, W), int)``.

    ``num_classes`` is the model's output count (None: not known yet); image folders and digits
    must match it. ``seed`` fixes the digits train/val split and the synthetic pixels and labels.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if section.source == "imagefolder":
        return _open_imagefolder(section, data_config, split, num_classes)
    if section.source == "digits":
        return _open_digits(section, data_config, split, num_classes, seed)
    return _open_synthetic(section, data_config, split, num_classes, seed)
