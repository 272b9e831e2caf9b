"""report.json: structure, synthetic nulls, validation and atomic writing."""

from __future__ import annotations

import copy
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.report import make_parity, make_report
from xpdeploy.report.schema import (
    REPORT_SCHEMA_VERSION,
    SYNTHETIC_NOTE,
    build_report,
    validate_report,
    write_report_json,
)

WHEN = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
ENV = {"python": "3.11.9", "onnxruntime": "1.18.0", "device": "cpu"}


def report(synthetic: bool = False, **kw: Any) -> dict[str, Any]:
    return make_report(synthetic, **{"title": "Quickstart", "environment": ENV, "created": WHEN,
                                    **kw})


def test_structure() -> None:
    r = report()
    assert set(r) == {
        "schema_version", "status", "pipeline", "title", "created", "run_dir", "data",
        "threads", "environment", "original", "candidates", "engines",
    }  # fmt: skip
    assert r["schema_version"] == REPORT_SCHEMA_VERSION == 1
    assert r["status"] == "failed" and r["pipeline"] == "quickstart" and r["title"] == "Quickstart"
    assert r["created"] == "2024-05-06T07:08:09Z"
    assert r["run_dir"] == "runs/quickstart" and r["threads"] == 4 and r["environment"] == ENV
    assert r["data"] == {"source": "imagefolder", "synthetic": False, "samples": 512, "note": None}
    assert r["original"] == {
        "name": "deit_tiny_patch16_224",
        "runner": "ort-cpu-fp32",
        "top1": 72.5,
        "gmacs": 1.26,
        "params_m": 5.717,
        "params": 5_717_000,
    }
    assert isinstance(r["original"]["params"], int)
    assert [c["name"] for c in r["candidates"]] == ["pruned", "pruned-fp16"]
    c = r["candidates"][0]
    assert set(c) == {
        "name", "runner", "artifact", "gmacs", "params_m", "top1", "top1_delta", "agreement",
        "max_abs_diff", "mean_abs_diff", "cosine", "latency_ms", "baseline_latency_ms", "speedup",
        "gates", "passed", "source", "baseline", "source_max_abs_diff",
        "gpu_latency_ms", "runner_info", "speedup_spread", "unstable",
    }  # fmt: skip
    assert c["top1"] == 72.1 and c["top1_delta"] == pytest.approx(-0.4)
    assert c["agreement"] == 0.9961 and c["max_abs_diff"] == 1.2e-4 and c["passed"] is True
    assert [row["batch"] for row in c["latency_ms"]] == [1, 32]
    assert set(c["latency_ms"][0]) == {"batch", "p10", "p50", "p90", "p99", "mean", "iters",
                                       "throughput"}
    assert c["latency_ms"][0]["p10"] == pytest.approx(1.8)
    assert c["latency_ms"][0]["p50"] == 2.0 and c["baseline_latency_ms"][0]["p50"] == 3.6
    assert c["speedup"] == {"1": pytest.approx(1.8), "32": pytest.approx(1.8)}
    assert c["speedup_spread"] == {"1": 0.03, "32": 0.02} and c["unstable"] == []
    assert set(c["gates"][0]) == {"name", "value", "limit", "passed", "detail"}
    bad = r["candidates"][1]
    assert bad["passed"] is False
    assert bad["speedup_spread"] == {"1": 0.14, "32": 0.05} and bad["unstable"] == [1]
    assert [g["name"] for g in bad["gates"] if not g["passed"]] == ["min_agreement"]


def test_synthetic_has_no_accuracy_anywhere() -> None:
    parity = make_parity(synthetic=True)
    assert parity.original_top1 is not None and parity.candidates[0].top1 is not None
    r = report(synthetic=True)
    assert r["data"]["synthetic"] is True and r["data"]["note"] == SYNTHETIC_NOTE
    assert "labels are random" in r["data"]["note"]
    assert r["original"]["top1"] is None
    for c in r["candidates"]:
        assert c["top1"] is None and c["top1_delta"] is None
        top1_gate = next(g for g in c["gates"] if g["name"] == "max_top1_drop")
        assert top1_gate["value"] is None and top1_gate["detail"].startswith("skipped")
    validate_report(r)


