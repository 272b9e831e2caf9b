"""The CUDA memory layer: device buffers, copies, a stream and timing events, from either package.

Two Python CUDA bindings are in use and we take whichever is installed:

* **cuda-python** (``cuda.bindings.runtime``, formerly ``cuda.cudart``): NVIDIA's current
  recommendation and what TensorRT's own samples use. Every call returns a tuple whose first item
  is a ``cudaError_t``; we turn a failure into a one-line :class:`CudaError` naming the error.
* **pycuda** (``pycuda.driver``): named by the product owner and common on JetPack images. Its
  calls raise ``pycuda.driver.Error``; we turn those into :class:`CudaError` too.

:func:`load_backend` tries cuda-python first, then pycuda. Both backends track every allocation,
stream and event they hand out, so :meth:`close` (or leaving the ``with`` block) releases all of
them even when the caller forgot one; :attr:`live_allocations` lets a test check for leaks.

Host buffers are ordinary (pageable) numpy arrays: pinned host memory is **not** implemented.
Copies from pageable memory are staged by the driver, so an "async" copy behaves like a synchronous
one and costs a little more; that is included in the host wall time a runner reports, which is what
an application without pinned buffers would see too.

Nothing here imports torch or TensorRT.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

import numpy as np

from xpdeploy.errors import MissingDependencyError, XpdeployError

CUDA_INSTALL_HINT = (
    "install one CUDA Python binding: pip install cuda-python of your CUDA major (e.g. "
    "'cuda-python>=12,<13' for CUDA 12; xpdeploy's extras [tensorrt] and [tensorrt-cu13] pin it "
    "together with TensorRT) or pip install pycuda; on Jetson use the JetPack image of "
    "docker/jetson, or pycuda from the L4T image"
)

BACKEND_NAMES = ("cuda-python", "pycuda")

#: What to do about a CUDA error that is not our bug, by the binding's error name.
_NO_DRIVER = ("no usable NVIDIA driver or GPU here: check nvidia-smi (tegrastats on Jetson), "
              "CUDA_VISIBLE_DEVICES, and run Docker with --runtime nvidia (Jetson) or --gpus all")
CUDA_ERROR_FIXES = {
    "cudaErrorNoDevice": _NO_DRIVER,
    "cudaErrorInsufficientDriver": "the NVIDIA driver is older than this CUDA runtime: install "
    "the cuda-python whose major matches the CUDA version nvidia-smi shows, or update the driver",
    "cudaErrorMemoryAllocation": "out of GPU memory: lower the batch size or "
    "build_engine.workspace_mb, or stop what else holds the GPU (nvidia-smi)",
}


class CudaError(XpdeployError):
    """A CUDA call failed (out of memory, no device, a bad pointer); the message names the call."""


class DeviceMemory:
    """One device allocation: the :class:`~xpdeploy.engine.calibrator.DeviceBuffer` protocol.

    ``ptr`` is the device address (an int, as TensorRT wants it), ``nbytes`` its size in bytes.
    Free it with :meth:`free` or let the backend free it on close.
    """

    def __init__(self, backend: _BackendBase, ptr: int, nbytes: int) -> None:
        self._backend = backend
        self._ptr = int(ptr)
        self.nbytes = int(nbytes)
        self.freed = False

    @property
    def ptr(self) -> int:
        """The device address."""
        return self._ptr

    def copy_from_host(self, host: np.ndarray) -> None:
        """Copy ``host`` to this buffer and return when the copy is done (synchronous).

        Used by the int8 calibrator, which hands TensorRT the pointer right after the copy.
        """
        stream = self._backend.default_stream()
        self._backend.htod_async(self, host, stream)
        self._backend.stream_sync(stream)

    def free(self) -> None:
        """Release the allocation (idempotent)."""
        self._backend.free(self)

    def __repr__(self) -> str:
        state = "freed" if self.freed else f"0x{self._ptr:x}"
        return f"DeviceMemory({state}, {self.nbytes} bytes)"


@runtime_checkable
class CudaBackend(Protocol):
    """What the TensorRT runner and the calibrator need from a CUDA binding.

    Streams and events are opaque handles of the binding; :meth:`stream_handle` gives the integer
    TensorRT's ``execute_async_v2/v3`` take. Copies are enqueued on a stream and finish at the next
    :meth:`stream_sync`; ``host`` arrays must be C-contiguous and stay alive until then.
    """

    name: str

    def alloc(self, nbytes: int) -> DeviceMemory: ...

    def free(self, buf: DeviceMemory) -> None: ...

    def htod_async(self, dst: DeviceMemory, host: np.ndarray, stream: Any) -> None: ...

    def dtoh_async(self, host: np.ndarray, src: DeviceMemory, stream: Any) -> None: ...

    def stream_create(self) -> Any: ...

    def stream_handle(self, stream: Any) -> int: ...

    def stream_sync(self, stream: Any) -> None: ...

    def event_create(self) -> Any: ...

    def event_record(self, event: Any, stream: Any) -> None: ...

    def event_elapsed_ms(self, start: Any, end: Any) -> float: ...

    def device_identity(self) -> tuple[str, str]: ...

    def close(self) -> None: ...


def _check_copy(host: np.ndarray, buf: DeviceMemory, what: str) -> int:
    """Bytes to copy between ``host`` and ``buf``; refuses non-contiguous or oversized arrays."""
    if buf.freed:
        raise CudaError(f"{what}: the device buffer was already freed")
    if not host.flags.c_contiguous:
        raise CudaError(f"{what}: the host array must be C-contiguous (use np.ascontiguousarray)")
    if host.nbytes > buf.nbytes:
        raise CudaError(
            f"{what}: host array has {host.nbytes} bytes but the device buffer only {buf.nbytes}"
        )
    return int(host.nbytes)


class _BackendBase:
    """Bookkeeping shared by both bindings: live allocations, streams, events, close()."""

    name = "cuda"

    def __init__(self) -> None:
        self._live: dict[int, DeviceMemory] = {}
        self._streams: list[Any] = []
        self._events: list[Any] = []
        self._default_stream: Any = None
        self.closed = False

    # -- subclass hooks -------------------------------------------------------------------------
    def _raw_alloc(self, nbytes: int) -> int:
        raise NotImplementedError

    def _raw_free(self, ptr: int) -> None:
        raise NotImplementedError

    def _raw_stream_destroy(self, stream: Any) -> None:
        raise NotImplementedError

    def _raw_event_destroy(self, event: Any) -> None:
        raise NotImplementedError

    def _raw_stream_create(self) -> Any:
        raise NotImplementedError

    def _raw_event_create(self) -> Any:
        raise NotImplementedError

    def _release_context(self) -> None:
        """Undo whatever context set-up the binding needed (nothing by default)."""

    def device_identity(self) -> tuple[str, str]:
        """(GPU name, compute capability "major.minor") of the backend's device.

        Part of the engine cache key: a plan only runs on the GPU model it was built for.
        """
        raise NotImplementedError

    # -- public ---------------------------------------------------------------------------------
    @property
    def live_allocations(self) -> int:
        """Number of device buffers handed out and not yet freed."""
        return len(self._live)

    @property
    def live_bytes(self) -> int:
        """Bytes of device memory handed out and not yet freed."""
        return sum(b.nbytes for b in self._live.values())

    def _check_open(self, what: str) -> None:
        if self.closed:
            raise CudaError(f"{what}: the {self.name} backend was already closed")

    def alloc(self, nbytes: int) -> DeviceMemory:
        """A device buffer of ``nbytes`` bytes (at least 1: CUDA refuses zero-size allocations)."""
        self._check_open("alloc")
        if nbytes < 0:
            raise CudaError(f"alloc: size must be >= 0 bytes, got {nbytes}")
        size = max(int(nbytes), 1)
        buf = DeviceMemory(self, self._raw_alloc(size), size)
        self._live[buf.ptr] = buf
        return buf

    def free(self, buf: DeviceMemory) -> None:
        """Release ``buf`` (a second call does nothing)."""
        if buf.freed:
            return
        buf.freed = True
        self._live.pop(buf.ptr, None)
        self._raw_free(buf.ptr)

    def stream_create(self) -> Any:
        """A new CUDA stream, destroyed on :meth:`close`."""
        self._check_open("stream_create")
        stream = self._raw_stream_create()
        self._streams.append(stream)
        return stream

    def default_stream(self) -> Any:
        """The backend's own stream for synchronous helper copies (created on first use)."""
        if self._default_stream is None:
            self._default_stream = self.stream_create()
        return self._default_stream

    def event_create(self) -> Any:
        """A new CUDA event with timing enabled, destroyed on :meth:`close`."""
        self._check_open("event_create")
        event = self._raw_event_create()
        self._events.append(event)
        return event

    def close(self) -> None:
        """Free every live buffer, destroy events and streams, release the context (idempotent).

        Every resource is released even if one release fails; the first failure is raised after.
        """
        if self.closed:
            return
        self.closed = True
        first: CudaError | None = None
        steps: list[tuple[Any, Any]] = [(self.free, b) for b in list(self._live.values())]
        steps += [(self._raw_event_destroy, e) for e in self._events]
        steps += [(self._raw_stream_destroy, s) for s in self._streams]
        for fn, arg in steps:
            try:
                fn(arg)
            except CudaError as exc:
                first = first or exc
        self._events.clear()
        self._streams.clear()
        self._default_stream = None
        try:
            self._release_context()
        except CudaError as exc:
            first = first or exc
        if first is not None:
            raise first

    def __enter__(self) -> _BackendBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _import_cudart() -> ModuleType:
    """cuda-python's runtime module: ``cuda.bindings.runtime`` (12.6+/13), else ``cuda.cudart``."""
    try:
        return importlib.import_module("cuda.bindings.runtime")
    except ImportError:
        return importlib.import_module("cuda.cudart")


