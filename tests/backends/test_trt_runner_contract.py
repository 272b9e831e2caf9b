"""TrtRunner's calls into TensorRT's runtime and the CUDA memory layer, checked against fakes.

These tests check OUR calls: that every I/O tensor gets a device address through TensorRT's tensor
(v3) API, that a context without it is refused, that shapes are set for
dynamic engines and wrong batches refused for fixed ones, that both timings and the deserialise
time are recorded, and that no buffer outlives the runner. They do not test TensorRT or CUDA: the
fake engine below only copies a recognisable pattern (row sum of the input plus the class index)
into its output so the tests can see the bytes went through the buffers they bound. Whether a
real plan runs is the job of the ``gpu`` + ``trt`` test at the end (set XPDEPLOY_TEST_PLAN).
"""

from __future__ import annotations

import enum
import os
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.backends.test_cuda_memory import fake_cudart
from xpdeploy.backends import trt_runner as trt_runner_module
from xpdeploy.backends.cuda_memory import CudaPythonBackend, _BackendBase
from xpdeploy.backends.runner import Runner
from xpdeploy.backends.trt_runner import EngineError, TrtRunner, numpy_dtype
from xpdeploy.verify.latency import measure_latency

CLASSES = 10
PIXELS = (3, 8, 8)

# --------------------------------------------------------------------------------------------------
# A CUDA backend whose "device memory" is host memory, recording each call
# --------------------------------------------------------------------------------------------------


class MemoryBackend(_BackendBase):
    """The CudaBackend interface over host byte arrays (``store[ptr]``); ``calls`` logs each call.

    Events report ``elapsed`` milliseconds. Uses the real bookkeeping of the layer (live
    allocations, close), so leak checks mean the same as with a real binding.
    """

    name = "memory"

    def __init__(self, elapsed: float = 2.5) -> None:
        super().__init__()
        self.store: dict[int, np.ndarray] = {}
        self.calls: list[tuple[str, Any]] = []
        self.elapsed = elapsed
        self._next = 0x10000

    def _raw_alloc(self, nbytes: int) -> int:
        ptr, self._next = self._next, self._next + 0x10000 + nbytes
        self.store[ptr] = np.zeros(nbytes, np.uint8)
        self.calls.append(("alloc", (ptr, nbytes)))
        return ptr

    def _raw_free(self, ptr: int) -> None:
        del self.store[ptr]
        self.calls.append(("free", ptr))

    def _raw_stream_create(self) -> Any:
        return types.SimpleNamespace(handle=0xABC)

    def _raw_stream_destroy(self, stream: Any) -> None:
        self.calls.append(("stream_destroy", stream.handle))

    def _raw_event_create(self) -> Any:
        return object()

    def _raw_event_destroy(self, event: Any) -> None:
        self.calls.append(("event_destroy", None))

    def htod_async(self, dst: Any, host: np.ndarray, stream: Any) -> None:
        self.calls.append(("htod", (dst.ptr, host.nbytes, host.dtype)))
        self.store[dst.ptr][: host.nbytes] = host.reshape(-1).view(np.uint8)

    def dtoh_async(self, host: np.ndarray, src: Any, stream: Any) -> None:
        self.calls.append(("dtoh", (src.ptr, host.nbytes)))
        host.reshape(-1).view(np.uint8)[:] = self.store[src.ptr][: host.nbytes]

    def stream_handle(self, stream: Any) -> int:
        return int(stream.handle)

    def stream_sync(self, stream: Any) -> None:
        self.calls.append(("sync", None))

    def event_record(self, event: Any, stream: Any) -> None:
        self.calls.append(("record", None))

    def event_elapsed_ms(self, start: Any, end: Any) -> float:
        self.calls.append(("elapsed", None))
        return self.elapsed


def kinds(backend: MemoryBackend) -> list[str]:
    return [k for k, _ in backend.calls]


