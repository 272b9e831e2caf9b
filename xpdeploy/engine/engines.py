"""Build every TensorRT engine a pipeline asks for: the glue between config, cache and builder.

For each ONNX source (the original and the pruned model) and each engine precision
(:func:`~xpdeploy.engine.settings.build_precisions`: ``best`` is fp16 and int8):

1. **host step** on the strongly typed path (TensorRT >= 10.12): fp16 is an ONNX graph cast on
   the host (:func:`~xpdeploy.export.fp16.cast_fp16`), int8 a graph with Q/DQ nodes from
   the calibration set (:func:`~xpdeploy.export.qdq.quantize_qdq`). The weak path
   parses the fp32 file and sets precision with builder flags.
2. one :class:`~xpdeploy.engine.settings.BuildSettings` per batch size or profile;
3. the **engine cache** (when ``engine_cache`` is set) is asked for a plan built under exactly the
   same :class:`~xpdeploy.engine.cache.EngineKey`; otherwise the engine is built
   (:func:`~xpdeploy.engine.builder.build_engine`, with an implicit int8 calibrator fed through
   the CUDA memory layer on the weak path) and stored;
4. the plan, build log and layer information are written under ``out_dir`` and described by a
   :class:`~xpdeploy.artifacts.TrtEngine`.

Torch-free: it runs on the device from a bundle as well as in the host pipeline. TensorRT and the
CUDA binding are handed in (``trt_module``, ``backend``) so the contract tests can drive it with
recording stand-ins; on a real device they are the installed packages.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from xpdeploy.artifacts import EngineSet, OnnxModels, TorchModel, TrtEngine
from xpdeploy.backends.trt_versions import TrtVersion, build_path, import_tensorrt, l4t_release
from xpdeploy.engine.builder import build_engine
from xpdeploy.engine.cache import EngineCache, EngineKey
from xpdeploy.engine.calibrator import CalibrationBatches, make_calibrator
from xpdeploy.engine.settings import BuildSettings, BuiltPrecision, build_precisions, plan_builds
from xpdeploy.errors import BuildError
from xpdeploy.export.fp16 import cast_fp16
from xpdeploy.export.graph import graph_precision
from xpdeploy.export.qdq import quantize_qdq
from xpdeploy.export.tensorrt_ops import op_types, parser_concerns
from xpdeploy.fileio import sha256_file, write_bytes_atomic, write_text_atomic
from xpdeploy.progress import format_duration, log
from xpdeploy.spec import BuildEngineConfig

if TYPE_CHECKING:
    from xpdeploy.data.calibration import CalibrationBatch

#: The engine cache of a run folder when the pipeline names none (relative to the run folder).
RUN_CACHE = "engine_cache"
#: Images the host step's parity check runs (fp16 cast / Q/DQ graph vs the fp32 graph).
HOST_PARITY_IMAGES = 8
#: quantize_qdq's calibration method for each implicit-calibrator kind of the config.
_QDQ_METHOD = {"minmax": "minmax", "entropy2": "entropy"}


@dataclass(frozen=True)
class EngineSource:
    """One ONNX file to build engines from (paths relative to the run folder or bundle root; an
    absolute path is taken as it is)."""

    label: str  # the torch model it came from: "original", "pruned" (names the plan files)
    onnx_file: str
    input_name: str
    #: one sample's input, without the batch axis: (3, 224, 224) pixels, or (197, 192) tokens of
    #: a block of a latency grid
    input_chw: tuple[int, ...]
    attention_blocks: int | None = None  # transformer depth, for the fused-attention check


@dataclass(frozen=True)
class DeviceInfo:
    """The GPU engines are built for: part of every engine cache key."""

    name: str
    compute_capability: str
    l4t_release: str | None
    cuda_binding: str

    @classmethod
    def of(cls, backend: Any, nv_tegra_release: str | Path = "/etc/nv_tegra_release"
           ) -> DeviceInfo:
        name, cc = backend.device_identity()
        return cls(name, cc, l4t_release(nv_tegra_release), str(getattr(backend, "name", "?")))

    def as_dict(self) -> dict[str, str | None]:
        return {"name": self.name, "compute_capability": self.compute_capability,
                "l4t_release": self.l4t_release, "cuda_binding": self.cuda_binding}

    @property
    def slug(self) -> str:
        """File-name-safe "nvidia-h100-80gb-hbm3-sm90"."""
        name = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "gpu"
        return f"{name}-sm{self.compute_capability.replace('.', '')}"


def build_engines(
    sources: Sequence[EngineSource],
    cfg: BuildEngineConfig,
    root: Path,
    out_dir: Path,
    *,
    backend: Any,
    calibration: CalibrationBatch | None = None,
    trt_module: ModuleType | None = None,
    nv_tegra_release: str | Path = "/etc/nv_tegra_release",
    say: Callable[[str], None] = log,
) -> EngineSet:
    """Build (or take from the cache) every engine of ``cfg`` for ``sources``; see the module doc.

    ``root``: the folder ONNX paths are relative to; ``out_dir`` (inside ``root``) receives
    ``engines/``, ``logs/``, ``graphs/`` and ``calibration/``. ``backend``: an open
    :class:`~xpdeploy.backends.cuda_memory.CudaBackend` (device identity, calibration buffers).
    Raises one-line :class:`BuildError` messages.
    """
    trt = trt_module if trt_module is not None else import_tensorrt("build_engine")
    version = TrtVersion.parse(str(trt.__version__))
    path = build_path(version)
    device = DeviceInfo.of(backend, nv_tegra_release)
    precisions = build_precisions(cfg.precision)
    if "int8" in precisions and calibration is None:
        raise BuildError(
            f"precision {cfg.precision} builds an int8 engine, which needs calibration images: "
            "set build_engine.calibration to a manifest (xpdeploy calib make)"
        )
    # Without a configured cache, plans are still kept under the run folder, so a build that was
    # interrupted (or a device run started again) does not rebuild what it already finished.
    cache = EngineCache(cfg.engine_cache or root / RUN_CACHE)
    timing_cache = cfg.timing_cache or out_dir / f"timing-{device.slug}-trt{version}.cache"
    l4t = f", L4T {device.l4t_release}" if device.l4t_release else ""
    say(f"  TensorRT {trt.__version__} ({path}ly typed path) on {device.name} "
        f"(sm {device.compute_capability}{l4t}), CUDA through {device.cuda_binding}; "
        f"{len(sources)} models x {'/'.join(precisions)}")
    for source in sources:  # before any build: a graph this parser cannot read fails in one line
        graph = root / source.onnx_file
        concerns = parser_concerns(op_types(graph), version.as_tuple()) if graph.is_file() else []
        if concerns:
            raise BuildError(f"TensorRT {version} cannot parse {source.onnx_file}: "
                             f"{'; '.join(concerns)}")
    engines: list[TrtEngine] = []
    for source in sources:
        for precision in precisions:
            graph_file, host_step = _host_graph(
                source, precision, path, cfg, root, out_dir, calibration)
            planned = plan_builds(
                cfg, version, source.input_name, source.input_chw, precision=precision,
                graph_precision=graph_precision(root / graph_file),
                profiles=cfg.profiles, layernorm_fp32=cfg.layernorm_override())
            for settings in planned:
                engines.append(_one_engine(
                    trt, source, settings, graph_file, host_step, root, out_dir, device, cache,
                    Path(timing_cache), calibration, cfg, backend, say))
    return EngineSet(deferred=False, reason="built here", tensorrt=str(trt.__version__),
                     precision=cfg.precision, device=device.as_dict(), engines=engines)


def _host_graph(
    source: EngineSource,
    precision: BuiltPrecision,
    path: str,
    cfg: BuildEngineConfig,
    root: Path,
    out_dir: Path,
    calibration: CalibrationBatch | None,
) -> tuple[str, dict[str, Any] | None]:
    """The ONNX file TensorRT parses for ``precision`` and what the host step did (or None)."""
    if path == "weak" or precision == "fp32":
        return source.onnx_file, None
    src = root / source.onnx_file
    dst = out_dir / "graphs" / f"{source.label}.{precision}.onnx"
    parity = calibration.pixels[:HOST_PARITY_IMAGES] if calibration is not None else None
    if precision == "fp16":
        report = cast_fp16(src, dst, parity_pixels=parity).as_dict()
    else:
        assert calibration is not None  # checked by build_engines
        report = quantize_qdq(
            src, dst, calibration.pixels, method=_QDQ_METHOD[cfg.calibrator],  # type: ignore[arg-type]
            parity_pixels=parity).as_dict()
    return dst.relative_to(root).as_posix(), report


def _key_precision(settings: BuildSettings) -> str:
    """The key's precision field, with every build choice that changes the plan for it.

    "fp16", "fp16/layernorm-fp32", "int8/minmax": an engine built with LayerNorm pinned, or
    calibrated with another calibrator, is a different engine.
    """
    parts = [settings.precision]
    if settings.layernorm_fp32:
        parts.append("layernorm-fp32")
    if settings.calibrator:
        parts.append(settings.calibrator)
    return "/".join(parts)


def _one_engine(
    trt: ModuleType,
    source: EngineSource,
    settings: BuildSettings,
    graph_file: str,
    host_step: dict[str, Any] | None,
    root: Path,
    out_dir: Path,
    device: DeviceInfo,
    cache: EngineCache,
    timing_cache: Path,
    calibration: CalibrationBatch | None,
    cfg: BuildEngineConfig,
    backend: Any,
    say: Callable[[str], None],
) -> TrtEngine:
    name = f"{source.label}.{settings.label}"
    graph = root / graph_file
    int8 = settings.precision == "int8"
    key = EngineKey(
        onnx_sha256=sha256_file(graph), trt_version=str(trt.__version__),
        device_name=device.name, compute_capability=device.compute_capability,
        l4t_release=device.l4t_release, precision=_key_precision(settings),
        profiles=(settings.profile.as_tuple(),),
        calibration_sha256=(calibration.manifest_sha256
                            if int8 and calibration is not None else None),
    )
    plan_path = out_dir / "engines" / f"{name}.plan"
    log_path = out_dir / "logs" / f"{name}.log"
    layers_path = out_dir / "logs" / f"{name}.layers.json"
    p = settings.profile
    common = dict(
        name=name, source=source.label, onnx_file=source.onnx_file, graph_file=graph_file,
        precision=settings.precision, label=settings.label, build_path=settings.path,
        file=plan_path.relative_to(root).as_posix(), batch_min=p.min[0], batch_opt=p.opt[0],
        batch_max=p.max[0], host_step=host_step,
    )
    found = cache.find(key)
    if found is not None:
        cached, meta = found
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached, plan_path)
        say(f"  {name}: reused from the engine cache {cached.parent}")
        return TrtEngine(**common, cache_hit=True, build_s=0.0,
                         fused_attention_kernels=meta.get("fused_attention_kernels"),
                         attention_blocks=meta.get("attention_blocks"),
                         layernorm_layers_pinned=int(meta.get("layernorm_layers_pinned", 0)),
                         warnings=list(meta.get("warnings", [])))
    calibrator = None
    if settings.calibrator is not None:
        assert calibration is not None  # checked by build_engines
        # At the engine's opt batch: TensorRT reads every calibration batch at the calibration
        # profile's opt shape, the engine's (the spec refuses a calibration_batch_size that
        # differs from it).
        batches = CalibrationBatches(calibration.pixels, settings.batch)
        cal_cache = (out_dir / "calibration" /
                     f"{source.label}.{settings.calibrator}.{key.onnx_sha256[:12]}."
                     f"{calibration.manifest_sha256[:12]}.b{batches.batch_size}.cache")
        cal_cache.parent.mkdir(parents=True, exist_ok=True)
        calibrator = make_calibrator(settings.calibrator, batches, cal_cache, backend.alloc,
                                     trt_module=trt)
        say(f"  {name}: int8 calibration with {batches.count} batches of {batches.batch_size} "
            f"({settings.calibrator}; {batches.dropped} images dropped)")
    say(f"  {name}: building ({settings.path}ly typed, flags "
        f"{', '.join(settings.builder_flags) or 'none'}) ...")
    t0 = time.monotonic()
    result = build_engine(
        graph, settings, timing_cache_path=timing_cache, log_path=log_path,
        calibrator=calibrator, attention_blocks=source.attention_blocks, trt_module=trt)
    build_s = time.monotonic() - t0
    write_bytes_atomic(plan_path, result.plan)
    write_text_atomic(layers_path, result.layer_info_json)
    for w in result.warnings:
        say(f"  warning: {name}: {w}")
    say(f"  {name}: built in {format_duration(build_s)}, {len(result.plan) / 2**20:.1f} MiB, "
        f"{result.fused_attention_kernels} fused attention kernels"
        + (f" for {result.attention_blocks} blocks" if result.attention_blocks else ""))
    metadata = {"fused_attention_kernels": result.fused_attention_kernels,
                "attention_blocks": result.attention_blocks,
                "layernorm_layers_pinned": result.layernorm_layers_pinned,
                "warnings": result.warnings, "build_s": build_s}
    cache.store(key, result.plan, metadata)
    return TrtEngine(**common, cache_hit=False, build_s=build_s,
                     fused_attention_kernels=result.fused_attention_kernels,
                     attention_blocks=result.attention_blocks,
                     layernorm_layers_pinned=result.layernorm_layers_pinned,
                     log_file=log_path.relative_to(root).as_posix(),
                     layers_file=layers_path.relative_to(root).as_posix(),
                     warnings=result.warnings)


def engine_sources(onnx: OnnxModels, models: Mapping[str, TorchModel]) -> list[EngineSource]:
    """What to build from: every file of one ONNX stage's output, the original first."""
    out = []
    for label, m in sorted(onnx.models.items(), key=lambda kv: kv[0] != "original"):
        source = models[label]
        out.append(EngineSource(label, m.file, m.input_name,
                                tuple(source.data_config.input_size),
                                len(source.arch.blocks) or None))
    return out
