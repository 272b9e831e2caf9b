"""``train``: plain supervised training of the loaded model (models without pretrained weights)."""

from __future__ import annotations

from xpdeploy import distributed
from xpdeploy.artifacts import Artifact, TorchModel
from xpdeploy.data.train_augment import describe
from xpdeploy.fileio import write_json_atomic
from xpdeploy.models.arch import rebuild_model, save_model
from xpdeploy.spec import FinetuneConfig, TrainConfig
from xpdeploy.stages.context import StageContext
from xpdeploy.stages.fingerprint import DataSettings
from xpdeploy.training.distill import Distiller
from xpdeploy.training.loop import effective_lr, train_model
from xpdeploy.training.precision import autocast_dtype


class Settings(DataSettings):
    train: TrainConfig | None


def run(ctx: StageContext[Settings], model: TorchModel) -> dict[str, Artifact]:
    assert ctx.settings.train is not None  # checked by PipelineSpec.check_runnable
    return train_stage(ctx, model, ctx.settings.train)


def train_stage(ctx: StageContext[DataSettings], model: TorchModel, cfg: TrainConfig,
                teacher: TorchModel | None = None) -> dict[str, Artifact]:
    """Train ``model`` with ``cfg`` in the stage folder (shared by ``train`` and ``finetune``).

    Collective under torchrun: every rank trains its shard; rank 0 alone writes the results.
    """
    spec = ctx.settings
    net = rebuild_model(model.arch, ctx.path(model.weights_file))
    distiller = None
    if teacher is not None:
        assert isinstance(cfg, FinetuneConfig)  # only finetune distils
        distiller = Distiller.from_config(
            rebuild_model(teacher.arch, ctx.path(teacher.weights_file)), cfg)
    train_set, val_set = spec.split(model, "train"), spec.split(model, "val")
    result = train_model(
        net,
        train_set,
        None if val_set.synthetic else val_set,
        cfg,
        checkpoint_dir=ctx.stage_dir / "checkpoints",
        fingerprint=ctx.fingerprint,
        seed=spec.seed,
        eval_batch_size=spec.data.batch_size,
        workers=spec.data.workers,
        distiller=distiller,
    )
    if not distributed.is_main():
        return {}
    write_json_atomic(ctx.stage_dir / "history.json", result.history)
    recipe = {
        "stage": ctx.stage,
        "epochs": cfg.epochs,
        "images_per_epoch": result.history[-1]["images"] if result.history else 0,
        "processes": distributed.world_size(),
        "batch_per_process": cfg.batch_size,
        "accumulate_steps": cfg.accumulate_steps,
        "global_batch": cfg.batch_size * cfg.accumulate_steps * distributed.world_size(),
        "peak_lr": effective_lr(cfg),
        "amp": str(autocast_dtype(cfg.amp, distributed.device()) or "off").removeprefix("torch."),
        "device": str(distributed.device()),
        "augment": describe(cfg.augment),
        "ema_decay": cfg.ema_decay,
        "keep": cfg.keep,
        "best_epoch": result.best_epoch,
        "best_top1": result.best_top1,
        "distill": getattr(cfg, "distill", "none"),
        "resumed_from_epoch": result.resumed_from_epoch,
    }
    write_json_atomic(ctx.stage_dir / "recipe.json", recipe)
    arch_path, weights_path = save_model(net, model.arch, ctx.stage_dir)
    return {
        "model": model.model_copy(
            update={
                "arch_file": ctx.rel(arch_path),
                "weights_file": ctx.rel(weights_path),
                "top1": result.final_top1,
                "top1_samples": len(val_set) if result.final_top1 is not None else 0,
                "epochs_trained": model.epochs_trained + result.epochs,
                "training": recipe,
            }
        )
    }
