"""verify/latency_grid: timing a grid in rounds, calibrating, validating, marking unsteadiness.

Runners here are fakes on a fake clock: each call advances the clock by the runner's own
latency, so every figure the table holds can be checked exactly.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest

from tests.latency.tables import table_key
from tests.verify.fake_clock import FakeClock
from xpdeploy.latency.grid import BlockGrid, GridFile, GridModel, GridShape
from xpdeploy.verify.latency_grid import TimingSettings, measure_table

FIXED, SCALE, PER_BLOCK = 0.5, 0.9, 0.05


def alone(h: int, m: int) -> float:
    return 0.1 + 0.2 * h + 0.001 * m


def in_model(heads: list[int], mlp: list[int]) -> float:
    return FIXED + sum(SCALE * alone(h, m) + PER_BLOCK for h, m in zip(heads, mlp, strict=True))


class FakeRunner:
    """Each call costs ``ms`` on the clock (plus ``drift`` ms more every call: unsteady)."""

    def __init__(self, clock: FakeClock, ms: float, drift: float = 0.0) -> None:
        self.name, self.clock, self.ms, self.drift = "fake", clock, ms, drift

    def infer(self, x: np.ndarray) -> np.ndarray:
        self.clock.t += self.ms / 1000.0
        self.ms += self.drift
        return x


def _grid() -> BlockGrid:
    points = [GridFile(heads=h, mlp=m, file=f"b_h{h}_m{m}") for h in (1, 2) for m in (8, 16)]
    plans = [([1, 2, 2], [16, 8, 16]), ([2, 1, 1], [8, 16, 8])]
    return BlockGrid(arch_name="t", arch_digest="a" * 64, input_size=[3, 8, 8], mlp_step=8,
                     shapes=[GridShape(blocks=[0, 1, 2], heads=2, mlp=16, input_shape=[5, 4],
                                       points=points)],
                     original=GridModel(name="original", heads=[2] * 3, mlp=[16] * 3,
                                        file="original"),
                     stem=GridModel(name="stem", heads=[], mlp=[], file="stem"),
                     smallest=GridModel(name="smallest", heads=[1] * 3, mlp=[8] * 3,
                                        file="smallest"),
                     validation=[GridModel(name=f"v{i}", heads=h, mlp=m, file=f"v{i}")
                                 for i, (h, m) in enumerate(plans)])


def _opener(clock: FakeClock, grid: BlockGrid, drifting: str | None = None):
    ms = {p.file: alone(p.heads, p.mlp) for p in grid.shapes[0].points}
    ms["stem"] = FIXED
    for model in (grid.original, grid.smallest, *grid.validation):
        ms[model.file] = in_model(model.heads, model.mlp)
    opened: list[str] = []

    def open_runner(path: Path, name: str):
        opened.append(path.name)
        return contextlib.nullcontext(FakeRunner(clock, ms[path.name],
                                                 0.05 if path.name == drifting else 0.0))
    return open_runner, opened


TIMING = TimingSettings(warmup=1, iters=6, rounds=3, max_spread=0.05, retries=2)


def test_the_table_holds_what_was_timed_and_its_calibration_is_exact(tmp_path: Path) -> None:
    clock, grid = FakeClock(), _grid()
    opener, opened = _opener(clock, grid)
    table = measure_table(grid, tmp_path, table_key(batch=4), opener, TIMING, clock=clock)
    assert table.key.batch == 4
    for point in table.shapes[0].points:
        assert point.ms == pytest.approx(alone(point.heads, point.mlp))
        assert point.stable and point.spread == pytest.approx(0.0, abs=1e-9)
    assert table.fixed_ms == pytest.approx(FIXED)
    assert table.scale == pytest.approx(SCALE) and table.per_block_ms == pytest.approx(PER_BLOCK)
    assert table.predict([2] * 3, [16] * 3) == pytest.approx(table.original_ms)
    assert table.predict([1] * 3, [8] * 3) == pytest.approx(table.smallest_ms)
    assert [v.name for v in table.validation] == ["v0", "v1"]
    for row in table.validation:  # the fakes follow the law the calibration assumes: no error
        assert row.predicted_ms == pytest.approx(row.measured_ms)
        assert row.error_pct == pytest.approx(0.0, abs=1e-6)
    assert table.settings == {"warmup": 1, "iters": 6, "rounds": 3, "max_spread": 0.05}
    assert opened.count("b_h2_m16") == 2  # the reference: opened once, and once as a point


def test_an_unsteady_point_is_measured_again_then_marked(tmp_path: Path) -> None:
    clock, grid = FakeClock(), _grid()
    opener, opened = _opener(clock, grid, drifting="b_h1_m8")
    table = measure_table(grid, tmp_path, table_key(), opener, TIMING, clock=clock)
    bad = {(p.heads, p.mlp): p for p in table.shapes[0].points}[(1, 8)]
    assert not bad.stable and bad.spread > 0.05
    assert table.unstable_points == 1 and table.points == 4
    # Opened once, timed 1 + retries times in that one session (the drift keeps growing).
    assert opened.count("b_h1_m8") == 1
