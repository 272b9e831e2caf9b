"""Latency statistics and interleaved timing, with fake runners and a fake clock."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.verify.fake_clock import FakeClock
from xpdeploy.artifacts import LatencyStats
from xpdeploy.backends.runner import Runner
from xpdeploy.verify.latency import (
    RatioEstimate,
    latency_stats,
    make_batch,
    measure_interleaved,
    measure_latency,
    measure_rounds,
)


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
    assert s.p10 == pytest.approx(1.9)  # numpy linear interpolation: 1 + 0.1 * 9
    assert s.p50 == pytest.approx(5.5)
    assert s.p90 == pytest.approx(9.1)  # numpy linear interpolation
    assert s.p99 == pytest.approx(9.91)
    assert s.mean == pytest.approx(5.5)
    assert s.throughput == pytest.approx(4 / 5.5 * 1000)


def test_latency_stats_without_p10_parse() -> None:
    """Results written before p10 was recorded still load, with p10 None."""
    old = '{"batch": 1, "p50": 2.0, "p90": 2.2, "p99": 2.6, "mean": 2.1, "iters": 30, ' \
          '"throughput": 500.0}'
    s = LatencyStats.model_validate_json(old)
    assert s.p10 is None and s.p50 == 2.0
    assert LatencyStats.model_validate_json(s.model_dump_json()) == s


def test_latency_stats_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no times"):
        latency_stats([], batch=1)
    with pytest.raises(ValueError, match="non-negative"):
        latency_stats([1.0, -0.5], batch=1)
    with pytest.raises(ValueError, match="batch"):
        latency_stats([1.0], batch=0)


def test_fake_runner_satisfies_protocol() -> None:
    assert isinstance(FakeRunner("a", [], FakeClock(100.0)), Runner)


def test_interleaved_order_alternates_and_times_are_exact() -> None:
    log: list[str] = []
    clock = FakeClock(100.0)
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
    clock = FakeClock(100.0)
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
    clock = FakeClock(100.0)
    r = FakeRunner("only", log, clock, cost_ms=3.0)
    s = measure_latency(r, np.zeros((1, 3, 2, 2)), batch=1, warmup=3, iters=4, clock=clock)
    assert len(log) == 7
    assert s.iters == 4 and s.p50 == pytest.approx(3.0) and s.batch == 1


def test_real_clock_gives_positive_times() -> None:
    r = FakeRunner("real", [], FakeClock(100.0))
    s = measure_latency(r, np.zeros((2, 3, 2, 2)), batch=2, warmup=0, iters=3)
    assert s.iters == 3 and s.p50 >= 0.0


def test_argument_checks() -> None:
    pixels = np.zeros((1, 3, 2, 2))
    with pytest.raises(ValueError, match="no runners"):
        measure_interleaved([], pixels, batch=1, warmup=0, iters=1)
    r = FakeRunner("a", [], FakeClock(100.0))
    with pytest.raises(ValueError, match="iters"):
        measure_interleaved([r], pixels, batch=1, warmup=0, iters=0)
    with pytest.raises(ValueError, match="warmup"):
        measure_interleaved([r], pixels, batch=1, warmup=-1, iters=1)
    with pytest.raises(ValueError, match="at least one sample"):
        make_batch(np.zeros((0, 3)), 1)


class ScheduledRunner(FakeRunner):
    """A fake runner whose calls cost ``costs_ms`` in turn (warm-up calls included)."""

    def __init__(self, name: str, log: list[str], clock: FakeClock, costs_ms: list[float]) -> None:
        super().__init__(name, log, clock)
        self.costs = list(costs_ms)

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        self.cost_ms = self.costs.pop(0)
        return super().infer(pixels)


def test_measure_rounds_gives_per_round_medians_ratio_and_spread() -> None:
    """3 rounds of 2 calls: the baseline drifts (4, 6, 2 ms) while the candidate holds at 2 ms, so
    the rounds' speedups are 2, 3 and 1: median 2, spread (3 - 1) / 2 / 2 = 0.5."""
    log: list[str] = []
    clock = FakeClock(100.0)
    base = ScheduledRunner("A", log, clock, [50.0, 4.0, 4.0, 6.0, 6.0, 2.0, 2.0])
    cand = ScheduledRunner("B", log, clock, [50.0] + [2.0] * 6)
    t = measure_rounds([base, cand], np.zeros((2, 3, 2, 2)), batch=2, warmup=1, iters=6, rounds=3,
                       clock=clock)
    assert base.costs == [] and cand.costs == []  # one warm-up call each, then 3 x 2 timed
    assert log == ["A", "B"] + ["A", "B", "B", "A"] * 3  # warm-up in round 0 only
    assert t.batch == 2
    # the fake clock is a float of seconds: ms come back within rounding, hence approx
    np.testing.assert_allclose(t.times[0], [[4.0, 4.0], [6.0, 6.0], [2.0, 2.0]], rtol=1e-9)
    np.testing.assert_allclose(t.times[1], [[2.0, 2.0]] * 3, rtol=1e-9)
    assert t.medians(0) == pytest.approx([4.0, 6.0, 2.0])
    assert t.medians(1) == pytest.approx([2.0, 2.0, 2.0])
    speedup = t.ratio(0, 1)
    assert speedup.rounds == pytest.approx((2.0, 3.0, 1.0))
    assert speedup.value == pytest.approx(2.0) and speedup.spread == pytest.approx(0.5)
    assert not speedup.stable(0.10) and speedup.stable(0.51)
    assert t.ratio(1, 0).rounds == pytest.approx((0.5, 1 / 3, 1.0))  # relative latency
    base_stats = t.stats(0)  # p50 over all 6 timed calls, warm-up excluded
    assert base_stats.iters == 6
    assert base_stats.p50 == pytest.approx(4.0) and base_stats.mean == pytest.approx(4.0)
    assert t.stats(1).p50 == pytest.approx(2.0)
    assert t.stats(1).throughput == pytest.approx(1000.0)  # batch 2 in 2 ms
    lat = t.latency(0)
    assert lat.value == pytest.approx(4.0) and lat.spread == pytest.approx(0.5)
    assert lat.rounds == pytest.approx((4.0, 6.0, 2.0))


