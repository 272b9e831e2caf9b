"""Latency PNG: written atomically, a real PNG, figures closed; each candidate is drawn beside the
baseline it was timed against (its own ``baseline_latency_ms`` row), never a shared one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.report import make_parity
from xpdeploy.report.plots import BarStats, Pair, _pairs_per_batch, _whisker_note, plot_latency
from xpdeploy.report.schema import build_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def report(synthetic: bool = False) -> dict[str, Any]:
    return build_report(
        make_parity(synthetic),
        pipeline="quickstart",
        run_dir="runs/quickstart",
        status="failed",
        title=None,
        environment={},
    )


@pytest.mark.parametrize("synthetic", [False, True])
def test_png_is_written(tmp_path: Path, synthetic: bool) -> None:
    import matplotlib.pyplot as plt

    target = tmp_path / "plots" / "latency.png"
    plot_latency(report(synthetic), target)
    data = target.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert [p.name for p in target.parent.iterdir()] == ["latency.png"]
    assert plt.get_fignums() == []


def test_empty_report_still_plots(tmp_path: Path) -> None:
    r = report()
    r["candidates"] = []
    target = tmp_path / "latency.png"
    plot_latency(r, target)
    assert target.read_bytes().startswith(PNG_MAGIC)


def row(batch: int, p50: float, p10: float | None = None, p90: float | None = None
        ) -> dict[str, Any]:
    """A report latency row; without ``p10`` it has no p10 key, as in reports before p10."""
    r = {"batch": batch, "p50": p50, "p90": p50 * 1.1 if p90 is None else p90, "p99": p50 * 1.3,
         "mean": p50, "iters": 30, "throughput": batch / p50 * 1000}
    if p10 is not None:
        r["p10"] = p10
    return r


def bug_report() -> dict[str, Any]:
    """The reported bug: 'pruned.onnx' (1.17x faster than original.onnx, timed with it) has a
    higher p50 than the baseline of the first candidate, timed in another run against torch.
    The old chart drew that first baseline as "original", so pruned.onnx looked slower."""
    return {
        "pipeline": "host",
        "candidates": [
            {"name": "pruned (torch)", "runner": "torch-fp32", "baseline": "original (torch)",
             "latency_ms": [row(1, 3.0, 2.8, 3.4), row(8, 20.0, 19.0, 22.0)],
             "baseline_latency_ms": [row(1, 5.0, 4.7, 5.6), row(8, 34.0, 33.0, 36.0)],
             "speedup": {"1": 5.0 / 3.0, "8": 1.7}, "speedup_spread": {"1": 0.03, "8": 0.02},
             "unstable": []},
            {"name": "pruned.onnx", "runner": "ort-cpu-fp32", "baseline": "original.onnx",
             "latency_ms": [row(1, 6.0, 5.5, 6.9), row(8, 30.0, 29.0, 33.0)],
             "baseline_latency_ms": [row(1, 7.0, 6.6, 7.7), row(8, 45.0, 44.0, 48.0)],
             "speedup": {"1": 1.17, "8": 1.5}, "speedup_spread": {"1": 0.12, "8": 0.01},
             "unstable": [1]},
            {"name": "pruned.b1.engine", "runner": "trt-fp16", "baseline": "original.b1.engine",
             "latency_ms": [row(1, 0.5, 0.45, 0.6)],
             "baseline_latency_ms": [row(1, 0.9, 0.85, 1.0)],
             "speedup": {"1": 1.8}, "speedup_spread": {"1": 0.04}, "unstable": []},
        ],
    }


def test_each_candidate_is_paired_with_its_own_baseline() -> None:
    groups = _pairs_per_batch(bug_report())
    assert sorted(groups) == [1, 8]
    torch, onnx, engine = groups[1]
    assert (torch.name, torch.runner, torch.baseline) == (
        "pruned (torch)", "torch-fp32", "original (torch)")
    assert (onnx.name, onnx.runner, onnx.baseline) == ("pruned.onnx", "ort-cpu-fp32",
                                                       "original.onnx")
    # different baselines at the same batch: each pair carries the one it was timed against
    assert torch.base == BarStats(p50=5.0, p10=4.7, p90=5.6)
    assert onnx.base == BarStats(p50=7.0, p10=6.6, p90=7.7)
    assert onnx.candidate == BarStats(p50=6.0, p10=5.5, p90=6.9)
    assert groups[8][1].base == BarStats(p50=45.0, p10=44.0, p90=48.0)
    # the candidate labelled faster is drawn lower than the bar it is paired with, although
    # its p50 is above the other candidate's baseline (the misleading comparison of the bug)
    for pairs in groups.values():
        for p in pairs:
            if p.candidate is not None:
                assert p.candidate.p50 < p.base.p50
    assert onnx.candidate.p50 > torch.base.p50
    assert onnx.speedup == "1.17x +-12% (unstable)" and onnx.unstable
    assert torch.speedup == "1.67x +-3%" and not torch.unstable
    assert engine.speedup == "1.80x +-4%"


def test_whiskers_come_from_the_rows() -> None:
    torch = _pairs_per_batch(bug_report())[1][0]
    assert torch.candidate is not None and torch.base is not None
    assert torch.candidate.whisker == (2.8, 3.4)
    assert torch.base.whisker == (4.7, 5.6)
    assert _whisker_note(_pairs_per_batch(bug_report())) == "whisker p10-p90 of all timed calls"


def test_a_candidate_missing_a_batch_is_na() -> None:
    engine = _pairs_per_batch(bug_report())[8][2]
    assert engine == Pair(name="pruned.b1.engine", runner="trt-fp16",
                          baseline="original.b1.engine", candidate=None, base=None,
                          speedup="n/a", unstable=False)


def test_report_pairs_follow_the_report() -> None:
    groups = _pairs_per_batch(report())
    assert sorted(groups) == [1, 32]
    pruned, fp16 = groups[1]
    assert (pruned.name, pruned.runner, pruned.baseline) == ("pruned", "ort-cpu-fp32", "original")
    assert pruned.candidate == BarStats(p50=2.0, p10=pytest.approx(1.8),
                                        p90=pytest.approx(2.2))
    assert pruned.base is not None and pruned.base.p50 == 3.6
    assert fp16.base is not None and fp16.base.p50 == 3.5  # its own, not pruned's 3.6
    # the label above each pair carries the spread of its rounds, and says when it is unstable
    assert pruned.speedup == "1.80x +-3%" and fp16.speedup == "2.33x +-14% (unstable)"
    assert fp16.unstable and not pruned.unstable
    assert groups[32][1].speedup == "2.60x +-5%"


def test_a_report_without_p10_still_draws(tmp_path: Path) -> None:
    r = bug_report()
    for c in r["candidates"]:
        for rw in c["latency_ms"] + c["baseline_latency_ms"]:
            del rw["p10"]
    groups = _pairs_per_batch(r)
    onnx = groups[1][1]
    assert onnx.candidate is not None and onnx.candidate.p10 is None
    assert onnx.candidate.whisker == (6.0, pytest.approx(6.9))  # from p50 up to p90
    assert "predates p10" in _whisker_note(groups)
    target = tmp_path / "latency.png"
    plot_latency(r, target)
    data = target.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    # a report mixing both (p10 only on some rows) says where the whisker starts at p50
    r["candidates"][0]["latency_ms"][0]["p10"] = 2.8
    assert "where p10 was not recorded" in _whisker_note(_pairs_per_batch(r))


def test_eight_candidates_draw(tmp_path: Path) -> None:
    r = bug_report()
    r["candidates"] = [dict(c, name=f"{c['name']}-{i}") for i in range(3)
                       for c in r["candidates"]][:8]
    target = tmp_path / "latency.png"
    plot_latency(r, target)
    assert target.read_bytes().startswith(PNG_MAGIC)
