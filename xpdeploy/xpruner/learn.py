"""Stage 1 of X-Pruner: learn the class-wise masks with the backbone frozen
(docs/method.md, "Stage 1").

Loss = CE(masked logits, y) + lambda_sparse * L_sparse + lambda_smooth * L_smooth (``target:
label``, the paper), or with KL(unmasked || masked) in place of the CE and the rows mixed by the
unmasked model's softmax (``target: teacher``, no label leak: :func:`_data_term`; the history's
``ce`` is then that KL); only the masks train, with Adam (default) or SGD with momentum
(``optimizer``; no weight decay: decay would shrink the rows of classes absent from a batch) and a
cosine decay from ``lr`` to ``min_lr`` over all steps or a constant ``lr`` (``schedule``).

**Convergence is checked, not assumed.** Adam moves every parameter by about lr per step whatever
its gradient, so a short run leaves most masks travelling at full speed and their scores only say
how consistently a gradient's sign pointed one way. Each epoch therefore records the share of mask
entries that moved more than ``converged_eps`` during it (heads and neurons apart) and the spread
(std / mean) of the unit scores; the run is ``converged`` when under 5% of both moved in the last
epoch, and says what to change when not.

The data order of epoch e is :func:`xpdeploy.training.batches.rank_shard` seeded by (seed, e), as
in :mod:`xpdeploy.training.loop`, and the optional ``max_images`` cap draws one seeded subset used
by every epoch (the same few images every epoch, unlike the training loop's fresh subset per epoch:
the masks should settle on one fixed set); the frozen model runs in eval mode (no dropout), so a run
resumed from the checkpoint after epoch e gives the same masks as an uninterrupted one.

**Under torchrun** (collective: every rank calls :func:`learn_masks` with the same arguments) the
global subset and each epoch's global order are the same as for one process; rank r takes the
positions r, r + N, ... of that order and ``batch_size`` is **per rank** (global batch N x
batch_size). The masks are parameters of the DDP-wrapped :class:`MaskedModel`, so their gradients
(cross-entropy of the rank's images plus the regularisers, which every rank adds) are averaged
over ranks and every rank takes the same Adam step: N ranks with batch b learn the masks one
process learns with batch N x b, to float rounding, when the subset divides into global batches.
The masks and Adam's state stay float32 whatever the backbone's dtype or autocast (they move by
~lr per step; half precision would round small steps away). Rank 0 alone writes the checkpoint
(:mod:`xpdeploy.training.checkpoint`, with every rank's RNG states); every rank resumes from it
(the stage folder must be on a filesystem all ranks see).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from xpdeploy import distributed
from xpdeploy.errors import ConfigError, DataError, ModelError
from xpdeploy.fileio import sha256_json, write_with
from xpdeploy.progress import log, progress
from xpdeploy.training import checkpoint
from xpdeploy.training.batches import rank_shard
from xpdeploy.training.loop import lr_factor
from xpdeploy.training.precision import autocast, autocast_dtype
from xpdeploy.xpruner.losses import smoothness_loss, sparsity_loss
from xpdeploy.xpruner.masks import ClassMasks, MaskedModel, scores

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import Dataset

    from xpdeploy.prune.unit_scores import UnitScores
    from xpdeploy.spec import LearnMasksConfig

CHECKPOINT_NAME = "masks.pt"
#: The run counts as converged when fewer than this share of head and of neuron masks moved by
#: more than ``converged_eps`` during the last epoch.
CONVERGED_SHARE = 0.05
#: Mixed into the seed of the ``max_images`` subset so it differs from every epoch's order.
_SUBSET_SALT = 0x5EED


@dataclass
class MaskLearningResult:
    """Learned masks, their unit scores, one history dict per epoch, and the convergence verdict.

    ``steps`` counts optimiser steps behind the masks (resumed ones included); ``seconds`` is the
    wall time of this call only.
    """

    masks: ClassMasks
    scores: UnitScores
    history: list[dict[str, float]] = field(default_factory=list)
    converged: bool = False
    steps: int = 0
    seconds: float = 0.0
    resumed_from_epoch: int = 0


def epoch_subset(n: int, max_images: int | None, seed: int) -> np.ndarray:
    """Indices of the images used every epoch: all of them, or one seeded sorted sample.

    Global (the same on every rank): :func:`epoch_order` shards it.
    """
    if max_images is None or max_images >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, _SUBSET_SALT])
    return np.sort(rng.choice(n, size=max_images, replace=False)).astype(np.int64)


def epoch_order(subset: np.ndarray, *, seed: int, epoch: int, rank: int = 0,
                world_size: int = 1) -> list[int]:
    """This rank's dataset indices for ``epoch``, in order: its shard of a seeded shuffle of
    ``subset`` (:func:`rank_shard`; every rank gets as many, the sampler repeats a few when
    ``len(subset)`` is not a multiple of ``world_size``)."""
    positions = rank_shard(len(subset), per_epoch=None, seed=seed, epoch=epoch, rank=rank,
                           world_size=world_size)
    return subset[np.asarray(positions, dtype=np.int64)].tolist()


def _spread(tables: list[np.ndarray]) -> float:
    """std / mean of the scores of one unit type across the whole model (0 when the mean is 0)."""
    values = np.concatenate(tables)
    mean = float(np.mean(values))
    return float(np.std(values) / mean) if mean else 0.0


def _abs_mean(tables: list[torch.Tensor]) -> float:
    """Mean |mask value| over every entry of these tables (1.0 at the start)."""
    total = sum(float(t.detach().abs().double().sum()) for t in tables)
    return total / max(sum(t.numel() for t in tables), 1)


def _moved_share(before: list[torch.Tensor], after: list[torch.Tensor], eps: float) -> float:
    """Share of entries of these tables that changed by more than ``eps`` (absolute mask units)."""
    pairs = zip(after, before, strict=True)
    moved = sum(int(((a.detach() - b).abs() > eps).sum()) for a, b in pairs)
    total = sum(a.numel() for a in after)
    return moved / max(total, 1)


def _run_key(cfg: LearnMasksConfig, *, fingerprint: str, seed: int, num_classes: int,
             images: int, world_size: int) -> str:
    """The caller's fingerprint plus what this function itself depends on (thread count aside).

    So a checkpoint is never resumed under another config, seed, data size or number of ranks
    (which sets the global batch, the steps per epoch and so the lr schedule) even when the caller's
    fingerprint does not cover them.
    """
    settings = cfg.model_dump(mode="json", exclude={"threads"})
    return sha256_json({"fingerprint": fingerprint, "cfg": settings, "seed": seed,
                        "num_classes": num_classes, "images": images,
                        "world_size": world_size})


def _check_same_start(start_epoch: int, path: Path | None) -> None:
    """Refuse (on every rank alike) a resume where the ranks read different checkpoints.

    They would run different numbers of steps and hang in DDP's all-reduce; the usual cause is a
    stage folder that is not on a filesystem every rank sees.
    """
    starts = distributed.all_gather_object(start_epoch)
    if len(set(starts)) > 1:
        raise ConfigError(
            f"learn_masks: the ranks found different mask checkpoints at {path} (resuming after "
            f"epochs {starts}, in rank order); put the run folder on a filesystem every rank sees"
        )


def _global_means(sums: dict[str, float], seen: int) -> dict[str, float]:
    """Per-image means of the epoch's loss sums over all ranks' images (collective)."""
    keys = list(sums)
    *totals, images = distributed.all_reduce_sum([*(sums[k] for k in keys), seen])
    return {k: v / max(images, 1.0) for k, v in zip(keys, totals, strict=True)}


def _fresh_state(
    model: nn.Module, num_classes: int, cfg: LearnMasksConfig, total_steps: int
) -> tuple[ClassMasks, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """All-ones masks; Adam (or SGD with momentum) without weight decay; a cosine decay from lr to
    min_lr over all steps, or a constant lr."""
    masks = ClassMasks.for_model(model, num_classes)
    if cfg.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            masks.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=0.0)
    else:
        optimizer = torch.optim.Adam(masks.parameters(), lr=cfg.lr, weight_decay=0.0)
    floor = cfg.min_lr / cfg.lr
    if cfg.schedule == "constant":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _s: 1.0)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: lr_factor(s, warmup_steps=0, total_steps=total_steps, floor=floor))
    return masks, optimizer, scheduler


@dataclass
class _Run:
    """The mutable state of one mask-learning run: what the checkpoint holds."""

    masks: ClassMasks
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    history: list[dict[str, float]] = field(default_factory=list)
    start_epoch: int = 0

    def checkpoint(self, run_key: str) -> dict[str, Any]:
        """The state :func:`xpdeploy.training.checkpoint.save` writes; ``run_key`` (which folds in
        the caller's fingerprint) is its fingerprint."""
        return {
            "fingerprint": run_key,
            "epoch": len(self.history),
            "masks": self.masks.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": self.history,
        }


def _start(model: nn.Module, num_classes: int, cfg: LearnMasksConfig, total_steps: int,
           checkpoint_path: Path | None, run_key: str) -> _Run:
    """A fresh run, or the one the checkpoint holds when it belongs to this exact run (its RNG
    states restored with it)."""
    run = _Run(*_fresh_state(model, num_classes, cfg, total_steps))
    state = checkpoint.load(checkpoint_path, run_key) if checkpoint_path else None
    if state is None:
        return run
    try:
        run.masks.load_state_dict(state["masks"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        run.history = list(state["history"])
        run.start_epoch = int(state["epoch"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        log(f"  mask checkpoint {checkpoint_path} does not fit this model "
            f"({type(e).__name__}); starting at epoch 0")
        return _Run(*_fresh_state(model, num_classes, cfg, total_steps))
    log(f"  resuming mask learning after epoch {run.start_epoch}/{cfg.epochs}")
    return run


def _check_labels(y: torch.Tensor, num_classes: int) -> None:
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise DataError(
            f"learn_masks: a label is outside 0..{num_classes - 1} (seen "
            f"{int(y.min())}..{int(y.max())}); the data and the model disagree"
        )


def _data_term(ddp: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: LearnMasksConfig,
               amp: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """The loss term that ties the masks to the data (``target``), a 0-d fp32 tensor in nats.

    ``label``: cross-entropy of the masked model (rows of the true class) to the label, as in the
    paper. The rows know the label, so they can raise the true logit beyond anything the unmasked
    model does (measured: the masked CE falls to 0.10 on a 69%-accurate model) and the scores
    partly measure that leak. ``teacher``: the frozen unmasked model's softmax chooses the rows
    (a probability-weighted mix) and the masked model is fitted to it by KL divergence; the label
    is never read, all-ones masks are a perfect fit, and a mask moves below 1 only as far as its
    unit is not needed to reproduce the model's own class evidence.
    """
    import torch.nn.functional as F

    if cfg.target == "label":
        with autocast(amp, device):
            logits = ddp(x, y)
        return F.cross_entropy(logits.float(), y)
    with torch.no_grad(), autocast(amp, device):
        teacher = distributed.unwrap(ddp).model(x).float()
    probs = teacher.softmax(dim=-1)
    with autocast(amp, device):
        logits = ddp(x, probs)
    return F.kl_div(logits.float().log_softmax(dim=-1), teacher.log_softmax(dim=-1),
                    reduction="batchmean", log_target=True)


def _train_epoch(ddp: nn.Module, run: _Run, loader: Any, cfg: LearnMasksConfig, *,
                 num_classes: int, device: torch.device, steps: int, label: str
                 ) -> tuple[dict[str, float], int]:
    """One pass over this rank's shard: (sums over its images of each loss term, images seen).

    ``ddp`` is the (DDP-wrapped) :class:`MaskedModel`: its backward averages the mask gradients
    over ranks, so every rank takes the same step. The regularisers are computed on every rank
    from the (identical) masks, so their averaged gradient is their own.
    """
    masks = run.masks
    amp = autocast_dtype("auto-bf16" if cfg.amp == "auto" else cfg.amp, device)
    sums = {"loss": 0.0, "ce": 0.0, "sparsity": 0.0, "smoothness": 0.0}
    seen = 0
    with progress(steps, label) as adv:
        for pixels, labels in loader:
            x = torch.as_tensor(pixels).to(device, non_blocking=True)
            y = torch.as_tensor(labels).to(device, non_blocking=True)
            _check_labels(y, num_classes)
            ce = _data_term(ddp, x, y, cfg, amp, device)
            sparse = sparsity_loss(masks, cfg.sparsity, cfg.penalty_norm)
            smooth = smoothness_loss(masks, cfg.smoothness, cfg.penalty_norm)
            loss = ce + cfg.lambda_sparse * sparse + cfg.lambda_smooth * smooth
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step()
            run.scheduler.step()
            if cfg.project:
                with torch.no_grad():
                    for t in masks.tables():
                        t.clamp_(0.0, 1.0)
            b = int(y.numel())
            for key, value in (("loss", loss), ("ce", ce), ("sparsity", sparse),
                               ("smoothness", smooth)):
                sums[key] += float(value.detach()) * b
            seen += b
            adv(loss=sums["loss"] / seen, ce=sums["ce"] / seen)
    return sums, seen


def _epoch_record(run: _Run, before: list[torch.Tensor], means: dict[str, float], *,
                  epoch: int, steps: int, eps: float) -> dict[str, float]:
    """The history entry of ``epoch`` (0-based): global loss means and the convergence figures.

    The convergence figures come from the masks alone, which are identical on every rank.
    """
    masks, nh = run.masks, run.masks.num_blocks
    after = masks.tables()
    unit_scores = scores(masks)
    return {
        "epoch": epoch + 1,
        **means,
        "moved_heads": _moved_share(before[:nh], after[:nh], eps),
        "moved_neurons": _moved_share(before[nh:], after[nh:], eps),
        "score_spread_heads": _spread(unit_scores.heads),
        "score_spread_neurons": _spread(unit_scores.neurons),
        "mask_abs_mean_heads": _abs_mean(after[:nh]),
        "mask_abs_mean_neurons": _abs_mean(after[nh:]),
        "lr": float(run.scheduler.get_last_lr()[0]),
        "steps": (epoch + 1) * steps,
    }


def _log_epoch(record: dict[str, float], epochs: int) -> None:
    log(
        f"  masks epoch {int(record['epoch'])}/{epochs}: loss {record['loss']:.4f} "
        f"(ce {record['ce']:.4f}, sparsity {record['sparsity']:.4g}, smoothness "
        f"{record['smoothness']:.4g}); moved heads {record['moved_heads']:.1%} neurons "
        f"{record['moved_neurons']:.1%}; score std/mean heads "
        f"{record['score_spread_heads']:.3f} neurons {record['score_spread_neurons']:.3f}"
    )


def _warn_unconverged(last: dict[str, float], cfg: LearnMasksConfig) -> None:
    log(
        f"  warning: the masks had not converged: {last['moved_heads']:.1%} of head and "
        f"{last['moved_neurons']:.1%} of neuron masks moved by more than {cfg.converged_eps:g} "
        f"in the last epoch (converged: under {CONVERGED_SHARE:.0%} of both); their scores "
        "mostly reflect the sign of the gradient, not a balance. Train longer "
        "(learn_masks.epochs, or a larger learn_masks.max_images) or raise learn_masks.lr"
    )


def learn_masks(
    model: nn.Module,
    train_set: Dataset,
    cfg: LearnMasksConfig,
    *,
    num_classes: int,
    seed: int,
    checkpoint_dir: Path | None = None,
    fingerprint: str = "",
    workers: int = 0,
) -> MaskLearningResult:
    """Learn class-wise head and neuron masks for ``model`` on ``train_set``.

    ``train_set`` yields ``(float32 (3, H, W) pixels, int label)``. The model is frozen and in eval
    mode during the run; its ``requires_grad`` flags and train/eval mode are restored at the end,
    and its weights are not changed. With ``checkpoint_dir``, ``masks.pt`` is written atomically
    after every epoch (by rank 0 alone under torchrun) and a run whose checkpoint carries the same
    ``fingerprint`` resumes from it.

    Collective under torchrun: every rank calls it with the same arguments and gets the same masks
    and history; ``cfg.batch_size`` is images per rank per step (module docstring).
    """
    from torch.utils.data import DataLoader

    model_classes = getattr(model, "num_classes", None)
    if isinstance(model_classes, int) and model_classes != num_classes:
        raise ModelError(
            f"learn_masks: num_classes is {num_classes} but the model predicts {model_classes} "
            "classes; masks need one row per class the model predicts"
        )
    start_time = time.monotonic()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world = distributed.rank(), distributed.world_size()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        subset = epoch_subset(len(train_set), cfg.max_images, seed)  # type: ignore[arg-type]
        if len(subset) == 0:
            raise DataError("learn_masks: the train split is empty; give it images")
        steps_per_epoch = math.ceil(math.ceil(len(subset) / world) / cfg.batch_size)
        total_steps = steps_per_epoch * cfg.epochs
        run_key = _run_key(cfg, fingerprint=fingerprint, seed=seed, num_classes=num_classes,
                           images=len(train_set), world_size=world)  # type: ignore[arg-type]
        checkpoint_path = checkpoint_dir / CHECKPOINT_NAME if checkpoint_dir else None
        run = _start(model, num_classes, cfg, total_steps, checkpoint_path, run_key)
        _check_same_start(run.start_epoch, checkpoint_path)
        # Backbone frozen before wrapping: DDP then syncs (and expects a gradient for) the masks
        # only, and every table gets one each step (absent classes' rows as zeros).
        ddp = distributed.wrap_ddp(MaskedModel(model, run.masks))

        for epoch in range(run.start_epoch, cfg.epochs):
            order = epoch_order(subset, seed=seed, epoch=epoch, rank=rank, world_size=world)
            loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=order,
                                num_workers=workers)
            before = [t.detach().clone() for t in run.masks.tables()]
            sums, seen = _train_epoch(ddp, run, loader, cfg, num_classes=num_classes,
                                      device=device, steps=steps_per_epoch,
                                      label=f"learn masks epoch {epoch + 1}/{cfg.epochs}")
            record = _epoch_record(run, before, _global_means(sums, seen), epoch=epoch,
                                   steps=steps_per_epoch, eps=cfg.converged_eps)
            run.history.append(record)
            _log_epoch(record, cfg.epochs)
            if checkpoint_path is not None:  # collective: gathers every rank's RNG states
                checkpoint.save(checkpoint_path, run.checkpoint(run_key))
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)

    history = run.history
    last = history[-1] if history else {}
    converged = bool(history) and (
        last["moved_heads"] < CONVERGED_SHARE and last["moved_neurons"] < CONVERGED_SHARE
    )
    if not converged and history:
        _warn_unconverged(last, cfg)
    return MaskLearningResult(
        masks=run.masks,
        scores=scores(run.masks),
        history=history,
        converged=converged,
        steps=total_steps,
        seconds=time.monotonic() - start_time,
        resumed_from_epoch=run.start_epoch,
    )


def save_masks(path: str | Path, masks: ClassMasks) -> None:
    """Write the mask tables as safetensors (``heads.<b>``, ``neurons.<b>``), atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous()
               for k, v in masks.state_dict().items()}
    metadata = {"format": "xpdeploy.class_masks", "num_classes": str(masks.num_classes)}
    write_with(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_masks(path: str | Path, model: nn.Module, num_classes: int) -> ClassMasks:
    """Read masks written by :func:`save_masks` for ``model``; a mismatch is a one-line error."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"mask file {path} does not exist; run the learn_masks stage first")
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise ModelError(
            f"cannot read mask file {path}: {e}; delete it and rerun learn_masks"
        ) from None
    masks = ClassMasks.for_model(model, num_classes)
    expected = {k: tuple(v.shape) for k, v in masks.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        diff = sorted(set(expected.items()) ^ set(found.items()))[:4]
        raise ModelError(
            f"mask file {path} does not fit this model with {num_classes} classes (first "
            f"differences as (table, shape): {diff}); rerun learn_masks for this model"
        )
    masks.load_state_dict({k: v.to(masks.heads[0].device) for k, v in tensors.items()})
    return masks
