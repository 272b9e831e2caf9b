"""``xpdeploy run BUNDLE.tar --stages verify,report``: continue a pipeline on the device.

The host writes a bundle (``xpdeploy bundle``): ONNX files, the fixed verification set, the torch
reference logits, calibration batches. On the device, without torch, this module extracts it
(digests checked), builds the TensorRT engines when ``build_engine`` is asked for
(:func:`xpdeploy.engine.engines.build_engines`, from the simplified ONNX files when the bundle has
them, with the bundle's calibration batches for int8), verifies every ONNX file in onnxruntime and
every engine in TensorRT against the reference logits, and writes the report, so a device run ends
like a host run: ``parity.json``, ``report.json``, ``report.md``, plus ``engines.json`` and the
plans, build logs and layer information under ``08_build_engine/``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xpdeploy.artifacts import EngineSet
from xpdeploy.bundle import CALIBRATION_NPZ, BundleManifest, open_bundle
from xpdeploy.errors import ConfigError, MissingDependencyError, ParityError
from xpdeploy.fileio import write_json_atomic
from xpdeploy.progress import format_duration, log

#: Stages a bundle can continue with, in order.
DEVICE_STAGES: tuple[str, ...] = ("build_engine", "verify", "report")
#: Where a device run writes engines, relative to its run folder (numbered as on the host).
ENGINE_DIR = "08_build_engine"
ENGINES_JSON = "engines.json"
#: File name endings ``run`` treats as a bundle instead of a pipeline file.
BUNDLE_SUFFIXES: tuple[str, ...] = (".tar", ".tar.gz", ".tgz")


def is_bundle(path: Path) -> bool:
    return path.name.endswith(BUNDLE_SUFFIXES)


@dataclass
class DeviceResult:
    """How a device run ended (``passed`` is False only when a gate failed)."""

    pipeline: str
    run_dir: Path
    passed: bool
    duration_s: float
    ran: list[str] = field(default_factory=list)
    report_md: Path | None = None


def parse_stages(text: str | None) -> list[str]:
    """``"verify,report"`` -> ["verify", "report"] in pipeline order; unknown names are errors."""
    if not text:
        return ["verify", "report"]
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in DEVICE_STAGES]
    if unknown or not stages:
        raise ConfigError(
            f"--stages {text!r}: a bundle continues with {', '.join(DEVICE_STAGES)} only "
            f"(unknown: {', '.join(unknown) or 'none given'})"
        )
    if "report" in stages and "verify" not in stages:
        raise ConfigError("--stages: 'report' needs 'verify'; use --stages verify,report")
    return sorted(set(stages), key=DEVICE_STAGES.index)


def _require_tensorrt() -> None:
    """Fail before extracting anything when build_engine cannot run here."""
    from xpdeploy.engine.versions import TRT_INSTALL_HINT, detect

    if detect() is None:
        raise MissingDependencyError(
            f"build_engine needs TensorRT, which is not installed here; {TRT_INSTALL_HINT}; or "
            "continue without engines: --stages verify,report"
        )


def run_bundle(tar: Path, run_dir: Path | None, stages: list[str]) -> DeviceResult:
    """Extract ``tar`` into ``run_dir/bundle`` and run ``stages`` on it; see the module doc."""
    t0 = time.monotonic()
    if "build_engine" in stages:
        _require_tensorrt()
    name = tar.name.split(".")[0]
    root = run_dir or Path("runs") / f"{name}-device"
    manifest = open_bundle(tar, root / "bundle")
    log(f"[bundle] {tar}: {len(manifest.members)} files, digests checked, pipeline "
        f"'{manifest.pipeline}'")
    result = DeviceResult(manifest.pipeline, root, passed=True, duration_s=0.0)
    with contextlib.ExitStack() as stack:
        engines = backend = None
        if "build_engine" in stages:
            from xpdeploy.engine.cuda_memory import load_backend

            backend = stack.enter_context(load_backend())
            engines = _build_engines(manifest, root, backend)
            result.ran.append("build_engine")
        parity = _verify(manifest, root, engines, backend)
    result.ran.append("verify")
    if "report" in stages:
        result.report_md = _report(manifest, parity, root, engines)
        result.ran.append("report")
    result.duration_s = time.monotonic() - t0
    if not parity.passed:
        failed = [c.name for c in parity.candidates if not c.passed]
        raise ParityError(f"{len(failed)} of {len(parity.candidates)} candidates failed their "
                          f"gates on the device ({', '.join(failed)}); see "
                          f"{result.report_md or root / parity.file}")
    return result


def _build_engines(manifest: BundleManifest, root: Path, backend: Any) -> EngineSet:
    """TensorRT engines of the bundle's models, written under ``root/08_build_engine``."""
    from xpdeploy.engine.engines import CalibrationSamples, build_engines, engine_sources
    from xpdeploy.fileio import write_json_atomic
    from xpdeploy.spec import BuildEngineConfig, load_spec

    spec = load_spec(manifest.path("pipeline.yaml"))
    cfg = spec.build_engine or BuildEngineConfig()
    group = manifest.onnx.get("simplify") or manifest.onnx["export_onnx"]
    bundle_rel = manifest.path("").resolve().relative_to(root.resolve()).as_posix()  # "bundle"
    sources = engine_sources(group, manifest.models, prefix=f"{bundle_rel}/")
    calibration = None
    if manifest.calibration is not None:
        from xpdeploy.data.calibration import load_npz

        batch = load_npz(manifest.path(CALIBRATION_NPZ))
        calibration = CalibrationSamples(batch.pixels, batch.manifest_sha256)
    log(f"[build_engine] running ({cfg.precision}, {len(sources)} models, on the device)")
    t0 = time.monotonic()
    engines = build_engines(sources, cfg, root, root / ENGINE_DIR, backend=backend,
                            calibration=calibration)
    write_json_atomic(root / ENGINES_JSON, engines.model_dump(mode="json"))
    built = sum(not e.cache_hit for e in engines.engines)
    log(f"[build_engine] done in {format_duration(time.monotonic() - t0)}: "
        f"{len(engines.engines)} engines ({built} built, {len(engines.engines) - built} from the "
        f"engine cache); {root / ENGINES_JSON}")
    return engines


