"""Temperatures sampled *during* verification, so a report shows whether the board throttled.

A Jetson at 90+ C lowers its clocks, and every latency measured after that point is slower for a
reason that has nothing to do with the model. One reading before or after the benchmark misses it;
:class:`TemperatureSampler` reads every visible zone (kernel thermal zones, NVIDIA GPUs through
``nvidia-smi``) on a background thread while ``verify`` runs and keeps min / max / mean per zone.

The sampling thread sleeps between readings (default every 2 s), so it costs the benchmark a
file read or an ``nvidia-smi`` call per interval, not a busy core.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from xpdeploy.environment import sample_temperatures

#: Above this many degrees C during verify, the report warns that latencies may include
#: throttling (Orin modules throttle from about 97 C junction; discrete GPUs from about 85 C, so
#: this is the lower of the two).
THROTTLE_WARN_C = 85.0
#: Seconds between readings.
INTERVAL_S = 2.0


class TemperatureSampler:
    """Context manager: reads ``sample()`` ({zone: C}) at entry, every ``interval_s``, and at exit.

    Readings that fail (a zone vanishing, ``nvidia-smi`` timing out) are skipped: temperatures
    inform the report, they must never fail a verification.
    """

    def __init__(self, sample: Callable[[], Mapping[str, float]] = sample_temperatures,
                 interval_s: float = INTERVAL_S) -> None:
        self._sample = sample
        self._interval = interval_s
        self._readings: dict[str, list[float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> None:
        try:
            values = dict(self._sample())
        except Exception:  # a failed reading is skipped, never raised (see the class doc)
            return
        for zone, c in values.items():
            self._readings.setdefault(zone, []).append(float(c))

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._read()

    def __enter__(self) -> TemperatureSampler:
        self._read()
        self._thread = threading.Thread(target=self._loop, name="xpdeploy-thermal", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._read()

    def summary(self) -> dict[str, dict[str, float]]:
        """{zone: {"min", "max", "mean" (C), "samples"}} over every reading taken."""
        return {zone: {"min": min(v), "max": max(v), "mean": sum(v) / len(v),
                       "samples": float(len(v))}
                for zone, v in sorted(self._readings.items()) if v}


def thermal_warnings(summary: Mapping[str, Mapping[str, Any]],
                     limit_c: float = THROTTLE_WARN_C) -> list[str]:
    """One sentence per zone that reached ``limit_c`` during verify."""
    return [f"{zone} reached {s['max']:.0f} C during verify (>= {limit_c:.0f} C): latencies may "
            "include thermal throttling; cool the board or add a fan and rerun"
            for zone, s in summary.items() if s.get("max", 0.0) >= limit_c]
