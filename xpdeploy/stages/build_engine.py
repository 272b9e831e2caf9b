"""``build_engine``: TensorRT engines from the ONNX files, or a clear hand-off to the device.

TensorRT engines are specific to a GPU and a TensorRT version, so they are built on the target. On
a machine without TensorRT (the team's CI, a laptop) the stage defers: the run finishes what it can
(onnxruntime verification, the report) and ends with a device bundle plus the exact command that
continues on the device (``pipeline.write_device_bundle``), unless ``build_engine.required: true``
makes the missing TensorRT an error.

This version defers on machines *with* TensorRT too and says so: the adapter
(:mod:`xpdeploy.engine`) and :class:`~xpdeploy.backends.trt_runner.TrtRunner` are written and
contract-tested, but the stage that drives them on a real GPU is not wired yet (no GPU to test it
on). Nothing here pretends to have built an engine.
"""

from __future__ import annotations

from xpdeploy.artifacts import Artifact, EngineSet, OnnxModels
from xpdeploy.engine.versions import TRT_INSTALL_HINT, detect
from xpdeploy.errors import MissingDependencyError
from xpdeploy.progress import log
from xpdeploy.stages.context import StageContext


def run(ctx: StageContext, onnx: OnnxModels, simplified: OnnxModels | None = None
        ) -> dict[str, Artifact]:
    cfg = ctx.spec.build_engine
    assert cfg is not None  # PipelineSpec.check_runnable
    version = detect()
    if version is None:
        if cfg.required:
            raise MissingDependencyError(
                f"build_engine.required is true but TensorRT is not installed; {TRT_INSTALL_HINT}"
                ", or set build_engine.required: false to continue on the device from a bundle"
            )
        reason = "TensorRT is not installed here"
    else:
        reason = (f"TensorRT {version} is installed, but building inside the pipeline is not "
                  "wired in this version")
    files = len(onnx.models) + (len(simplified.models) if simplified else 0)
    log(f"  {reason}: the {cfg.precision} engines for {files} ONNX files are deferred to the "
        "device; the run ends with a device bundle")
    return {"engines": EngineSet(deferred=True, reason=reason, precision=cfg.precision,
                                 tensorrt=str(version) if version else None)}