class CudaPythonBackend(_BackendBase):
    """The CUDA runtime through cuda-python (uses the device's primary context, like TensorRT)."""

    name = "cuda-python"

    def __init__(self, cudart: ModuleType | None = None, device: int = 0) -> None:
        super().__init__()
        self._rt = cudart if cudart is not None else _import_cudart()
        self._device = device
        self._call("cudaSetDevice", device)

    def _error_name(self, err: Any) -> str:
        try:
            res = self._rt.cudaGetErrorName(err)
            name = res[1] if isinstance(res, tuple) else res
            return name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # the name is a courtesy: never let it mask the real error
            return str(getattr(err, "name", err))

    def _call(self, fn: str, *args: Any) -> Any:
        """Call ``cudart.<fn>(*args)``; raise CudaError unless it returned cudaSuccess.

        Returns the single value after the error code, a tuple of them, or None.
        """
        try:
            res = getattr(self._rt, fn)(*args)
        except (RuntimeError, OSError) as exc:
            # cuda-python 11.8 (JetPack 5) loads libcuda on the first call and raises
            # RuntimeError("Failed to dlopen libcuda.so") instead of returning an error code.
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CudaError(f"CUDA call {fn} failed: {detail} (cuda-python); {_NO_DRIVER}"
                            ) from exc
        if not isinstance(res, tuple):
            res = (res,)
        err, values = res[0], res[1:]
        if err != self._rt.cudaError_t.cudaSuccess:
            name = self._error_name(err)
            fix = CUDA_ERROR_FIXES.get(name)
            raise CudaError(f"CUDA call {fn} failed: {name} (cuda-python)"
                            + (f"; {fix}" if fix else ""))
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    def _raw_alloc(self, nbytes: int) -> int:
        return int(self._call("cudaMalloc", nbytes))

    def device_identity(self) -> tuple[str, str]:
        """From ``cudaGetDeviceProperties`` (``name`` is a NUL-padded char array)."""
        prop = self._call("cudaGetDeviceProperties", self._device)
        raw = prop.name
        if isinstance(raw, bytes):
            raw = raw.split(b"\0", 1)[0].decode(errors="replace")
        name = str(raw)
        return name.strip(), f"{int(prop.major)}.{int(prop.minor)}"

    def _raw_free(self, ptr: int) -> None:
        self._call("cudaFree", ptr)

    def _raw_stream_create(self) -> Any:
        return self._call("cudaStreamCreate")

    def _raw_stream_destroy(self, stream: Any) -> None:
        self._call("cudaStreamDestroy", stream)

    def _raw_event_create(self) -> Any:
        return self._call("cudaEventCreate")

    def _raw_event_destroy(self, event: Any) -> None:
        self._call("cudaEventDestroy", event)

    def htod_async(self, dst: DeviceMemory, host: np.ndarray, stream: Any) -> None:
        """Enqueue a host-to-device copy of all of ``host`` into ``dst``."""
        n = _check_copy(host, dst, "htod_async")
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call("cudaMemcpyAsync", dst.ptr, host.ctypes.data, n, kind, stream)

    def dtoh_async(self, host: np.ndarray, src: DeviceMemory, stream: Any) -> None:
        """Enqueue a device-to-host copy of ``host.nbytes`` bytes of ``src`` into ``host``."""
        n = _check_copy(host, src, "dtoh_async")
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call("cudaMemcpyAsync", host.ctypes.data, src.ptr, n, kind, stream)

    def stream_handle(self, stream: Any) -> int:
        """The stream as the integer handle TensorRT's enqueue takes."""
        return int(stream)

    def stream_sync(self, stream: Any) -> None:
        """Block until all work enqueued on ``stream`` is done."""
        self._call("cudaStreamSynchronize", stream)

    def event_record(self, event: Any, stream: Any) -> None:
        """Enqueue ``event`` on ``stream``."""
        self._call("cudaEventRecord", event, stream)

    def event_elapsed_ms(self, start: Any, end: Any) -> float:
        """GPU milliseconds between two recorded events (waits for ``end`` to complete)."""
        self._call("cudaEventSynchronize", end)
        return float(self._call("cudaEventElapsedTime", start, end))


