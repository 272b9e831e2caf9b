"""The threshold search on 2 CPU ranks (gloo, DDP) against one process with twice the batch.

Each rank draws its own shard of one seeded global order (``shuffled_batches(rank=, world_size=)``)
and DDP averages the threshold (and backbone) gradients, so 2 ranks with batch 8 search as one
process with batch 16, to float rounding: 64 images, 4 global batches per pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import timm
import torch

from tests.distributed_utils import run_ranks
from xpdeploy import distributed
from xpdeploy.prune.criteria import magnitude_scores
from xpdeploy.prune.mac_model import MacModel
from xpdeploy.prune.planner import PlanConstraints
from xpdeploy.prune.threshold import ThresholdResult, threshold_search
from xpdeploy.spec import ThresholdConfig
from xpdeploy.training.batches import shuffled_batches

EXACT = PlanConstraints(round_mlp_to=1, min_mlp_per_block=1)
PER_RANK_BATCH = 8
#: Thresholds, expected MACs, multipliers and losses: equal to float rounding (fp32 thresholds).
ATOL = 1e-5


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32,
                             depth=2, num_heads=4, num_classes=10).eval()


def _data() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(torch.randn(64, 3, 16, 16, generator=g),
                                          torch.randint(0, 10, (64,), generator=g))


def _search(batch_size: int, backbone_lr: float | None,
            **v2: Any) -> tuple[ThresholdResult, list[Any]]:
    """A 12-step search on this rank's shard; the result and the backbone's weights after it."""
    model = _model()
    macs = MacModel.from_model(model, (3, 16, 16))
    scores = magnitude_scores(model).normalized("type")
    batches = shuffled_batches(_data(), batch_size, seed=0, rank=distributed.rank(),
                               world_size=distributed.world_size())
    cfg = ThresholdConfig(steps=12, backbone_lr=backbone_lr, **v2)
    result = threshold_search(model, scores, macs, batches, cfg, 0.5 * macs.original, EXACT)
    return result, [p.detach().clone() for p in model.parameters()]


def _search_on_rank(batch_size: int) -> dict[str, Any]:
    frozen, _ = _search(batch_size, None)
    adapted, weights = _search(batch_size, 1e-3)
    projected, _ = _search(batch_size, None, loss="kl", budget="projection")
    return {"rank": distributed.rank(), "frozen": frozen, "adapted": adapted, "weights": weights,
            "projected": projected}


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    return run_ranks(_search_on_rank, 2, PER_RANK_BATCH)


def _assert_same_search(a: ThresholdResult, b: ThresholdResult, atol: float) -> None:
    np.testing.assert_allclose(a.thresholds, b.thresholds, atol=atol, rtol=0)
    assert a.keep.to_json() == b.keep.to_json()
    assert a.threshold_keep.to_json() == b.threshold_keep.to_json()
    assert len(a.history) == len(b.history)
    for ha, hb in zip(a.history, b.history, strict=True):
        for key in ("ce", "R", "R_hard", "beta", "gamma", "n"):
            assert ha[key] == pytest.approx(hb[key], rel=atol, abs=atol), key


def test_ranks_end_with_identical_thresholds(ranks) -> None:
    first, second = ranks
    assert [first["rank"], second["rank"]] == [0, 1]
    for key in ("frozen", "adapted", "projected"):
        a, b = first[key], second[key]
        # bit-identical: the same averaged gradients, hence the same Adam steps and multipliers
        assert a.thresholds == b.thresholds and a.history == b.history, key
        assert a.keep.to_json() == b.keep.to_json()
    for wa, wb in zip(first["weights"], second["weights"], strict=True):
        assert torch.equal(wa, wb)


def test_two_ranks_search_as_one_process_with_twice_the_batch(ranks) -> None:
    frozen, _ = _search(2 * PER_RANK_BATCH, None)
    _assert_same_search(ranks[0]["frozen"], frozen, ATOL)
    adapted, weights = _search(2 * PER_RANK_BATCH, 1e-3)
    _assert_same_search(ranks[0]["adapted"], adapted, ATOL)
    assert adapted.backbone_adapted
    projected, _ = _search(2 * PER_RANK_BATCH, None, loss="kl", budget="projection")
    _assert_same_search(ranks[0]["projected"], projected, ATOL)
    for wa, wb in zip(ranks[0]["weights"], weights, strict=True):
        torch.testing.assert_close(wa, wb, atol=ATOL, rtol=0)


def test_shuffled_batches_deal_one_global_order_out_to_the_ranks() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(24).float().view(24, 1, 1, 1),
                                          torch.arange(24))
    whole = shuffled_batches(data, 4, seed=5)
    shards = [shuffled_batches(data, 2, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(12 + 3):  # two passes and then some: every pass a fresh global order
        _, y = next(whole)
        (_, y0), (_, y1) = next(shards[0]), next(shards[1])
        assert y0.tolist() == y[0::2].tolist() and y1.tolist() == y[1::2].tolist()
