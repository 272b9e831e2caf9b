"""``learn_masks``: X-Pruner's class-wise explainability masks, with the backbone frozen.

Collective under torchrun: every rank learns (its shard of the data, ``learn_masks.batch_size``
images per rank per step, gradients averaged) and ends with the same masks; rank 0 alone writes
the masks, scores, history and plots, and the other ranks return no outputs (the executor hands
rank 0's to every rank).
"""

from __future__ import annotations

from xpdeploy import distributed
from xpdeploy.artifacts import Artifact, MaskSet, TorchModel
from xpdeploy.fileio import write_json_atomic
from xpdeploy.models.arch import rebuild_model
from xpdeploy.spec import LearnMasksConfig
from xpdeploy.stages.context import StageContext
from xpdeploy.stages.fingerprint import DataSettings
from xpdeploy.xpruner.learn import learn_masks, save_masks
from xpdeploy.xpruner.plots import plot_class_unit_heatmaps, plot_curve, plot_scores


class Settings(DataSettings):
    learn_masks: LearnMasksConfig


def run(ctx: StageContext[Settings], model: TorchModel) -> dict[str, Artifact]:
    spec, cfg = ctx.settings, ctx.settings.learn_masks
    # This rank's GPU when there is one (DDP over NCCL needs the model there), as in training.
    net = rebuild_model(model.arch, ctx.path(model.weights_file)).to(distributed.device())
    train_set = spec.split(model, "train")
    result = learn_masks(net, train_set, cfg, num_classes=model.arch.num_classes, seed=spec.seed,
                         checkpoint_dir=ctx.stage_dir / "checkpoints", fingerprint=ctx.fingerprint,
                         workers=spec.data.workers)
    if not distributed.is_main():
        return {}
    result.masks.to("cpu")
    masks_path, scores_path = ctx.stage_dir / "masks.safetensors", ctx.stage_dir / "scores.json"
    history_path = ctx.stage_dir / "history.json"
    save_masks(masks_path, result.masks)
    write_json_atomic(scores_path, result.scores.to_json())
    write_json_atomic(history_path, result.history)
    plots = [ctx.stage_dir / "masks_heatmap.png", ctx.stage_dir / "scores.png",
             ctx.stage_dir / "curve.png"]
    plot_class_unit_heatmaps(result.masks, plots[0], list(train_set.class_names))
    plot_scores(result.scores, plots[1])
    plot_curve(result.history, plots[2])
    return {"masks": MaskSet(
        masks_file=ctx.rel(masks_path), scores_file=ctx.rel(scores_path),
        history_file=ctx.rel(history_path), plots=[ctx.rel(p) for p in plots],
        num_classes=model.arch.num_classes, steps=result.steps, seconds=result.seconds,
        converged=result.converged, settings=cfg.model_dump(mode="json"),
    )}
