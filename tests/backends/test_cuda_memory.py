"""The CUDA memory layer's calls into cuda-python and pycuda, checked against recording fakes.

These tests check OUR calls (which function, in which order, with which sizes, and that every
allocation is freed); they do not test CUDA. The fakes below return plausible values and never touch
a GPU, so passing here says nothing about real copies or timings: that needs the ``gpu`` tests on a
device machine (tests/backends/test_trt_runner_contract.py).
"""

from __future__ import annotations

import enum
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from xpdeploy.backends import cuda_memory
from xpdeploy.backends.cuda_memory import (
    CudaBackend,
    CudaError,
    CudaPythonBackend,
    PycudaBackend,
    load_backend,
)
from xpdeploy.engine.calibrator import DeviceBuffer
from xpdeploy.errors import MissingDependencyError

# --------------------------------------------------------------------------------------------------
# A recording stand-in for cuda-python's runtime module (cudart)
# --------------------------------------------------------------------------------------------------


class CudaErrorT(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2
    cudaErrorNoDevice = 100


class CudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class FakeHandle:
    """A cudaStream_t / cudaEvent_t: an opaque object that converts to int like cuda-python's."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __int__(self) -> int:
        return self.value


def fake_cudart(elapsed_ms: float = 1.25) -> types.ModuleType:
    """A cudart module whose functions return cuda-python's (err, value...) tuples and log calls.

    ``mod.calls`` lists (name, args); ``mod.fail[name] = error`` makes the next call of ``name``
    return that error code.
    """
    mod = types.ModuleType("fake_cudart")
    mod.cudaError_t = CudaErrorT  # type: ignore[attr-defined]
    mod.cudaMemcpyKind = CudaMemcpyKind  # type: ignore[attr-defined]
    calls: list[tuple[str, tuple[Any, ...]]] = []
    fail: dict[str, CudaErrorT] = {}
    counter = iter(range(0x1000, 0x100000, 0x100))
    ok = CudaErrorT.cudaSuccess

    def rec(name: str, *values: Any) -> Any:
        def fn(*args: Any) -> tuple[Any, ...]:
            calls.append((name, args))
            if name in fail:
                return (fail.pop(name), *([None] * len(values)))
            return (ok, *[v() if callable(v) else v for v in values])

        return fn

    mod.cudaSetDevice = rec("cudaSetDevice")  # type: ignore[attr-defined]
    mod.cudaMalloc = rec("cudaMalloc", lambda: next(counter))  # type: ignore[attr-defined]
    mod.cudaFree = rec("cudaFree")  # type: ignore[attr-defined]
    mod.cudaMemcpyAsync = rec("cudaMemcpyAsync")  # type: ignore[attr-defined]
    mod.cudaStreamCreate = rec(  # type: ignore[attr-defined]
        "cudaStreamCreate", lambda: FakeHandle(next(counter)))
    mod.cudaStreamDestroy = rec("cudaStreamDestroy")  # type: ignore[attr-defined]
    mod.cudaStreamSynchronize = rec("cudaStreamSynchronize")  # type: ignore[attr-defined]
    mod.cudaEventCreate = rec(  # type: ignore[attr-defined]
        "cudaEventCreate", lambda: FakeHandle(next(counter)))
    mod.cudaEventDestroy = rec("cudaEventDestroy")  # type: ignore[attr-defined]
    mod.cudaEventRecord = rec("cudaEventRecord")  # type: ignore[attr-defined]
    mod.cudaEventSynchronize = rec("cudaEventSynchronize")  # type: ignore[attr-defined]
    mod.cudaEventElapsedTime = rec("cudaEventElapsedTime", elapsed_ms)  # type: ignore[attr-defined]
    props = types.SimpleNamespace(name=b"NVIDIA H100 80GB HBM3\0\0\0", major=9, minor=0)
    mod.cudaGetDeviceProperties = rec("cudaGetDeviceProperties", props)  # type: ignore[attr-defined]
    mod.cudaGetErrorName = lambda err: (ok, CudaErrorT(err).name.encode())  # type: ignore[attr-defined]
    mod.calls = calls  # type: ignore[attr-defined]
    mod.fail = fail  # type: ignore[attr-defined]
    return mod


def names(mod: Any) -> list[str]:
    return [name for name, _ in mod.calls]


# --------------------------------------------------------------------------------------------------
# A recording stand-in for pycuda.driver
# --------------------------------------------------------------------------------------------------


def fake_pycuda_driver(current_context: bool = False, elapsed_ms: float = 0.75) -> types.ModuleType:
    """A ``pycuda.driver`` that logs calls in ``mod.calls``; ``mod.fail_alloc`` makes mem_alloc
    raise like pycuda does when the device is out of memory."""
    mod = types.ModuleType("fake_pycuda_driver")
    calls: list[tuple[str, tuple[Any, ...]]] = []
    counter = iter(range(0x2000, 0x200000, 0x100))

    class Error(Exception):
        pass

    class MemoryError_(Error):
        pass

    class Ctx:
        def push(self) -> None:
            calls.append(("ctx.push", ()))

        def pop(self) -> None:
            calls.append(("ctx.pop", ()))

    class Context:
        @staticmethod
        def get_current() -> Ctx | None:
            calls.append(("Context.get_current", ()))
            return Ctx() if current_context else None

    class Device:
        def __init__(self, ordinal: int) -> None:
            calls.append(("Device", (ordinal,)))

        def retain_primary_context(self) -> Ctx:
            calls.append(("retain_primary_context", ()))
            return Ctx()

        def name(self) -> str:
            return "Orin (nvgpu)"

        def compute_capability(self) -> tuple[int, int]:
            return (8, 7)

    class Alloc:
        def __init__(self, nbytes: int) -> None:
            self.ptr = next(counter)
            self.nbytes = nbytes

        def __int__(self) -> int:
            return self.ptr

        def free(self) -> None:
            calls.append(("free", (self.ptr,)))

    class Stream:
        def __init__(self) -> None:
            self.handle = next(counter)
            calls.append(("Stream", ()))

        def synchronize(self) -> None:
            calls.append(("Stream.synchronize", (self.handle,)))

    class Event:
        def __init__(self) -> None:
            calls.append(("Event", ()))

        def record(self, stream: Stream) -> None:
            calls.append(("Event.record", (stream.handle,)))

        def synchronize(self) -> None:
            calls.append(("Event.synchronize", ()))

        def time_till(self, other: Event) -> float:
            calls.append(("Event.time_till", ()))
            return elapsed_ms

    def mem_alloc(nbytes: int) -> Alloc:
        calls.append(("mem_alloc", (nbytes,)))
        if mod.fail_alloc:  # type: ignore[attr-defined]
            raise MemoryError_("cuMemAlloc failed: out of memory")
        return Alloc(nbytes)

    def memcpy_htod_async(dst: int, src: np.ndarray, stream: Stream) -> None:
        calls.append(("memcpy_htod_async", (dst, src.nbytes, stream.handle)))

    def memcpy_dtoh_async(dst: np.ndarray, src: int, stream: Stream) -> None:
        calls.append(("memcpy_dtoh_async", (src, dst.nbytes, stream.handle)))

    mod.Error = Error  # type: ignore[attr-defined]
    mod.init = lambda: calls.append(("init", ()))  # type: ignore[attr-defined]
    mod.Context = Context  # type: ignore[attr-defined]
    mod.Device = Device  # type: ignore[attr-defined]
    mod.Stream = Stream  # type: ignore[attr-defined]
    mod.Event = Event  # type: ignore[attr-defined]
    mod.mem_alloc = mem_alloc  # type: ignore[attr-defined]
    mod.memcpy_htod_async = memcpy_htod_async  # type: ignore[attr-defined]
    mod.memcpy_dtoh_async = memcpy_dtoh_async  # type: ignore[attr-defined]
    mod.fail_alloc = False  # type: ignore[attr-defined]
    mod.calls = calls  # type: ignore[attr-defined]
    return mod


# --------------------------------------------------------------------------------------------------
# Choosing a backend
# --------------------------------------------------------------------------------------------------


def _install(monkeypatch: pytest.MonkeyPatch, cudart: Any = None, driver: Any = None) -> None:
    """Make ``import cuda.bindings.runtime`` / ``cuda.cudart`` / ``pycuda.driver`` give the fakes
    (None: the import fails), whatever is installed on this machine."""
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    monkeypatch.setitem(sys.modules, "cuda.cudart", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)


def test_cuda_python_is_preferred_over_pycuda(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, cudart=fake_cudart(), driver=fake_pycuda_driver())
    with load_backend() as backend:
        assert isinstance(backend, CudaPythonBackend) and backend.name == "cuda-python"
        assert isinstance(backend, CudaBackend)


def test_older_cuda_python_module_path_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuda-python before 12.6 only has ``cuda.cudart``."""
    rt = fake_cudart()
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)
    monkeypatch.setitem(sys.modules, "cuda.cudart", rt)
    with load_backend() as backend:
        assert isinstance(backend, CudaPythonBackend)
    assert names(rt)[0] == "cudaSetDevice"