def _import_pycuda_driver() -> ModuleType:
    return importlib.import_module("pycuda.driver")


class PycudaBackend(_BackendBase):
    """The CUDA driver API through pycuda.

    Context: when a context is already current (``import pycuda.autoinit`` did it, or the
    application made one) we use it; otherwise we push the device's *primary* context, the one the
    CUDA runtime and TensorRT use, and pop it on :meth:`close`. A context made by
    ``make_context`` instead would be a second context on the device, and TensorRT's engine and our
    buffers would live in different ones.
    """

    name = "pycuda"

    def __init__(self, driver: ModuleType | None = None, device: int = 0) -> None:
        super().__init__()
        self._drv = driver if driver is not None else _import_pycuda_driver()
        self._device = device
        self._allocs: dict[int, Any] = {}  # ptr -> pycuda DeviceAllocation (kept alive until freed)
        self._pushed: Any = None
        self._guard("cuInit", self._drv.init)
        if self._guard("cuCtxGetCurrent", self._drv.Context.get_current) is None:
            dev = self._guard("cuDeviceGet", self._drv.Device, device)
            ctx = self._guard("cuDevicePrimaryCtxRetain", dev.retain_primary_context)
            self._guard("cuCtxPushCurrent", ctx.push)
            self._pushed = ctx

    def _guard(self, what: str, fn: Any, *args: Any) -> Any:
        """Call ``fn(*args)``, turning pycuda's exceptions into a one-line CudaError."""
        try:
            return fn(*args)
        except self._drv.Error as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if not detail.startswith(what):  # pycuda's messages usually name the call already
                detail = f"{what} failed: {detail}"
            raise CudaError(f"CUDA call {detail} (pycuda)") from exc

    def device_identity(self) -> tuple[str, str]:
        """From ``pycuda.driver.Device``: ``name()`` and ``compute_capability()``."""
        dev = self._guard("cuDeviceGet", self._drv.Device, self._device)
        major, minor = self._guard("cuDeviceGetAttribute", dev.compute_capability)
        return str(self._guard("cuDeviceGetName", dev.name)).strip(), f"{int(major)}.{int(minor)}"

    def _raw_alloc(self, nbytes: int) -> int:
        alloc = self._guard("cuMemAlloc", self._drv.mem_alloc, nbytes)
        ptr = int(alloc)
        self._allocs[ptr] = alloc
        return ptr

    def _raw_free(self, ptr: int) -> None:
        alloc = self._allocs.pop(ptr, None)
        if alloc is not None:
            self._guard("cuMemFree", alloc.free)

    def _raw_stream_create(self) -> Any:
        return self._guard("cuStreamCreate", self._drv.Stream)

    def _raw_stream_destroy(self, stream: Any) -> None:
        """pycuda destroys a stream when its object is collected; dropping our reference is all."""

    def _raw_event_create(self) -> Any:
        return self._guard("cuEventCreate", self._drv.Event)

    def _raw_event_destroy(self, event: Any) -> None:
        """Like streams, pycuda events are destroyed when collected."""

    def _release_context(self) -> None:
        if self._pushed is not None:
            ctx, self._pushed = self._pushed, None
            self._guard("cuCtxPopCurrent", ctx.pop)

    def htod_async(self, dst: DeviceMemory, host: np.ndarray, stream: Any) -> None:
        """Enqueue a host-to-device copy of all of ``host`` into ``dst``."""
        _check_copy(host, dst, "htod_async")
        self._guard("cuMemcpyHtoDAsync", self._drv.memcpy_htod_async, dst.ptr, host, stream)

    def dtoh_async(self, host: np.ndarray, src: DeviceMemory, stream: Any) -> None:
        """Enqueue a device-to-host copy of ``host.nbytes`` bytes of ``src`` into ``host``."""
        _check_copy(host, src, "dtoh_async")
        self._guard("cuMemcpyDtoHAsync", self._drv.memcpy_dtoh_async, host, src.ptr, stream)

    def stream_handle(self, stream: Any) -> int:
        """The stream as the integer handle TensorRT's enqueue takes."""
        return int(stream.handle)

    def stream_sync(self, stream: Any) -> None:
        """Block until all work enqueued on ``stream`` is done."""
        self._guard("cuStreamSynchronize", stream.synchronize)

    def event_record(self, event: Any, stream: Any) -> None:
        """Enqueue ``event`` on ``stream``."""
        self._guard("cuEventRecord", event.record, stream)

    def event_elapsed_ms(self, start: Any, end: Any) -> float:
        """GPU milliseconds between two recorded events (waits for ``end`` to complete)."""
        self._guard("cuEventSynchronize", end.synchronize)
        return float(self._guard("cuEventElapsedTime", start.time_till, end))


