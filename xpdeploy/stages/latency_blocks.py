"""``latency_blocks``: every block of the model at every (heads, MLP width), as ONNX files.

What ``latency_table`` times (:mod:`xpdeploy.export.block_grid`). The files depend on the
architecture, not on the weights' values, so a table measured once serves every run of the
architecture; they are torch-free inputs, so a latency bundle carries them to a device.
"""

from __future__ import annotations

from xpdeploy.artifacts import Artifact, LatencyBlocks, TorchModel
from xpdeploy.fileio import sha256_json
from xpdeploy.models.arch import rebuild_model
from xpdeploy.progress import log
from xpdeploy.spec import LatencyConfig, PipelineSpec
from xpdeploy.stages.context import StageContext
from xpdeploy.stages.fingerprint import StageSettings


class Settings(StageSettings):
    mlp_step: int  # prune.latency.mlp_step, else prune.round_mlp_to
    validation_models: int  # prune.latency.validation_models
    seed: int
    opset: int  # export_onnx.opset: the blocks go through the deployed model's exporter


def settings(spec: PipelineSpec) -> Settings:
    latency = spec.prune.latency if spec.prune else LatencyConfig()
    round_to = spec.prune.round_mlp_to if spec.prune else 8
    return Settings(mlp_step=latency.mlp_step or round_to,
                    validation_models=latency.validation_models, seed=spec.seed,
                    opset=spec.export_onnx.opset)


def arch_digest(model: TorchModel) -> str:
    """What a latency table is measured for: the architecture, not the weights."""
    return sha256_json(model.arch.model_dump(mode="json"))


def run(ctx: StageContext[Settings], model: TorchModel) -> dict[str, Artifact]:
    from xpdeploy.export.block_grid import export_block_grid

    s = ctx.settings
    net = rebuild_model(model.arch, ctx.path(model.weights_file))
    grid = export_block_grid(net, model.data_config.input_size, ctx.stage_dir,
                             arch_name=model.arch.timm_name, arch_digest=arch_digest(model),
                             mlp_step=s.mlp_step, validation_models=s.validation_models,
                             seed=s.seed, opset=s.opset)
    points = sum(len(shape.points) for shape in grid.shapes)
    log(f"  {points} block files over {len(grid.shapes)} block shape(s), MLP every "
        f"{s.mlp_step}; {len(grid.validation)} validation models")
    folder = ctx.rel(ctx.stage_dir)
    return {"blocks": LatencyBlocks(
        file=ctx.rel(ctx.stage_dir / "grid.json"), arch_digest=grid.arch_digest,
        shapes=len(grid.shapes), points=points,
        onnx_files=[f"{folder}/{f}" for f in grid.files()])}
