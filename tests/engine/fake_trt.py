"""A recording stand-in for the ``tensorrt`` module (tests only).

It checks OUR calls into TensorRT: which functions we call, in which order, with which arguments.
It does not imitate what TensorRT does with them (no parsing, no tactics, no kernels), so passing
these tests says nothing about whether a real TensorRT builds the engine; that needs the ``trt``
and ``gpu`` marked tests on a device machine.
"""

from __future__ import annotations

import enum
import json
import types
from dataclasses import dataclass, field
from typing import Any


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class BuilderFlag(enum.Enum):
    FP16 = "FP16"
    INT8 = "INT8"
    OBEY_PRECISION_CONSTRAINTS = "OBEY"
    PREFER_PRECISION_CONSTRAINTS = "PREFER"


class MemoryPoolType(enum.Enum):
    WORKSPACE = "WORKSPACE"


class ProfilingVerbosity(enum.Enum):
    LAYER_NAMES_ONLY = "LAYER_NAMES_ONLY"
    DETAILED = "DETAILED"


class LayerInformationFormat(enum.Enum):
    ONELINE = "ONELINE"
    JSON = "JSON"


class LayerType(enum.Enum):
    CONSTANT = "CONSTANT"
    REDUCE = "REDUCE"
    ELEMENTWISE = "ELEMENTWISE"
    NORMALIZATION = "NORMALIZATION"
    MATRIX_MULTIPLY = "MATRIX_MULTIPLY"
    SHAPE = "SHAPE"


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    INT64 = "int64"


class Severity(enum.Enum):
    ERROR = "ERROR"
    WARNING = "WARNING"
    INFO = "INFO"


@dataclass
class FakeTensor:
    name: str
    shape: tuple[int, ...]
    dtype: Any = DataType.FLOAT


@dataclass
class FakeLayer:
    name: str
    type: LayerType
    out_dtype: Any = DataType.FLOAT
    precision: Any = None
    output_types: dict[int, Any] = field(default_factory=dict)

    @property
    def num_outputs(self) -> int:
        return 1

    def get_output(self, j: int) -> FakeTensor:
        return FakeTensor(f"{self.name}:out{j}", (1,), self.out_dtype)

    def set_output_type(self, j: int, dtype: Any) -> None:
        self.output_types[j] = dtype


@dataclass
class Scenario:
    """What the fake TensorRT answers; tests change it before building."""

    version: str = "10.3.0.26"
    parse_ok: bool = True
    parser_errors: list[tuple[int, str]] = field(default_factory=list)
    inputs: list[FakeTensor] = field(
        default_factory=lambda: [FakeTensor("pixels", (-1, 3, 16, 16))]
    )
    layers: list[FakeLayer] = field(default_factory=list)
    build_ok: bool = True
    timing_cache_accepted: bool = True
    layer_info: dict[str, Any] = field(default_factory=lambda: {"Layers": [], "Bindings": []})
    plan: bytes = b"PLAN"


