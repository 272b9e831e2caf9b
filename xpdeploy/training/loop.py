"""Supervised training (``train`` and ``finetune``): one process or many under torchrun.

What makes a killed run resume with the result of an uninterrupted one:

- the data order of epoch e is a permutation seeded by (seed, e), sharded over ranks
  (:func:`xpdeploy.training.batches.rank_shard`); a world of one and a world of N see the same
  global order;
- every augmentation draw is seeded by (seed, epoch, image index), and every mixup/cutmix batch by
  (seed, epoch, rank, batch), so the draws do not depend on how many images were processed before,
  on DataLoader workers, or on a resume;
- checkpoints (:mod:`xpdeploy.training.checkpoint`) hold the model, optimiser, scheduler, scaler,
  EMA, every rank's RNG states and the position, after every epoch and, with
  ``checkpoint_every_steps``, every k optimiser steps: a kill loses at most that much work.

Under torchrun the model is wrapped in DistributedDataParallel (gradients averaged over ranks),
``batch_size`` is per process, metrics are summed over ranks, evaluation is sharded, and only
rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xpdeploy import distributed
from xpdeploy.progress import log, progress
from xpdeploy.training import checkpoint
from xpdeploy.training.batches import rank_shard
from xpdeploy.training.evaluate import evaluate_top1
from xpdeploy.training.precision import autocast, autocast_dtype, grad_scaler

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import Dataset

    from xpdeploy.spec import TrainConfig
    from xpdeploy.training.distill import Distiller

#: Kept for callers that name the checkpoint file.
CHECKPOINT_NAME = checkpoint.LAST_NAME
#: Mixed into the seeds of mixup/cutmix batches so they differ from the per-image draws.
_MIX_SALT = 0x313


@dataclass
class TrainResult:
    """What a finished training run reports; ``history`` has one dict per epoch.

    ``final_top1``: val top-1 (percent) of the weights the run outputs (the EMA's when
    ``ema_decay`` is set; the best epoch's when ``keep: best``); ``best_top1``: the best val top-1
    seen at any evaluation. ``resumed_from_epoch`` / ``resumed_from_step``: where a resumed run
    picked up (0, 0 for a fresh one).
    """

    epochs: int
    final_top1: float | None
    best_top1: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_epoch: int = 0
    resumed_from_step: int = 0
    best_epoch: int | None = None


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, position embeddings and tokens (standard for ViTs)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "dist_token"))
        (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, floor: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``floor`` (= min_lr / lr), per optimiser step."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress_ = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))


def draw_seed(*parts: int) -> int:
    """A 32-bit seed from integers (seed, epoch, index, ...); distinct tuples give unrelated
    seeds (numpy's SeedSequence hashing), unlike sums or products of the parts."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def effective_lr(cfg: TrainConfig) -> float:
    """Peak lr after the opt-in linear scaling rule: lr * global batch / ``lr_scale_batch``."""
    if cfg.lr_scale_batch is None:
        return cfg.lr
    global_batch = cfg.batch_size * cfg.accumulate_steps * distributed.world_size()
    return cfg.lr * global_batch / cfg.lr_scale_batch


@dataclass(frozen=True)
class _Plan:
    """Sizes of one run, per rank: images, forward passes and optimiser steps per epoch."""

    n: int
    per_epoch: int
    micro_per_epoch: int
    steps_per_epoch: int

    @classmethod
    def of(cls, n: int, cfg: TrainConfig) -> _Plan:
        per_epoch = min(n, cfg.max_images or n)
        shard = math.ceil(per_epoch / distributed.world_size())
        micro = math.ceil(shard / cfg.batch_size)
        return cls(n, per_epoch, micro, math.ceil(micro / cfg.accumulate_steps))


class _DropSeed:
    """Adapter for datasets indexed by int: ignores the per-draw seed (no augmentation)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.dataset[key[0]]


def _keyed(train_set: Dataset, cfg: TrainConfig) -> Any:
    """``train_set`` as a dataset indexed by (index, draw seed), augmented per ``cfg.augment``."""
    from xpdeploy.data.train_augment import AugmentedSplit, describe

    if isinstance(train_set, AugmentedSplit):
        return train_set
    data_config = getattr(train_set, "data_config", None)
    if data_config is not None:
        return AugmentedSplit(train_set, data_config, cfg.augment)  # type: ignore[arg-type]
    if describe(cfg.augment):
        raise ValueError("augmentation needs a data split with a data_config (open_split's)")
    return _DropSeed(train_set)


def _copy_into(dst: nn.Module, src: nn.Module) -> None:
    import torch

    with torch.no_grad():
        dst.load_state_dict(src.state_dict())


def train_model(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None,
    cfg: TrainConfig,
    *,
    checkpoint_dir: Path,
    fingerprint: str,
    seed: int,
    eval_batch_size: int,
    workers: int = 0,
    distiller: Distiller | None = None,
) -> TrainResult:
    """Train ``model`` in place (it ends on CPU, in eval mode, holding the output weights).

    Resumes from ``checkpoint_dir/last.pt`` when it belongs to ``fingerprint``. With a
    ``distiller`` the loss mixes the supervised loss with distillation from its teacher's logits
    on the same (augmented, mixed) images. Collective under torchrun: every rank calls it.
    """
    import torch
    from timm.loss import SoftTargetCrossEntropy
    from torch.utils.data import DataLoader

    from xpdeploy.data.train_augment import BatchMixer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed + distributed.rank())
    device = distributed.device()
    amp = autocast_dtype(cfg.amp, device)
    model.to(device)
    if distiller is not None:
        distiller.teacher.to(device)
    data = _keyed(train_set, cfg)
    num_classes = int(getattr(train_set, "num_classes", 0) or _num_outputs(model))
    mixer = BatchMixer(cfg.augment, num_classes=num_classes, label_smoothing=cfg.label_smoothing)
    plan = _Plan.of(len(data), cfg)
    total_steps = plan.steps_per_epoch * cfg.epochs
    warmup_steps = round(cfg.warmup_epochs * plan.steps_per_epoch)
    lr = effective_lr(cfg)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, warmup_steps=warmup_steps, total_steps=total_steps,
                            floor=min(1.0, cfg.min_lr / lr)),
    )
    scaler = grad_scaler(amp, device)
    ema = _make_ema(model, cfg.ema_decay)
    ddp = distributed.wrap_ddp(model)
    hard_ce = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    soft_ce = SoftTargetCrossEntropy()  # mixup/cutmix targets (smoothing is already in them)
    if distributed.is_main():
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    last_path = checkpoint_dir / checkpoint.LAST_NAME
    best_path = checkpoint_dir / checkpoint.BEST_NAME

    history: list[dict[str, Any]] = []
    start_epoch = start_step = 0
    best: tuple[float, int] | None = None  # (top-1, epoch)
    partial: dict[str, dict[str, float]] = {}  # rank -> metric sums of a partial epoch
    state = checkpoint.load(last_path, fingerprint)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        history = list(state["history"])
        start_epoch, start_step = int(state["epoch"]), int(state["step_in_epoch"])
        best = tuple(state["best"]) if state.get("best") else None  # type: ignore[assignment]
        partial = dict(state.get("partial") or {})
        if state.get("world_size", 1) != distributed.world_size():
            # Another process count means another global batch and steps per epoch: continue
            # from the start of the interrupted epoch, with the schedule at that point.
            start_step, partial = 0, {}
            scheduler.last_epoch = start_epoch * plan.steps_per_epoch - 1
            with warnings.catch_warnings():  # "step() before optimizer.step()": intended here
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
        where = f"step {start_step} of epoch {start_epoch + 1}" if start_step else \
            f"the checkpoint after epoch {start_epoch}"
        log(f"  resuming from {where}/{cfg.epochs}")
    resumed = (start_epoch, start_step)

    def snapshot(epoch: int, step_in_epoch: int, sums: dict[str, Any]) -> None:
        checkpoint.save(last_path, {
            "fingerprint": fingerprint, "epoch": epoch, "step_in_epoch": step_in_epoch,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None,
            "history": history, "best": list(best) if best else None, "partial": sums,
        })

    for epoch in range(start_epoch, cfg.epochs):
        shard = rank_shard(plan.n, per_epoch=plan.per_epoch, seed=seed, epoch=epoch,
                           rank=distributed.rank(), world_size=distributed.world_size())
        first_step = start_step if epoch == start_epoch else 0
        skip = first_step * cfg.accumulate_steps * cfg.batch_size
        keys = [(i, draw_seed(seed, epoch, i)) for i in shard[skip:]]
        loader = DataLoader(data, batch_size=cfg.batch_size, sampler=keys, num_workers=workers)
        sums = {"loss": 0.0, "correct": 0.0, "seen": 0.0}
        if first_step:  # the metrics of the steps before the mid-epoch checkpoint
            sums.update(partial.get(str(distributed.rank()), {}))
        model.train()
        step_in_epoch = first_step
        micro = first_step * cfg.accumulate_steps
        with progress(plan.steps_per_epoch - first_step,
                      f"train epoch {epoch + 1}/{cfg.epochs}") as advance:
            batches = iter(loader)
            while micro < plan.micro_per_epoch:
                group = min(cfg.accumulate_steps, plan.micro_per_epoch - micro)
                optimizer.zero_grad(set_to_none=True)
                for k in range(group):
                    pixels, labels = next(batches)
                    x, y = pixels.float().to(device), labels.to(device)
                    target = None
                    if mixer.enabled:
                        x, target = mixer(x, y, seed=draw_seed(seed, epoch, distributed.rank(),
                                                               micro + k, _MIX_SALT))
                    with contextlib.ExitStack() as stack:
                        if k < group - 1 and ddp is not model:  # sync gradients once per step
                            stack.enter_context(ddp.no_sync())  # type: ignore[operator]
                        stack.enter_context(autocast(amp, device))
                        logits = ddp(x)
                        loss = hard_ce(logits, y) if target is None else \
                            soft_ce(logits.float(), target)
                        if distiller is not None:
                            loss = distiller.loss(loss, logits, x)
                    scaler.scale(loss / group).backward()
                    sums["loss"] += float(loss.detach()) * y.numel()
                    sums["correct"] += float((logits.detach().argmax(1) == y).sum())
                    sums["seen"] += y.numel()
                micro += group
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if ema is not None:
                    ema.update(model, step=epoch * plan.steps_per_epoch + step_in_epoch)
                step_in_epoch += 1
                advance(loss=sums["loss"] / max(sums["seen"], 1))
                every = cfg.checkpoint_every_steps
                if every and step_in_epoch % every == 0 and step_in_epoch < plan.steps_per_epoch:
                    gathered = distributed.all_gather_object(sums)
                    snapshot(epoch, step_in_epoch, {str(r): s for r, s in enumerate(gathered)})
        loss_sum, correct, seen = distributed.all_reduce_sum(
            [sums["loss"], sums["correct"], sums["seen"]])
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(seen, 1),
            "train_top1": 100.0 * correct / max(seen, 1),
            "lr": float(scheduler.get_last_lr()[0]),
            "images": seen,
            **_shard_stats(plan.n, shard),
        }
        last_epoch = epoch + 1 == cfg.epochs
        if val_set is not None and ((epoch + 1) % cfg.eval_every == 0 or last_epoch):
            evaluated = ema.module if ema is not None else model
            record["val_top1"] = evaluate_top1(evaluated, val_set, batch_size=eval_batch_size,
                                               workers=workers, label="val", sharded=True)
            if ema is not None:
                record["val_top1_raw"] = evaluate_top1(model, val_set, batch_size=eval_batch_size,
                                                       workers=workers, label="val (raw)",
                                                       sharded=True)
            if best is None or record["val_top1"] > best[0]:
                best = (record["val_top1"], epoch + 1)
                checkpoint.save_weights(best_path, evaluated.state_dict())
        history.append(record)
        _log_epoch(record, cfg.epochs)
        snapshot(epoch + 1, 0, {})
        start_step = 0

    return _finish(model, ema, cfg, history, best, best_path, resumed)


def _finish(model: nn.Module, ema: Any, cfg: TrainConfig, history: list[dict[str, Any]],
            best: tuple[float, int] | None, best_path: Path,
            resumed: tuple[int, int]) -> TrainResult:
    """Put the output weights (last, EMA or best) into ``model``, on CPU, in eval mode."""
    import torch

    distributed.barrier()  # best.pt is complete before any rank reads it
    if cfg.keep == "best" and best is not None:
        model.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True))
        log(f"  keeping the best weights: epoch {best[1]}, val top-1 {best[0]:.2f}%")
    elif ema is not None:
        _copy_into(model, ema.module)
    model.to("cpu").eval()
    vals = [h["val_top1"] for h in history if "val_top1" in h]
    final = (best[0] if cfg.keep == "best" and best else (vals[-1] if vals else None))
    return TrainResult(
        epochs=cfg.epochs,
        final_top1=final,
        best_top1=best[0] if best else None,
        history=history,
        resumed_from_epoch=resumed[0],
        resumed_from_step=resumed[1],
        best_epoch=best[1] if best else None,
    )


def _shard_stats(n: int, shard: list[int]) -> dict[str, Any]:
    """How many distinct images each rank saw this epoch and how many more than one rank saw.

    Recorded so a distributed run shows it really split the data (overlap: only the few images
    DistributedSampler repeats to give every rank the same count). Cheap: one bit per image.
    """
    if distributed.current() is None:
        return {"images_per_rank": [len(set(shard))], "images_overlap": 0}
    bits = np.zeros(n, dtype=bool)
    bits[shard] = True
    masks = [np.unpackbits(m, count=n).astype(bool)
             for m in distributed.all_gather_object(np.packbits(bits))]
    counts = np.sum(masks, axis=0)
    return {"images_per_rank": [int(m.sum()) for m in masks],
            "images_overlap": int((counts > 1).sum())}


def _make_ema(model: nn.Module, decay: float | None) -> Any:
    """timm's ModelEmaV3 (an fp32 copy updated after every optimiser step), or None."""
    if decay is None:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay)


def _num_outputs(model: nn.Module) -> int:
    return int(getattr(model, "num_classes", 0))


def _log_epoch(record: dict[str, Any], epochs: int) -> None:
    val = record.get("val_top1")
    raw = record.get("val_top1_raw")
    log(
        f"  epoch {int(record['epoch'])}/{epochs}: loss {record['loss']:.4f} "
        f"train top-1 {record['train_top1']:.2f}%"
        + (f" val top-1 {val:.2f}%" if val is not None else "")
        + (f" (EMA; raw weights {raw:.2f}%)" if raw is not None else "")
    )
