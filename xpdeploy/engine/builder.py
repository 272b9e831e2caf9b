"""ONNX -> serialized TensorRT plan, for one :class:`~xpdeploy.engine.settings.BuildSettings`.

``tensorrt`` is imported only when :func:`build_engine` runs (or handed in as ``trt_module``, which
is how the contract tests drive these calls without TensorRT). Call order:

1. logger (collects the build log), builder, network with the path's creation flags, ONNX parser;
2. check the parsed input against the requested profile; pin LayerNorm layers to fp32 if asked;
3. builder config: workspace pool limit, precision flags, DETAILED profiling verbosity (so the
   engine inspector reports layer types and tactics), int8 calibrator, optimisation profile;
4. timing cache loaded from ``timing_cache_path`` (empty if absent), build, timing cache saved;
5. layer information as JSON from the engine inspector; fused attention kernels counted.

Fused attention heuristic (:func:`is_fused_attention_layer`): a layer counts when its name, type
or tactic mentions "mha"/"fmha"/"flash" (TensorRT's fused multi-head-attention kernels, e.g.
``_gemm_mha_v2``, ``fmha_v2``), or when it is a Myelin ``ForeignNode`` whose name mentions
"attn"/"attention" (Myelin fuses a block's attention into one foreign node named after its first
and last ONNX nodes). It is a heuristic: a mismatch with the caller's number of attention blocks
is a warning, never an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from xpdeploy.backends.trt_versions import import_tensorrt
from xpdeploy.engine.settings import BuildSettings
from xpdeploy.errors import BuildError
from xpdeploy.fileio import write_bytes_atomic, write_text_atomic

_NORM_SEGMENT = re.compile(r"(?:fc_|pre_|post_)?norm\d*|ln(?:_?\d+|_\w+)?|layer_?norm\w*", re.I)
_FUSED_ATTENTION = re.compile(r"f?mha|flash", re.I)
_ATTENTION_NAME = re.compile(r"attn|attention", re.I)
_SEVERITY_TAGS = {"INTERNAL_ERROR": "F", "ERROR": "E", "WARNING": "W", "INFO": "I", "VERBOSE": "V"}
#: Parser errors named in a BuildError message (the full list is in the build log).
_MAX_PARSER_ERRORS = 5


@dataclass
class BuildResult:
    """What one build produced. ``layer_info_json`` is the engine inspector's JSON text."""

    plan: bytes
    log_lines: list[str]
    layer_info_json: str
    fused_attention_kernels: int
    attention_blocks: int | None
    layernorm_layers_pinned: int
    warnings: list[str] = field(default_factory=list)


def build_engine(
    onnx_path: str | Path,
    settings: BuildSettings,
    *,
    timing_cache_path: str | Path,
    log_path: str | Path,
    calibrator: Any | None = None,
    attention_blocks: int | None = None,
    trt_module: ModuleType | None = None,
    is_fused_attention: Callable[[Any], bool] | None = None,
) -> BuildResult:
    """Build one engine; raises a one-line :class:`BuildError` on failure.

    ``calibrator`` is required when ``settings.calibrator`` is set (see
    :func:`~xpdeploy.engine.calibrator.make_calibrator`). ``attention_blocks`` (the model's depth)
    enables the fused-attention check. The build log is written to ``log_path`` whether the build
    succeeds or not; the timing cache is updated only after a successful build.
    """
    trt = trt_module if trt_module is not None else import_tensorrt("build_engine")
    if settings.calibrator is not None and calibrator is None:
        raise BuildError(
            f"precision {settings.precision} needs a {settings.calibrator} calibrator; "
            "build one with xpdeploy.engine.calibrator.make_calibrator"
        )
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise BuildError(f"ONNX model {onnx_path} does not exist; run export_onnx first")
    log_lines: list[str] = []
    warnings = list(settings.warnings)
    try:
        return _build(
            trt, onnx_path, settings, Path(timing_cache_path), calibrator, attention_blocks,
            is_fused_attention or is_fused_attention_layer, log_lines, warnings,
        )
    finally:
        write_text_atomic(log_path, "".join(line + "\n" for line in log_lines))