def test_pycuda_is_used_when_cuda_python_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, cudart=None, driver=fake_pycuda_driver())
    with load_backend() as backend:
        assert isinstance(backend, PycudaBackend) and backend.name == "pycuda"


def test_prefer_picks_pycuda_even_when_cuda_python_is_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _install(monkeypatch, cudart=fake_cudart(), driver=fake_pycuda_driver())
    with load_backend(prefer="pycuda") as backend:
        assert isinstance(backend, PycudaBackend)


def test_neither_binding_gives_one_line_error_naming_both(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch)
    with pytest.raises(MissingDependencyError) as info:
        load_backend()
    msg = str(info.value)
    assert "\n" not in msg
    assert "cuda-python" in msg and "pycuda" in msg
    assert "pip install cuda-python" in msg and "pip install pycuda" in msg
    assert "Jetson" in msg and "JetPack" in msg


def test_unknown_preference_is_refused() -> None:
    with pytest.raises(cuda_memory.XpdeployError, match="unknown CUDA backend 'cupy'"):
        load_backend(prefer="cupy")


# --------------------------------------------------------------------------------------------------
# cuda-python backend
# --------------------------------------------------------------------------------------------------


def test_cuda_python_alloc_free_pairing_and_no_leak_after_close() -> None:
    rt = fake_cudart()
    with CudaPythonBackend(rt) as backend:
        a = backend.alloc(1024)
        b = backend.alloc(0)  # CUDA refuses 0 bytes: we ask for 1
        assert backend.live_allocations == 2 and backend.live_bytes == 1025
        a.free()
        a.free()  # idempotent
        assert backend.live_allocations == 1
        backend.stream_create()
        backend.event_create()
    assert backend.live_allocations == 0 and b.freed
    mallocs = [args for n, args in rt.calls if n == "cudaMalloc"]
    frees = [args for n, args in rt.calls if n == "cudaFree"]
    assert mallocs == [(1024,), (1,)]
    assert sorted(p for (p,) in frees) == sorted([a.ptr, b.ptr])  # each freed exactly once
    assert names(rt).count("cudaStreamDestroy") == 1
    assert names(rt).count("cudaEventDestroy") == 1
    backend.close()  # a second close does nothing
    assert names(rt).count("cudaFree") == 2