# --------------------------------------------------------------------------------------------------
# A recording stand-in for tensorrt's runtime objects
# --------------------------------------------------------------------------------------------------


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    BF16 = 7


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class Spec:
    """What the fake engine declares: one input and one output, fixed or dynamic batch."""

    def __init__(self, batch: int = 4, *, dynamic: tuple[int, int, int] | None = None,
                 in_dtype: DataType = DataType.FLOAT, out_dtype: DataType = DataType.FLOAT,
                 extra_output: bool = False) -> None:
        b = -1 if dynamic else batch
        self.tensors = [("pixels", True, in_dtype, (b, *PIXELS)),
                        ("logits", False, out_dtype, (b, CLASSES))]
        if extra_output:
            self.tensors.insert(1, ("tokens", False, DataType.FLOAT, (b, 5, 4)))
        self.profile = dynamic


class FakeContext:
    """Records calls; on execute, writes row-sum-plus-class-index into the logits buffer."""

    def __init__(self, spec: Spec, memory: MemoryBackend, log: list[tuple[str, Any]]) -> None:
        self.spec, self.memory, self.log = spec, memory, log
        self.batch: int | None = None if spec.profile else spec.tensors[0][3][0]
        self.addresses: dict[str, int] = {}

    def _shape(self, i: int) -> tuple[int, ...]:
        shape = self.spec.tensors[i][3]
        return (self.batch if self.batch is not None else -1, *shape[1:])

    def _run(self, addresses: dict[str, int]) -> None:
        _, _, in_dtype, _ = self.spec.tensors[0]
        x_dtype = numpy_dtype(in_dtype)
        n = self.batch or 0
        x = self.memory.store[addresses["pixels"]][: n * int(np.prod(PIXELS)) * x_dtype.itemsize]
        rows = x.view(x_dtype).reshape(n, -1).astype(np.float64).sum(axis=1)
        logits = rows[:, None] + np.arange(CLASSES)[None, :]
        out_dtype = numpy_dtype(self.spec.tensors[-1][2])
        raw = logits.astype(out_dtype).reshape(-1).view(np.uint8)
        self.memory.store[addresses["logits"]][: raw.size] = raw

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.log.append(("set_input_shape", (name, tuple(shape))))
        self.batch = shape[0]
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._shape([t[0] for t in self.spec.tensors].index(name))

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.log.append(("set_tensor_address", (name, ptr)))
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.log.append(("execute_async_v3", stream_handle))
        self.memory.calls.append(("execute", None))
        self._run(self.addresses)
        return True


class FakeEngine:
    def __init__(self, spec: Spec, memory: MemoryBackend, log: list[Any], api: str) -> None:
        self.spec, self.memory, self.log, self.api = spec, memory, log, api
        self.num_io_tensors = len(spec.tensors)

    def _by_name(self, name: str) -> tuple[Any, ...]:
        return next(t for t in self.spec.tensors if t[0] == name)

    def get_tensor_name(self, i: int) -> str:
        return self.spec.tensors[i][0]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if self._by_name(name)[1] else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return self._by_name(name)[2]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._by_name(name)[3]

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        assert self.spec.profile is not None
        return [(b, *PIXELS) for b in self.spec.profile]

    def create_execution_context(self) -> Any:
        self.log.append(("create_execution_context", None))
        if self.api != "v3":  # TensorRT < 8.5: no tensor API (execute_async_v3)
            return types.SimpleNamespace()
        return FakeContext(self.spec, self.memory, self.log)


