"""``finetune``: recovery training of the pruned model (plain supervised for now)."""

from __future__ import annotations

from xpdeploy.artifacts import Artifact, TorchModel
from xpdeploy.stages.context import StageContext
from xpdeploy.stages.train import train_stage


def run(ctx: StageContext, model: TorchModel) -> dict[str, Artifact]:
    assert ctx.spec.finetune is not None  # PipelineSpec.check_runnable
    return train_stage(ctx, model, ctx.spec.finetune)
