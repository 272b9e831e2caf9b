"""The interface every backend implements (docs/architecture.md section 4): :class:`Runner`, and
:func:`infer_all`, the one way a whole set of images goes through a runner in batches.

Numpy only, so the torch-free device side and the verify package import it freely.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Runner(Protocol):
    """One way of running a model (torch, onnxruntime, TensorRT) behind a single interface.

    Constructing a runner only stores its artifact; ``__enter__`` opens the session, deserialises
    the engine or allocates buffers, and ``__exit__`` releases them. ``infer`` takes NCHW float32
    pixels and returns logits (N, classes) as a numpy array, so it returns only when the work is
    done (a GPU runner synchronises before returning), which is what makes timing it meaningful.
    """

    name: str  # e.g. "torch-fp32", "ort-cpu-fp32", "trt-fp16", "trt-int8"

    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc: Any) -> None: ...

    def infer(self, pixels: np.ndarray) -> np.ndarray: ...


def iter_batches(pixels: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive slices of at most ``batch_size`` samples, float32 and C-contiguous (no copy when
    ``pixels`` already is); the last one may be shorter."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, len(pixels), batch_size):
        yield np.ascontiguousarray(pixels[start : start + batch_size], dtype=np.float32)


def infer_all(
    runner: Runner, pixels: np.ndarray, batch_size: int, *, fixed_batch: bool = False
) -> np.ndarray:
    """Logits for every row of ``pixels``; with ``fixed_batch`` the last batch is zero-padded
    (for static-batch engines and ONNX files) and the padding rows are dropped from the result."""
    outputs = []
    for chunk in iter_batches(pixels, batch_size):
        rows = len(chunk)
        if fixed_batch and rows < batch_size:
            pad = np.zeros((batch_size - rows, *chunk.shape[1:]), dtype=np.float32)
            chunk = np.concatenate([chunk, pad])
        outputs.append(np.asarray(runner.infer(chunk), dtype=np.float32)[:rows])
    return np.concatenate(outputs)
