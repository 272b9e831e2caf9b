"""``export_onnx``: ONNX (opset 17, ``pixels`` -> ``logits``, dynamic batch), checked vs torch."""

from __future__ import annotations

from xpdeploy.artifacts import Artifact, OnnxModel, OnnxModels, TorchModel, VerifySet
from xpdeploy.backends.ort_runner import OrtRunner
from xpdeploy.backends.torch_runner import TorchRunner
from xpdeploy.data.verify_set import load_verify_set
from xpdeploy.export.onnx_export import count_nodes, export_onnx
from xpdeploy.export.parity import PARITY_SAMPLES, check_output_parity
from xpdeploy.export.tensorrt_ops import tensorrt_notes
from xpdeploy.models.arch import rebuild_model
from xpdeploy.progress import log
from xpdeploy.spec import ExportOnnxConfig
from xpdeploy.stages.context import StageContext
from xpdeploy.stages.fingerprint import StageSettings


class Settings(StageSettings):
    export_onnx: ExportOnnxConfig


def run(ctx: StageContext[Settings], model: TorchModel, verify_set: VerifySet,
        pruned: TorchModel | None = None) -> dict[str, Artifact]:
    """Export the original and (when present) the pruned model through the same path."""
    pixels = load_verify_set(ctx.path(verify_set.file), PARITY_SAMPLES).pixels
    out = {m.label: _export(ctx, m, pixels) for m in (model, pruned) if m is not None}
    return {"onnx": OnnxModels(models=out)}


def _export(ctx: StageContext[Settings], model: TorchModel, pixels) -> OnnxModel:
    cfg = ctx.settings.export_onnx
    path = ctx.stage_dir / f"{model.label}.onnx"
    net = rebuild_model(model.arch, ctx.path(model.weights_file))
    export_onnx(net, path, input_size=model.data_config.input_size, opset=cfg.opset,
                trace_batch=cfg.trace_batch, dynamic_batch=cfg.dynamic_batch)
    batch = pixels if cfg.dynamic_batch else pixels[: cfg.trace_batch]
    with TorchRunner(model, ctx.run_dir) as ref, OrtRunner(path) as ort:
        diff = check_output_parity(
            ref, ort, batch, atol=cfg.parity_atol, artifact=path, compared_to="the torch model",
            option="export_onnx.parity_atol", fix="the export is wrong (try another "
            "export_onnx.opset)",
        )
    nodes = count_nodes(path)
    log(f"  {path.name}: opset {cfg.opset}, {nodes} nodes, max |torch - ort| {diff:.2e}")
    return OnnxModel(
        label=model.label, file=ctx.rel(path), opset=cfg.opset, dynamic_batch=cfg.dynamic_batch,
        nodes=nodes, max_abs_diff=diff, gmacs=model.gmacs, params_m=model.params_m,
        tensorrt_notes=tensorrt_notes(path),
    )
