"""Mask learning on 2 CPU ranks (gloo, DDP) against one process with the same global batch.

N ranks with batch b see, step by step, the images one process sees with batch N x b (the same
global order, dealt out r, r + N, ...), and DDP averages their per-rank mean gradients, which is
the gradient of the global batch mean; the regularisers are identical on every rank. So the masks
match a single process with twice the batch to float rounding, when the subset divides into
global batches (here 48 images, global batch 16).

These runs use ``smoothness: none``. The default ``class_tv`` term has the gradient
``lambda_smooth * sign(M[c] - M[c+1])``, and rows that the same updates moved alike differ by 0
or by one rounding error: a batch of 16 and two of 8 round differently, the sign flips for a few
entries, and Adam turns that into a full ~lr step (measured: 8 of 1280 entries off by ~1e-3 after
6 steps). That is the loss's own sensitivity to rounding, as between any two batch sizes, not a
difference in what the ranks compute; every rank still ends with bit-identical masks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import xpdeploy.xpruner.learn as learn
from tests.conftest import TINY_MODEL
from tests.distributed_utils import run_ranks
from xpdeploy import distributed
from xpdeploy.models.factory import create_model
from xpdeploy.spec import LearnMasksConfig, ModelConfig
from xpdeploy.training import checkpoint

NUM_CLASSES = 10
PER_RANK_BATCH = 8
_REAL_WRITE, _REAL_LOG_EPOCH = checkpoint.write_with, learn._log_epoch
SETTINGS = {"epochs": 2, "max_images": 48, "lr": 0.05, "smoothness": "none"}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(ModelConfig(**TINY_MODEL))


class _Recorded(torch.utils.data.Dataset):
    """Noise images, label i % 10, that remember which indices were read (in this process)."""

    def __init__(self, n: int = 64) -> None:
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((n, 3, 16, 16)).astype(np.float32)
        self.read: list[int] = []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        self.read.append(int(i))
        return self.x[i], i % NUM_CLASSES


def _learn_on_rank(cfg: LearnMasksConfig, checkpoint_dir: Path,
                   stop_after_epoch: int | None = None) -> dict[str, Any]:
    """learn_masks on this rank; counts its checkpoint writes and the images it read.

    ``stop_after_epoch``: every rank stops (as if killed) once that epoch's checkpoint is due.
    """
    data = _Recorded()
    saves: list[int] = []

    def counting_write(path: Path, write: Any) -> None:  # the file writes this rank makes
        _REAL_WRITE(path, write)
        saves.append(int(torch.load(path, weights_only=True)["epoch"]))

    def log_then_stop(record: dict[str, float], epochs: int) -> None:
        _REAL_LOG_EPOCH(record, epochs)
        if stop_after_epoch is not None and record["epoch"] > stop_after_epoch:
            raise KeyboardInterrupt

    checkpoint.write_with, learn._log_epoch = counting_write, log_then_stop
    try:
        result = learn.learn_masks(_model(), data, cfg, num_classes=NUM_CLASSES, seed=0,
                                   checkpoint_dir=checkpoint_dir, fingerprint="f")
    except KeyboardInterrupt:
        return {"rank": distributed.rank(), "interrupted": True, "saves": saves}
    finally:
        checkpoint.write_with, learn._log_epoch = _REAL_WRITE, _REAL_LOG_EPOCH
    return {"rank": distributed.rank(), "interrupted": False, "saves": saves, "read": data.read,
            "masks": [t.detach().clone() for t in result.masks.tables()],
            "history": result.history, "steps": result.steps,
            "resumed_from_epoch": result.resumed_from_epoch}


def _stop_then_resume_on_rank(cfg: LearnMasksConfig, checkpoint_dir: Path
                              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """An interrupted run (stopped after epoch 1), then the run that resumes it, in one spawn."""
    stopped = _learn_on_rank(cfg, checkpoint_dir, stop_after_epoch=1)
    return stopped, _learn_on_rank(cfg, checkpoint_dir)


def _cfg(batch_size: int) -> LearnMasksConfig:
    return LearnMasksConfig(batch_size=batch_size, **SETTINGS)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> learn.MaskLearningResult:
    """The reference: one process, global batch 2 x PER_RANK_BATCH."""
    return learn.learn_masks(_model(), _Recorded(), _cfg(2 * PER_RANK_BATCH),
                             num_classes=NUM_CLASSES, seed=0,
                             checkpoint_dir=tmp_path_factory.mktemp("single"), fingerprint="f")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[list[dict[str, Any]], Path]:
    """Two ranks with PER_RANK_BATCH each: each rank's result, and the shared checkpoint folder."""
    folder = tmp_path_factory.mktemp("ckpt")
    return run_ranks(_learn_on_rank, 2, _cfg(PER_RANK_BATCH), folder), folder


