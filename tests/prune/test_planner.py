"""The global planner and the exact-budget repair, on synthetic MAC models (pure numpy, fast)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from xpdeploy.errors import PruneError
from xpdeploy.prune.mac_model import MacModel
from xpdeploy.prune.planner import (
    PlanConstraints,
    plan_global,
    plan_summary,
    repair_to_budget,
    smallest_macs,
)
from xpdeploy.prune.unit_scores import KeepSets, UnitScores

# DeiT-Tiny's shape: 12 blocks, 3 heads of 64, MLP 768, 197 tokens of width 192.
DEIT_T = MacModel(
    fixed=1.0e7,
    head_cost=(float(64 * 197 * (4 * 192 + 2 * 197)),) * 12,
    neuron_cost=(float(2 * 197 * 192),) * 12,
    heads=(3,) * 12,
    mlp=(768,) * 12,
)
# Two blocks, 2 heads of cost 100 and 64 neurons of cost 1 each: original 528 MACs.
SMALL = MacModel(fixed=0.0, head_cost=(100.0, 100.0), neuron_cost=(1.0, 1.0), heads=(2, 2),
                 mlp=(64, 64))


def _random_scores(macs: MacModel, seed: int = 0) -> UnitScores:
    rng = np.random.default_rng(seed)
    return UnitScores(heads=[rng.random(h) for h in macs.heads],
                      neurons=[rng.random(m) for m in macs.mlp])


def _macs(keep: KeepSets, macs: MacModel) -> float:
    return macs.macs(keep.head_counts, keep.mlp_widths)


def _assert_valid(keep: KeepSets, macs: MacModel, target: float, c: PlanConstraints) -> None:
    got = _macs(keep, macs)
    assert got <= target
    assert got >= target * (1 - c.tolerance)
    for b, (h, m) in enumerate(zip(keep.head_counts, keep.mlp_widths, strict=True)):
        assert h >= min(c.min_heads_per_block, macs.heads[b])
        assert m % c.round_mlp_to == 0 or m == macs.mlp[b]
        assert m >= min(c.min_mlp_per_block, macs.mlp[b])
    for idx in [*keep.heads, *keep.neurons]:
        assert np.all(np.diff(idx) > 0), "kept indices are sorted and unique"


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7, 0.9, 0.99])
def test_meets_target_within_tolerance(ratio: float) -> None:
    c = PlanConstraints()
    target = DEIT_T.original * ratio
    keep = plan_global(_random_scores(DEIT_T), DEIT_T, target, c)
    _assert_valid(keep, DEIT_T, target, c)


def test_min_heads_and_block_floors_respected() -> None:
    c = PlanConstraints(min_heads_per_block=2, min_mlp_per_block=100,
                        block_floors={3: (3, 700)})
    target = smallest_macs(DEIT_T, c) * 1.02
    keep = plan_global(_random_scores(DEIT_T, 1), DEIT_T, target, c)
    _assert_valid(keep, DEIT_T, target, c)
    assert min(keep.head_counts) >= 2
    assert min(keep.mlp_widths) >= 104, "floor 100 rounded up to a multiple of 8"
    assert keep.head_counts[3] == 3 and keep.mlp_widths[3] >= 704


def test_lowest_normalised_scores_go_first_not_score_per_mac() -> None:
    # 16 neurons of block 1 score lowest, then head 0 of block 0; everything else high.
    neurons = [np.full(64, 1.0), np.full(64, 1.0)]
    neurons[1][10:26] = np.linspace(0.1, 0.2, 16)
    heads = [np.array([0.5, 1.0]), np.array([1.0, 1.0])]
    scores = UnitScores(heads=heads, neurons=neurons)
    c = PlanConstraints()
    keep = plan_global(scores, SMALL, SMALL.original - 16, c, normalize="none")
    # Score per MAC would remove head 0 first (0.5/100 < 0.1/1) and land at 428 MACs.
    assert keep.head_counts == [2, 2]
    np.testing.assert_array_equal(keep.neurons[1], np.r_[0:10, 26:64])
    np.testing.assert_array_equal(keep.neurons[0], np.arange(64))
    # 16 more MACs to remove than the head is worth: now the head goes too, after the neurons.
    keep = plan_global(scores, SMALL, SMALL.original - 116, c, normalize="none")
    assert [list(h) for h in keep.heads] == [[1], [0, 1]]
    np.testing.assert_array_equal(keep.neurons[1], np.r_[0:10, 26:64])


def test_normalize_type_vs_none() -> None:
    # Raw head scores (0.1) are far below raw neuron scores (~1): 'none' removes a head first;
    # per type, every head normalises to 1.0 and 16 neurons of block 1 to ~0.53.
    neurons = [np.full(64, 1.0), np.full(64, 1.0)]
    neurons[1][:16] = 0.5
    scores = UnitScores(heads=[np.full(2, 0.1), np.full(2, 0.1)], neurons=neurons)
    c = PlanConstraints()
    by_type = plan_global(scores, SMALL, SMALL.original - 16, c, normalize="type")
    assert by_type.head_counts == [2, 2] and by_type.mlp_widths == [64, 48]
    np.testing.assert_array_equal(by_type.neurons[1], np.arange(16, 64))
    raw = plan_global(scores, SMALL, SMALL.original - 16, c, normalize="none")
    assert sum(raw.head_counts) == 3 and raw.mlp_widths == [64, 64]


def test_normalize_type_vs_block() -> None:
    # Block 0's neurons score half of block 1's: per type (layer-adaptive) only block 0 loses
    # neurons; per block both blocks look alike and both lose some.
    rng = np.random.default_rng(3)
    neurons = [0.5 * (1 + 0.01 * rng.permutation(64)), 1.0 * (1 + 0.01 * rng.permutation(64))]
    scores = UnitScores(heads=[np.full(2, 5.0), np.full(2, 5.0)], neurons=neurons)
    c = PlanConstraints()
    by_type = plan_global(scores, SMALL, SMALL.original - 32, c, normalize="type")
    assert by_type.mlp_widths == [32, 64]
    by_block = plan_global(scores, SMALL, SMALL.original - 32, c, normalize="block")
    assert by_block.mlp_widths[0] < 64 and by_block.mlp_widths[1] < 64
    for keep in (by_type, by_block):
        _assert_valid(keep, SMALL, SMALL.original - 32, c)


def test_impossible_target_names_the_numbers() -> None:
    c = PlanConstraints(min_heads_per_block=1, min_mlp_per_block=8)
    smallest = smallest_macs(SMALL, c)
    assert smallest == 2 * 100 + 2 * 8
    with pytest.raises(PruneError) as e:
        plan_global(_random_scores(SMALL), SMALL, smallest - 1, c)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{(smallest - 1) / 1e9:.4g} GMACs" in msg and f"{smallest / 1e9:.4g} GMACs" in msg
    assert "min_heads_per_block" in msg and "raise the target" in msg
    # the smallest model itself is reachable
    keep = plan_global(_random_scores(SMALL), SMALL, smallest, c)
    assert keep.head_counts == [1, 1] and keep.mlp_widths == [8, 8]


@pytest.mark.parametrize("factor", [1.0, 1.5])
def test_target_at_or_above_original_raises(factor: float) -> None:
    with pytest.raises(PruneError, match=r"nothing to prune.*target_ratio < 1"):
        plan_global(_random_scores(SMALL), SMALL, SMALL.original * factor, PlanConstraints())


def test_deterministic_with_ties() -> None:
    ties = UnitScores(heads=[np.ones(3)] * 12, neurons=[np.ones(768)] * 12)
    c = PlanConstraints()
    a = plan_global(ties, DEIT_T, DEIT_T.original * 0.5, c)
    b = plan_global(ties, DEIT_T, DEIT_T.original * 0.5, c)
    assert a.to_json() == b.to_json()
    _assert_valid(a, DEIT_T, DEIT_T.original * 0.5, c)


def test_repair_from_over_budget_keep() -> None:
    c = PlanConstraints()
    scores = _random_scores(DEIT_T, 5).normalized("type")
    rng = np.random.default_rng(5)
    start = KeepSets(heads=[np.sort(rng.choice(3, 2, replace=False)) for _ in range(12)],
                     neurons=[np.sort(rng.choice(768, 613, replace=False)) for _ in range(12)])
    target = DEIT_T.original * 0.4
    assert _macs(start, DEIT_T) > target
    keep = repair_to_budget(start, scores, DEIT_T, target, c)
    _assert_valid(keep, DEIT_T, target, c)


def test_repair_from_under_budget_keep_only_adds() -> None:
    c = PlanConstraints()
    scores = _random_scores(DEIT_T, 6).normalized("type")
    start = KeepSets(heads=[np.array([0])] * 12, neurons=[np.arange(8)] * 12)
    target = DEIT_T.original * 0.6
    keep = repair_to_budget(start, scores, DEIT_T, target, c)
    _assert_valid(keep, DEIT_T, target, c)
    for s, k in zip([*start.heads, *start.neurons], [*keep.heads, *keep.neurons], strict=True):
        assert set(s.tolist()) <= set(k.tolist())


def test_repair_restores_floors_and_rounds_widths() -> None:
    c = PlanConstraints(min_heads_per_block=1)
    scores = _random_scores(SMALL, 7)
    start = KeepSets(heads=[np.array([], dtype=np.int64), np.array([0, 1])],
                     neurons=[np.arange(13), np.arange(64)])
    target = 2 * 100 + 64 + 16  # room for exactly 16 neurons in block 0 (or a head's worth less)
    keep = repair_to_budget(start, scores, SMALL, target, c)
    assert keep.head_counts[0] >= 1
    _assert_valid(keep, SMALL, target, c)


def test_untouched_block_keeps_non_multiple_width() -> None:
    macs = MacModel(fixed=0.0, head_cost=(100.0, 100.0), neuron_cost=(1.0, 1.0), heads=(2, 2),
                    mlp=(100, 64))
    scores = UnitScores(heads=[np.full(2, 9.0), np.full(2, 9.0)],
                        neurons=[np.full(100, 9.0), np.linspace(0.1, 1.0, 64)])
    keep = plan_global(scores, macs, macs.original - 24, PlanConstraints())
    assert keep.mlp_widths == [100, 40] and keep.head_counts == [2, 2]


def test_coarse_granularity_never_exceeds_target() -> None:
    macs = MacModel(fixed=0.0, head_cost=(100.0,), neuron_cost=(1.0,), heads=(4,), mlp=(8,))
    c = PlanConstraints(tolerance=0.001)
    keep = plan_global(_random_scores(macs), macs, 350.0, c)
    assert _macs(keep, macs) <= 350.0 and keep.head_counts == [3]  # 308: a head's granularity


def test_plan_summary() -> None:
    keep = plan_global(_random_scores(SMALL), SMALL, 400.0, PlanConstraints())
    s = plan_summary(keep, SMALL)
    assert s["gmacs_before"] == pytest.approx(528e-9)
    assert s["gmacs_after"] == pytest.approx(_macs(keep, SMALL) / 1e9)
    assert s["ratio"] == pytest.approx(_macs(keep, SMALL) / 528)
    assert [b["heads_kept"] + b["heads_removed"] for b in s["blocks"]] == [2, 2]
    assert [b["mlp_kept"] for b in s["blocks"]] == keep.mlp_widths


def test_bad_inputs_raise() -> None:
    with pytest.raises(PruneError, match="min_heads_per_block"):
        PlanConstraints(min_heads_per_block=0)
    with pytest.raises(PruneError, match="normalize"):
        bad_mode: Any = "mean"
        plan_global(_random_scores(SMALL), SMALL, 400.0, PlanConstraints(), bad_mode)
    with pytest.raises(PruneError, match="recompute the scores"):
        plan_global(_random_scores(DEIT_T), SMALL, 400.0, PlanConstraints())
    with pytest.raises(PruneError, match="indices"):
        repair_to_budget(KeepSets(heads=[np.array([5]), np.array([0])],
                                  neurons=[np.arange(8), np.arange(8)]),
                         _random_scores(SMALL), SMALL, 400.0, PlanConstraints())


def test_reading_a_bad_plan_file_is_one_clear_error(tmp_path) -> None:
    from xpdeploy.prune.unit_scores import KeepSets

    with pytest.raises(PruneError, match="does not exist"):
        KeepSets.read(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('{"not": "a plan"}')
    with pytest.raises(PruneError, match=r"is not a plan\.json written by xpdeploy"):
        KeepSets.read(tmp_path / "bad.json")
