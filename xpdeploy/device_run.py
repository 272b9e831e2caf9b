"""``xpdeploy run BUNDLE.tar --stages verify,report``: continue a pipeline on the device.

The host writes a bundle (:mod:`xpdeploy.bundle`), a partial run folder: ONNX files, the fixed
verification set, the torch reference logits, calibration batches, and the outputs of every host
stage. Here, without torch, the bundle is extracted into the run folder (digests checked) and the
asked-for stages run through the host's executor and stage functions
(:func:`xpdeploy.pipeline.run_pipeline` with a :class:`~xpdeploy.pipeline.Continuation`): the same
manifests, reuse of finished stages, and resume after an interruption; ``build_engine`` builds the
TensorRT engines from the bundle's ONNX files (int8: from its calibration batches), ``verify``
checks every ONNX file and engine against the reference logits, ``report`` writes the report.
"""

from __future__ import annotations

from pathlib import Path

from xpdeploy.bundle import CALIBRATION_NPZ, DEVICE_STAGES, RESOLVED_PIPELINE, open_bundle
from xpdeploy.errors import ConfigError, MissingDependencyError
from xpdeploy.pipeline import Continuation, PipelineResult, run_pipeline
from xpdeploy.progress import log
from xpdeploy.spec import STAGE_ORDER, BuildEngineConfig, load_spec

#: File name endings ``run`` treats as a bundle instead of a pipeline file.
BUNDLE_SUFFIXES: tuple[str, ...] = (".tar", ".tar.gz", ".tgz")


def is_bundle(path: Path) -> bool:
    return path.name.endswith(BUNDLE_SUFFIXES)


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
    from xpdeploy.backends.trt_versions import TRT_INSTALL_HINT, detect

    if detect() is None:
        raise MissingDependencyError(
            f"build_engine needs TensorRT, which is not installed here; {TRT_INSTALL_HINT}; or "
            "continue without engines: --stages verify,report"
        )


def run_bundle(tar: Path, run_dir: Path | None, stages: list[str], *,
               overrides: tuple[str, ...] = (), force: bool = False) -> PipelineResult:
    """Extract ``tar`` into ``run_dir`` and run ``stages`` there; see the module doc.

    ``overrides``: ``--set`` for the bundle's pipeline (e.g. ``verify.iters=50``); ``force``
    reruns the stages even if they finished with the same inputs.
    """
    if "build_engine" in stages:
        _require_tensorrt()
    root = run_dir or Path("runs") / f"{tar.name.split('.')[0]}-device"
    manifest = open_bundle(tar, root)
    log(f"[bundle] {tar}: {len(manifest.members)} files, digests checked, pipeline "
        f"'{manifest.pipeline}'")
    spec = load_spec(root / RESOLVED_PIPELINE, overrides)
    # The device runs the asked-for stages even where the host's pipeline stopped before them.
    spec.stages = [s for s in STAGE_ORDER if s in spec.stage_list() or s in stages]
    if "build_engine" in stages:
        cfg = spec.build_engine or BuildEngineConfig()
        if manifest.calibration is not None:  # the images stay on the host: their batches travel
            cfg = cfg.model_copy(update={"calibration": (root / CALIBRATION_NPZ).resolve()})
        spec.build_engine = cfg
    continuation = Continuation(stages=tuple(stages), outputs=manifest.recorded(),
                                reference=manifest.reference, origin=manifest.origin())
    return run_pipeline(spec, root, force=force, continuation=continuation)
