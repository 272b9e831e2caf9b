"""Latency of runners, measured side by side (docs/architecture.md sections 4 and 6).

All times are milliseconds per batch; throughput is images per second at the median latency.
Speedups are ratios of medians measured in the same process, interleaved call by call, so that
anything that drifts on the machine (clock boost, thermal throttling, another process waking up,
caches warming) hits the original and the candidate alike and cancels in the ratio.

Drift that is slower than one call but faster than a whole measurement still moves a single ratio
of medians (on a 2-core shared machine the same batch-1 file measured 2.5 to 10.8 ms minutes
apart). So :func:`measure_rounds` splits the timed calls into rounds, takes the ratio of medians in
each, and reports the median ratio with its spread over rounds (:class:`RatioEstimate`): a figure
whose rounds disagree by more than a tolerance is known to be unstable, and says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from xpdeploy.artifacts import LatencyStats
from xpdeploy.backends.runner import Runner

Clock = Callable[[], float]
"""Returns the current time in seconds (like ``time.perf_counter``)."""


def latency_stats(times_ms: Sequence[float] | np.ndarray, batch: int) -> LatencyStats:
    """Summarise per-call times (ms per batch of ``batch`` images) as p10/p50/p90/p99/mean and
    img/s.

    Percentiles use numpy's default linear interpolation. A zero median (only possible with a fake
    clock) gives an infinite throughput rather than a division error.
    """
    t = np.asarray(times_ms, dtype=np.float64).reshape(-1)
    if t.size == 0:
        raise ValueError("latency_stats: no times were given; measure at least one iteration")
    if batch <= 0:
        raise ValueError(f"latency_stats: batch must be positive, got {batch}")
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        raise ValueError("latency_stats: times must be finite and non-negative milliseconds")
    p10, p50, p90, p99 = (float(v) for v in np.percentile(t, [10, 50, 90, 99]))
    throughput = batch / p50 * 1000.0 if p50 > 0 else float("inf")
    return LatencyStats(
        batch=batch,
        p10=p10,
        p50=p50,
        p90=p90,
        p99=p99,
        mean=float(t.mean()),
        iters=int(t.size),
        throughput=float(throughput),
    )


def make_batch(pixels: np.ndarray, batch: int) -> np.ndarray:
    """The first ``batch`` samples of ``pixels`` (rows repeated cyclically if there are fewer).

    The result is C-contiguous float32, the layout every backend expects, so no runner pays for a
    conversion inside the timed call.
    """
    arr = np.asarray(pixels)
    if arr.ndim < 1 or arr.shape[0] == 0:
        raise ValueError(f"need at least one sample to time, got pixels of shape {arr.shape}")
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    rows = np.arange(batch) % arr.shape[0]
    return np.ascontiguousarray(arr[rows], dtype=np.float32)


def measure_interleaved(
    runners: Sequence[Runner],
    pixels: np.ndarray,
    batch: int,
    warmup: int,
    iters: int,
    clock: Clock = time.perf_counter,
) -> list[LatencyStats]:
    """Time several runners on the same batch, interleaved call by call; stats in runner order.

    Why interleaved: timing the original for a minute and then the candidate for a minute lets
    machine drift (frequency scaling, thermal throttling, background load) land on one of them and
    shows up as a fake speedup or slowdown. Calling each runner once per round puts the drift on
    both, so it cancels in the ratio of medians (docs/architecture.md sections 4 and 6). The order
    alternates every round (forward on even rounds, reversed on odd ones) so that neither runner
    always runs right after the other and inherits its cache state or its tail of GPU work.

    The runners must already be entered (open). ``warmup`` untimed rounds run first (same
    alternating order), then ``iters`` timed rounds; ``clock`` returns seconds.
    """
    times = _interleaved_times(runners, make_batch(pixels, batch), warmup, iters, clock)
    return [latency_stats(t, batch) for t in times]


def measure_latency(
    runner: Runner,
    pixels: np.ndarray,
    batch: int,
    warmup: int,
    iters: int,
    clock: Clock = time.perf_counter,
) -> LatencyStats:
    """Time one runner: ``warmup`` untimed calls, then ``iters`` timed ones (ms per batch)."""
    return measure_interleaved([runner], pixels, batch, warmup, iters, clock=clock)[0]


@dataclass(frozen=True)
class RatioEstimate:
    """A ratio of medians measured in several interleaved rounds.

    ``value``: the median over rounds of each round's ratio; ``spread``: half the range of the
    rounds' ratios over ``value`` (0.05 = the rounds agree within +-5%); ``rounds``: each round's
    ratio. One round has no spread to show (0.0): stability needs at least two.
    """

    value: float
    spread: float
    rounds: tuple[float, ...]

    def stable(self, max_spread: float) -> bool:
        """Whether the rounds agree within ``max_spread`` (a fraction of the value)."""
        return bool(np.isfinite(self.spread)) and self.spread <= max_spread

    @classmethod
    def of(cls, ratios: Sequence[float]) -> RatioEstimate:
        r = np.asarray(ratios, dtype=np.float64)
        if r.size == 0:
            raise ValueError("RatioEstimate.of: no rounds were measured")
        value = float(np.median(r))
        finite = 0 < value < float("inf") and bool(np.all(np.isfinite(r)))
        spread = float((r.max() - r.min()) / 2 / value) if finite else float("inf")
        return cls(value=value, spread=spread, rounds=tuple(float(x) for x in r))


@dataclass(frozen=True)
class RoundTimes:
    """Per runner, the timed calls of each round (ms per batch), from :func:`measure_rounds`."""

    batch: int
    times: tuple[tuple[tuple[float, ...], ...], ...]  # [runner][round][call]

    def stats(self, runner: int) -> LatencyStats:
        """p10/p50/p90/p99 over every timed call of ``runner`` (all rounds)."""
        return latency_stats([t for rnd in self.times[runner] for t in rnd], self.batch)

    def medians(self, runner: int) -> list[float]:
        """The median of each round of ``runner``, ms per batch."""
        return [float(np.median(rnd)) for rnd in self.times[runner]]

    def ratio(self, numerator: int, denominator: int) -> RatioEstimate:
        """median(numerator) / median(denominator) per round; e.g. a speedup is
        ``ratio(baseline, candidate)`` and a relative latency ``ratio(candidate, reference)``."""
        return RatioEstimate.of([a / b if b > 0 else float("inf") for a, b in zip(
            self.medians(numerator), self.medians(denominator), strict=True)])

    def latency(self, runner: int) -> RatioEstimate:
        """The runner's median latency (ms per batch) over rounds, with its spread."""
        return RatioEstimate.of(self.medians(runner))


