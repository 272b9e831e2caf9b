"""``finetune``: recovery training of the pruned model, distilled from the original (teacher)."""

from __future__ import annotations

from xpdeploy.artifacts import Artifact, TorchModel
from xpdeploy.stages.context import StageContext
from xpdeploy.stages.train import train_stage


def run(ctx: StageContext, model: TorchModel, teacher: TorchModel) -> dict[str, Artifact]:
    cfg = ctx.spec.finetune
    assert cfg is not None  # PipelineSpec.check_runnable
    return train_stage(ctx, model, cfg, teacher=teacher if cfg.distill != "none" else None)
