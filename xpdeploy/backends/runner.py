"""The interface every backend implements (docs/architecture.md section 4): :class:`Runner`.

Numpy only, so the torch-free device side and the verify package import it freely.
"""

from __future__ import annotations

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
