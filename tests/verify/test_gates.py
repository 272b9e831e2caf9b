"""Each gate passing and failing, disabled gates, and the synthetic skip of the top-1 gate."""

from __future__ import annotations

import math
from typing import Any

import pytest

from xpdeploy.spec import GatesConfig
from xpdeploy.verify.gates import SKIPPED_SYNTHETIC, evaluate_gates, fmt_speedup

GOOD: dict[str, Any] = {
    "top1_delta": -0.2,
    "agreement": 0.995,
    "max_abs_diff": 1e-4,
    "cosine": 0.99999,
    "speedup": {1: 1.5, 32: 1.8},
    "synthetic": False,
}
ALL_ON = GatesConfig(min_speedup=1.2)


def by_name(results: list[Any]) -> dict[str, Any]:
    return {r.name: r for r in results}


def test_defaults_all_pass_and_min_speedup_is_off() -> None:
    res = evaluate_gates(GatesConfig(), **GOOD)
    assert [r.name for r in res] == ["max_top1_drop", "min_agreement", "max_abs_diff", "min_cosine"]
    assert all(r.passed for r in res)


def test_disabled_gates_yield_nothing() -> None:
    off = GatesConfig(
        max_top1_drop=None, min_agreement=None, max_abs_diff=None, min_cosine=None, min_speedup=None
    )
    assert evaluate_gates(off, **GOOD) == []


@pytest.mark.parametrize(
    ("gate", "override", "value", "detail"),
    [
        ("max_top1_drop", {"top1_delta": -0.75}, 0.75, "top-1 drop 0.75 pts > 0.50 pts"),
        ("min_agreement", {"agreement": 0.985}, 0.985, "agreement 0.985 < 0.99"),
        ("max_abs_diff", {"max_abs_diff": 2.5e-3}, 2.5e-3, "max abs diff 2.50e-03 > 1.00e-03"),
        ("min_cosine", {"cosine": 0.998}, 0.998, "cosine 0.998000 < 0.999000"),
        ("min_speedup", {"speedup": {1: 1.1, 32: 1.9}}, 1.1, "speedup 1.10x < 1.20x (batch 1)"),
    ],
)
def test_each_gate_fails(gate: str, override: dict[str, Any], value: float, detail: str) -> None:
    res = by_name(evaluate_gates(ALL_ON, **{**GOOD, **override}))
    assert not res[gate].passed
    assert res[gate].value == pytest.approx(value)
    assert res[gate].detail == detail
    assert all(r.passed for name, r in res.items() if name != gate)


def test_each_gate_passes_with_values_and_limits() -> None:
    res = by_name(evaluate_gates(ALL_ON, **GOOD))
    assert all(r.passed for r in res.values())
    assert res["max_top1_drop"].value == pytest.approx(0.2) and res["max_top1_drop"].limit == 0.5
    assert res["min_agreement"].detail == "agreement 0.995 >= 0.99"
    assert res["min_speedup"].value == 1.5  # the worst batch size decides


def test_limits_are_inclusive_and_improvement_passes() -> None:
    res = by_name(evaluate_gates(ALL_ON, **{**GOOD, "top1_delta": -0.5, "agreement": 0.99}))
    assert res["max_top1_drop"].passed and res["min_agreement"].passed
    better = by_name(evaluate_gates(ALL_ON, **{**GOOD, "top1_delta": 1.0}))["max_top1_drop"]
    assert better.passed and better.value == -1.0


def test_close_values_get_enough_digits() -> None:
    res = by_name(evaluate_gates(ALL_ON, **{**GOOD, "agreement": 0.98999}))["min_agreement"]
    assert not res.passed and res.detail == "agreement 0.98999 < 0.99"


def test_synthetic_skips_top1_explicitly() -> None:
    res = by_name(evaluate_gates(ALL_ON, **{**GOOD, "top1_delta": -5.0, "synthetic": True}))
    gate = res["max_top1_drop"]
    assert gate.value is None and gate.passed and gate.detail == SKIPPED_SYNTHETIC
    assert gate.detail.startswith("skipped:")


def test_missing_top1_is_skipped_with_its_own_reason() -> None:
    gate = by_name(evaluate_gates(ALL_ON, **{**GOOD, "top1_delta": None}))["max_top1_drop"]
    assert gate.value is None and gate.passed and gate.detail.startswith("skipped:")
    assert gate.detail != SKIPPED_SYNTHETIC


def test_nan_fails() -> None:
    res = by_name(evaluate_gates(ALL_ON, **{**GOOD, "max_abs_diff": math.nan, "cosine": math.nan}))
    assert not res["max_abs_diff"].passed and not res["min_cosine"].passed
    nan_speed = by_name(evaluate_gates(ALL_ON, **{**GOOD, "speedup": {1: 2.0, 32: math.nan}}))
    assert not nan_speed["min_speedup"].passed and "batch 32" in nan_speed["min_speedup"].detail


