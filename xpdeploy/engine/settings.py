"""What one TensorRT engine build asks for, from the ``build_engine`` config (pure, no TensorRT).

One :class:`BuildSettings` describes one engine. Choices made here:

* **Static batch by default**: one engine per entry of ``batch_sizes``, each with min = opt = max
  = (batch, C, H, W). Jetson boards have little memory and no use for shape flexibility, and a
  static engine lets TensorRT pick tactics for exactly that shape (a dynamic one is tuned for
  ``opt`` only).
* **Optional dynamic profiles**: ``profiles`` is a list of batch ranges (min, opt, max); each gives
  one engine with one optimisation profile over the batch axis (C, H, W stay fixed: the model's
  input size never changes after export). When given, they replace ``batch_sizes``. One profile per
  engine keeps runners simple (no profile switching on an execution context).
* **Precision flags** (weak path): fp32 -> none, fp16 -> FP16, int8 -> INT8 + FP16 (int8 where
  TensorRT has an int8 kernel, fp16 elsewhere, like ``trtexec --int8 --fp16``: an int8 engine whose
  other layers fell back to fp32 would lose to the fp16 engine for no reason). When LayerNorm is
  pinned to
  fp32 we add PREFER_PRECISION_CONSTRAINTS rather than OBEY: every norm layer has an fp32 kernel,
  so "prefer" is honoured in practice, and it cannot fail a build the way "obey" can.
* **Strong path**: no precision flags at all; the ONNX graph must already carry the requested
  precision (``graph_precision``), else a :class:`BuildError` says which host step is missing.
* **best** is not a TensorRT mode but two builds (:func:`build_precisions`): an fp16 and an int8
  engine, measured side by side by ``verify``, which keeps the faster one that passes the gates
  (int8 is often not faster than fp16 for ViT attention on Orin). :func:`plan_builds` is called
  once per precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from xpdeploy.backends.trt_versions import (
    BuildPath,
    Precision,
    TrtVersion,
    build_path,
    needs_layernorm_fp32,
)
from xpdeploy.errors import BuildError
from xpdeploy.export.graph import GraphPrecision
from xpdeploy.spec import BuildEngineConfig

CalibratorKind = Literal["minmax", "entropy2"]
#: The precision of one built engine (``best`` is a choice between two of them).
BuiltPrecision = Literal["fp32", "fp16", "int8"]

_MIB = 1024 * 1024
#: TensorRT's implicit (calibrator-based) int8 is deprecated from this version on; it still works.
_IMPLICIT_INT8_DEPRECATED_FROM = (10, 1, 0)

_WEAK_FLAGS: dict[str, tuple[str, ...]] = {
    "fp32": (),
    "fp16": ("FP16",),
    "int8": ("INT8", "FP16"),
}


def build_precisions(precision: Precision) -> tuple[BuiltPrecision, ...]:
    """The engine precisions a configured precision builds: ``best`` is fp16 and int8."""
    return ("fp16", "int8") if precision == "best" else (precision,)


@dataclass(frozen=True)
class Profile:
    """Min / opt / max shapes of one network input, in elements (NCHW for images, (N, T, D) for
    a ViT block's tokens)."""

    input_name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        ranks = {len(self.min), len(self.opt), len(self.max)}
        if len(ranks) != 1:
            raise BuildError(
                f"profile for '{self.input_name}': min {self.min}, opt {self.opt} and max "
                f"{self.max} must have the same rank"
            )
        if any(d <= 0 for d in (*self.min, *self.opt, *self.max)):
            raise BuildError(
                f"profile for '{self.input_name}': every dimension must be positive, got min "
                f"{self.min}, opt {self.opt}, max {self.max}"
            )
        for lo, mid, hi in zip(self.min, self.opt, self.max, strict=True):
            if not lo <= mid <= hi:
                raise BuildError(
                    f"profile for '{self.input_name}': need min <= opt <= max in every "
                    f"dimension, got min {self.min}, opt {self.opt}, max {self.max}"
                )

    @property
    def is_static(self) -> bool:
        """True when min = opt = max (a static-shape engine)."""
        return self.min == self.opt == self.max

    def as_tuple(self) -> tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(name, min, opt, max): the form stored in an engine cache key."""
        return (self.input_name, self.min, self.opt, self.max)


@dataclass(frozen=True)
class BuildSettings:
    """Everything one engine build asks TensorRT for (flag names are TensorRT enum member names)."""

    version: TrtVersion
    path: BuildPath
    precision: BuiltPrecision
    network_flags: tuple[str, ...]  # NetworkDefinitionCreationFlag members
    builder_flags: tuple[str, ...]  # BuilderFlag members
    workspace_bytes: int  # builder workspace memory pool limit, bytes
    profile: Profile
    calibrator: CalibratorKind | None  # None: no implicit calibrator (not int8, or strong path)
    layernorm_fp32: bool
    warnings: tuple[str, ...] = field(default=())

    @property
    def input_name(self) -> str:
        return self.profile.input_name

    @property
    def batch(self) -> int:
        """The batch size the engine is tuned for (``opt``'s first dimension)."""
        return self.profile.opt[0]

    @property
    def label(self) -> str:
        """A file-name-safe tag: "fp16-b8" (static) or "int8-b1-8-32" (dynamic batch)."""
        p = self.profile
        if p.is_static:
            return f"{self.precision}-b{self.batch}"
        return f"{self.precision}-b{p.min[0]}-{p.opt[0]}-{p.max[0]}"


def plan_builds(
    config: BuildEngineConfig,
    version: TrtVersion,
    input_name: str,
    input_chw: Sequence[int],
    *,
    precision: BuiltPrecision | None = None,
    graph_precision: GraphPrecision = "fp32",
    profiles: Sequence[tuple[int, int, int]] | None = None,
    layernorm_fp32: bool | None = None,
) -> list[BuildSettings]:
    """One :class:`BuildSettings` per engine to build, or a one-line :class:`BuildError`.

    ``precision``: the engine precision to plan (default ``config.precision``); with ``best``
    configured, call once for each of :func:`build_precisions`.

    ``input_chw`` is the model input without the batch axis, e.g. (3, 224, 224), or the tokens
    (197, 192) of a block of a latency grid (:mod:`xpdeploy.verify.latency_grid`). ``profiles`` are
    batch ranges (min, opt, max) replacing ``config.batch_sizes`` (see the module docstring).
    ``layernorm_fp32`` overrides the version rule of
    :func:`~xpdeploy.backends.trt_versions.needs_layernorm_fp32` (None: follow the rule).
    """
    path = build_path(version)
    if precision is None:
        if config.precision == "best":
            raise BuildError("precision best is two builds: plan each of build_precisions('best')")
        precision = config.precision
    chw = tuple(int(d) for d in input_chw)
    if not chw or any(d <= 0 for d in chw):
        raise BuildError(f"input '{input_name}' needs positive non-batch dimensions, got {chw}")
    warnings: list[str] = []

    if path == "weak":
        network_flags, builder_flags, calibrator = _weak(
            config, precision, version, graph_precision, warnings)
    else:
        network_flags, builder_flags, calibrator = _strong(precision, version, graph_precision)

    pin = needs_layernorm_fp32(version, precision) if layernorm_fp32 is None else layernorm_fp32
    if pin and path == "strong":
        raise BuildError(
            f"layernorm_fp32 cannot be forced on TensorRT {version}: strongly typed networks "
            "forbid layer precisions; keep the norms fp32 in the ONNX graph (the host fp16 cast "
            "does) or leave layernorm_fp32 unset"
        )
    if pin and precision == "fp32":
        pin = False  # everything is fp32 already
    if pin:
        builder_flags = (*builder_flags, "PREFER_PRECISION_CONSTRAINTS")

    ranges = _batch_ranges(config.batch_sizes, profiles)
    return [
        BuildSettings(
            version=version,
            path=path,
            precision=precision,
            network_flags=network_flags,
            builder_flags=builder_flags,
            workspace_bytes=int(config.workspace_mb) * _MIB,
            profile=Profile(input_name, (lo, *chw), (mid, *chw), (hi, *chw)),
            calibrator=calibrator,
            layernorm_fp32=pin,
            warnings=tuple(warnings),
        )
        for lo, mid, hi in ranges
    ]


def _weak(
    config: BuildEngineConfig,
    precision: BuiltPrecision,
    version: TrtVersion,
    graph_precision: GraphPrecision,
    warnings: list[str],
) -> tuple[tuple[str, ...], tuple[str, ...], CalibratorKind | None]:
    """Network flags, builder flags and calibrator kind of the weakly typed path."""
    if graph_precision != "fp32":
        raise BuildError(
            f"TensorRT {version} builds weakly typed: it takes the fp32 ONNX model and sets "
            f"precision with builder flags, but got a {graph_precision} graph; pass the fp32 "
            "export (the host-side cast and Q/DQ steps are for TensorRT >= 10.12)"
        )
    # EXPLICIT_BATCH is required in 8.x and deprecated (ignored) from 10.0.
    network_flags: tuple[str, ...] = ("EXPLICIT_BATCH",) if version.major < 10 else ()
    calibrator: CalibratorKind | None = None
    if precision == "int8":
        if config.calibration is None:
            raise BuildError(
                f"precision {config.precision} on TensorRT {version} needs an int8 calibration "
                "set: set build_engine.calibration to a calibration manifest, or use precision "
                "fp16"
            )
        calibrator = config.calibrator
        if version.as_tuple() >= _IMPLICIT_INT8_DEPRECATED_FROM:
            warnings.append(
                f"TensorRT {version} deprecates implicit int8 calibration (it still works); "
                "TensorRT >= 10.12 uses Q/DQ nodes instead"
            )
    return network_flags, _WEAK_FLAGS[precision], calibrator


def _strong(
    precision: BuiltPrecision, version: TrtVersion, graph_precision: GraphPrecision
) -> tuple[tuple[str, ...], tuple[str, ...], None]:
    """The strongly typed path: precision must already be in the graph; no builder flags."""
    if precision != graph_precision:
        step = {
            "fp16": "cast the ONNX model to fp16 on the host",
            "int8": "insert int8 Q/DQ nodes on the host (using the calibration set)",
            "fp32": "pass the plain fp32 export",
        }[precision]
        raise BuildError(
            f"precision {precision} on TensorRT {version} must come from the ONNX graph "
            f"(strongly typed), but the graph is {graph_precision}: {step} before build_engine"
        )
    return ("STRONGLY_TYPED",), (), None


def _batch_ranges(
    batch_sizes: Sequence[int], profiles: Sequence[tuple[int, int, int]] | None
) -> list[tuple[int, int, int]]:
    """(min, opt, max) batch per engine: static ones from batch_sizes, or the given profiles."""
    if profiles:
        out = []
        for p in profiles:
            if len(p) != 3:
                raise BuildError(f"a batch profile is (min, opt, max), got {tuple(p)}")
            lo, mid, hi = (int(v) for v in p)
            if not 0 < lo <= mid <= hi:
                raise BuildError(
                    f"batch profile needs 0 < min <= opt <= max, got min {lo}, opt {mid}, max {hi}"
                )
            out.append((lo, mid, hi))
        return out
    if not batch_sizes:
        raise BuildError("build_engine.batch_sizes is empty; give at least one, e.g. [1]")
    bad = [b for b in batch_sizes if int(b) <= 0]
    if bad:
        raise BuildError(f"build_engine.batch_sizes must be positive, got {list(batch_sizes)}")
    seen: list[int] = []
    for b in batch_sizes:
        if int(b) not in seen:
            seen.append(int(b))
    return [(b, b, b) for b in seen]
