"""Int8 calibration for the weak path: fixed-size batches and TensorRT's implicit calibrators.

TensorRT pulls calibration batches through ``get_batch(names)``, which must return one device
pointer per network input, each holding exactly one input of the calibration profile's opt shape
(the engine's opt shape: TensorRT reads that many bytes whatever ``get_batch_size()`` says), so
the batch size is the engine's opt batch (:mod:`xpdeploy.engine.engines`). Copying to the GPU
is the CUDA memory layer's job; this module only needs the tiny :class:`DeviceBuffer` protocol.

Last partial batch: **dropped**, not padded. Padding with zeros would add fake activations to the
ranges (MinMax) and histograms (Entropy2) and bias the scales; repeating real samples would
over-weight them in Entropy2's histograms. Dropping loses at most ``batch_size - 1`` samples, which
:attr:`CalibrationBatches.dropped` reports; fewer samples than one batch is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

import numpy as np

from xpdeploy.backends.trt_versions import import_tensorrt
from xpdeploy.engine.settings import CalibratorKind
from xpdeploy.errors import BuildError
from xpdeploy.fileio import write_bytes_atomic


@runtime_checkable
class DeviceBuffer(Protocol):
    """GPU memory holding one calibration batch (implemented by the CUDA memory layer)."""

    @property
    def ptr(self) -> int:
        """The device address TensorRT reads from."""
        ...

    def copy_from_host(self, host: np.ndarray) -> None:
        """Copy ``host`` (C-contiguous, the buffer's size) to the device; returns when done."""
        ...


#: Allocates a device buffer of the given size in bytes.
DeviceAlloc = Callable[[int], DeviceBuffer]


class CalibrationBatches:
    """Fixed-size float32 NCHW batches from a calibration array (last partial batch dropped)."""

    def __init__(self, samples: np.ndarray, batch_size: int) -> None:
        arr = np.asarray(samples)
        if arr.ndim != 4:
            raise BuildError(f"calibration samples must be (N, C, H, W), got shape {arr.shape}")
        if batch_size <= 0:
            raise BuildError(f"calibration batch size must be positive, got {batch_size}")
        if arr.shape[0] < batch_size:
            raise BuildError(
                f"calibration set has {arr.shape[0]} samples, fewer than one batch of "
                f"{batch_size} (the int8 engine's opt batch, which TensorRT calibrates at); "
                "add images to the calibration set or build the int8 engine at a smaller batch"
            )
        self.samples = np.ascontiguousarray(arr, dtype=np.float32)
        self.batch_size = int(batch_size)

    @property
    def count(self) -> int:
        """Number of full batches served."""
        return self.samples.shape[0] // self.batch_size

    @property
    def dropped(self) -> int:
        """Samples left out because they do not fill a last batch."""
        return self.samples.shape[0] - self.count * self.batch_size

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return (self.batch_size, *self.samples.shape[1:])

    @property
    def batch_nbytes(self) -> int:
        """Size of one batch in bytes (float32)."""
        return int(np.prod(self.batch_shape)) * 4

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(self.count):
            lo = i * self.batch_size
            yield self.samples[lo : lo + self.batch_size]  # contiguous slice of a C array


def make_calibrator(
    kind: CalibratorKind,
    batches: CalibrationBatches,
    cache_path: str | Path,
    device_alloc: DeviceAlloc,
    *,
    trt_module: ModuleType | None = None,
) -> Any:
    """An ``IInt8MinMaxCalibrator`` or ``IInt8EntropyCalibrator2`` feeding ``batches``.

    MinMax is the default for ViTs: their activations have rare large outliers (after the softmax
    and GELU), which Entropy2's histogram clipping cuts off. The class is created here because its
    base class lives in the imported ``tensorrt`` module. ``cache_path`` holds TensorRT's
    calibration cache: when it exists, TensorRT reads the scales from it and asks for no batch, so
    the caller must name it after everything the scales depend on (ONNX and calibration digests).
    One device buffer of one batch is allocated on the first ``get_batch``.
    """
    trt = trt_module if trt_module is not None else import_tensorrt("int8 calibration")
    base_name = {"minmax": "IInt8MinMaxCalibrator", "entropy2": "IInt8EntropyCalibrator2"}[kind]
    base = getattr(trt, base_name)
    cache_file = Path(cache_path)

    class _Calibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)  # pybind11 bases must be initialised explicitly
            self.kind = kind
            self.batches = batches
            self.cache_path = cache_file
            self.served = 0
            self._iter = iter(batches)
            self._buffer: DeviceBuffer | None = None

        def get_batch_size(self) -> int:
            return batches.batch_size

        def get_batch(self, names: list[str], *_: Any) -> list[int] | None:
            if len(names) != 1:
                raise BuildError(
                    f"int8 calibration feeds one input, but the network has {len(names)}: {names}"
                )
            try:
                batch = next(self._iter)
            except StopIteration:
                return None  # tells TensorRT the calibration data is exhausted
            if self._buffer is None:
                self._buffer = device_alloc(batches.batch_nbytes)
            self._buffer.copy_from_host(batch)
            self.served += 1
            return [int(self._buffer.ptr)]

        def read_calibration_cache(self) -> bytes | None:
            try:
                data = self.cache_path.read_bytes()
            except OSError:
                return None
            return data or None

        def write_calibration_cache(self, cache: Any) -> None:
            write_bytes_atomic(self.cache_path, bytes(cache))

    _Calibrator.__name__ = _Calibrator.__qualname__ = f"Xpdeploy{base_name[1:]}"
    return _Calibrator()

