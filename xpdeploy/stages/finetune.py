"""``finetune``: recovery training of the pruned model, distilled from the original (teacher)."""

from __future__ import annotations

from xpdeploy.artifacts import Artifact, TorchModel
from xpdeploy.spec import FinetuneConfig
from xpdeploy.stages.context import StageContext
from xpdeploy.stages.fingerprint import DataSettings
from xpdeploy.stages.train import train_stage


class Settings(DataSettings):
    finetune: FinetuneConfig | None


def run(ctx: StageContext[Settings], model: TorchModel, teacher: TorchModel
        ) -> dict[str, Artifact]:
    cfg = ctx.settings.finetune
    assert cfg is not None  # PipelineSpec.check_runnable
    return train_stage(ctx, model, cfg, teacher=teacher if cfg.distill != "none" else None)