def test_two_ranks_learn_the_masks_of_one_process_with_twice_the_batch(
    two_ranks: tuple[list[dict[str, Any]], Path], one_process: learn.MaskLearningResult
) -> None:
    ranks, folder = two_ranks
    assert [r["rank"] for r in ranks] == [0, 1]
    first, second = ranks
    # every rank ends with the very same masks and history (DDP: same averaged step everywhere)
    for a, b in zip(first["masks"], second["masks"], strict=True):
        assert torch.equal(a, b)
    assert first["history"] == second["history"]
    # ... which are those of one process with the global batch
    for a, b in zip(first["masks"], one_process.masks.tables(), strict=True):
        torch.testing.assert_close(a, b.detach(), atol=1e-5, rtol=0)
    assert first["steps"] == one_process.steps == 6
    for h2, h1 in zip(first["history"], one_process.history, strict=True):
        assert h2["steps"] == h1["steps"]
        for key in ("loss", "ce", "sparsity", "smoothness", "lr"):  # global means, not rank 0's
            assert h2[key] == pytest.approx(h1[key], rel=1e-5, abs=1e-7), key
    # disjoint shards of the one seeded subset, every epoch, together exactly that subset
    subset = set(learn.epoch_subset(64, SETTINGS["max_images"], seed=0).tolist())
    per_epoch = SETTINGS["max_images"] // 2
    for epoch in range(SETTINGS["epochs"]):
        seen = [r["read"][epoch * per_epoch:(epoch + 1) * per_epoch] for r in ranks]
        assert len(set(seen[0])) == per_epoch and not set(seen[0]) & set(seen[1])
        assert set(seen[0]) | set(seen[1]) == subset
    # rank 0 alone wrote the checkpoint, after each epoch; it holds the masks the ranks ended with
    assert first["saves"] == [1, 2] and second["saves"] == []
    state = torch.load(folder / learn.CHECKPOINT_NAME, weights_only=True)
    assert state["epoch"] == 2
    for key, value in state["masks"].items():
        table = getattr(one_process.masks, key.split(".")[0])[int(key.split(".")[1])]
        torch.testing.assert_close(value, table.detach(), atol=1e-5, rtol=0)


def test_two_ranks_resume_from_rank_0s_checkpoint(
    tmp_path: Path, two_ranks: tuple[list[dict[str, Any]], Path]
) -> None:
    runs = run_ranks(_stop_then_resume_on_rank, 2, _cfg(PER_RANK_BATCH), tmp_path / "ckpt")
    stopped, resumed = [r[0] for r in runs], [r[1] for r in runs]
    assert all(r["interrupted"] for r in stopped)
    assert stopped[0]["saves"] == [1] and stopped[1]["saves"] == []
    assert [r["resumed_from_epoch"] for r in resumed] == [1, 1]  # both read the shared file
    assert resumed[0]["saves"] == [2] and resumed[1]["saves"] == []
    for a, b in zip(resumed[0]["masks"], resumed[1]["masks"], strict=True):
        assert torch.equal(a, b)
    # the same masks as an uninterrupted two-rank run
    straight = two_ranks[0]
    for a, b in zip(resumed[0]["masks"], straight[0]["masks"], strict=True):
        assert torch.equal(a, b)
    assert resumed[0]["history"] == straight[0]["history"]


def test_epoch_order_shards_one_global_order() -> None:
    subset = learn.epoch_subset(100, 40, seed=3)
    whole = learn.epoch_order(subset, seed=3, epoch=1)
    shards = [learn.epoch_order(subset, seed=3, epoch=1, rank=r, world_size=2) for r in range(2)]
    assert sorted(whole) == sorted(subset.tolist())
    assert shards[0] == whole[0::2] and shards[1] == whole[1::2]
    assert learn.epoch_order(subset, seed=3, epoch=2) != whole  # a fresh order every epoch