def test_cuda_python_copies_pass_sizes_kinds_and_stream() -> None:
    rt = fake_cudart()
    with CudaPythonBackend(rt) as backend:
        buf = backend.alloc(4 * 6)
        stream = backend.stream_create()
        host = np.arange(6, dtype=np.float32)
        backend.htod_async(buf, host, stream)
        out = np.empty(4, dtype=np.float32)  # a partial read back is allowed
        backend.dtoh_async(out, buf, stream)
        backend.stream_sync(stream)
        assert backend.stream_handle(stream) == int(stream)
    copies = [args for n, args in rt.calls if n == "cudaMemcpyAsync"]
    assert copies[0] == (buf.ptr, host.ctypes.data, 24, CudaMemcpyKind.cudaMemcpyHostToDevice,
                         stream)
    assert copies[1] == (out.ctypes.data, buf.ptr, 16, CudaMemcpyKind.cudaMemcpyDeviceToHost,
                         stream)
    assert ("cudaStreamSynchronize", (stream,)) in rt.calls


def test_copy_refuses_oversized_or_strided_host_arrays() -> None:
    with CudaPythonBackend(fake_cudart()) as backend:
        buf = backend.alloc(8)
        stream = backend.stream_create()
        with pytest.raises(CudaError, match="16 bytes but the device buffer only 8"):
            backend.htod_async(buf, np.zeros(4, np.float32), stream)
        with pytest.raises(CudaError, match="C-contiguous"):
            backend.htod_async(buf, np.zeros(4, np.float32)[::2], stream)


