"""The public API of each real TensorRT release, and stand-in modules held to exactly that API.

``tests/engine/trt_api/tensorrt-<version>.json`` are copies of the tables in the team's shared
folder, read from NVIDIA's bindings wheels (``tensorrt-bindings==8.6.1``,
``tensorrt-cu12-bindings==10.x / 11.4.0.106``) by importing the compiled module: every public
class with its attributes, every enum with its members and values, the module's values and
functions. They are facts about the real bindings, kept here so the stand-ins cannot drift from
them (``test_trt_api.py`` compares every stand-in's names with its table).

:func:`faithful_module` turns a table plus behaviour classes (the recording fakes of
``fake_trt.py``) into a module that exposes **exactly** the table's names:

* every enum is an ``IntEnum`` with the table's members and values (so ``STRONGLY_TYPED`` is 1 on
  10.x and 0 on 11.x, and a member a version lacks is an ``AttributeError``);
* every class has exactly the table's public attributes. A name the fake implements but the
  version lacks is blocked (reading, writing or calling it raises ``AttributeError``, as pybind11
  does); a name the version has but the fake does not implement raises ``NotImplementedError``
  when used, so a test can never pass by touching an unimplemented name silently;
* module values (``float32``...) are members of the version's ``DataType``; module functions raise
  ``NotImplementedError``;
* each use of an attribute the table marks deprecated is recorded in
  ``_deprecated_uses``, so the tests can say which deprecated API each version's path relies on.

TensorRT 8.5 (JetPack 5) has no bindings wheel, so no table: :func:`derive_8_5` takes 8.6.1's
table and removes what TensorRT 8.6 added to the Python API (the "API Changes For TensorRT 8.6.0
EA" chapter of NVIDIA's 8.6 API reference): the cast, normalization and reverse-sequence layers,
hardware compatibility, version-compatible / lean-runtime engines, FP8, auxiliary streams, the
builder optimisation level and the runtime's temp-file controls. Enum values of the remaining
members are kept as 8.6 numbers them (LayerType values shift, which no code of ours reads).
"""

from __future__ import annotations

import copy
import enum
import functools
import json
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from xpdeploy.backends.trt_versions import TrtVersion

TABLES = Path(__file__).parent / "trt_api"
#: Versions with a table (the bindings' ``__version__``), oldest first; "8.5.2.2" is derived.
TABLE_VERSIONS = ("8.5.2.2", "8.6.1", "10.3.0", "10.11.0.33", "10.12.0.36", "10.13.0.35",
                  "11.4.0.106")

#: Severity of ILogger / Logger: a nested enum the tables list by name only; its values are
#: those of ``nvinfer1::ILogger::Severity`` (the tables' ``Logger.__init__`` signature shows
#: ``<Severity.WARNING: 2>``).
SEVERITY = {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4}
#: Module-level DataType values -> DataType member.
DATATYPE_VALUES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int8": "INT8",
                   "int32": "INT32", "int64": "INT64", "bool": "BOOL", "uint8": "UINT8",
                   "fp8": "FP8", "int4": "INT4", "fp4": "FP4", "e8m0": "E8M0"}

