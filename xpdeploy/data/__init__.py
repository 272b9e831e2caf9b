"""Data: sources (image folder, digits, synthetic), the one preprocessing function, the fixed
verification set and light augmentation.

Importing this package does not import torch: :func:`open_split` (which builds torch Datasets) is
loaded on first use, so device machines without torch can use the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from xpdeploy.data.augment import augment_batch
from xpdeploy.data.preprocess import preprocess_array, preprocess_image
from xpdeploy.data.verify_set import (
    VerifyBatch,
    iter_batches,
    load_verify_set,
    save_verify_set,
    select_indices,
)

if TYPE_CHECKING:
    from xpdeploy.data.sources import open_split

__all__ = [
    "VerifyBatch",
    "augment_batch",
    "iter_batches",
    "load_verify_set",
    "open_split",
    "preprocess_array",
    "preprocess_image",
    "save_verify_set",
    "select_indices",
]


def __getattr__(name: str) -> Any:
    if name == "open_split":
        from xpdeploy.data.sources import open_split

        return open_split
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
