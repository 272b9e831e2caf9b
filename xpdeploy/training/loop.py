"""Supervised training with per-epoch checkpoints that make a killed run resume exactly.

The data order of epoch e is a permutation seeded by (seed, e), and the augmentation generator is
seeded the same way, so a run resumed from the checkpoint after epoch e replays epochs e+1.. exactly
as an uninterrupted run would (same weights up to floating-point reordering of threads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xpdeploy.data.augment import augment_batch
from xpdeploy.fileio import write_with
from xpdeploy.progress import log, progress
from xpdeploy.training.evaluate import evaluate_top1

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import Dataset

    from xpdeploy.spec import TrainConfig
    from xpdeploy.training.distill import Distiller

CHECKPOINT_NAME = "last.pt"


@dataclass
class TrainResult:
    """What a finished training run reports; ``history`` has one dict per epoch."""

    epochs: int
    final_top1: float | None
    best_top1: float | None
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_epoch: int = 0


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


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    import torch

    write_with(path, lambda tmp: torch.save(state, tmp))


def _load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint's state if it belongs to this exact training run, else None."""
    import torch

    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a checkpoint from an older version or a damaged disk: start over
        log(f"  ignoring unreadable checkpoint {path} ({type(e).__name__}); training from epoch 0")
        return None
    if state.get("fingerprint") != fingerprint:
        log(f"  checkpoint {path} belongs to another config or input; training from epoch 0")
        return None
    return state


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
    """Train ``model`` in place; resume from ``checkpoint_dir/last.pt`` when it fits.

    With a ``distiller`` the loss mixes cross-entropy with distillation from its teacher's logits
    on the same (augmented) images.
    """
    import torch
    from torch.utils.data import DataLoader

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    n = len(train_set)  # type: ignore[arg-type]
    per_epoch = min(n, cfg.max_images or n)
    steps_per_epoch = math.ceil(per_epoch / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(
            s, warmup_steps=warmup_steps, total_steps=total_steps, floor=cfg.min_lr / cfg.lr
        ),
    )
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    checkpoint_path = checkpoint_dir / CHECKPOINT_NAME
    history: list[dict[str, float]] = []
    start_epoch = 0
    state = _load_checkpoint(checkpoint_path, fingerprint)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        history = list(state["history"])
        start_epoch = int(state["epoch"])
        log(f"  resuming from the checkpoint after epoch {start_epoch}/{cfg.epochs}")

    for epoch in range(start_epoch, cfg.epochs):
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=generator)[:per_epoch]
        rng = np.random.default_rng([seed, epoch])
        loader = DataLoader(
            train_set, batch_size=cfg.batch_size, sampler=order.tolist(), num_workers=workers
        )
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        with progress(steps_per_epoch, f"train epoch {epoch + 1}/{cfg.epochs}") as advance:
            for pixels, labels in loader:
                x = torch.from_numpy(
                    augment_batch(
                        pixels.numpy(),
                        rng,
                        hflip=cfg.augment.hflip,
                        crop_padding=cfg.augment.crop_padding,
                    )
                )
                logits = model(x)
                loss = criterion(logits, labels)
                if distiller is not None:
                    loss = distiller.loss(loss, logits, x)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                loss_sum += loss.item() * labels.numel()
                correct += int((logits.argmax(1) == labels).sum())
                seen += labels.numel()
                advance(loss=loss_sum / seen)
        val_top1 = (
            evaluate_top1(model, val_set, batch_size=eval_batch_size, workers=workers, label="val")
            if val_set is not None
            else None
        )
        record = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(seen, 1),
            "train_top1": 100.0 * correct / max(seen, 1),
            "lr": float(scheduler.get_last_lr()[0]),
        }
        if val_top1 is not None:
            record["val_top1"] = val_top1
        history.append(record)
        log(
            f"  epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f} "
            f"train top-1 {record['train_top1']:.2f}%"
            + (f" val top-1 {val_top1:.2f}%" if val_top1 is not None else "")
        )
        _save_checkpoint(
            checkpoint_path,
            {
                "fingerprint": fingerprint,
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "history": history,
            },
        )
    model.eval()
    vals = [h["val_top1"] for h in history if "val_top1" in h]
    return TrainResult(
        epochs=cfg.epochs,
        final_top1=vals[-1] if vals else None,
        best_top1=max(vals) if vals else None,
        history=history,
        resumed_from_epoch=start_epoch,
    )
