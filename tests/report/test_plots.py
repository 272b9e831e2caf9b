"""Latency PNG: written atomically, a real PNG, figures closed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.report import make_parity
from xpdeploy.report.plots import _bars_per_batch, plot_latency
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


def test_bars_follow_the_report() -> None:
    groups = _bars_per_batch(report())
    assert sorted(groups) == [1, 32]
    labels = [b[0] for b in groups[1]]
    assert labels == [
        "original (ort-cpu-fp32)",
        "pruned (ort-cpu-fp32)",
        "pruned-fp16 (ort-cpu-fp16)",
    ]
    original, pruned, fp16 = groups[1]
    assert original[1:] == (3.6, pytest.approx(3.96), None, None)  # first candidate's baseline
    assert pruned[1] == 2.0 and pruned[3] == pytest.approx(1.8)
    assert fp16[3] == pytest.approx(3.5 / 1.5)
    # the label above each bar carries the spread of its rounds, and says when it is unstable
    assert pruned[4] == "1.80x +-3%" and fp16[4] == "2.33x +-14% (unstable)"
    assert groups[32][2][4] == "2.60x +-5%"