def make_fake_trt(scenario: Scenario | None = None) -> tuple[types.ModuleType, list[tuple]]:
    """A module object standing in for ``tensorrt`` and the list it records calls into.

    Each record is ``(call name, *arguments)``; the order is the order of our calls.
    """
    sc = scenario or Scenario()
    calls: list[tuple] = []

    class ILogger:
        Severity = Severity

        def __init__(self) -> None:
            calls.append(("ILogger.__init__",))

    class FakeNetwork:
        def __init__(self, flags: int) -> None:
            self.flags = flags

        @property
        def num_inputs(self) -> int:
            return len(sc.inputs)

        def get_input(self, i: int) -> FakeTensor:
            return sc.inputs[i]

        @property
        def num_layers(self) -> int:
            return len(sc.layers)

        def get_layer(self, i: int) -> FakeLayer:
            return sc.layers[i]

    class ParserError:
        def __init__(self, node: int, desc: str) -> None:
            self._node, self._desc = node, desc

        def node(self) -> int:
            return self._node

        def desc(self) -> str:
            return self._desc

    class OnnxParser:
        def __init__(self, network: FakeNetwork, logger: Any) -> None:
            calls.append(("OnnxParser", network, logger))
            self.logger = logger

        def parse_from_file(self, path: str) -> bool:
            calls.append(("parser.parse_from_file", path))
            for _, desc in sc.parser_errors:
                self.logger.log(Severity.ERROR, desc)
            return sc.parse_ok

        @property
        def num_errors(self) -> int:
            return len(sc.parser_errors)

        def get_error(self, i: int) -> ParserError:
            return ParserError(*sc.parser_errors[i])

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = bytes(data)

        def serialize(self) -> bytes:
            return self.data + b"+timed"

    class OptimizationProfile:
        def set_shape(self, name: str, lo: Any, mid: Any, hi: Any) -> None:
            calls.append(("profile.set_shape", name, tuple(lo), tuple(mid), tuple(hi)))

    class BuilderConfig:
        def __init__(self) -> None:
            self._timing_cache: TimingCache | None = None
            self._verbosity = None
            self._calibrator = None

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            calls.append(("config.set_memory_pool_limit", pool, size))

        def set_flag(self, flag: Any) -> None:
            calls.append(("config.set_flag", flag))

        @property
        def profiling_verbosity(self) -> Any:
            return self._verbosity

        @profiling_verbosity.setter
        def profiling_verbosity(self, value: Any) -> None:
            calls.append(("config.profiling_verbosity", value))
            self._verbosity = value

        @property
        def int8_calibrator(self) -> Any:
            return self._calibrator

        @int8_calibrator.setter
        def int8_calibrator(self, value: Any) -> None:
            calls.append(("config.int8_calibrator", value))
            self._calibrator = value

        def add_optimization_profile(self, profile: Any) -> int:
            calls.append(("config.add_optimization_profile", profile))
            return 0

        def set_calibration_profile(self, profile: Any) -> bool:
            calls.append(("config.set_calibration_profile", profile))
            return True

        def create_timing_cache(self, data: bytes) -> TimingCache:
            calls.append(("config.create_timing_cache", bytes(data)))
            return TimingCache(data)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            calls.append(("config.set_timing_cache", cache.data, ignore_mismatch))
            ok = sc.timing_cache_accepted or cache.data == b""
            if ok:
                self._timing_cache = cache
            return ok

        def get_timing_cache(self) -> TimingCache:
            calls.append(("config.get_timing_cache",))
            assert self._timing_cache is not None
            return self._timing_cache

    class Builder:
        def __init__(self, logger: Any) -> None:
            calls.append(("Builder", logger))
            self.logger = logger

        def create_network(self, flags: int) -> FakeNetwork:
            calls.append(("builder.create_network", flags))
            return FakeNetwork(flags)

        def create_builder_config(self) -> BuilderConfig:
            calls.append(("builder.create_builder_config",))
            return BuilderConfig()

        def create_optimization_profile(self) -> OptimizationProfile:
            calls.append(("builder.create_optimization_profile",))
            return OptimizationProfile()

        def build_serialized_network(self, network: Any, config: Any) -> bytes | None:
            calls.append(("builder.build_serialized_network", network, config))
            if not sc.build_ok:
                self.logger.log(Severity.ERROR, "out of\nmemory")
                return None
            return sc.plan

    class Inspector:
        def get_engine_information(self, fmt: Any) -> str:
            calls.append(("inspector.get_engine_information", fmt))
            return json.dumps(sc.layer_info)

    class Engine:
        def create_engine_inspector(self) -> Inspector:
            return Inspector()

    class Runtime:
        def __init__(self, logger: Any) -> None:
            calls.append(("Runtime", logger))

        def deserialize_cuda_engine(self, plan: bytes) -> Engine:
            calls.append(("runtime.deserialize_cuda_engine", bytes(plan)))
            return Engine()

    class _CalibratorBase:
        def __init__(self) -> None:
            calls.append((f"{type(self).__mro__[1].__name__}.__init__",))

    class IInt8MinMaxCalibrator(_CalibratorBase):
        pass

    class IInt8EntropyCalibrator2(_CalibratorBase):
        pass

    mod = types.ModuleType("tensorrt")
    mod.__dict__.update(
        __version__=sc.version,
        ILogger=ILogger,
        Builder=Builder,
        OnnxParser=OnnxParser,
        Runtime=Runtime,
        NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag,
        BuilderFlag=BuilderFlag,
        MemoryPoolType=MemoryPoolType,
        ProfilingVerbosity=ProfilingVerbosity,
        LayerInformationFormat=LayerInformationFormat,
        LayerType=LayerType,
        float32=DataType.FLOAT,
        float16=DataType.HALF,
        int64=DataType.INT64,
        IInt8MinMaxCalibrator=IInt8MinMaxCalibrator,
        IInt8EntropyCalibrator2=IInt8EntropyCalibrator2,
    )
    return mod, calls


def names(calls: list[tuple]) -> list[str]:
    """Just the call names, in order."""
    return [c[0] for c in calls]