def measure_rounds(
    runners: Sequence[Runner],
    pixels: np.ndarray,
    batch: int,
    *,
    warmup: int,
    iters: int,
    rounds: int,
    clock: Clock = time.perf_counter,
) -> RoundTimes:
    """:func:`measure_interleaved` in ``rounds`` rounds of ``ceil(iters / rounds)`` timed calls
    per runner each (at least one), after ``warmup`` untimed rounds; see the module doc."""
    if rounds <= 0:
        raise ValueError(f"measure_rounds: rounds must be positive, got {rounds}")
    per_round = max(1, -(-iters // rounds))
    x = make_batch(pixels, batch)
    times: list[list[tuple[float, ...]]] = [[] for _ in runners]
    for r in range(rounds):
        stats = _interleaved_times(runners, x, warmup if r == 0 else 0, per_round, clock)
        for i, t in enumerate(stats):
            times[i].append(tuple(t))
    return RoundTimes(batch=batch, times=tuple(tuple(t) for t in times))


def _interleaved_times(runners: Sequence[Runner], x: np.ndarray, warmup: int, iters: int,
                       clock: Clock) -> list[list[float]]:
    """Per runner the ``iters`` timed calls (ms) of one interleaved measurement on batch ``x``."""
    if not runners:
        raise ValueError("measure_interleaved: no runners to time")
    if iters <= 0:
        raise ValueError(f"measure_interleaved: iters must be positive, got {iters}")
    if warmup < 0:
        raise ValueError(f"measure_interleaved: warmup must be >= 0, got {warmup}")
    forward = list(range(len(runners)))
    backward = forward[::-1]
    for r in range(warmup):
        for i in forward if r % 2 == 0 else backward:
            runners[i].infer(x)
    times: list[list[float]] = [[] for _ in runners]
    for r in range(iters):
        for i in forward if r % 2 == 0 else backward:
            start = clock()
            runners[i].infer(x)
            times[i].append((clock() - start) * 1000.0)
    return times
