"""``build_engine``: TensorRT engines from the ONNX files, or a clear hand-off to the device.

TensorRT engines are specific to a GPU and a TensorRT version, so they are built on the target.
With TensorRT and a CUDA binding installed, this stage builds them here
(:func:`xpdeploy.engine.engines.build_engines`: from the simplified ONNX files when the pipeline
simplifies, else the exported ones; the original's and the pruned model's, so ``verify`` can time
one against the other on TensorRT). On a machine without TensorRT (the team's CI, a laptop) the
stage defers: the run finishes what it can (onnxruntime verification, the report) and ends with a
device bundle plus the exact command that continues on the device
(``pipeline.write_device_bundle``), unless ``build_engine.required: true`` makes the missing
TensorRT an error.
"""

from __future__ import annotations

from xpdeploy.artifacts import Artifact, EngineSet, OnnxModels, TorchModel
from xpdeploy.backends.trt_versions import TRT_INSTALL_HINT, detect
from xpdeploy.errors import MissingDependencyError
from xpdeploy.progress import log
from xpdeploy.spec import BuildEngineConfig
from xpdeploy.stages.context import StageContext
from xpdeploy.stages.fingerprint import StageSettings


class Settings(StageSettings):
    build_engine: BuildEngineConfig | None


def run(
    ctx: StageContext[Settings],
    model: TorchModel,
    onnx: OnnxModels | None = None,
    simplified: OnnxModels | None = None,
    pruned: TorchModel | None = None,
) -> dict[str, Artifact]:
    """``onnx``: the exported files (None on a device whose bundle left them out: it builds from
    ``simplified``)."""
    cfg = ctx.settings.build_engine
    assert cfg is not None  # PipelineSpec.check_runnable
    deployable = simplified or onnx
    assert deployable is not None  # the pipeline exports before it builds engines
    version = detect()
    if version is None:
        if cfg.required:
            raise MissingDependencyError(
                f"build_engine.required is true but TensorRT is not installed; {TRT_INSTALL_HINT}"
                ", or set build_engine.required: false to continue on the device from a bundle"
            )
        reason = "TensorRT is not installed here"
        log(f"  {reason}: the {cfg.precision} engines of {len(deployable.models)} ONNX files "
            f"({', '.join(m.file.rsplit('/', 1)[-1] for m in deployable.models.values())}) are "
            "deferred to the device; the run ends with a device bundle")
        return {"engines": EngineSet(deferred=True, reason=reason, precision=cfg.precision)}

    from xpdeploy.backends.cuda_memory import load_backend
    from xpdeploy.engine.engines import build_engines, engine_sources

    models = {m.label: m for m in (model, pruned) if m is not None}
    sources = engine_sources(deployable, models)
    calibration = None
    if cfg.calibration is not None:
        from xpdeploy.data.calibration import load_for_engine

        calibration = load_for_engine(cfg.calibration, model.data_config)
    with load_backend() as backend:
        engines = build_engines(sources, cfg, ctx.run_dir, ctx.stage_dir, backend=backend,
                                calibration=calibration)
    return {"engines": engines}