#: What TensorRT 8.6 added to the Python API, removed from 8.6.1's table to derive 8.5's.
ADDED_IN_8_6: dict[str, Any] = {
    "module": ["ICastLayer", "INormalizationLayer", "IReverseSequenceLayer",
               "HardwareCompatibilityLevel", "TempfileControlFlag", "fp8"],
    "members": {"LayerType": ["CAST", "NORMALIZATION", "REVERSE_SEQUENCE"],
                "BuilderFlag": ["VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "FP8"],
                "DataType": ["FP8"],
                "PreviewFeature": ["PROFILE_SHARING_0806"]},
    "attrs": {"INetworkDefinition": ["add_cast", "add_normalization", "add_reverse_sequence"],
              "IBuilderConfig": ["builder_optimization_level", "hardware_compatibility_level",
                                 "max_aux_streams", "plugins_to_serialize"],
              "Runtime": ["engine_host_code_allowed", "load_runtime", "tempfile_control_flags",
                          "temporary_directory"],
              "ICudaEngine": ["hardware_compatibility_level", "num_aux_streams"],
              "IExecutionContext": ["set_aux_streams"]},
}


@functools.cache
def _read(version: str) -> dict[str, Any]:
    return json.loads((TABLES / f"tensorrt-{version}.json").read_text())["module"]


def derive_8_5() -> dict[str, Any]:
    """TensorRT 8.5's API: 8.6.1's table without what 8.6 added (see the module docstring)."""
    table = copy.deepcopy(_read("8.6.1"))
    for name in ADDED_IN_8_6["module"]:
        del table[name]
    for enum_name, members in ADDED_IN_8_6["members"].items():
        for m in members:
            del table[enum_name]["members"][m]
    for cls, attrs in ADDED_IN_8_6["attrs"].items():
        for a in attrs:
            del table[cls]["attrs"][a]
    return table


def table_version(version: str) -> str:
    """The table a TensorRT version is held to: the one of the same major.minor, else the newest
    older one, else the oldest (8.4, refused by xpdeploy before any call, gets 8.5's)."""
    want = TrtVersion.parse(version)
    known = [(TrtVersion.parse(v), v) for v in TABLE_VERSIONS]
    same = [v for t, v in known if (t.major, t.minor) == (want.major, want.minor)]
    if same:
        return same[0]
    older = [v for t, v in known if t <= want]
    return older[-1] if older else TABLE_VERSIONS[0]


def load_table(version: str) -> dict[str, Any]:
    """The API table (``module`` part) TensorRT ``version`` is held to (a fresh copy)."""
    name = table_version(version)
    return derive_8_5() if name == "8.5.2.2" else copy.deepcopy(_read(name))


# -- the names of a table, and of a module --------------------------------------------------------

def table_names(table: Mapping[str, Any]) -> dict[str, Any]:
    """{name: kind} for module values and functions, {name: {member: value}} for enums and
    {name: sorted public attributes} for classes (dunders such as ``__init__`` left out)."""
    out: dict[str, Any] = {}
    for name, entry in table.items():
        if entry["kind"] == "enum":
            out[name] = dict(entry["members"])
        elif entry["kind"] == "class":
            out[name] = sorted(a for a in entry["attrs"] if not a.startswith("__"))
        else:
            out[name] = entry["kind"]
    return out


def module_names(mod: types.ModuleType) -> dict[str, Any]:
    """The same structure as :func:`table_names`, read from a module object by introspection:
    what the stand-in actually answers to, not what it was built from."""
    out: dict[str, Any] = {}
    for name in dir(mod):
        if name.startswith("_"):
            continue
        value = getattr(mod, name)
        if isinstance(value, type) and issubclass(value, enum.Enum):
            out[name] = {m: int(v) for m, v in value.__members__.items()}
        elif isinstance(value, type):
            out[name] = sorted(a for a in dir(value)
                               if not a.startswith("_") and hasattr(value, a))
        elif isinstance(value, enum.Enum):
            out[name] = type(value).__name__
        else:
            out[name] = "builtin_function_or_method"
    return out


# -- building a stand-in module -------------------------------------------------------------------

class _Absent:
    """A name the stand-in's fake defines but the real version lacks: any use raises
    ``AttributeError`` (as the real bindings do), and ``hasattr`` is False."""

    def __init__(self, version: str, owner: str, name: str) -> None:
        self.message = f"'tensorrt.{owner}' object has no attribute '{name}' (TensorRT {version})"

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        raise AttributeError(self.message)

    def __set__(self, obj: Any, value: Any) -> None:
        raise AttributeError(self.message)


def _unimplemented(version: str, owner: str, name: str, sig: str) -> Any:
    """A name the version has and the fake does not implement: a method or property (by the
    table's docstring line) raising NotImplementedError, so no test passes by using it."""
    message = (f"the TensorRT {version} stand-in does not implement {owner}.{name}; add it to "
               "tests/engine/fake_trt.py if our code needs it")

    def fail(*_: Any, **__: Any) -> Any:
        raise NotImplementedError(message)

    if sig.startswith(f"{name}("):
        return fail
    return property(fail, fail)


def _guarded_setattr(allowed: frozenset[str], version: str, owner: str,
                     cls: list[type]) -> Callable[..., None]:
    """pybind11 objects refuse unknown attributes; Python subclasses of them (our logger and
    calibrators) get a ``__dict__`` and may set anything, so only the class itself is guarded."""

    def __setattr__(self: Any, name: str, value: Any) -> None:
        if type(self) is cls[0] and not name.startswith("_") and name not in allowed:
            raise AttributeError(
                f"'tensorrt.{owner}' object has no attribute '{name}' (TensorRT {version})")
        object.__setattr__(self, name, value)

    return __setattr__


def _recording(impl: type, attr: str, label: str, uses: list[str]) -> Any:
    """``impl``'s method or property ``attr``, appending ``label`` to ``uses`` on each use."""
    member = getattr(impl, attr)  # on the class: a property object, or the plain function
    if isinstance(member, property):
        def fget(obj: Any) -> Any:
            uses.append(label)
            return member.fget(obj)  # type: ignore[misc]

        def fset(obj: Any, value: Any) -> None:
            uses.append(label)
            member.fset(obj, value)  # type: ignore[misc]

        return property(fget, fset if member.fset else None)

    @functools.wraps(member)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        uses.append(label)
        return member(self, *args, **kwargs)

    return method


def faithful_class(version: str, name: str, entry: Mapping[str, Any], impl: type | None,
                   severity: type[enum.IntEnum], uses: list[str] | None = None) -> type:
    """The class ``name`` of ``version``: ``impl``'s behaviour, exactly the table's names.
    ``severity``: the module's one ``ILogger.Severity`` enum. ``uses`` collects the attributes
    the table marks deprecated each time one is used ("IBuilderConfig.set_calibration_profile").
    Class-level marks are not recorded: the tables set them whenever a class docstring mentions
    a deprecation (8.6.1 marks Builder), so they do not say the class itself is deprecated."""
    attrs = {a: (info or {}).get("sig", "") for a, info in entry["attrs"].items()
             if not a.startswith("__")}
    ns: dict[str, Any] = {"__module__": "tensorrt", "__qualname__": name}
    base = impl if impl is not None else object
    if impl is not None and uses is not None:
        for attr, info in entry["attrs"].items():
            if (info or {}).get("deprecated") and not attr.startswith("__") and hasattr(impl,
                                                                                      attr):
                ns[attr] = _recording(impl, attr, f"{name}.{attr}", uses)

    for attr, sig in attrs.items():
        if attr in ns:
            continue
        if impl is None or not hasattr(impl, attr):
            if attr in SEVERITY:
                continue  # set below from the Severity enum
            ns[attr] = _unimplemented(version, name, attr, sig)
    if impl is not None:
        for attr in dir(impl):
            if not attr.startswith("_") and attr not in attrs:
                ns[attr] = _Absent(version, name, attr)
    if "Severity" in attrs:
        ns["Severity"] = severity
        for member in SEVERITY:
            if member in attrs:
                ns[member] = severity[member]
    made: list[type] = []
    ns["__setattr__"] = _guarded_setattr(frozenset(attrs), version, name, made)
    made.append(type(name, (base,), ns))
    return made[0]


def faithful_module(version: str, impls: Mapping[str, type],
                    extras: Mapping[str, Any] | None = None) -> types.ModuleType:
    """A ``tensorrt`` module of ``version`` with exactly its table's names.

    ``impls``: behaviour classes by table class name (their public names beyond the table are
    blocked, see :func:`faithful_class`); an impl for a class the version lacks is dropped. A
    key in ``impls`` that names an enum is an error (enums always come from the table).
    ``extras``: private names (``_`` prefix) the tests read, e.g. the recorded builds.
    ``mod._deprecated_uses`` lists each use of a name the table marks deprecated.
    """
    table = load_table(version)
    mod = types.ModuleType("tensorrt")
    enums: dict[str, type[enum.IntEnum]] = {}
    for name, entry in table.items():
        if entry["kind"] == "enum":
            enums[name] = enum.IntEnum(name, entry["members"])  # type: ignore[assignment]
            enums[name].__module__ = "tensorrt"
    uses: list[str] = []
    severity = enum.IntEnum("Severity", SEVERITY)
    severity.__module__ = "tensorrt"
    for name in impls:
        if name in enums:
            raise ValueError(f"{name} is an enum: it comes from the table, not from a fake")
    for name, entry in table.items():
        kind = entry["kind"]
        if kind == "enum":
            value: Any = enums[name]
        elif kind == "class":
            value = faithful_class(version, name, entry, impls.get(name), severity, uses)
        elif kind == "DataType":
            value = enums["DataType"][DATATYPE_VALUES[name]]
        else:
            value = _unimplemented(version, "tensorrt", name, f"{name}(")
        setattr(mod, name, value)
    mod.__version__ = version
    mod._deprecated_uses = uses  # type: ignore[attr-defined]
    for key, value in (extras or {}).items():
        if not key.startswith("_"):
            raise ValueError(f"stand-in extra '{key}' must be private (start with '_')")
        setattr(mod, key, value)
    return mod