def test_measure_rounds_rounds_the_calls_per_round_up() -> None:
    """iters 5 over 2 rounds: ceil(5 / 2) = 3 calls per round, 6 in all; iters below rounds still
    times one call per round."""
    clock = FakeClock(100.0)
    a, b = FakeRunner("A", [], clock, 3.0), FakeRunner("B", [], clock, 1.5)
    t = measure_rounds([a, b], np.zeros((1, 3)), batch=1, warmup=0, iters=5, rounds=2, clock=clock)
    assert [len(r) for r in t.times[0]] == [3, 3] and t.stats(1).iters == 6
    ratio = t.ratio(0, 1)
    assert ratio.value == pytest.approx(2.0) and ratio.rounds == pytest.approx((2.0, 2.0))
    assert ratio.spread == pytest.approx(0.0, abs=1e-9) and ratio.stable(0.01)
    few = measure_rounds([a], np.zeros((1, 3)), batch=1, warmup=0, iters=2, rounds=4, clock=clock)
    assert [len(r) for r in few.times[0]] == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="rounds must be positive"):
        measure_rounds([a], np.zeros((1, 3)), batch=1, warmup=0, iters=2, rounds=0, clock=clock)


def test_ratio_estimate_edge_cases() -> None:
    one = RatioEstimate.of([1.7])  # a single round has no spread to show
    assert one.value == 1.7 and one.spread == 0.0 and one.rounds == (1.7,) and one.stable(0.01)
    even = RatioEstimate.of([1.0, 2.0])  # median of an even count is the mean of the middle two
    assert even.value == 1.5 and even.spread == pytest.approx(0.5 / 1.5)
    assert RatioEstimate.of([2.0, 2.2, 1.8]).spread == pytest.approx(0.1)
    assert RatioEstimate.of([2.0, 2.2, 1.8]).stable(0.1 + 1e-12)
    zero = RatioEstimate.of([0.0, 0.0, 1.0])  # a zero median: no relative spread exists
    assert zero.value == 0.0 and zero.spread == float("inf") and not zero.stable(0.99)
    inf_round = RatioEstimate.of([float("inf"), 2.0, 2.0])  # a zero-median round's ratio
    assert inf_round.value == 2.0 and inf_round.spread == float("inf")
    assert not inf_round.stable(0.5)
    with np.errstate(invalid="ignore"):  # inf / inf: the spread is NaN, which is never stable
        inf_median = RatioEstimate.of([float("inf"), float("inf"), 2.0])
    assert inf_median.value == float("inf") and not inf_median.stable(0.5)
