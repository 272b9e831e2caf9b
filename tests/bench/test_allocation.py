"""bench/allocation.py's bookkeeping: seed statistics, one table line per allocator setting."""

from __future__ import annotations

import pytest

from bench.allocation import allocator_label, markdown_table, summarize


def _row(allocator: str, config: dict, one_shot: float, finetuned: dict[str, float]) -> dict:
    return {"criterion": "xpruner", "allocator": allocator, "ratio": 0.5, "config": config,
            "one_shot_top1": one_shot, "finetuned": finetuned, "heads": [3, 2],
            "mlp": [768, 32], "plan_seconds": 12.0}


def test_summarize_gives_mean_and_sample_sd_over_seeds() -> None:
    assert summarize({}) == (None, None)
    assert summarize({"0": 67.0}) == (67.0, 0.0)
    mean, sd = summarize({"0": 67.0, "1": 68.0, "2": 69.0})
    assert mean == pytest.approx(68.0) and sd == pytest.approx(1.0)  # n - 1 in the denominator


def test_rows_of_two_settings_of_one_allocator_stay_apart() -> None:
    rows = [_row("threshold", {"loss": "kl", "budget": "projection"}, 62.86, {}),
            _row("threshold", {"loss": "ce", "budget": "lagrangian"}, 62.64, {"0": 66.0}),
            _row("sensitivity", {"refine": 1}, 67.66, {"0": 67.46, "1": 67.52, "2": 68.18}),
            _row("global", {}, 61.94, {})]
    assert [allocator_label(r) for r in rows] == [
        "threshold (kl, projection)", "threshold (ce, lagrangian)", "sensitivity (refine 1)",
        "global"]
    table = markdown_table(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert ("| 0.5 | xpruner | sensitivity (refine 1) | 67.66 | 67.72 +- 0.40 (3) | 3, 2 | "
            "768, 32 | 12 |") in table
    assert any("threshold (kl, projection) | 62.86 | - |" in line for line in table)
