"""Latency of runners, measured side by side (docs/architecture.md sections 4 and 6).

All times are milliseconds per batch; throughput is images per second at the median latency.
Speedups are ratios of medians measured in the same process, interleaved call by call, so that
anything that drifts on the machine (clock boost, thermal throttling, another process waking up,
caches warming) hits the original and the candidate alike and cancels in the ratio.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from xpdeploy.artifacts import LatencyStats
from xpdeploy.backends.runner import Runner

Clock = Callable[[], float]
"""Returns the current time in seconds (like ``time.perf_counter``)."""


def latency_stats(times_ms: Sequence[float] | np.ndarray, batch: int) -> LatencyStats:
    """Summarise per-call times (ms per batch of ``batch`` images) as p50/p90/p99/mean and img/s.

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
    p50, p90, p99 = (float(v) for v in np.percentile(t, [50, 90, 99]))
    throughput = batch / p50 * 1000.0 if p50 > 0 else float("inf")
    return LatencyStats(
        batch=batch,
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
    if not runners:
        raise ValueError("measure_interleaved: no runners to time")
    if iters <= 0:
        raise ValueError(f"measure_interleaved: iters must be positive, got {iters}")
    if warmup < 0:
        raise ValueError(f"measure_interleaved: warmup must be >= 0, got {warmup}")
    x = make_batch(pixels, batch)
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
