"""A recording stand-in for the ``tensorrt`` module of one real version (tests only).

It checks OUR calls into TensorRT: which functions we call, in which order, with which arguments.
It does not imitate what TensorRT does with them (no parsing, no tactics, no kernels), so passing
these tests says nothing about whether a real TensorRT builds the engine; that needs the ``trt``
and ``gpu`` marked tests on a device machine.

The module it returns has exactly the names and enum values of the real bindings of
``Scenario.version`` (:mod:`tests.engine.trt_api`): on 11.x there is no ``BuilderFlag.FP16``, no
``IInt8MinMaxCalibrator`` and no ``IBuilderConfig.int8_calibrator``, and touching one raises
``AttributeError`` here as it would on the device. The behaviour classes below are named after
the table's classes; each may implement names several versions have, and the table decides which
of them a version exposes.
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.engine.trt_api import faithful_module


@dataclass
class FakeTensor:
    """A network tensor; ``dtype`` is a ``DataType`` member name, resolved per version."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "FLOAT"


@dataclass
class FakeLayer:
    """A network layer; ``type`` / ``out_dtype`` are member names of the version's ``LayerType``
    / ``DataType``. ``precision`` and ``output_types`` record what our code set."""

    name: str
    type: str
    out_dtype: str = "FLOAT"
    precision: Any = None
    output_types: dict[int, Any] = field(default_factory=dict)


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
    #: How the fake reads a non-empty timing cache blob: "ok", "none" (TensorRT logs an error
    #: and returns no cache) or "raise".
    timing_cache_blob: str = "ok"
    layer_info: dict[str, Any] = field(default_factory=lambda: {"Layers": [], "Bindings": []})
    plan: bytes = b"PLAN"


class ModuleRef:
    """The module being built, for behaviour classes that hand out other stand-in objects."""

    mod: types.ModuleType


#: Adds or replaces behaviour classes before the module is built (see ort_backed_trt).
ImplHook = Callable[[dict[str, type], ModuleRef], None]