def fake_trt(spec: Spec, memory: MemoryBackend, api: str = "v3") -> types.ModuleType:
    """A ``tensorrt`` module whose Runtime deserialises any plan except b"corrupt" into an engine
    declaring ``spec``; ``mod.log`` records the runtime calls in order."""
    mod = types.ModuleType("fake_tensorrt")
    log: list[tuple[str, Any]] = []

    class Logger:
        WARNING = "WARNING"

        def __init__(self, severity: str) -> None:
            self.severity = severity

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            log.append(("Runtime", logger.severity))

        def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
            log.append(("deserialize_cuda_engine", len(data)))
            return None if data == b"corrupt" else FakeEngine(spec, memory, log, api)

    mod.__version__ = "10.3.0"  # type: ignore[attr-defined]
    mod.Logger = Logger  # type: ignore[attr-defined]
    mod.Runtime = Runtime  # type: ignore[attr-defined]
    mod.TensorIOMode = TensorIOMode  # type: ignore[attr-defined]
    mod.DataType = DataType  # type: ignore[attr-defined]
    mod.log = log  # type: ignore[attr-defined]
    return mod


def ticking_clock(step_s: float = 0.004) -> Any:
    """A clock that advances ``step_s`` seconds per reading: every measured span is one step."""
    state = {"t": 0.0}

    def clock() -> float:
        state["t"] += step_s
        return state["t"]

    return clock


def pixels(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *PIXELS)).astype(np.float32)


def expected_logits(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).astype(np.float64).sum(axis=1)[:, None] + np.arange(CLASSES)


def open_runner(spec: Spec, api: str = "v3", **kw: Any) -> tuple[TrtRunner, MemoryBackend, Any]:
    backend = MemoryBackend()
    trt = fake_trt(spec, backend, api)
    runner = TrtRunner(b"plan-bytes", name="trt-fp16", backend=backend, trt_module=trt,
                       clock=ticking_clock(), **kw)
    return runner, backend, trt


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_v3_binds_every_io_tensor_and_returns_float32_logits() -> None:
    runner, backend, trt = open_runner(Spec(batch=4, extra_output=True))
    x = pixels(4)
    with runner as r:
        assert isinstance(r, Runner) and r.name == "trt-fp16"
        out = r.infer(x)
        ptrs = {name: buf.ptr for name, buf in r._device.items()}
    assert out.dtype == np.float32 and out.shape == (4, CLASSES)
    np.testing.assert_allclose(out, expected_logits(x), rtol=1e-5)
    bound = {args[0]: args[1] for name, args in trt.log if name == "set_tensor_address"}
    assert bound == ptrs and set(bound) == {"pixels", "tokens", "logits"}
    assert ("execute_async_v3", 0xABC) in trt.log
    assert not any(name == "set_input_shape" for name, _ in trt.log)  # fixed-batch engine
    seq = kinds(backend)
    i = seq.index("htod")
    assert seq[i:i + 6] == ["htod", "record", "execute", "record", "dtoh", "sync"]
    assert seq.index("elapsed") > seq.index("sync")


def test_both_timings_and_deserialize_and_first_inference_are_recorded() -> None:
    runner, _, _ = open_runner(Spec(batch=2))
    assert runner.deserialize_ms is None and runner.first_inference_ms is None
    with runner as r:
        assert r.deserialize_ms == pytest.approx(4.0)  # one clock step around deserialise only
        assert r.first_inference_ms is None
        for _ in range(3):
            r.infer(pixels(2))
        assert r.first_inference_ms == pytest.approx(4.0)
        assert r.gpu_times_ms() == [2.5, 2.5, 2.5]  # from the CUDA events
        assert r.host_times_ms() == pytest.approx([4.0, 4.0, 4.0])  # from the host clock
        assert r.last_timing is not None and r.last_timing.batch == 2
        r.reset_timings()
        assert r.timings == [] and r.first_inference_ms is not None
    assert runner.deserialize_ms == pytest.approx(4.0)  # still readable after the with block


def test_fixed_batch_engine_refuses_another_batch_in_one_line() -> None:
    runner, backend, _ = open_runner(Spec(batch=4))
    with runner as r:
        with pytest.raises(EngineError) as info:
            r.infer(pixels(2))
        assert r.timings == []
    msg = str(info.value)
    assert "\n" not in msg and "built for batch 4, got batch 2" in msg
    assert "execute" not in kinds(backend)