def test_speedup_gate_without_latency_fails() -> None:
    gate = by_name(evaluate_gates(ALL_ON, **{**GOOD, "speedup": {}}))["min_speedup"]
    assert not gate.passed and gate.value is None and "no latency" in gate.detail


def test_the_top1_floor_reads_the_candidates_own_accuracy() -> None:
    floor = GatesConfig(max_top1_drop=None, min_agreement=None, max_abs_diff=None,
                        min_cosine=None, min_top1=95.0)
    ok = by_name(evaluate_gates(floor, top1=96.11, **GOOD))["min_top1"]
    assert ok.passed and ok.detail == "top-1 96.11 % >= 95.00 %"
    low = by_name(evaluate_gates(floor, top1=85.83, **GOOD))["min_top1"]
    assert not low.passed and low.detail == "top-1 85.83 % < 95.00 %"
    synthetic = by_name(evaluate_gates(floor, top1=None, **{**GOOD, "synthetic": True}))
    assert synthetic["min_top1"].passed and synthetic["min_top1"].detail == SKIPPED_SYNTHETIC


def test_unstable_deciding_speedup_fails_and_says_how_to_fix() -> None:
    gate = by_name(evaluate_gates(ALL_ON, **{**GOOD, "speedup": {1: 1.52, 32: 1.8}},
                                  unstable=[1], speedup_spread={1: 0.14, 32: 0.02},
                                  max_spread=0.10))["min_speedup"]
    assert not gate.passed and gate.value == 1.52 and gate.limit == 1.2
    assert gate.detail == (
        "speedup 1.52x at batch 1 is unstable (rounds disagree by +-14% > +-10%): rerun on a "
        "quieter machine, raise verify.iters/rounds, or set verify.threads: 1")


def test_any_unstable_speedup_the_gate_reads_fails_it() -> None:
    """Batch 1 decides (1.5x, stable), but batch 32's figure is not trusted: its true value may be
    the lowest, so the gate cannot pass on it."""
    gate = by_name(evaluate_gates(ALL_ON, **GOOD, unstable=[32], speedup_spread={32: 0.3},
                                  max_spread=0.1))["min_speedup"]
    assert not gate.passed and gate.value == 1.8
    assert gate.detail.startswith("speedup 1.80x at batch 32 is unstable (rounds disagree by "
                                  "+-30% > +-10%): rerun")


def test_several_unstable_speedups_name_the_lowest_first() -> None:
    gate = by_name(evaluate_gates(ALL_ON, **GOOD, unstable=[1, 32]))["min_speedup"]
    assert not gate.passed and gate.value == 1.5
    assert gate.detail.startswith(  # without spreads the detail still says what was exceeded
        "speedup 1.50x at batch 1 is unstable (rounds disagree beyond verify.max_spread); also "
        "unstable at batch 32: rerun on a quieter machine")


def test_a_stable_speedup_below_the_limit_keeps_its_own_detail() -> None:
    """No rerun makes a stable 1.1x pass a 1.2x floor: the detail says that, then notes the rest."""
    gate = by_name(evaluate_gates(ALL_ON, **{**GOOD, "speedup": {1: 1.1, 32: 1.9}},
                                  unstable=[32], speedup_spread={32: 0.2},
                                  max_spread=0.1))["min_speedup"]
    assert not gate.passed and gate.value == 1.1
    assert gate.detail == "speedup 1.10x < 1.20x (batch 1); unstable at batch 32"


def test_unstable_marks_only_matter_to_an_enabled_speedup_gate() -> None:
    off = by_name(evaluate_gates(GatesConfig(), **GOOD, unstable=[1, 32]))
    assert "min_speedup" not in off and all(g.passed for g in off.values())
    ignored = by_name(evaluate_gates(ALL_ON, **GOOD, unstable=[4]))["min_speedup"]  # not measured
    assert ignored.passed and ignored.detail == "speedup 1.50x >= 1.20x (batch 1)"
    nan_speed = by_name(evaluate_gates(ALL_ON, **{**GOOD, "speedup": {1: 2.0, 32: math.nan}},
                                       unstable=[32]))["min_speedup"]
    assert not nan_speed.passed
    assert nan_speed.detail == "speedup nanx < 1.20x (batch 32); unstable at batch 32"


@pytest.mark.parametrize(
    ("value", "spread", "unstable", "text"),
    [(1.85, None, False, "1.85x"), (1.85, 0.031, False, "1.85x +-3%"),
     (2.1, 0.14, True, "2.10x +-14% (unstable)"), (1.0, 0.004, False, "1.00x +-0.4%"),
     (1.0, math.inf, True, "1.00x +-? (unstable)")],
)
def test_fmt_speedup(value: float, spread: float | None, unstable: bool, text: str) -> None:
    assert fmt_speedup(value, spread, unstable) == text