def _build(
    trt: ModuleType,
    onnx_path: Path,
    settings: BuildSettings,
    timing_cache_path: Path,
    calibrator: Any | None,
    attention_blocks: int | None,
    is_fused: Callable[[Any], bool],
    log_lines: list[str],
    warnings: list[str],
) -> BuildResult:
    logger = make_logger(trt, log_lines)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, settings.network_flags))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so weights stored next to the model are found.
    if not parser.parse_from_file(str(onnx_path)):
        raise BuildError(_parser_message(parser, onnx_path, settings))
    dynamic = _check_input(network, settings)

    pinned = _pin_layernorm(trt, network) if settings.layernorm_fp32 else 0
    if settings.layernorm_fp32 and pinned == 0:
        warnings.append("layernorm_fp32 is on but no LayerNorm layer was recognised by name/type")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    for name in settings.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile = None
    if dynamic:
        p = settings.profile
        profile = builder.create_optimization_profile()
        profile.set_shape(p.input_name, p.min, p.opt, p.max)
        config.add_optimization_profile(profile)
    if settings.calibrator is not None:
        config.int8_calibrator = calibrator
        if profile is not None:
            config.set_calibration_profile(profile)  # calibrate at the profile's opt shape

    _load_timing_cache(config, timing_cache_path, warnings)
    host_mem = builder.build_serialized_network(network, config)
    if host_mem is None:
        raise BuildError(_build_failure_message(log_lines, settings))
    plan = bytes(host_mem)
    _save_timing_cache(config, timing_cache_path, warnings)

    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise BuildError(_build_failure_message(log_lines, settings, what="deserialise"))
    inspector = engine.create_engine_inspector()
    layer_info = str(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    fused = count_fused_attention(layer_info, is_fused)
    if attention_blocks is not None and fused != attention_blocks:
        warnings.append(
            f"{fused} fused attention kernels found for {attention_blocks} attention blocks "
            f"(TensorRT {settings.version}, {settings.label}); attention may run unfused and "
            "slower, see the layer information"
        )
    return BuildResult(
        plan=plan,
        log_lines=log_lines,
        layer_info_json=layer_info,
        fused_attention_kernels=fused,
        attention_blocks=attention_blocks,
        layernorm_layers_pinned=pinned,
        warnings=warnings,
    )


def make_logger(trt: ModuleType, lines: list[str]) -> Any:
    """A ``trt.ILogger`` appending "[W] message" lines to ``lines`` (tag from the severity)."""

    class _ListLogger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)  # pybind11 bases must be initialised explicitly

        def log(self, severity: Any, msg: str) -> None:
            name = getattr(severity, "name", str(severity)).rsplit(".", 1)[-1]
            lines.append(f"[{_SEVERITY_TAGS.get(name, '?')}] {msg}")

    return _ListLogger()


def _network_flags(trt: ModuleType, names: tuple[str, ...]) -> int:
    """Bit mask of NetworkDefinitionCreationFlag members.

    Strict: :func:`~xpdeploy.engine.settings.plan_builds` asks only for members the version has
    (EXPLICIT_BATCH below 10.0, STRONGLY_TYPED on the strong path), so a missing one is our bug
    and raises AttributeError rather than being skipped. Bit positions come from the version's
    enum: STRONGLY_TYPED is bit 1 on 10.x and bit 0 (deprecated, ignored) on 11.x.
    """
    mask = 0
    for name in names:
        mask |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    return mask


def _parser_message(parser: Any, onnx_path: Path, settings: BuildSettings) -> str:
    errors = []
    for i in range(int(parser.num_errors)):
        err = parser.get_error(i)
        desc = " ".join(str(err.desc()).split())  # one line, whatever the parser wrote
        errors.append(f"node {err.node()}: {desc}")
    shown = "; ".join(errors[:_MAX_PARSER_ERRORS]) or "no error reported"
    more = f" (+{len(errors) - _MAX_PARSER_ERRORS} more in the build log)" if (
        len(errors) > _MAX_PARSER_ERRORS) else ""
    return (
        f"TensorRT {settings.version} could not parse {onnx_path}: {shown}{more}; run the simplify "
        "stage or export with another opset"
    )


def _check_input(network: Any, settings: BuildSettings) -> bool:
    """Whether the parsed input needs an optimisation profile (it has a dynamic dimension).

    Raises BuildError when the input is missing, of another rank, or static with a shape other
    than the one requested (re-export with a dynamic batch axis to build other batch sizes).
    """
    p = settings.profile
    inputs = {}
    for i in range(int(network.num_inputs)):
        tensor = network.get_input(i)
        inputs[str(tensor.name)] = tuple(int(d) for d in tensor.shape)
    if p.input_name not in inputs:
        raise BuildError(
            f"the ONNX model has no input '{p.input_name}' (inputs: {sorted(inputs)}); fix the "
            "input name passed to build_engine"
        )
    shape = inputs[p.input_name]
    if len(shape) != len(p.opt):
        raise BuildError(
            f"input '{p.input_name}' has rank {len(shape)} {shape} but the profile has rank "
            f"{len(p.opt)} {p.opt}"
        )
    dynamic = any(d < 0 for d in shape)
    for d, lo, hi in zip(shape, p.min, p.max, strict=True):
        if d >= 0 and not lo == d == hi:
            raise BuildError(
                f"input '{p.input_name}' is fixed at {shape} in the ONNX model but "
                f"{settings.label} asks for {p.min}..{p.max}; export with a dynamic batch axis"
            )
    return dynamic


