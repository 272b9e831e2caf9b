"""onnxruntime on the CPU (and, where installed, its CUDA / TensorRT execution providers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from xpdeploy.errors import MissingDependencyError

#: onnxruntime's GPU execution providers, verified as extra runners where the installed
#: onnxruntime offers them (onnxruntime-gpu; the TensorRT one builds an engine at session start).
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def gpu_providers() -> list[str]:
    """The GPU execution providers this onnxruntime offers (empty on the CPU package)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    available = set(ort.get_available_providers())
    return [p for p in GPU_PROVIDERS if p in available]


def ort_session(
    path: Path, *, provider: str = "CPUExecutionProvider", threads: int | None = None,
    optimize: bool = True,
) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``path`` on one provider, one inter-op thread.

    ``threads``: intra-op threads (None: one per core). ``optimize=False`` turns graph fusion off,
    so Q/DQ pairs run as exact fake quantization (what TensorRT's int8 GEMMs compute), not through
    onnxruntime's own int8 CPU kernels, whose extra error says nothing about an engine.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependencyError(
            "onnxruntime is not installed; pip install onnxruntime") from None
    if provider not in ort.get_available_providers():
        raise MissingDependencyError(
            f"onnxruntime provider {provider} is not available here "
            f"(available: {', '.join(ort.get_available_providers())})"
        )
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: warnings would flood CI logs
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=[provider])


class OrtRunner:
    """Runs an ONNX file in an onnxruntime session with a fixed thread count."""

    def __init__(
        self,
        path: Path,
        *,
        threads: int | None = None,
        provider: str = "CPUExecutionProvider",
        input_name: str = "pixels",
        optimize: bool = True,
    ) -> None:
        short = provider.removesuffix("ExecutionProvider").lower()
        self.name = f"ort-{short}-fp32"
        self._path = path
        self._threads = threads
        self._provider = provider
        self._input_name = input_name
        self._optimize = optimize  # False: graph fusion off (see ort_session)
        self._session: Any = None

    def __enter__(self) -> OrtRunner:
        self._session = ort_session(self._path, provider=self._provider, threads=self._threads,
                                    optimize=self._optimize)
        return self

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        """Logits for a float32 NCHW batch."""
        assert self._session is not None, "use OrtRunner as a context manager"
        feed = {self._input_name: np.ascontiguousarray(pixels, dtype=np.float32)}
        return self._session.run(None, feed)[0]

    def __exit__(self, *exc: object) -> None:
        self._session = None