def test_wrong_image_size_is_refused() -> None:
    runner, _, _ = open_runner(Spec(batch=1))
    with runner as r, pytest.raises(EngineError, match="check the preprocessing size"):
        r.infer(np.zeros((1, 3, 16, 16), np.float32))


def test_dynamic_engine_sets_input_shape_and_rebinds_when_the_batch_changes() -> None:
    runner, backend, trt = open_runner(Spec(dynamic=(1, 4, 8)))
    with runner as r:
        assert r.batch_range == (1, 8)
        x2, x5, x3 = pixels(2, 1), pixels(5, 2), pixels(3, 3)
        np.testing.assert_allclose(r.infer(x2), expected_logits(x2), rtol=1e-5)
        np.testing.assert_allclose(r.infer(x5), expected_logits(x5), rtol=1e-5)
        np.testing.assert_allclose(r.infer(x3), expected_logits(x3), rtol=1e-5)
        r.infer(x3)  # same batch again: nothing to set up
        with pytest.raises(EngineError, match="built for batches 1 to 8, got batch 9"):
            r.infer(pixels(9))
        assert [t.batch for t in r.timings] == [2, 5, 3, 3]
    shapes = [args for name, args in trt.log if name == "set_input_shape"]
    assert shapes == [("pixels", (2, *PIXELS)), ("pixels", (5, *PIXELS)), ("pixels", (3, *PIXELS))]
    allocs = [args[1] for name, args in backend.calls if name == "alloc"]
    # grown once for batch 5 (input and logits), reused for batch 3
    assert allocs == [2 * 192 * 4, 2 * CLASSES * 4, 5 * 192 * 4, 5 * CLASSES * 4]
    assert backend.live_allocations == 0


def test_a_context_without_the_tensor_api_is_refused_and_nothing_leaks() -> None:
    runner, backend, _ = open_runner(Spec(batch=2), api="v2")
    with pytest.raises(EngineError, match=r"no execute_async_v3; xpdeploy needs TensorRT >= 8\.5"):
        runner.__enter__()
    assert backend.live_allocations == 0 and not backend.closed


def test_fp16_io_is_converted_on_the_host() -> None:
    runner, backend, _ = open_runner(Spec(batch=2, in_dtype=DataType.HALF,
                                          out_dtype=DataType.HALF))
    x = pixels(2)
    with runner as r:
        out = r.infer(x)
    htod = next(args for k, args in backend.calls if k == "htod")
    assert htod[1] == x.size * 2 and htod[2] == np.float16  # half the bytes of float32
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected_logits(x.astype(np.float16)), rtol=2e-3, atol=2e-2)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (Spec(in_dtype=DataType.INT8), "feeds float pixels"),
        (Spec(out_dtype=DataType.BF16), "BF16, which has no numpy equivalent"),
    ],
)
def test_unsupported_io_dtypes_are_refused_and_nothing_leaks(spec: Spec, match: str) -> None:
    runner, backend, _ = open_runner(spec)
    with pytest.raises(EngineError, match=match):
        runner.__enter__()
    assert backend.live_allocations == 0 and not backend.closed  # the caller's backend stays open


def test_int8_output_maps_to_numpy() -> None:
    assert numpy_dtype(DataType.INT8) == np.int8 and numpy_dtype(DataType.HALF) == np.float16


def test_corrupt_plan_is_a_one_line_error_and_owned_backend_is_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = MemoryBackend()
    monkeypatch.setattr(trt_runner_module, "load_backend", lambda: backend)
    runner = TrtRunner(b"corrupt", trt_module=fake_trt(Spec(), backend))
    with pytest.raises(EngineError) as info:
        runner.__enter__()
    assert "\n" not in str(info.value) and "rebuild it here" in str(info.value)
    assert backend.closed


def test_owned_backend_is_loaded_on_enter_and_closed_on_exit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    backend = MemoryBackend()
    monkeypatch.setattr(trt_runner_module, "load_backend", lambda: backend)
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"x" * 100)
    trt = fake_trt(Spec(batch=1), backend)
    with TrtRunner(plan, trt_module=trt) as r:
        r.infer(pixels(1))
        assert backend.live_allocations == 2
    assert ("deserialize_cuda_engine", 100) in trt.log
    assert backend.closed and backend.live_allocations == 0