def load_backend(prefer: str | None = None, *, device: int = 0) -> _BackendBase:
    """The first CUDA binding that imports: cuda-python, then pycuda (or only ``prefer``).

    ``prefer`` is "cuda-python" or "pycuda" to insist on one. Raises MissingDependencyError naming
    both packages (and the JetPack image) when none imports; a CudaError when one imports but CUDA
    itself fails (no driver, no device), because installing the other package would not help then.
    """
    if prefer is not None and prefer not in BACKEND_NAMES:
        raise XpdeployError(
            f"unknown CUDA backend '{prefer}'; choose one of {', '.join(BACKEND_NAMES)}"
        )
    order = [prefer] if prefer else list(BACKEND_NAMES)
    reasons: list[str] = []
    for name in order:
        try:
            module = _import_cudart() if name == "cuda-python" else _import_pycuda_driver()
        except ImportError as exc:
            reasons.append(f"{name}: {exc}")
            continue
        if name == "cuda-python":
            return CudaPythonBackend(module, device=device)
        return PycudaBackend(module, device=device)
    missing = f"{prefer}, which is not installed" if prefer else "cuda-python or pycuda, neither "
    missing += "" if prefer else "is installed"
    raise MissingDependencyError(
        f"running a TensorRT engine needs {missing} "
        f"({'; '.join(reasons)}); {CUDA_INSTALL_HINT}"
    )
