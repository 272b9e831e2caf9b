"""Temperatures sampled while verify runs, and what the report makes of them."""

from __future__ import annotations

import threading

from tests.report import make_parity
from xpdeploy.report.markdown import render_markdown
from xpdeploy.report.schema import build_report
from xpdeploy.verify.thermal import TemperatureSampler, thermal_warnings


def test_sampler_reads_at_entry_during_and_at_exit() -> None:
    readings = iter([{"gpu0": 50.0, "cpu": 40.0}, {"gpu0": 70.0}, {"gpu0": 60.0, "cpu": 44.0}])
    during = threading.Event()

    def sample() -> dict[str, float]:
        value = next(readings, {"gpu0": 60.0, "cpu": 44.0})
        during.set()
        return value

    with TemperatureSampler(sample, interval_s=0.01) as sampler:
        during.clear()
        assert during.wait(5)  # the background thread read at least once
    summary = sampler.summary()
    assert summary["gpu0"]["min"] == 50.0 and summary["gpu0"]["max"] == 70.0
    assert summary["cpu"]["samples"] >= 2 and summary["gpu0"]["samples"] >= 3


def test_a_failing_reading_is_skipped_not_raised() -> None:
    calls = iter([RuntimeError("nvidia-smi timed out"), {"soc": 41.0}])

    def sample() -> dict[str, float]:
        value = next(calls, {"soc": 42.0})
        if isinstance(value, Exception):
            raise value
        return value

    with TemperatureSampler(sample, interval_s=60) as sampler:
        pass
    assert sampler.summary() == {"soc": {"min": 41.0, "max": 41.0, "mean": 41.0,
                                         "samples": 1.0}}


def test_hot_zones_warn_in_the_report() -> None:
    hot = {"gpu0": {"min": 60.0, "max": 91.0, "mean": 80.0, "samples": 10.0},
           "cpu": {"min": 40.0, "max": 50.0, "mean": 45.0, "samples": 10.0}}
    (warning,) = thermal_warnings(hot)
    assert warning.startswith("gpu0 reached 91 C during verify (>= 85 C)")
    parity = make_parity().model_copy(update={"temperatures_c": hot})
    report = build_report(parity, pipeline="p", run_dir="r", status="passed", title=None,
                          environment={"host": {}, "tools": {}, "warnings": []})
    env = report["environment"]
    assert env["temperatures_during_verify_c"] == hot and env["warnings"] == [warning]
    md = render_markdown(report)
    assert "Temperatures during verify: gpu0 60-91 C, cpu 40-50 C" in md
    assert "thermal throttling" in md