def test_defaults_and_original_extra() -> None:
    r = report(title=None, original_extra={"onnx": "03_export/original.onnx", "top1": 99.0})
    assert r["title"] == "xpdeploy report: quickstart"
    assert r["original"]["onnx"] == "03_export/original.onnx"
    assert r["original"]["top1"] == 72.5  # computed keys win over extras
    created = datetime.fromisoformat(report(created=None)["created"].replace("Z", "+00:00"))
    assert created.tzinfo is not None and created.utcoffset().total_seconds() == 0


def test_bad_status_is_refused() -> None:
    with pytest.raises(ValueError, match="status"):
        report(status="ok")


def test_non_finite_numbers_become_null() -> None:
    parity = make_parity()
    bad = parity.candidates[1].model_copy(
        update={"max_abs_diff": math.nan, "speedup": {1: math.inf, 32: 2.6},
                "speedup_spread": {1: math.nan, 32: 0.05}}
    )
    parity = parity.model_copy(update={"candidates": [parity.candidates[0], bad]})
    r = build_report(parity, pipeline="p", run_dir="r", status="failed", title=None, environment={})
    assert r["candidates"][1]["max_abs_diff"] is None
    assert r["candidates"][1]["speedup"] == {"1": None, "32": 2.6}
    assert r["candidates"][1]["speedup_spread"] == {"1": None, "32": 0.05}
    json.dumps(r, allow_nan=False)  # strict JSON


@pytest.mark.parametrize(
    "path",
    [
        ("status",),
        ("candidates",),
        ("data", "note"),
        ("original", "params"),
        ("candidates", 0, "cosine"),
        ("candidates", 1, "latency_ms", 0, "p90"),
        ("candidates", 0, "baseline_latency_ms", 1, "throughput"),
        ("candidates", 1, "gates", 0, "detail"),
    ],
)
def test_validate_names_the_missing_key(path: tuple[Any, ...]) -> None:
    r = copy.deepcopy(report())
    validate_report(r)
    node: Any = r
    for part in path[:-1]:
        node = node[part]
    del node[path[-1]]
    with pytest.raises(ValueError, match=f"missing required key '{path[-1]}'"):
        validate_report(r)


def test_validate_catches_broken_invariants() -> None:
    r = report(synthetic=True)
    r["candidates"][0]["top1"] = 70.0
    with pytest.raises(ValueError, match="synthetic"):
        validate_report(r)
    r = report()
    r["schema_version"] = 2
    with pytest.raises(ValueError, match="schema_version"):
        validate_report(r)
    r = report()
    r["candidates"] = {}
    with pytest.raises(ValueError, match="expected a list"):
        validate_report(r)


def test_write_report_json_round_trips(tmp_path: Path) -> None:
    r = report()
    target = tmp_path / "out" / "report.json"
    write_report_json(target, r)
    assert json.loads(target.read_text(encoding="utf-8")) == r
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]  # no temp file left


def test_write_report_json_refuses_invalid_and_keeps_old(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("old", encoding="utf-8")
    r = report()
    del r["data"]
    with pytest.raises(ValueError, match="'data'"):
        write_report_json(target, r)
    assert target.read_text(encoding="utf-8") == "old"


def test_reports_without_spreads_still_validate() -> None:
    """speedup_spread and unstable are additive: a report written before them stays valid."""
    r = report()
    for c in r["candidates"]:
        del c["speedup_spread"], c["unstable"]
    validate_report(r)
    assert r["schema_version"] == 1


def test_reports_without_p10_still_validate() -> None:
    """p10 is additive: a report written before it stays valid; a null one too; not a string."""
    r = report()
    for c in r["candidates"]:
        for row in c["latency_ms"] + c["baseline_latency_ms"]:
            del row["p10"]
    validate_report(r)
    r = report()
    r["candidates"][0]["baseline_latency_ms"][1]["p10"] = None
    validate_report(r)
    r["candidates"][0]["baseline_latency_ms"][1]["p10"] = "fast"
    with pytest.raises(ValueError, match=r"baseline_latency_ms\[1\]\.p10: expected a number"):
        validate_report(r)


def test_results_without_p10_give_a_null_p10() -> None:
    """A parity.json written before p10 parses (p10 None) and reports it as null."""
    parity = make_parity()
    data = parity.model_dump(mode="json")
    for c in data["candidates"]:
        for row in c["latency_ms"] + c["baseline_latency_ms"]:
            del row["p10"]
    old = type(parity).model_validate(data)
    r = build_report(old, pipeline="quickstart", run_dir="runs/quickstart", status="failed",
                     title=None, environment={})
    assert r["candidates"][0]["latency_ms"][0]["p10"] is None
    validate_report(r)
