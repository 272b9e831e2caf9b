"""``simplify``: onnxsim on every exported model, parity re-checked in onnxruntime."""

from __future__ import annotations

from xpdeploy.artifacts import Artifact, OnnxModels, VerifySet
from xpdeploy.backends.ort_runner import OrtRunner
from xpdeploy.data.verify_set import load_verify_set
from xpdeploy.export.onnx_export import count_nodes
from xpdeploy.export.parity import PARITY_SAMPLES, check_output_parity
from xpdeploy.export.simplify import simplify_onnx
from xpdeploy.export.tensorrt_ops import tensorrt_notes
from xpdeploy.progress import log
from xpdeploy.spec import SimplifyConfig
from xpdeploy.stages.context import StageContext
from xpdeploy.stages.fingerprint import StageSettings


class Settings(StageSettings):
    simplify: SimplifyConfig


def run(ctx: StageContext[Settings], onnx: OnnxModels, verify_set: VerifySet
        ) -> dict[str, Artifact]:
    cfg = ctx.settings.simplify
    pixels = load_verify_set(ctx.path(verify_set.file), PARITY_SAMPLES).pixels
    out = {}
    for label, src in onnx.models.items():
        dst = ctx.stage_dir / f"{label}.sim.onnx"
        simplify_onnx(ctx.path(src.file), dst, skip_fuse_bn=cfg.skip_fuse_bn)
        batch = pixels if src.dynamic_batch else pixels[:1]
        with OrtRunner(ctx.path(src.file)) as before, OrtRunner(dst) as after:
            diff = check_output_parity(
                before, after, batch, atol=cfg.parity_atol, artifact=dst, compared_to=src.file,
                option="simplify.parity_atol", fix="remove 'simplify' from stages",
            )
        nodes = count_nodes(dst)
        log(f"  {dst.name}: {src.nodes} -> {nodes} nodes, max |before - after| {diff:.2e}")
        out[label] = src.model_copy(
            update={"file": ctx.rel(dst), "nodes": nodes, "simplified": True,
                    "nodes_before_simplify": src.nodes, "max_abs_diff": max(diff, src.max_abs_diff),
                    "tensorrt_notes": tensorrt_notes(dst, src.tensorrt_notes)}
        )
    return {"onnx": OnnxModels(models=out)}
