"""The fixed verification set: one seeded, class-balanced batch of images in a .npz.

Every runner (torch, onnxruntime, TensorRT, on the host or on the device) is fed these exact bytes,
so parity numbers compare models, not data pipelines. The file holds the uint8 images after resize
and crop with their normalisation (:mod:`xpdeploy.data.image_set`: a quarter of the float32 model
input's size before PNG compression), ``labels`` (int64), ``source``, ``synthetic`` and
``class_names``; it is written with a fixed zip timestamp, so the same content always gives the
same bytes (and the same digest, for resume). :func:`load_verify_set` returns the float32 model
input; a file written before images were stored (float32 ``pixels``) is read as it is.

numpy and Pillow only: this module runs on torch-free device machines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xpdeploy.data import image_set
from xpdeploy.data.npz import read_npz, write_npz
from xpdeploy.errors import DataError

_KEYS = ("labels", "source", "synthetic", "class_names")


@dataclass(frozen=True)
class VerifyBatch:
    """A loaded verification set. ``synthetic``: labels are random, no accuracy may be reported."""

    pixels: np.ndarray  # float32 (N, 3, H, W), C-contiguous
    labels: np.ndarray  # int64 (N,)
    source: str
    synthetic: bool
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def select_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of ``min(n, len(labels))`` samples, balanced over classes.

    Classes are visited round-robin in a seeded random order, each class's samples in a seeded
    random order, so every class is represented (when ``n`` >= the class count) and the choice
    depends only on ``labels``, ``n`` and ``seed``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    n = max(0, min(int(n), len(labels)))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    class_order = rng.permutation(len(classes))  # position of each class in a round
    rank = np.empty(len(labels), dtype=np.int64)  # the round each sample is taken in
    position = np.empty(len(labels), dtype=np.int64)
    for c, pos in zip(classes, class_order, strict=True):
        members = rng.permutation(np.flatnonzero(labels == c))
        rank[members] = np.arange(len(members))
        position[members] = pos
    order = np.lexsort((position, rank))  # by round, then by class position within the round
    return np.sort(order[:n]).astype(np.int64)


def save_verify_set(
    path: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    source: str,
    synthetic: bool,
    class_names: list[str],
) -> None:
    """Write the verification set to ``path`` (.npz) atomically.

    ``images``: uint8 (N, H, W, 3) after resize and crop (``eval_geometry``); ``mean`` and ``std``
    per RGB channel on the 0..1 scale, as the model's data config gives them.
    """
    images = image_set.check_images(images)
    labels = np.asarray(labels)
    labels_ok = labels.ndim == 1 and len(labels) == len(images)
    if not labels_ok or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be integers shaped ({len(images)},), got {labels.dtype} {labels.shape}"
        )
    arrays = {
        **image_set.encode(images, mean, std),
        "labels": labels.astype(np.int64),
        "source": np.array(source, dtype=str),
        "synthetic": np.array(bool(synthetic)),
        "class_names": np.array([str(c) for c in class_names], dtype=str),
    }
    write_npz(path, arrays)


def load_verify_set(path: str | Path, samples: int | None = None) -> VerifyBatch:
    """Read a verification set written by :func:`save_verify_set` (or, float32 ``pixels``, by an
    xpdeploy before it): the float32 model input, labels and provenance. ``samples``: only the
    first ``samples`` (a parity check on a few images decodes no more than those)."""
    fix = "rerun the 'load' stage with --force to write it again"
    z = read_npz(path, _KEYS, what="verification set", fix=fix,
                 optional=(image_set.LEGACY_KEY, *image_set.IMAGE_KEYS))
    pixels = image_set.model_input(z, what=f"verification set {path}", fix=fix, limit=samples)
    labels = z["labels"][:samples].astype(np.int64)
    source = str(z["source"])
    synthetic = bool(z["synthetic"])
    class_names = [str(c) for c in z["class_names"]]
    if pixels.ndim != 4 or labels.shape != (len(pixels),):
        raise DataError(
            f"verification set {path} has pixels {pixels.shape} and labels {labels.shape}, "
            f"expected (N, 3, H, W) and (N,); {fix}"
        )
    return VerifyBatch(pixels, labels, source, synthetic, class_names)