def test_missing_plan_file_is_a_one_line_error(tmp_path: Path) -> None:
    backend = MemoryBackend()
    runner = TrtRunner(tmp_path / "nope.plan", backend=backend,
                       trt_module=fake_trt(Spec(), backend))
    with pytest.raises(EngineError, match=r"cannot read TensorRT plan .*nope\.plan"):
        runner.__enter__()


def test_infer_outside_with_block_is_refused() -> None:
    runner, _, _ = open_runner(Spec())
    with pytest.raises(EngineError, match="context manager"):
        runner.infer(pixels(4))


def test_runner_times_under_measure_latency() -> None:
    runner, _, _ = open_runner(Spec(batch=2))
    with runner as r:
        stats = measure_latency(r, pixels(5), batch=2, warmup=1, iters=3)
        assert stats.iters == 3 and len(r.timings) == 4  # warm-up calls are recorded too


def test_runner_over_cuda_python_backend_frees_everything() -> None:
    """The same runner over the cuda-python backend (fake cudart): the call sequence per infer."""
    rt = fake_cudart(elapsed_ms=1.5)
    memory = MemoryBackend()  # only gives the fake engine somewhere to write; never used for I/O
    backend = CudaPythonBackend(rt)
    trt = fake_trt(Spec(batch=2), memory)
    with TrtRunner(b"plan", backend=backend, trt_module=trt) as r:
        r._context.memory.store = _AnyPtrStore()  # fake engine writes into throwaway memory
        r.infer(pixels(2))
        assert r.gpu_times_ms() == [1.5]
    seq = [n for n, _ in rt.calls]
    i = seq.index("cudaMemcpyAsync")
    assert seq[i:i + 7] == ["cudaMemcpyAsync", "cudaEventRecord", "cudaEventRecord",
                            "cudaMemcpyAsync", "cudaStreamSynchronize", "cudaEventSynchronize",
                            "cudaEventElapsedTime"]
    assert backend.live_allocations == 0  # the runner freed its buffers on exit...
    assert seq.count("cudaMalloc") == 2 and seq.count("cudaFree") == 2
    assert not backend.closed  # ...but leaves the caller's backend open
    backend.close()


class _AnyPtrStore(dict):  # type: ignore[type-arg]
    """Device memory for the fake engine when the real (fake-cudart) backend holds the pointers."""

    def __missing__(self, ptr: int) -> np.ndarray:
        self[ptr] = np.zeros(1 << 16, np.uint8)
        return self[ptr]


# --------------------------------------------------------------------------------------------------
# On a device machine
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.trt
def test_real_plan_runs_and_reports_both_timings() -> None:
    """Runs the plan named by XPDEPLOY_TEST_PLAN (built elsewhere, e.g. by the engine stage) with
    whichever CUDA binding is installed; checks shapes, finiteness and that both timings exist."""
    plan = os.environ.get("XPDEPLOY_TEST_PLAN")
    if not plan:
        pytest.skip("set XPDEPLOY_TEST_PLAN to a TensorRT plan built on this machine")
    with TrtRunner(Path(plan), name="trt-test") as r:
        lo, _ = r.batch_range
        shape = tuple(d if d > 0 else 1 for d in r.inputs[0].shape[1:])
        x = np.random.default_rng(0).standard_normal((lo, *shape)).astype(np.float32)
        out = r.infer(x)
        r.infer(x)
        assert out.dtype == np.float32 and out.shape[0] == lo and np.isfinite(out).all()
        assert r.deserialize_ms is not None and r.deserialize_ms > 0
        assert r.first_inference_ms is not None and r.first_inference_ms > 0
        timing = r.last_timing
        assert timing is not None and 0 < timing.gpu_ms <= timing.host_ms
