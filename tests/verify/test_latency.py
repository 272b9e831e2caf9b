"""Latency statistics and interleaved timing, with fake runners and a fake clock."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from xpdeploy.backends.runner import Runner
from xpdeploy.verify.latency import (
    latency_stats,
    make_batch,
    measure_interleaved,
    measure_latency,
)


class FakeClock:
    """A clock in seconds that only moves when a fake runner works."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class FakeRunner:
    """Records every call in a shared log and advances the fake clock by its cost (ms)."""

    def __init__(self, name: str, log: list[str], clock: FakeClock, cost_ms: float = 1.0) -> None:
        self.name = name
        self.log = log
        self.clock = clock
        self.cost_ms = cost_ms
        self.inputs: list[np.ndarray] = []

    def __enter__(self) -> FakeRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        self.log.append(self.name)
        self.inputs.append(pixels)
        self.clock.t += self.cost_ms / 1000.0
        return np.zeros((pixels.shape[0], 10), dtype=np.float32)


def test_latency_stats_on_known_list() -> None:
    times = [float(v) for v in range(1, 11)]  # 1..10 ms
    s = latency_stats(times, batch=4)
    assert s.batch == 4 and s.iters == 10
    assert s.p50 == pytest.approx(5.5)
    assert s.p90 == pytest.approx(9.1)  # numpy linear interpolation
    assert s.p99 == pytest.approx(9.91)
    assert s.mean == pytest.approx(5.5)
    assert s.throughput == pytest.approx(4 / 5.5 * 1000)


def test_latency_stats_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no times"):
        latency_stats([], batch=1)
    with pytest.raises(ValueError, match="non-negative"):
        latency_stats([1.0, -0.5], batch=1)
    with pytest.raises(ValueError, match="batch"):
        latency_stats([1.0], batch=0)


def test_fake_runner_satisfies_protocol() -> None:
    assert isinstance(FakeRunner("a", [], FakeClock()), Runner)


def test_interleaved_order_alternates_and_times_are_exact() -> None:
    log: list[str] = []
    clock = FakeClock()
    a = FakeRunner("A", log, clock, cost_ms=2.0)
    b = FakeRunner("B", log, clock, cost_ms=1.0)
    pixels = np.zeros((8, 3, 4, 4), dtype=np.float32)
    stats = measure_interleaved([a, b], pixels, batch=2, warmup=2, iters=5, clock=clock)

    assert log[:4] == ["A", "B", "B", "A"]  # warm-up rounds alternate too
    assert log[4:] == ["A", "B", "B", "A", "A", "B", "B", "A", "A", "B"]
    assert [s.iters for s in stats] == [5, 5]
    assert stats[0].p50 == pytest.approx(2.0) and stats[0].p99 == pytest.approx(2.0)
    assert stats[1].p50 == pytest.approx(1.0) and stats[1].mean == pytest.approx(1.0)
    assert stats[0].throughput == pytest.approx(2 / 2.0 * 1000)
    assert all(s.batch == 2 for s in stats)


def test_every_runner_gets_the_same_array() -> None:
    log: list[str] = []
    clock = FakeClock()
    a, b = FakeRunner("A", log, clock), FakeRunner("B", log, clock)
    measure_interleaved([a, b], np.ones((4, 3, 2, 2)), batch=4, warmup=1, iters=3, clock=clock)
    first = a.inputs[0]
    assert all(x is first for x in a.inputs + b.inputs)


def test_batch_is_tiled_contiguous_float32() -> None:
    pixels = np.arange(3 * 2 * 2 * 1, dtype=np.float64).reshape(3, 2, 2, 1)
    x = make_batch(pixels.transpose(0, 2, 1, 3), 5)  # non-contiguous float64 input
    assert x.shape == (5, 2, 2, 1) and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(x[3], x[0])
    np.testing.assert_array_equal(x[4], x[1])
    np.testing.assert_array_equal(x[2], pixels[2].transpose(1, 0, 2))


def test_batch_smaller_than_samples_takes_first_rows() -> None:
    pixels = np.arange(6, dtype=np.float32).reshape(6, 1)
    np.testing.assert_array_equal(make_batch(pixels, 2), [[0.0], [1.0]])


def test_measure_latency_single_runner() -> None:
    log: list[str] = []
    clock = FakeClock()
    r = FakeRunner("only", log, clock, cost_ms=3.0)
    s = measure_latency(r, np.zeros((1, 3, 2, 2)), batch=1, warmup=3, iters=4, clock=clock)
    assert len(log) == 7
    assert s.iters == 4 and s.p50 == pytest.approx(3.0) and s.batch == 1


def test_real_clock_gives_positive_times() -> None:
    r = FakeRunner("real", [], FakeClock())
    s = measure_latency(r, np.zeros((2, 3, 2, 2)), batch=2, warmup=0, iters=3)
    assert s.iters == 3 and s.p50 >= 0.0


def test_argument_checks() -> None:
    pixels = np.zeros((1, 3, 2, 2))
    with pytest.raises(ValueError, match="no runners"):
        measure_interleaved([], pixels, batch=1, warmup=0, iters=1)
    r = FakeRunner("a", [], FakeClock())
    with pytest.raises(ValueError, match="iters"):
        measure_interleaved([r], pixels, batch=1, warmup=0, iters=0)
    with pytest.raises(ValueError, match="warmup"):
        measure_interleaved([r], pixels, batch=1, warmup=-1, iters=1)
    with pytest.raises(ValueError, match="at least one sample"):
        make_batch(np.zeros((0, 3)), 1)