def _verify(manifest: BundleManifest, root: Path, engines: EngineSet | None, backend: Any):
    from xpdeploy.verify.device import verify_bundle

    runners = "onnxruntime" + (" and TensorRT" if engines else "")
    log(f"[verify] running ({runners} on the device, against the bundle's torch logits)")
    t0 = time.monotonic()
    parity = verify_bundle(manifest, engines=engines, engines_root=root,
                           backend=backend)  # logs one line per candidate
    write_json_atomic(root / parity.file, parity.model_dump(mode="json", exclude={"file"}))
    log(f"[verify] done in {format_duration(time.monotonic() - t0)}")
    return parity


def _report(manifest: BundleManifest, parity, root: Path, engines: EngineSet | None) -> Path:
    from xpdeploy.report.environment import capture
    from xpdeploy.report.markdown import write_markdown
    from xpdeploy.report.schema import build_report, write_report_json
    from xpdeploy.spec import load_spec

    spec = load_spec(manifest.path("pipeline.yaml"))
    original = manifest.models["original"]
    report = build_report(
        parity, pipeline=manifest.pipeline, run_dir=str(root),
        status="passed" if parity.passed else "failed",
        title=(spec.report.title or f"xpdeploy report: {manifest.pipeline}") + " (device)",
        environment=capture(),
        original_extra={"epochs_trained": original.epochs_trained,
                        "top1_samples": original.top1_samples, "val_top1": original.top1,
                        "bundle": {"source_run": manifest.source_run,
                                   "created": manifest.created}},
        engines=engines,
    )
    write_report_json(root / "report.json", report)
    write_markdown(root / "report.md", report)
    if spec.report.plots:
        try:  # matplotlib is not in the device image: the table in report.md says it all
            from xpdeploy.report.plots import plot_latency

            plot_latency(report, root / "latency.png")
        except ImportError:
            log("  (no latency.png: matplotlib is not installed on this device)")
    log(f"[report] {root / 'report.md'}")
    return root / "report.md"
