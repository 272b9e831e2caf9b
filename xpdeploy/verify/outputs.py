"""Run a whole verification set through a runner in batches."""

from __future__ import annotations

import numpy as np

from xpdeploy.backends.runner import Runner
from xpdeploy.data.verify_set import iter_batches


def infer_all(
    runner: Runner, pixels: np.ndarray, batch_size: int, *, fixed_batch: bool = False
) -> np.ndarray:
    """Logits for every row of ``pixels``; with ``fixed_batch`` the last batch is zero-padded
    (for static-batch engines) and the padding rows are dropped from the result."""
    outputs = []
    for chunk in iter_batches(pixels, batch_size):
        rows = len(chunk)
        if fixed_batch and rows < batch_size:
            pad = np.zeros((batch_size - rows, *chunk.shape[1:]), dtype=np.float32)
            chunk = np.concatenate([chunk, pad])
        outputs.append(np.asarray(runner.infer(chunk), dtype=np.float32)[:rows])
    return np.concatenate(outputs)
