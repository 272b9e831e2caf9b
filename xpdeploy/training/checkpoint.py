"""Checkpoints of every resumable run (training, mask learning): written by rank 0 alone.

A checkpoint holds the caller's state (the training loop's model, optimiser, scheduler, AMP scaler
and EMA state, position and history; learn_masks' masks, optimiser, scheduler and history) and
every rank's RNG states (torch CPU and CUDA, numpy's and Python's global generators) gathered to
rank 0, so each rank of a resumed run draws what it would have drawn. Augmentation is seeded per
draw (:mod:`xpdeploy.data.train_augment`), so these RNG states only matter for dropout and the like.

A checkpoint carries the fingerprint of the run's config and inputs; one from another config is
ignored (the run restarts), never half-applied. Writes are atomic (``fileio.write_with``).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xpdeploy import distributed
from xpdeploy.fileio import write_with
from xpdeploy.progress import log

#: The full training state after the last completed epoch or ``checkpoint_every_steps`` step.
LAST_NAME = "last.pt"
#: The weights that scored best on val so far (weights only: a model state dict).
BEST_NAME = "best.pt"


def rng_state() -> dict[str, Any]:
    """This process's global RNG states (restored by :func:`set_rng_state`)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _numpy_state() -> tuple[Any, ...]:
    """numpy's legacy global state with its key array as a tensor, so ``weights_only`` loads it."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (plus every rank's RNG states) atomically on rank 0.

    Collective: every rank must call it at the same point, because the RNG states are gathered.
    """
    rngs = distributed.all_gather_object(rng_state())
    if distributed.is_main():
        full = {**state, "rng": rngs, "world_size": distributed.world_size()}
        write_with(path, lambda tmp: torch.save(full, tmp))


def save_weights(path: Path, weights: dict[str, torch.Tensor]) -> None:
    """Write a weights-only checkpoint (``best.pt``) on rank 0."""
    if distributed.is_main():
        cpu = {k: v.detach().cpu() for k, v in weights.items()}
        write_with(path, lambda tmp: torch.save(cpu, tmp))


def load(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint's state if it belongs to this exact run (its ``fingerprint``), else None.

    Every rank reads it (the run folder is on a shared filesystem) and restores its own RNG
    states; a checkpoint written by a different number of ranks restores rank 0's states only
    where the rank exists, and says so.
    """
    if not path.is_file():
        return None
    try:  # weights_only: a checkpoint is data, never code
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an older format or a damaged disk: start over, say so
        log(f"  ignoring unreadable checkpoint {path} ({type(e).__name__}); starting at epoch 0")
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        log(f"  checkpoint {path} belongs to another config or input; starting at epoch 0")
        return None
    rngs = state.get("rng") or []
    me = distributed.rank()
    if state.get("world_size", 1) != distributed.world_size():
        log(f"  checkpoint was written by {state.get('world_size', 1)} processes, this run has "
            f"{distributed.world_size()}: continuing from the start of the interrupted epoch "
            "(the global batch changes, so the result differs from an uninterrupted run)")
    if me < len(rngs):
        set_rng_state(rngs[me])
    return state