def _is_norm_layer(trt: ModuleType, layer: Any) -> bool:
    normalization = getattr(getattr(trt, "LayerType", None), "NORMALIZATION", None)
    if normalization is not None and layer.type == normalization:
        return True
    return any(_NORM_SEGMENT.fullmatch(seg) for seg in str(layer.name).split("/"))


def _pin_layernorm(trt: ModuleType, network: Any) -> int:
    """Run LayerNorm layers and their float outputs in fp32; returns how many layers were pinned.

    Recognised by type (NORMALIZATION, TensorRT >= 8.6) or by an ONNX node path segment such as
    ``norm1``, ``fc_norm``, ``ln_2`` or ``layernorm`` (torch exports name nodes
    "/blocks.0/norm1/ReduceMean"). Constant layers and non-float outputs (shape tensors) are left
    alone: forcing a type on them breaks the build.
    """
    floats = {trt.float32, trt.float16}
    constant = getattr(getattr(trt, "LayerType", None), "CONSTANT", None)
    pinned = 0
    for i in range(int(network.num_layers)):
        layer = network.get_layer(i)
        if (constant is not None and layer.type == constant) or not _is_norm_layer(trt, layer):
            continue
        outputs = [j for j in range(int(layer.num_outputs)) if layer.get_output(j).dtype in floats]
        if not outputs:
            continue
        layer.precision = trt.float32
        for j in outputs:
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def _load_timing_cache(config: Any, path: Path, warnings: list[str]) -> None:
    """Attach the timing cache at ``path`` to ``config``, or a fresh one with a warning.

    A fresh (empty) cache when the file is absent, unreadable, corrupt (TensorRT's
    ``create_timing_cache`` returns None or raises on a blob it cannot read: a truncated copy, a
    plan or calibration file given by mistake) or refused (``ignore_mismatch=False``: a cache
    written on another GPU or TensorRT version is refused rather than trusted). Never fatal: the
    cache only saves build time, and the build rewrites it.
    """
    try:
        data = path.read_bytes() if path.is_file() else b""
    except OSError as exc:
        warnings.append(f"timing cache {path} could not be read ({exc.strerror or exc}); "
                        "starting a fresh one")
        data = b""
    if data:
        try:
            cache = config.create_timing_cache(data)
            accepted = cache is not None and bool(config.set_timing_cache(cache, False))
        except (RuntimeError, TypeError, ValueError):
            accepted = False
        if accepted:
            return
        warnings.append(
            f"timing cache {path} is corrupt or was written by another GPU or TensorRT; starting "
            "a fresh one (saved over it after the build)"
        )
    config.set_timing_cache(config.create_timing_cache(b""), False)


def _save_timing_cache(config: Any, path: Path, warnings: list[str]) -> None:
    """Write the build's timing cache to ``path``; a failure is a warning (the engine is built)."""
    try:
        write_bytes_atomic(path, bytes(config.get_timing_cache().serialize()))
    except OSError as exc:
        warnings.append(f"timing cache {path} could not be saved ({exc.strerror or exc}); the "
                        "next build times its tactics again")


def _build_failure_message(
    log_lines: list[str], settings: BuildSettings, what: str = "build"
) -> str:
    errors = [line[4:] for line in log_lines if line.startswith(("[E]", "[F]"))]
    last = " ".join(errors[-1].split()) if errors else "no error in the log"
    return (
        f"TensorRT {settings.version} could not {what} the {settings.label} engine: {last}; see "
        "the build log (raise workspace_mb if tactics were skipped for memory)"
    )


def count_fused_attention(layer_info_json: str, is_fused: Callable[[Any], bool]) -> int:
    """Number of inspector layers that ``is_fused`` accepts (0 when the JSON is not readable)."""
    try:
        info = json.loads(layer_info_json)
    except ValueError:
        return 0
    layers = info.get("Layers", []) if isinstance(info, dict) else []
    return sum(1 for layer in layers if is_fused(layer))


def is_fused_attention_layer(layer: Any) -> bool:
    """The default fused-attention heuristic (see the module docstring).

    ``layer`` is one entry of the inspector's "Layers": a dict with DETAILED verbosity (Name,
    LayerType, TacticName, ...), a plain name string otherwise.
    """
    if isinstance(layer, dict):
        name = str(layer.get("Name", ""))
        text = " ".join(str(layer.get(k, "")) for k in ("Name", "LayerType", "TacticName"))
    else:
        name = text = str(layer)
    if _FUSED_ATTENTION.search(text):
        return True
    return "foreignnode" in name.lower() and bool(_ATTENTION_NAME.search(name))