def fake_impls(sc: Scenario, calls: list[tuple], ref: ModuleRef) -> dict[str, type]:
    """The recording behaviour classes, by the name of the TensorRT class they stand for."""

    class ILogger:
        def __init__(self) -> None:
            calls.append(("ILogger.__init__",))

    class Logger:
        def __init__(self, min_severity: Any = None) -> None:
            self._min_severity = min_severity

    class ITensor:
        def __init__(self, spec: FakeTensor) -> None:
            self._spec = spec

        @property
        def name(self) -> str:
            return self._spec.name

        @property
        def shape(self) -> tuple[int, ...]:
            return self._spec.shape

        @property
        def dtype(self) -> Any:
            return getattr(ref.mod.DataType, self._spec.dtype)

    class ILayer:
        def __init__(self, spec: FakeLayer) -> None:
            self._spec = spec

        @property
        def name(self) -> str:
            return self._spec.name

        @property
        def type(self) -> Any:
            return getattr(ref.mod.LayerType, self._spec.type)

        @property
        def precision(self) -> Any:
            return self._spec.precision

        @precision.setter
        def precision(self, value: Any) -> None:
            self._spec.precision = value

        @property
        def num_outputs(self) -> int:
            return 1

        def get_output(self, j: int) -> Any:
            return ref.mod.ITensor(FakeTensor(f"{self._spec.name}:out{j}", (1,),
                                              self._spec.out_dtype))

        def set_output_type(self, j: int, dtype: Any) -> None:
            self._spec.output_types[j] = dtype

    class INetworkDefinition:
        def __init__(self, flags: int) -> None:
            self._flags = flags

        @property
        def num_inputs(self) -> int:
            return len(sc.inputs)

        def get_input(self, i: int) -> Any:
            return ref.mod.ITensor(sc.inputs[i])

        @property
        def num_layers(self) -> int:
            return len(sc.layers)

        def get_layer(self, i: int) -> Any:
            return ref.mod.ILayer(sc.layers[i])

    class ParserError:
        def __init__(self, node: int, desc: str) -> None:
            self._node, self._desc = node, desc

        def node(self) -> int:
            return self._node

        def desc(self) -> str:
            return self._desc

    class OnnxParser:
        def __init__(self, network: Any, logger: Any) -> None:
            calls.append(("OnnxParser", network, logger))
            self._logger = logger

        def parse_from_file(self, path: str) -> bool:
            calls.append(("parser.parse_from_file", path))
            for _, desc in sc.parser_errors:
                self._logger.log(ref.mod.ILogger.Severity.ERROR, desc)
            return sc.parse_ok

        @property
        def num_errors(self) -> int:
            return len(sc.parser_errors)

        def get_error(self, i: int) -> Any:
            return ref.mod.ParserError(*sc.parser_errors[i])

    class ITimingCache:
        def __init__(self, data: bytes) -> None:
            self._data = bytes(data)

        def serialize(self) -> bytes:
            return self._data + b"+timed"

    class IOptimizationProfile:
        def set_shape(self, name: str, lo: Any, mid: Any, hi: Any) -> None:
            calls.append(("profile.set_shape", name, tuple(lo), tuple(mid), tuple(hi)))
            self._shapes = (name, tuple(lo), tuple(mid), tuple(hi))

    class IBuilderConfig:
        """Precision names (``int8_calibrator``, ``set_calibration_profile``) exist only where the
        version's table has them: on 11.x, using them is an AttributeError."""

        def __init__(self) -> None:
            self._timing_cache: Any = None
            self._verbosity = None
            self._calibrator = None
            self._calibration_profile: Any = None
            self._profiles: list[Any] = []

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
            self._profiles.append(profile)
            return len(self._profiles) - 1

        def set_calibration_profile(self, profile: Any) -> bool:
            calls.append(("config.set_calibration_profile", profile))
            self._calibration_profile = profile
            return True

        def create_timing_cache(self, data: bytes) -> Any:
            calls.append(("config.create_timing_cache", bytes(data)))
            if data and sc.timing_cache_blob == "raise":
                raise RuntimeError("Serialization assertion failed: magic tag does not match")
            if data and sc.timing_cache_blob == "none":
                return None
            return ref.mod.ITimingCache(data)

        def set_timing_cache(self, cache: Any, ignore_mismatch: bool) -> bool:
            if cache is None:  # pybind11 refuses None for a reference argument
                raise TypeError("set_timing_cache(): incompatible function arguments")
            calls.append(("config.set_timing_cache", cache._data, ignore_mismatch))
            ok = sc.timing_cache_accepted or cache._data == b""
            if ok:
                self._timing_cache = cache
            return ok

        def get_timing_cache(self) -> Any:
            calls.append(("config.get_timing_cache",))
            assert self._timing_cache is not None
            return self._timing_cache

    class Builder:
        def __init__(self, logger: Any) -> None:
            calls.append(("Builder", logger))
            self._logger = logger

        def create_network(self, flags: int = 0) -> Any:
            calls.append(("builder.create_network", flags))
            return ref.mod.INetworkDefinition(flags)

        def create_builder_config(self) -> Any:
            calls.append(("builder.create_builder_config",))
            return ref.mod.IBuilderConfig()

        def create_optimization_profile(self) -> Any:
            calls.append(("builder.create_optimization_profile",))
            return ref.mod.IOptimizationProfile()

        def build_serialized_network(self, network: Any, config: Any) -> bytes | None:
            calls.append(("builder.build_serialized_network", network, config))
            if not sc.build_ok:
                self._logger.log(ref.mod.ILogger.Severity.ERROR, "out of\nmemory")
                return None
            return sc.plan

    class EngineInspector:
        def get_engine_information(self, fmt: Any) -> str:
            calls.append(("inspector.get_engine_information", fmt))
            return json.dumps(sc.layer_info)

    class ICudaEngine:
        def create_engine_inspector(self) -> Any:
            return ref.mod.EngineInspector()

    class Runtime:
        def __init__(self, logger: Any) -> None:
            calls.append(("Runtime", logger))

        def deserialize_cuda_engine(self, plan: bytes) -> Any:
            calls.append(("runtime.deserialize_cuda_engine", bytes(plan)))
            return ref.mod.ICudaEngine()

    class _CalibratorBase:
        def __init__(self) -> None:
            calls.append((f"{type(self).__mro__[1].__name__}.__init__",))

    class IInt8MinMaxCalibrator(_CalibratorBase):
        pass

    class IInt8EntropyCalibrator2(_CalibratorBase):
        pass

    return {c.__name__: c for c in (
        ILogger, Logger, ITensor, ILayer, INetworkDefinition, ParserError, OnnxParser,
        ITimingCache, IOptimizationProfile, IBuilderConfig, Builder, EngineInspector,
        ICudaEngine, Runtime, IInt8MinMaxCalibrator, IInt8EntropyCalibrator2)}


def make_fake_trt(scenario: Scenario | None = None, hook: ImplHook | None = None,
                  extras: dict[str, Any] | None = None) -> tuple[types.ModuleType, list[tuple]]:
    """A module object standing in for ``tensorrt`` (of ``scenario.version``) and the list it
    records calls into.

    Each record is ``(call name, *arguments)``; the order is the order of our calls. ``hook``
    adds or replaces behaviour classes; ``extras`` are private module names the tests read.
    """
    sc = scenario or Scenario()
    calls: list[tuple] = []
    ref = ModuleRef()
    impls = fake_impls(sc, calls, ref)
    if hook is not None:
        hook(impls, ref)
    ref.mod = faithful_module(sc.version, impls, {"_scenario": sc, **(extras or {})})
    return ref.mod, calls


def names(calls: list[tuple]) -> list[str]:
    """Just the call names, in order."""
    return [c[0] for c in calls]
