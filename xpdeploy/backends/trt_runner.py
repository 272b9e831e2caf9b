"""TensorRT behind the runner interface: deserialise a plan, bind device buffers, time each call.

TensorRT's tensor API (v3) is used: tensors by name; ``set_input_shape``, ``set_tensor_address``
for every I/O tensor, then ``execute_async_v3(stream)``. Every TensorRT xpdeploy accepts (8.5 and
later, :data:`~xpdeploy.backends.trt_versions.MIN_VERSION`) has it; the older bindings API is not
used.

Each ``infer`` records two times (milliseconds per batch):

* ``gpu_ms``: CUDA events recorded on the stream right before and right after the enqueue, read
  after the stream is synchronised. This is the engine's GPU compute alone, without copies or
  Python overhead: the number to compare with ``trtexec``'s "GPU Compute Time".
* ``host_ms``: host wall time of the whole call (dtype conversion, host-to-device copy, enqueue,
  device-to-host copy, synchronise): what an application sees per batch.

``deserialize_ms`` (reading nothing from disk: only ``deserialize_cuda_engine``) and
``first_inference_ms`` (host wall time of the first ``infer``, which includes the batch's shape
set-up, buffer allocation and TensorRT's lazy first-run work) are recorded once per ``__enter__``.

Nothing here imports torch; TensorRT and the CUDA binding are imported on ``__enter__``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from xpdeploy.backends.cuda_memory import CudaBackend, DeviceMemory, load_backend
from xpdeploy.backends.trt_versions import MIN_VERSION, import_tensorrt
from xpdeploy.errors import XpdeployError


class EngineError(XpdeployError):
    """A TensorRT plan cannot be loaded or run (wrong version, wrong GPU, wrong batch size)."""


#: TensorRT DataType member name -> numpy dtype of the host buffer. BF16/FP8/INT4 have no numpy
#: type and are refused for I/O (they are fine inside the engine).
_NUMPY_DTYPES: dict[str, np.dtype] = {
    "FLOAT": np.dtype(np.float32),
    "HALF": np.dtype(np.float16),
    "INT8": np.dtype(np.int8),
    "UINT8": np.dtype(np.uint8),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
}

#: Input dtypes we can fill from float32 pixels without a quantisation scale.
_FLOAT_INPUTS = {np.dtype(np.float32), np.dtype(np.float16)}


def numpy_dtype(trt_dtype: Any) -> np.dtype:
    """The numpy dtype of a ``tensorrt.DataType``, by member name (works for any version)."""
    name = getattr(trt_dtype, "name", None) or str(trt_dtype).rsplit(".", 1)[-1]
    try:
        return _NUMPY_DTYPES[str(name).upper()]
    except KeyError:
        raise EngineError(
            f"engine I/O tensor has TensorRT type {name}, which has no numpy equivalent; "
            f"build the engine with {', '.join(sorted(_NUMPY_DTYPES))} I/O"
        ) from None


@dataclass(frozen=True)
class IoTensor:
    """One engine input or output as the engine declares it (-1 marks a dynamic dimension)."""

    name: str
    index: int  # I/O tensor index
    is_input: bool
    dtype: np.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TrtTiming:
    """Times of one ``infer`` call in milliseconds: GPU compute (events) and host wall (copies)."""

    batch: int
    gpu_ms: float
    host_ms: float


class TrtRunner:
    """Runs a serialised TensorRT engine (a ``.plan`` path or its bytes) on one CUDA stream.

    ``backend`` is a :class:`~xpdeploy.backends.cuda_memory.CudaBackend`; by default one is loaded
    on ``__enter__`` (cuda-python, else pycuda) and closed on ``__exit__``. A backend passed in is
    left open (its owner closes it); the runner still frees every buffer it allocated.
    ``trt_module`` replaces ``import tensorrt`` (tests). ``clock`` returns seconds.
    """

    def __init__(
        self,
        plan: str | Path | bytes,
        *,
        name: str = "trt",
        backend: CudaBackend | None = None,
        trt_module: ModuleType | None = None,
        output_name: str = "logits",
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.name = name
        self._plan = plan
        self._backend_arg = backend
        self._trt_arg = trt_module
        self._output_name = output_name
        self._clock = clock
        self.deserialize_ms: float | None = None
        self.first_inference_ms: float | None = None
        self.timings: list[TrtTiming] = []
        self._reset_state()

    def _reset_state(self) -> None:
        self._trt: Any = None
        self._backend: Any = None
        self._owns_backend = False
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._events: tuple[Any, Any] | None = None
        self._inputs: list[IoTensor] = []
        self._outputs: list[IoTensor] = []
        self._batch_range: tuple[int, int] | None = None  # (min, max) accepted batch sizes
        self._batch: int | None = None  # batch the buffers and shapes are set up for
        self._device: dict[str, DeviceMemory] = {}
        self._host_out: dict[str, np.ndarray] = {}

    # -- open / close ---------------------------------------------------------------------------
    def _plan_bytes(self) -> bytes:
        if isinstance(self._plan, bytes | bytearray | memoryview):
            return bytes(self._plan)
        path = Path(self._plan)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise EngineError(
                f"cannot read TensorRT plan {path}: {exc.strerror or exc}; build it first"
            ) from exc

    def __enter__(self) -> TrtRunner:
        trt = self._trt_arg if self._trt_arg is not None else import_tensorrt("running an engine")
        data = self._plan_bytes()
        self._trt = trt
        try:
            if self._backend_arg is not None:
                self._backend = self._backend_arg
            else:
                self._backend = load_backend()
                self._owns_backend = True
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            start = self._clock()
            self._engine = self._runtime.deserialize_cuda_engine(data)
            self.deserialize_ms = (self._clock() - start) * 1000.0
            if self._engine is None:
                raise EngineError(
                    f"TensorRT {getattr(trt, '__version__', '?')} could not deserialise the plan "
                    f"'{self.name}' ({len(data)} bytes); a plan only loads with the TensorRT "
                    "version and GPU it was built for: rebuild it here"
                )
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise EngineError(
                    f"TensorRT could not create an execution context for '{self.name}' "
                    "(out of GPU memory?)"
                )
            if not hasattr(self._context, "execute_async_v3"):
                raise EngineError(
                    f"TensorRT {getattr(trt, '__version__', '?')} has no execute_async_v3; "
                    f"xpdeploy needs TensorRT >= {'.'.join(map(str, MIN_VERSION[:2]))}"
                )
            self._read_io()
            self._stream = self._backend.stream_create()
            self._events = (self._backend.event_create(), self._backend.event_create())
        except BaseException:
            self._close()
            raise
        self.first_inference_ms = None
        self.timings = []
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        """Free buffers, drop TensorRT objects (context before engine before runtime), close."""
        backend = self._backend
        try:
            if backend is not None:
                for buf in self._device.values():
                    backend.free(buf)
        finally:
            self._device.clear()
            self._context = None
            self._engine = None
            self._runtime = None
            if backend is not None and self._owns_backend:
                backend.close()
            self._reset_state()

    # -- engine I/O -----------------------------------------------------------------------------
    def _read_io(self) -> None:
        trt, eng = self._trt, self._engine
        tensors: list[IoTensor] = []
        for i in range(eng.num_io_tensors):
            name = eng.get_tensor_name(i)
            is_input = eng.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            tensors.append(IoTensor(name, i, is_input, numpy_dtype(eng.get_tensor_dtype(name)),
                                    tuple(int(d) for d in eng.get_tensor_shape(name))))
        self._inputs = [t for t in tensors if t.is_input]
        self._outputs = [t for t in tensors if not t.is_input]
        if len(self._inputs) != 1 or not self._outputs:
            raise EngineError(
                f"engine '{self.name}' has inputs {[t.name for t in self._inputs]} and outputs "
                f"{[t.name for t in self._outputs]}; the runner needs one pixel input and at least "
                "one output"
            )
        (inp,) = self._inputs
        if inp.dtype not in _FLOAT_INPUTS:
            raise EngineError(
                f"engine input '{inp.name}' is {inp.dtype}; the runner feeds float pixels, so "
                "build the engine with float32 or float16 input (int8 stays inside the engine)"
            )
        if len(inp.shape) < 1:
            raise EngineError(f"engine input '{inp.name}' has no batch dimension: {inp.shape}")
        if inp.shape[0] == -1:
            lo, _, hi = eng.get_tensor_profile_shape(inp.name, 0)
            self._batch_range = (int(lo[0]), int(hi[0]))
        else:
            self._batch_range = (inp.shape[0], inp.shape[0])

    @property
    def batch_range(self) -> tuple[int, int]:
        """Smallest and largest batch the engine accepts (equal for a fixed-batch engine)."""
        if self._batch_range is None:
            raise EngineError("TrtRunner.batch_range is known only inside the with block")
        return self._batch_range

    @property
    def inputs(self) -> list[IoTensor]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[IoTensor]:
        return list(self._outputs)

    def _logits_tensor(self) -> IoTensor:
        for t in self._outputs:
            if t.name == self._output_name:
                return t
        return self._outputs[0]

    def _check_input(self, x: np.ndarray) -> None:
        inp = self._inputs[0]
        lo, hi = self.batch_range
        if x.ndim != len(inp.shape):
            raise EngineError(
                f"engine '{self.name}' input '{inp.name}' has {len(inp.shape)} dims "
                f"{inp.shape}, got an array of shape {x.shape}"
            )
        batch = x.shape[0]
        if not lo <= batch <= hi:
            built = f"batch {lo}" if lo == hi else f"batches {lo} to {hi}"
            raise EngineError(
                f"engine '{self.name}' was built for {built}, got batch {batch}; rebuild the "
                "engine for this batch (or with a dynamic batch profile) or change the batch size"
            )
        for want, got in zip(inp.shape[1:], x.shape[1:], strict=True):
            if want != -1 and want != got:
                raise EngineError(
                    f"engine '{self.name}' input '{inp.name}' expects shape {inp.shape}, got "
                    f"{x.shape}; check the preprocessing size"
                )

    def _prepare(self, shape: tuple[int, ...]) -> None:
        """Set the input shape (dynamic engines), size buffers, bind every I/O tensor's address."""
        ctx, backend = self._context, self._backend
        inp = self._inputs[0]
        if -1 in inp.shape and not ctx.set_input_shape(inp.name, shape):
            raise EngineError(f"TensorRT refused input shape {shape} for '{inp.name}'")
        for t in (*self._inputs, *self._outputs):
            dims = shape if t.is_input else tuple(int(d) for d in ctx.get_tensor_shape(t.name))
            if any(d < 0 for d in dims):
                raise EngineError(f"TensorRT left output '{t.name}' with unknown shape {dims}")
            nbytes = int(np.prod(dims, dtype=np.int64)) * t.dtype.itemsize
            buf = self._device.get(t.name)
            if buf is None or buf.nbytes < nbytes:
                if buf is not None:
                    backend.free(buf)
                    del self._device[t.name]
                buf = backend.alloc(nbytes)
                self._device[t.name] = buf
            if not t.is_input:
                self._host_out[t.name] = np.empty(dims, dtype=t.dtype)
            if not ctx.set_tensor_address(t.name, buf.ptr):
                raise EngineError(f"TensorRT refused the device address of '{t.name}'")
        self._batch = shape[0]

    # -- inference ------------------------------------------------------------------------------
    def infer(self, pixels: np.ndarray) -> np.ndarray:
        """Logits (N, classes) as float32 for an NCHW float batch; returns after synchronising.

        Only the logits output (``output_name``, else the first output) is copied back; other
        outputs get device buffers, as TensorRT requires, but stay on the GPU.
        """
        if self._context is None:
            raise EngineError("use TrtRunner as a context manager (with TrtRunner(...) as r:)")
        start = self._clock()
        inp = self._inputs[0]
        x = np.ascontiguousarray(pixels, dtype=inp.dtype)
        self._check_input(x)
        if self._batch != x.shape[0]:
            self._prepare(tuple(int(d) for d in x.shape))
        backend, stream = self._backend, self._stream
        ev_start, ev_end = self._events  # type: ignore[misc]
        backend.htod_async(self._device[inp.name], x, stream)
        backend.event_record(ev_start, stream)
        ok = self._context.execute_async_v3(backend.stream_handle(stream))
        backend.event_record(ev_end, stream)
        logits_t = self._logits_tensor()
        host = self._host_out[logits_t.name]
        backend.dtoh_async(host, self._device[logits_t.name], stream)
        backend.stream_sync(stream)
        if ok is False:
            raise EngineError(f"TensorRT failed to run engine '{self.name}' (see its log above)")
        out = host.astype(np.float32, copy=True)  # the host buffer is reused by the next call
        host_ms = (self._clock() - start) * 1000.0
        gpu_ms = backend.event_elapsed_ms(ev_start, ev_end)
        if self.first_inference_ms is None:
            self.first_inference_ms = host_ms
        self.timings.append(TrtTiming(batch=int(x.shape[0]), gpu_ms=gpu_ms, host_ms=host_ms))
        return out

    # -- timing summaries -------------------------------------------------------------------------
    @property
    def last_timing(self) -> TrtTiming | None:
        """Times of the latest ``infer`` call (None before the first)."""
        return self.timings[-1] if self.timings else None

    def gpu_times_ms(self, batch: int | None = None) -> list[float]:
        """GPU compute times (ms) of the recorded calls, optionally of one batch size only."""
        return [t.gpu_ms for t in self.timings if batch is None or t.batch == batch]

    def host_times_ms(self, batch: int | None = None) -> list[float]:
        """Host wall times (ms, copies included) of the recorded calls, optionally of one batch."""
        return [t.host_ms for t in self.timings if batch is None or t.batch == batch]

    def reset_timings(self) -> None:
        """Forget per-call times (e.g. after warm-up); keeps deserialize/first-inference times."""
        self.timings = []

