"""prune/sensitivity: measured per-block loss curves and the plan they give (tiny ViT, CPU)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from tests.conftest import TINY_MODEL
from tests.distributed_utils import run_ranks
from xpdeploy.prune.criteria import magnitude_scores, random_scores
from xpdeploy.prune.mac_model import MacModel
from xpdeploy.prune.planner import PlanConstraints, plan_global
from xpdeploy.prune.sensitivity import (
    SensitivityCurves,
    measure_curves,
    sensitivity_plan,
)
from xpdeploy.prune.surgery import prune_model
from xpdeploy.prune.unit_scores import UnitScores

C = PlanConstraints(round_mlp_to=8, min_mlp_per_block=8, tolerance=0.01)


def _model(quiet_block: int | None = None) -> torch.nn.Module:
    """The tiny ViT; ``quiet_block``'s MLP output scaled by 1e-3 (its neurons barely matter)."""
    torch.manual_seed(0)
    model = timm.create_model(TINY_MODEL["name"], **TINY_MODEL["kwargs"]).eval()
    if quiet_block is not None:
        with torch.no_grad():
            model.blocks[quiet_block].mlp.fc2.weight.mul_(1e-3)
    return model


def _images(n: int = 64, seed: int = 1) -> list[torch.Tensor]:
    x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    return [x[i:i + 16] for i in range(0, n, 16)]


def _kl_per_image(reference: torch.nn.Module, model: torch.nn.Module,
                  batches: list[torch.Tensor]) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for x in batches:
            p = F.log_softmax(reference(x).double(), -1)
            q = F.log_softmax(model(x).double(), -1)
            total += float(F.kl_div(q, p, log_target=True, reduction="sum"))
            n += x.shape[0]
    return total / n


def test_a_curve_point_is_the_kl_of_the_physically_pruned_model() -> None:
    model, batches = _model(), _images()
    scores = magnitude_scores(model)
    macs = MacModel.from_model(model, (3, 16, 16))
    curves = measure_curves(model, scores, batches, C.floors(macs), mlp_step=32)
    assert curves.images == 64 and curves.base_loss == 0.0
    assert curves.neurons[0].kept == (8, 32, 64, 96, 128) and curves.heads[1].kept == (1, 2)
    for b in range(2):
        assert curves.heads[b].at(2) == 0.0 and curves.neurons[b].at(128) == 0.0
        for k in (1,):
            cut = copy.deepcopy(model)
            prune_model(cut, scores.keep_top([k if i == b else 2 for i in range(2)], [128] * 2))
            assert curves.heads[b].at(k) == pytest.approx(_kl_per_image(model, cut, batches),
                                                          rel=1e-6)
        cut = copy.deepcopy(model)
        prune_model(cut, scores.keep_top([2, 2], [32 if i == b else 128 for i in range(2)]))
        assert curves.neurons[b].at(32) == pytest.approx(_kl_per_image(model, cut, batches),
                                                         rel=1e-6)
    # Around a plan, the base loss is that plan's KL, and the plan's own point carries it.
    around = measure_curves(model, scores, batches, C.floors(macs), mlp_step=32,
                            around=([1, 2], [64, 128]))
    cut = copy.deepcopy(model)
    prune_model(cut, scores.keep_top([1, 2], [64, 128]))
    assert around.base_loss == pytest.approx(_kl_per_image(model, cut, batches), rel=1e-6)
    assert around.heads[0].at(1) == pytest.approx(around.base_loss, rel=1e-9)
    assert SensitivityCurves.from_json(around.to_json()) == around


def test_the_plan_cuts_the_block_whose_units_matter_least_whatever_the_order() -> None:
    """Block 1's MLP barely reaches the output; the scores are random, so a score queue cannot
    know that, but the measured losses do: block 1's MLP goes to the floor, block 0's stays."""
    model = _model(quiet_block=1)
    macs = MacModel.from_model(model, (3, 16, 16))
    scores = random_scores(list(macs.heads), list(macs.mlp), seed=0)
    target = macs.macs([2, 2], [128, 8]) + 1.0
    plan = sensitivity_plan(model, scores, _images(), macs, target, C, mlp_step=16, refine=1)
    assert plan.keep.mlp_widths == [128, 8] and plan.keep.head_counts == [2, 2]
    queue = plan_global(scores, macs, target, C)
    assert queue.mlp_widths[0] < 128  # the score queue cut into block 0 too
    assert plan.plan_loss < 1e-3 and len(plan.rounds) == 1
    assert plan.rounds[0]["measured_loss"] == plan.plan_loss


@pytest.mark.parametrize("refine", [0, 2])
def test_the_plan_meets_the_budget_and_is_deterministic(refine: int) -> None:
    model, batches = _model(), _images()
    macs = MacModel.from_model(model, (3, 16, 16))
    scores = magnitude_scores(model)
    target = 0.6 * macs.original
    plans = [sensitivity_plan(model, scores, batches, macs, target, C, mlp_step=32,
                              refine=refine) for _ in range(2)]
    first, second = plans
    m = macs.macs(first.keep.head_counts, first.keep.mlp_widths)
    assert target * (1 - C.tolerance) <= m <= target
    assert [h.tolist() for h in first.keep.heads] == [h.tolist() for h in second.keep.heads]
    assert [n.tolist() for n in first.keep.neurons] == [n.tolist() for n in second.keep.neurons]
    assert first.rounds == second.rounds
    assert 1 <= len(first.rounds) <= refine + 1
    assert all("measured_loss" in r for r in first.rounds)


def _plan_on_rank(scores: UnitScores, n: int) -> dict:
    from xpdeploy import distributed

    model = _model()
    macs = MacModel.from_model(model, (3, 16, 16))
    batches = _images(n)
    r, world = distributed.rank(), distributed.world_size()
    mine = [x[r::world] for x in batches]  # each rank its half of every batch
    plan = sensitivity_plan(model, scores, mine, macs, 0.55 * macs.original, C, mlp_step=32,
                            refine=1)
    return {"heads": [h.tolist() for h in plan.keep.heads],
            "neurons": [m.tolist() for m in plan.keep.neurons], "rounds": plan.rounds}


def test_two_processes_measure_and_plan_as_one() -> None:
    scores = magnitude_scores(_model())
    one = _plan_on_rank(scores, 64)
    first, second = run_ranks(_plan_on_rank, 2, scores, 64)
    assert first["heads"] == second["heads"] == one["heads"]
    assert first["neurons"] == second["neurons"] == one["neurons"]
    a = one["rounds"][0]["curves"]
    b = first["rounds"][0]["curves"]
    assert a["images"] == b["images"] == 64
    for t in ("heads", "neurons"):
        for ca, cb in zip(a[t], b[t], strict=True):
            assert ca["kept"] == cb["kept"]
            np.testing.assert_allclose(ca["loss"], cb["loss"], rtol=1e-9, atol=1e-12)
