"""A stand-in ``tensorrt`` whose "engines" run the parsed ONNX file in onnxruntime (tests only).

It exists to drive OUR whole device path end to end without TensorRT: engine planning, the host
steps, the int8 calibrator (it pulls every batch, as TensorRT does, through the CUDA memory
layer), the engine cache, the build log and layer files, :class:`TrtRunner`'s v3 calls, the
verify candidates and the ``precision: best`` choice. It does not imitate TensorRT: the "plan" is
a JSON note naming the ONNX file and the profile, and "execution" runs that file in onnxruntime
on the bytes our runner copied into the stand-in device memory (fp16/int8 engines round the
logits through float16 so they differ a little from the fp32 reference, like a real engine would).
Whether a real TensorRT builds and runs these engines is the job of the ``gpu`` + ``trt`` tests.
"""

from __future__ import annotations

import importlib.machinery
import json
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tests.backends.test_trt_runner_contract import MemoryBackend
from tests.engine.fake_trt import FakeTensor, ModuleRef, Scenario, make_fake_trt


class DeviceMemoryBackend(MemoryBackend):
    """:class:`MemoryBackend` reporting a device identity, as the engine cache key needs."""

    def __init__(self, name: str = "Fake GPU", cc: str = "8.7") -> None:
        super().__init__()
        self.identity = (name, cc)

    def device_identity(self) -> tuple[str, str]:
        return self.identity


def _onnx_io(path: str) -> tuple[tuple[str, tuple[int, ...]], tuple[str, tuple[int, ...]]]:
    """(name, shape with -1 for symbolic dims) of an ONNX file's input and of its first output:
    ("pixels", (-1, 3, 16, 16)) and ("logits", (-1, 10)) for a model, ("tokens", (-1, 17, 32))
    and ("tokens_out", (-1, 17, 32)) for a block of a latency grid."""
    model = onnx.load(path, load_external_data=False)
    inp, out = model.graph.input[0], model.graph.output[0]

    def dims(t: Any) -> tuple[int, ...]:
        return tuple(d.dim_value if d.HasField("dim_value") else -1
                     for d in t.type.tensor_type.shape.dim)

    return (inp.name, dims(inp)), (out.name, dims(out))


class CalibrationShapeError(RuntimeError):
    """Our calibrator handed TensorRT a buffer of another size than the input TensorRT reads.

    TensorRT reads exactly the calibration shape's volume from each pointer: a larger buffer
    means it silently calibrates on part of every batch, a smaller one that it reads past the
    end. Neither fails a real build, so the stand-in fails it instead.
    """


