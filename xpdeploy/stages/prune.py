"""``prune``: unit scores of one criterion -> a plan at the MAC budget -> the pruned model.

Under torchrun ``ranking: threshold`` and ``ranking: sensitivity`` are collective: rank 0
computes the scores and shares them, every rank searches (threshold: ``prune.threshold.batch_size``
images per rank per step) or measures (sensitivity: its share of ``prune.sensitivity.images``) on
its shard of the train split, and rank 0 alone prunes, evaluates and writes. The other ways of
planning (global ranking, a replayed plan) are cheap, so rank 0 does them alone and the other
ranks return at once. The other ranks return no outputs; the executor hands rank 0's to every
rank.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from xpdeploy import distributed
from xpdeploy.artifacts import Artifact, LatencyTable, MaskSet, PrunePlan, TorchModel
from xpdeploy.errors import ConfigError, PruneError
from xpdeploy.fileio import write_json_atomic
from xpdeploy.models.arch import describe_arch, rebuild_model, save_model
from xpdeploy.models.complexity import count_gmacs, count_params_m
from xpdeploy.progress import log
from xpdeploy.prune.allocation import LatencyTarget
from xpdeploy.prune.mac_model import MacModel
from xpdeploy.prune.planner import PlanConstraints, check_target, plan_global, plan_summary
from xpdeploy.prune.plots import plot_allocation
from xpdeploy.prune.surgery import prune_model
from xpdeploy.prune.unit_scores import KeepSets, UnitScores
from xpdeploy.spec import MASK_CRITERIA, PruneConfig
from xpdeploy.stages.context import StageContext
from xpdeploy.stages.fingerprint import DataSettings
from xpdeploy.training.batches import shuffled_batches
from xpdeploy.training.evaluate import evaluate_top1

if TYPE_CHECKING:
    from torch import nn


class Settings(DataSettings):
    prune: PruneConfig | None


Ctx = StageContext[Settings]


def _scores(ctx: Ctx, net, model: TorchModel, masks: MaskSet | None, macs: MacModel
            ) -> UnitScores:
    from xpdeploy.prune import criteria

    spec, cfg = ctx.settings, ctx.settings.prune
    assert cfg is not None
    if cfg.criterion in MASK_CRITERIA:
        if masks is None:
            raise ConfigError(f"prune.criterion {cfg.criterion!r} needs the output of "
                              "'learn_masks'")
        if cfg.effective_mask_score == "coverage":
            from xpdeploy.xpruner.learn import load_masks
            from xpdeploy.xpruner.masks import coverage_scores

            tables = load_masks(ctx.path(masks.masks_file), net, model.arch.num_classes)
            mask_scores = coverage_scores(tables)
        else:
            mask_scores = UnitScores.from_json(
                json.loads(ctx.path(masks.scores_file).read_text()))
        if cfg.criterion == "xpruner":
            return mask_scores
    if cfg.criterion == "magnitude":
        return criteria.magnitude_scores(net)
    if cfg.criterion == "random":
        return criteria.random_scores(list(macs.heads), list(macs.mlp), spec.seed)
    batches = shuffled_batches(spec.split(model, "train"), spec.data.batch_size, seed=spec.seed,
                               workers=spec.data.workers)
    taylor = criteria.taylor_scores(net, batches, cfg.taylor_images)
    return criteria.hybrid_scores(mask_scores, taylor) if cfg.criterion == "xpruner_taylor" \
        else taylor


def _shared_scores(ctx: Ctx, net: nn.Module, model: TorchModel, masks: MaskSet | None,
                   macs: MacModel) -> UnitScores:
    """The criterion's scores on every rank: rank 0 scores alone (taylor reads data) and shares
    them, so every rank plans with the very same scores."""
    return distributed.broadcast_object(
        _scores(ctx, net, model, masks, macs) if distributed.is_main() else None)


def _sensitivity_plan(ctx: Ctx, net: nn.Module, model: TorchModel,
                      masks: MaskSet | None, macs: MacModel, target: float | LatencyTarget,
                      constraints: PlanConstraints) -> tuple[KeepSets, dict[str, Any]]:
    """Keep sets of the sensitivity allocator and what plan.json records of it (collective).

    The images are one seeded set of the train split (the first ``images`` of epoch 0's global
    order), each rank measuring its shard; ``net`` is back on the CPU afterwards, unchanged.
    """
    import time

    from xpdeploy.prune.sensitivity import sensitivity_plan
    from xpdeploy.training.batches import fixed_images

    spec, cfg = ctx.settings, ctx.settings.prune
    assert cfg is not None
    scores = _shared_scores(ctx, net, model, masks, macs)
    sens = cfg.sensitivity
    batches = fixed_images(spec.split(model, "train"), sens.images, sens.batch_size, seed=spec.seed,
                           workers=spec.data.workers, rank=distributed.rank(),
                           world_size=distributed.world_size())
    t0 = time.monotonic()
    net.to(distributed.device())
    result = sensitivity_plan(net, scores, batches, macs, target, constraints,
                              mlp_step=sens.mlp_step, refine=sens.refine)
    net.to("cpu")
    return result.keep, {"sensitivity": {**result.to_json(), "seconds": time.monotonic() - t0}}


def _threshold_plan(ctx: Ctx, net: nn.Module, model: TorchModel, masks: MaskSet | None,
                    macs: MacModel, target: float, constraints: PlanConstraints
                    ) -> tuple[KeepSets, dict[str, Any]]:
    """Keep sets of the threshold search and what plan.json records of it (collective).

    The search runs on this rank's device and shard; ``net`` is back on the CPU afterwards (adapted
    in place when ``backbone_lr`` is set), ready for the surgery.
    """
    from xpdeploy.prune.threshold import threshold_search

    spec, cfg = ctx.settings, ctx.settings.prune
    assert cfg is not None
    scores = _shared_scores(ctx, net, model, masks, macs)
    batches = shuffled_batches(spec.split(model, "train"), cfg.threshold.batch_size, seed=spec.seed,
                               workers=spec.data.workers, rank=distributed.rank(),
                               world_size=distributed.world_size())
    net.to(distributed.device())  # DDP over NCCL needs the model on this rank's GPU
    result = threshold_search(net, scores.normalized(cfg.normalize), macs, batches,
                              cfg.threshold, target, constraints, seed=spec.seed,
                              checkpoint=ctx.stage_dir / "checkpoints" / "threshold.pt",
                              fingerprint=ctx.fingerprint)
    net.to("cpu")
    return result.keep, {"thresholds": result.thresholds, "threshold_history": result.history,
                         "alpha": result.alpha, "backbone_adapted": result.backbone_adapted}


def _latency_target(ctx: Ctx, model: TorchModel, latency: LatencyTable | None, macs: MacModel,
                    constraints: PlanConstraints) -> LatencyTarget:
    """The latency budget, after checking that the table is this model's and the target can be
    met: a one-line error before any scoring or measuring when it cannot."""
    from xpdeploy.latency.table import LatencyModel, LatencyTableError
    from xpdeploy.stages.latency_blocks import arch_digest

    cfg = ctx.settings.prune
    assert cfg is not None and cfg.target_latency_ms is not None
    if latency is None:
        raise ConfigError("prune.target_latency_ms plans with a latency table; add "
                          "'latency_blocks' and 'latency_table' to 'stages' (before 'prune')")
    table = LatencyModel.read(ctx.path(latency.file))
    if table.key.arch_digest != arch_digest(model):
        raise LatencyTableError(
            f"the latency table was measured for another architecture than this model's "
            f"({table.key.arch_name}); rerun latency_blocks and latency_table on this model")
    target = cfg.target_latency_ms
    where = f"{table.key.runtime} ({table.key.precision}) at batch {table.key.batch}"
    floor_h, floor_m = constraints.floors(macs)
    smallest = table.fixed_ms + sum(
        min(table.cost(b, h, m) for h, m in table.options(b)
            if h >= floor_h[b] and m >= floor_m[b]) for b in range(table.blocks))
    original = table.predict(list(macs.heads), list(macs.mlp))
    if target >= original:
        raise PruneError(f"nothing to prune; target {target:.4g} ms >= the original's "
                         f"{original:.4g} ms on {where}; lower prune.target_latency_ms")
    if target < smallest:
        raise PruneError(
            f"target {target:.4g} ms is below the smallest model the constraints allow "
            f"({smallest:.4g} ms predicted on {where} with min_heads_per_block="
            f"{constraints.min_heads_per_block}, min_mlp_per_block="
            f"{constraints.min_mlp_per_block}); raise the target or lower the floors")
    return LatencyTarget(table=table, target_ms=target)


def _latency_record(budget: LatencyTarget, keep: KeepSets, latency: LatencyTable | None
                    ) -> dict[str, Any]:
    """What plan.json records of a latency budget (ms per batch)."""
    table = budget.table
    return {"target_ms": budget.target_ms,
            "predicted_ms": table.predict(keep.head_counts, keep.mlp_widths),
            "original_ms": table.original_ms, "fixed_ms": table.fixed_ms, "scale": table.scale,
            "runtime": table.key.runtime, "precision": table.key.precision,
            "batch": table.key.batch, "threads": table.key.threads,
            "device_id": table.key.device_id,
            "table": latency.file if latency is not None else None,
            "per_block_ms": [table.cost(b, h, m) for b, (h, m) in
                             enumerate(zip(keep.head_counts, keep.mlp_widths, strict=True))]}


def run(ctx: Ctx, model: TorchModel, masks: MaskSet | None = None,
        latency: LatencyTable | None = None) -> dict[str, Artifact]:
    spec, cfg = ctx.settings, ctx.settings.prune
    assert cfg is not None  # PipelineSpec.check_runnable
    collective = cfg.plan_file is None and cfg.ranking in ("threshold", "sensitivity")
    if not collective and not distributed.is_main():
        return {}  # rank 0 plans alone
    net = rebuild_model(model.arch, ctx.path(model.weights_file))
    size = model.data_config.input_size
    macs = MacModel.from_model(net, size)
    replay = KeepSets.read(cfg.plan_file) if cfg.plan_file is not None else None
    constraints = PlanConstraints.from_config(cfg)
    budget: LatencyTarget | None = None
    if replay is not None:
        target = macs.macs(replay.head_counts, replay.mlp_widths)
    elif cfg.target_latency_ms is not None:
        budget = _latency_target(ctx, model, latency, macs, constraints)
        target = macs.original  # the MACs the plan lands on are recorded once it exists
    elif cfg.target_gmacs is not None:
        target = cfg.target_gmacs * 1e9
    else:
        target = cfg.target_ratio * macs.original
    if replay is None and budget is None:
        check_target(target, macs, constraints)
    extra: dict[str, Any] = {}
    if replay is not None:
        keep, extra = replay, {"replayed_from": str(cfg.plan_file)}
    elif cfg.ranking == "global":
        scores = _scores(ctx, net, model, masks, macs)
        keep = plan_global(scores, macs, target, constraints, cfg.normalize)
    else:
        if budget is not None:
            keep, extra = _sensitivity_plan(ctx, net, model, masks, macs, budget, constraints)
        else:
            plan_by = _threshold_plan if cfg.ranking == "threshold" else _sensitivity_plan
            keep, extra = plan_by(ctx, net, model, masks, macs, target, constraints)
        if not distributed.is_main():
            return {}
        if budget is not None:
            target = macs.macs(keep.head_counts, keep.mlp_widths)
            extra["latency"] = _latency_record(budget, keep, latency)
    params_before = count_params_m(net)
    prune_model(net, keep)
    gmacs = count_gmacs(net, size)
    predicted = macs.macs(keep.head_counts, keep.mlp_widths) / 1e9
    if abs(gmacs - predicted) > 1e-9:
        raise PruneError(f"pruned model has {gmacs:.6f} GMACs but the plan predicted "
                         f"{predicted:.6f}; this is a bug, please report it")
    arch = describe_arch(net, model.arch.timm_name, model.arch.kwargs)
    plan_path = ctx.stage_dir / "plan.json"
    write_json_atomic(plan_path, {
        "criterion": cfg.criterion, "ranking": cfg.ranking, "normalize": cfg.normalize,
        **({"mask_score": cfg.effective_mask_score} if cfg.criterion in MASK_CRITERIA else {}),
        "target_gmacs": target / 1e9, "summary": plan_summary(keep, macs),
        "blocks": keep.to_json(), "mac_model": macs.to_json(), **extra,
    })
    plots = plot_allocation(extra, keep.head_counts, keep.mlp_widths, ctx.stage_dir)
    val = spec.split(model, "val")
    one_shot = None if val.synthetic else evaluate_top1(
        net, val, batch_size=spec.data.batch_size, workers=spec.data.workers, label="one-shot")
    arch_path, weights_path = save_model(net, arch, ctx.stage_dir)
    params_after = count_params_m(net)
    record = extra.get("latency")
    budget_text = (f"latency {record['predicted_ms']:.3f} ms predicted, target "
                   f"{record['target_ms']:.3f} ms" if record else f"target {target / 1e9:.4f}")
    log(f"  {cfg.criterion}/{cfg.ranking}: {macs.original / 1e9:.4f} -> {gmacs:.4f} GMACs "
        f"({budget_text}), heads {keep.head_counts}, mlp {keep.mlp_widths}"
        + (f", one-shot top-1 {one_shot:.2f}%" if one_shot is not None else ""))
    plan = PrunePlan(
        target_latency_ms=record["target_ms"] if record else None,
        predicted_latency_ms=record["predicted_ms"] if record else None,
        latency=latency.setting if record and latency is not None else None,
        table_original_ms=record["original_ms"] if record else None,
        file=ctx.rel(plan_path), criterion=cfg.criterion, ranking=cfg.ranking,
        normalize=cfg.normalize, target_gmacs=target / 1e9, gmacs_before=macs.original / 1e9,
        gmacs_after=gmacs, params_before_m=params_before, params_after_m=params_after,
        heads_per_block=keep.head_counts, mlp_per_block=keep.mlp_widths, one_shot_top1=one_shot,
        plots=[ctx.rel(p) for p in plots],
    )
    pruned = model.model_copy(update={
        "label": "pruned", "arch_file": ctx.rel(arch_path), "weights_file": ctx.rel(weights_path),
        "arch": arch, "gmacs": gmacs, "params_m": params_after, "top1": one_shot,
        "top1_samples": len(val) if one_shot is not None else 0,
    })
    return {"plan": plan, "model": pruned}