def test_cuda_python_event_timing_is_read_after_the_end_event_completes() -> None:
    rt = fake_cudart(elapsed_ms=3.5)
    with CudaPythonBackend(rt) as backend:
        stream = backend.stream_create()
        start, end = backend.event_create(), backend.event_create()
        backend.event_record(start, stream)
        backend.event_record(end, stream)
        assert backend.event_elapsed_ms(start, end) == 3.5
    seq = names(rt)
    assert seq.index("cudaEventSynchronize") < seq.index("cudaEventElapsedTime")
    assert ("cudaEventElapsedTime", (start, end)) in rt.calls


def test_cuda_python_error_becomes_one_line_with_the_error_name() -> None:
    rt = fake_cudart()
    with CudaPythonBackend(rt) as backend:
        rt.fail["cudaMalloc"] = CudaErrorT.cudaErrorMemoryAllocation
        with pytest.raises(CudaError) as info:
            backend.alloc(1 << 40)
        assert backend.live_allocations == 0
    msg = str(info.value)
    assert msg.startswith("CUDA call cudaMalloc failed: cudaErrorMemoryAllocation (cuda-python); "
                          "out of GPU memory: lower the batch size") and "\n" not in msg


def test_cuda_python_11_8_missing_driver_is_a_cuda_error_with_the_fix(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """cuda-python 11.8 (JetPack 5) raises RuntimeError from the first call when libcuda cannot
    be loaded, instead of returning an error code."""
    rt = fake_cudart()

    def no_driver(*_: Any) -> Any:
        raise RuntimeError("Failed to dlopen libcuda.so\n(more)")

    rt.cudaSetDevice = no_driver  # type: ignore[attr-defined]
    _install(monkeypatch, cudart=rt, driver=fake_pycuda_driver())
    with pytest.raises(CudaError) as info:
        load_backend()  # a CudaError, not "try pycuda": the driver is what is missing
    msg = str(info.value)
    assert msg.startswith("CUDA call cudaSetDevice failed: Failed to dlopen libcuda.so "
                          "(cuda-python); no usable NVIDIA driver") and "\n" not in msg
    assert "--runtime nvidia" in msg and "nvidia-smi" in msg


def test_cuda_python_no_device_error_names_the_fix() -> None:
    rt = fake_cudart()
    rt.fail["cudaSetDevice"] = CudaErrorT.cudaErrorNoDevice
    with pytest.raises(CudaError, match=r"cudaSetDevice failed: cudaErrorNoDevice \(cuda-python\); "
                                        r"no usable NVIDIA driver"):
        CudaPythonBackend(rt)


def test_device_memory_satisfies_the_calibrator_protocol() -> None:
    """The int8 calibrator takes ``backend.alloc`` as its DeviceAlloc; copy_from_host must sync."""
    rt = fake_cudart()
    with CudaPythonBackend(rt) as backend:
        buf = backend.alloc(12)
        assert isinstance(buf, DeviceBuffer)
        buf.copy_from_host(np.zeros(3, np.float32))
    seq = names(rt)
    assert seq.index("cudaMemcpyAsync") < seq.index("cudaStreamSynchronize")


def test_use_after_close_is_an_error() -> None:
    backend = CudaPythonBackend(fake_cudart())
    backend.close()
    with pytest.raises(CudaError, match="already closed"):
        backend.alloc(4)


# --------------------------------------------------------------------------------------------------
# pycuda backend
# --------------------------------------------------------------------------------------------------


def test_pycuda_pushes_and_pops_the_primary_context_when_none_is_current() -> None:
    drv = fake_pycuda_driver(current_context=False)
    with PycudaBackend(drv, device=1):
        pass
    seq = names(drv)
    assert seq[:5] == ["init", "Context.get_current", "Device", "retain_primary_context",
                       "ctx.push"]
    assert ("Device", (1,)) in drv.calls
    assert seq[-1] == "ctx.pop"


def test_pycuda_uses_the_current_context_without_pushing_one() -> None:
    drv = fake_pycuda_driver(current_context=True)  # e.g. after ``import pycuda.autoinit``
    with PycudaBackend(drv):
        pass
    assert "ctx.push" not in names(drv) and "ctx.pop" not in names(drv)


def test_pycuda_alloc_free_copies_and_timing() -> None:
    drv = fake_pycuda_driver(elapsed_ms=0.5)
    with PycudaBackend(drv) as backend:
        buf = backend.alloc(40)
        kept = backend.alloc(8)
        stream = backend.stream_create()
        start, end = backend.event_create(), backend.event_create()
        backend.htod_async(buf, np.zeros(10, np.float32), stream)
        backend.event_record(start, stream)
        backend.event_record(end, stream)
        backend.dtoh_async(np.empty(5, np.float32), buf, stream)
        backend.stream_sync(stream)
        assert backend.event_elapsed_ms(start, end) == 0.5
        assert backend.stream_handle(stream) == stream.handle
        buf.free()
    assert ("mem_alloc", (40,)) in drv.calls
    assert ("memcpy_htod_async", (buf.ptr, 40, stream.handle)) in drv.calls
    assert ("memcpy_dtoh_async", (buf.ptr, 20, stream.handle)) in drv.calls
    frees = [args[0] for n, args in drv.calls if n == "free"]
    assert sorted(frees) == sorted([buf.ptr, kept.ptr])  # the forgotten one is freed on close
    seq = names(drv)
    assert seq.index("Event.synchronize") < seq.index("Event.time_till")


def test_pycuda_error_becomes_one_line_cuda_error() -> None:
    drv = fake_pycuda_driver()
    with PycudaBackend(drv) as backend:
        drv.fail_alloc = True
        with pytest.raises(CudaError) as info:
            backend.alloc(64)
    assert str(info.value) == "CUDA call cuMemAlloc failed: out of memory (pycuda)"
    assert "\n" not in str(info.value)


def test_device_identity_from_either_binding() -> None:
    """Name and compute capability (engine cache key) as each binding reports them."""
    cudart = fake_cudart()
    backend = CudaPythonBackend(cudart, device=0)
    assert backend.device_identity() == ("NVIDIA H100 80GB HBM3", "9.0")
    assert ("cudaGetDeviceProperties", (0,)) in cudart.calls
    backend.close()
    pyc = PycudaBackend(fake_pycuda_driver(), device=0)
    assert pyc.device_identity() == ("Orin (nvgpu)", "8.7")
    pyc.close()


def test_tensorrt_extras_pin_cuda_python_to_their_cuda_major() -> None:
    """Each TensorRT extra installs TensorRT and cuda-python of one CUDA major (the hint above
    tells users to match it), never a cuda-python without an upper bound."""
    import tomllib
    from packaging.requirements import Requirement
    from packaging.version import Version

    root = Path(__file__).resolve().parents[2]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    seen = 0
    for name in ("tensorrt", "tensorrt-cu13"):
        reqs = {r.name: r for r in map(Requirement, extras[name])}
        (trt_name,) = [n for n in reqs if n.startswith("tensorrt-cu")]
        major = int(trt_name.removeprefix("tensorrt-cu"))
        allowed = reqs["cuda-python"].specifier
        assert Version(f"{major}.0") in allowed and Version(f"{major}.99") in allowed
        assert Version(f"{major + 1}.0") not in allowed
        assert Version(f"{major - 1}.99") not in allowed
        seen += 1
    assert seen == 2