def make_ort_backed_trt(
    memory: MemoryBackend | Callable[[], MemoryBackend], version: str = "10.3.0.26"
) -> tuple[types.ModuleType, list[tuple]]:
    """The stand-in module and the list recording our builder-side calls (see fake_trt).

    ``memory``: the backend whose stand-in device memory the engines read and write (the one our
    code is handed as its CUDA backend), or a function returning the current one (a pipeline
    opens one backend per stage). ``mod._builds`` lists one dict per build: ONNX path,
    profile, builder flags, calibration batches pulled (and the shape TensorRT read them at).
    """
    sc = Scenario(version=version)
    builds: list[dict[str, Any]] = []

    def current_memory() -> MemoryBackend:
        return memory if isinstance(memory, MemoryBackend) else memory()

    def hook(impls: dict[str, type], ref: ModuleRef) -> None:
        base_parser, base_builder = impls["OnnxParser"], impls["Builder"]

        class OnnxParser(base_parser):  # type: ignore[misc, valid-type]
            def parse_from_file(self, path: str) -> bool:
                (name, shape), _ = _onnx_io(path)
                sc.inputs = [FakeTensor(name, shape)]
                builds.append({"onnx": path, "profile": None, "flags": [],
                               "first_call": len(calls)})
                return super().parse_from_file(path)

        class IOptimizationProfile(impls["IOptimizationProfile"]):  # type: ignore[misc]
            def set_shape(self, name: str, lo: Any, mid: Any, hi: Any) -> None:
                builds[-1]["profile"] = [list(lo), list(mid), list(hi)]
                super().set_shape(name, lo, mid, hi)

        class Builder(base_builder):  # type: ignore[misc, valid-type]
            def build_serialized_network(self, network: Any, config: Any) -> bytes | None:
                first = builds[-1]["first_call"]
                flags = [c[1].name for c in calls[first:] if c[0] == "config.set_flag"]
                builds[-1]["flags"] = flags
                calibrator = config._calibrator
                if calibrator is not None:  # what TensorRT does with an implicit calibrator
                    shape = _calibration_shape(network, config)
                    builds[-1]["calibration_shape"] = list(shape)
                    builds[-1]["calibration_batches"] = _calibrate(
                        calibrator, sc.inputs[0].name, shape, current_memory())
                if super().build_serialized_network(network, config) is None:
                    return None
                return json.dumps(builds[-1]).encode()

        class Runtime:
            def __init__(self, logger: Any) -> None:
                calls.append(("Runtime", logger))

            def deserialize_cuda_engine(self, plan: bytes) -> Any:
                calls.append(("runtime.deserialize_cuda_engine", len(plan)))
                try:
                    note = json.loads(bytes(plan))
                except ValueError:
                    return None  # not one of our plans: what TensorRT does with a foreign plan
                return ref.mod.ICudaEngine(note, sc, memory, ref)

        impls.update(OnnxParser=OnnxParser, Builder=Builder, Runtime=Runtime,
                     IOptimizationProfile=IOptimizationProfile,
                     ICudaEngine=OrtEngine, IExecutionContext=OrtContext)

    mod, calls = make_fake_trt(sc, hook, {"_builds": builds})
    # torch's dynamo probes importlib.util.find_spec("tensorrt"), which needs a spec.
    mod.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    return mod, calls


def _calibration_shape(network: Any, config: Any) -> tuple[int, ...]:
    """The input shape TensorRT calibrates at: the calibration profile's opt shape, else the
    input's own shape when it is static; a dynamic input without a calibration profile fails
    the build, as it does in TensorRT."""
    tensor = network.get_input(0)
    shape = tuple(int(d) for d in tensor.shape)
    profile = config._calibration_profile
    if profile is not None:
        return tuple(profile._shapes[2])
    if any(d < 0 for d in shape):
        raise CalibrationShapeError(
            f"input '{tensor.name}' {shape} is dynamic and no calibration profile was set")
    return shape


def _calibrate(calibrator: Any, input_name: str, shape: tuple[int, ...],
               memory: MemoryBackend) -> int:
    """Pull every batch as TensorRT does, checking each buffer holds exactly the float32 volume
    of ``shape``; returns the number of batches (0 when the calibration cache was read)."""
    if calibrator.read_calibration_cache():
        return 0
    volume = int(np.prod(shape)) * 4
    served = 0
    while (pointers := calibrator.get_batch([input_name])) is not None:
        for ptr in pointers:
            size = memory.store[int(ptr)].size
            if size != volume:
                raise CalibrationShapeError(
                    f"calibration buffer of '{input_name}' holds {size} bytes; TensorRT reads "
                    f"{volume} (float32 {shape}, the calibration profile's opt shape)")
        served += 1
    calibrator.write_calibration_cache(b"scales:" + str(served).encode())
    return served


class OrtEngine:
    """A deserialised "plan": the tensor API (v3) of an engine over an onnxruntime session."""

    def __init__(self, note: dict[str, Any], sc: Scenario,
                 memory: MemoryBackend | Callable[[], MemoryBackend], ref: ModuleRef) -> None:
        import onnxruntime as ort

        self._note, self._sc, self._memory, self._ref = note, sc, memory, ref
        (name, shape), (out_name, out_shape) = _onnx_io(note["onnx"])
        self._input_name, self._output_name = name, out_name
        self._tensors = [(name, True, (-1, *shape[1:])), (out_name, False, (-1, *out_shape[1:]))]
        self._reduced = "FP16" in note["flags"] or "INT8" in note["flags"] or (
            "fp16" in Path(note["onnx"]).name or "int8" in Path(note["onnx"]).name)
        self._session = ort.InferenceSession(note["onnx"], providers=["CPUExecutionProvider"])

    @property
    def num_io_tensors(self) -> int:
        return len(self._tensors)

    def create_engine_inspector(self) -> Any:
        return self._ref.mod.EngineInspector()

    def get_tensor_name(self, i: int) -> str:
        return self._tensors[i][0]

    def get_tensor_mode(self, name: str) -> Any:
        is_input = next(t[1] for t in self._tensors if t[0] == name)
        mode = self._ref.mod.TensorIOMode
        return mode.INPUT if is_input else mode.OUTPUT

    def get_tensor_dtype(self, name: str) -> Any:
        return self._ref.mod.DataType.FLOAT

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return next(t[2] for t in self._tensors if t[0] == name)

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[list[int]]:
        return self._note["profile"]  # type: ignore[no-any-return]

    def create_execution_context(self) -> Any:
        return self._ref.mod.IExecutionContext(self)


class OrtContext:
    """``IExecutionContext`` v3 calls; ``execute_async_v3`` reads and writes the stand-in memory."""

    def __init__(self, engine: OrtEngine) -> None:
        self._engine = engine
        self._shape: tuple[int, ...] | None = None
        self._addresses: dict[str, int] = {}

    @property
    def engine(self) -> OrtEngine:
        return self._engine

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        lo, _, hi = self._engine._note["profile"]
        if not lo[0] <= shape[0] <= hi[0]:
            return False
        self._shape = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        assert self._shape is not None
        if name == self._engine._input_name:
            return self._shape
        return (self._shape[0], *self._engine._tensors[1][2][1:])

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self._addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        engine = self._engine
        memory = engine._memory
        if not isinstance(memory, MemoryBackend):
            memory = memory()
        assert self._shape is not None
        n = int(np.prod(self._shape))
        x = memory.store[self._addresses[engine._input_name]][: n * 4].view(np.float32)
        out = engine._session.run(None, {engine._input_name: x.reshape(self._shape)})[0]
        if engine._reduced:
            out = out.astype(np.float16)
        raw = np.ascontiguousarray(out, dtype=np.float32).reshape(-1).view(np.uint8)
        memory.store[self._addresses[engine._output_name]][: raw.size] = raw
        return True


class BackendPerCall:
    """A ``load_backend`` stand-in that opens a new :class:`DeviceMemoryBackend` per call, as the
    real one does (a pipeline opens one per stage); ``current`` is the newest."""

    def __init__(self, name: str = "NVIDIA Orin", cc: str = "8.7") -> None:
        self.name, self.cc = name, cc
        self.opened: list[DeviceMemoryBackend] = []

    @property
    def current(self) -> DeviceMemoryBackend | None:
        return self.opened[-1] if self.opened else None

    def __call__(self, *args: Any, **kwargs: Any) -> DeviceMemoryBackend:
        self.opened.append(DeviceMemoryBackend(self.name, self.cc))
        return self.opened[-1]


def install_stand_in(setter: Callable[[Any, str, Any], None], version: str = "10.3.0.26"
                     ) -> tuple[types.ModuleType, list[tuple], BackendPerCall]:
    """Make ``tensorrt`` the stand-in (of ``version``) and ``cuda_memory.load_backend`` a
    :class:`BackendPerCall`; returns the module, its recorded builder calls and the loader.

    ``setter``: ``monkeypatch.setattr`` in a test, plain ``setattr`` in a subprocess (the caller
    restores ``sys.modules["tensorrt"]``; ``monkeypatch.setitem`` first does).
    """
    import sys

    import xpdeploy.backends.cuda_memory as cuda_memory

    loader = BackendPerCall()
    trt, calls = make_ort_backed_trt(lambda: loader.current,  # type: ignore[arg-type, return-value]
                                     version=version)
    sys.modules["tensorrt"] = trt
    setter(cuda_memory, "load_backend", loader)
    return trt, calls, loader
