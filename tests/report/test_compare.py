"""``xpdeploy compare``: exit 0 within bounds, 3 on a regression, 1 on bad input or another device.

The reports are built in code (the shape of a real quickstart report.json, two candidates at
batches 1 and 32) so that the tests do not depend on any run folder.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from xpdeploy.cli.compare import compare
from xpdeploy.environment import device_fingerprint, fingerprint_id
from xpdeploy.report.compare import (
    ComparisonError,
    compare_reports,
    parse_fraction,
)
from xpdeploy.report.schema import validate_report


def environment(gpu: str | None = "Orin (nvgpu)", trt: str | None = "10.3.0") -> dict[str, Any]:
    """A captured environment (the keys :func:`environment.capture` writes)."""
    env: dict[str, Any] = {
        "host": {"platform": "Linux-5.15-tegra-aarch64", "machine": "aarch64",
                 "cpu_model": "NVIDIA Jetson AGX Orin Developer Kit", "logical_cores": 12},
        "tools": {"python": "3.10.12", "xpdeploy": "0.1.0", "onnxruntime": "1.18.0",
                  "tensorrt": trt},
        "gpus": None if gpu is None else [{"name": gpu, "driver": "540.3.0", "sm_clock_mhz": 1300.0,
                                           "max_sm_clock_mhz": 1300.0, "temperature_c": 45.0}],
        "libraries": {"cuda": "12.6", "cudnn": "9.3.0", "tensorrt": trt},
        "jetson": {"l4t": "36.4.0", "nvpmodel": {"mode": "MAXN", "id": 0},
                   "max_performance": True},
        "warnings": [],
    }
    env["fingerprint"] = device_fingerprint(env)
    env["fingerprint_id"] = fingerprint_id(env)
    return env


def latency(batch: int, p50: float | None) -> dict[str, Any]:
    return {"batch": batch, "p50": p50, "p90": None if p50 is None else p50 * 1.1,
            "p99": None if p50 is None else p50 * 1.3, "mean": p50, "iters": 30,
            "throughput": None if p50 is None else batch / p50 * 1000}


def candidate(name: str, top1: float | None, p50: dict[int, float | None]) -> dict[str, Any]:
    return {
        "name": name, "runner": "trt-fp16", "artifact": f"07_build/{name}.engine", "gmacs": 1.2,
        "params_m": 5.7, "top1": top1, "top1_delta": None if top1 is None else top1 - 79.0,
        "agreement": 0.99, "max_abs_diff": 1e-3, "mean_abs_diff": 1e-4, "cosine": 0.9999,
        "latency_ms": [latency(b, v) for b, v in p50.items()],
        "baseline_latency_ms": [latency(b, 2 * (v or 1.0)) for b, v in p50.items()],
        "speedup": {str(b): 2.0 for b in p50},
        "gates": [{"name": "max_top1_drop", "value": 0.1, "limit": 0.5, "passed": True,
                   "detail": "top-1 drop 0.10 pts <= 0.50 pts"}],
        "passed": True,
    }


def report(env: dict[str, Any] | None = None, *, pruned_p50: float = 2.0,
           pruned_top1: float = 78.5) -> dict[str, Any]:
    """A valid schema-1 report with the candidates 'original.engine' and 'pruned.engine'."""
    r = {
        "schema_version": 1, "status": "passed", "pipeline": "deit_tiny_orin",
        "title": "xpdeploy report: deit_tiny_orin", "created": "2026-11-25T18:08:08Z",
        "run_dir": "runs/deit", "data": {"source": "imagenet", "synthetic": False,
                                         "samples": 5000, "note": None},
        "threads": 4, "environment": env if env is not None else environment(),
        "original": {"name": "original", "runner": "torch-cpu-fp32", "top1": 79.0, "gmacs": 1.26,
                     "params_m": 5.7, "params": 5_700_000},
        "candidates": [candidate("original.engine", 79.0, {1: 3.0, 32: 30.0}),
                       candidate("pruned.engine", pruned_top1, {1: pruned_p50, 32: 20.0})],
    }
    validate_report(r)
    return r


def invoke(tmp_path: Path, base: dict | str, new: dict | str, *args: str):
    paths = []
    for name, content in (("base.json", base), ("new.json", new)):
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        paths.append(str(path))
    return CliRunner().invoke(compare, [*paths, *args])


def test_parse_fraction() -> None:
    assert parse_fraction("5%") == pytest.approx(0.05)
    assert parse_fraction("0.05") == pytest.approx(0.05)
    assert parse_fraction(" 12.5% ") == pytest.approx(0.125)
    for bad in ("5", "-1%", "five", "nan%"):
        with pytest.raises(ValueError):
            parse_fraction(bad)


def test_within_bounds_exits_0(tmp_path: Path) -> None:
    result = invoke(tmp_path, report(), report(pruned_p50=2.08, pruned_top1=78.2),
                    "--max-regression", "5%")
    assert result.exit_code == 0, result.output
    assert "PASSED | compare | 4 latency and 2 top-1 rows" in result.output
    assert "+4.0%" in result.output


def test_latency_regression_exits_3_and_names_the_row(tmp_path: Path) -> None:
    md = tmp_path / "cmp.md"
    result = invoke(tmp_path, report(), report(pruned_p50=2.2), "--max-regression", "0.05",
                    "--markdown", str(md))
    assert result.exit_code == 3, result.output
    row = next(line for line in result.output.splitlines() if "REGRESSION" in line)
    assert row.split()[:2] == ["pruned.engine", "1"] and "+10.0%" in row
    assert "error: 1 regression beyond the bounds" in result.output
    assert "'pruned.engine' batch 1 p50 2.000 -> 2.200 ms (+10.0%)" in result.output
    page = md.read_text()
    assert page.startswith("# xpdeploy compare: FAILED (1 regression)")
    assert "| pruned.engine | 1 | 2.000 | 2.200 | +10.0% | REGRESSION |" in page


def test_bound_is_respected(tmp_path: Path) -> None:
    result = invoke(tmp_path, report(), report(pruned_p50=2.2), "--max-regression", "15%")
    assert result.exit_code == 0, result.output


def test_accuracy_drop_exits_3(tmp_path: Path) -> None:
    result = invoke(tmp_path, report(), report(pruned_top1=77.9))
    assert result.exit_code == 3, result.output
    assert "'pruned.engine' top-1 78.50 -> 77.90 % (-0.60 pts)" in result.output
    loose = invoke(tmp_path, report(), report(pruned_top1=77.9), "--max-top1-drop", "1")
    assert loose.exit_code == 0, loose.output


def test_fingerprint_mismatch_exits_1_in_one_line(tmp_path: Path) -> None:
    result = invoke(tmp_path, report(), report(environment(gpu="NVIDIA A100-SXM4-80GB")))
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: BASE and NEW were measured on "
                                                   "different devices")
    assert "GPU 'Orin (nvgpu)' vs 'NVIDIA A100-SXM4-80GB'" in lines[0]
    trt = invoke(tmp_path, report(), report(environment(trt="8.6.2")))
    assert trt.exit_code == 1 and "TensorRT '10.3.0' vs '8.6.2'" in trt.output


@pytest.mark.parametrize("content", ["{not json", "[]", json.dumps({"schema_version": 1})])
def test_invalid_report_exits_1_in_one_line(tmp_path: Path, content: str) -> None:
    result = invoke(tmp_path, report(), content)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: NEW ") and "new.json" in lines[0]


def test_missing_file_and_bad_bound_exit_1(tmp_path: Path) -> None:
    missing = CliRunner().invoke(compare, [str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert missing.exit_code == 1 and "BASE" in missing.output and "cannot read" in missing.output
    bad = invoke(tmp_path, report(), report(), "--max-regression", "5")
    assert bad.exit_code == 1 and "ambiguous" in bad.output


def test_missing_rows_are_listed_not_ignored() -> None:
    base, new = report(), report()
    new["candidates"][1]["latency_ms"] = new["candidates"][1]["latency_ms"][:1]  # no batch 32
    new["candidates"].append(candidate("pruned.int8.engine", 78.0, {1: 1.0}))
    dropped = copy.deepcopy(base)
    dropped["candidates"] = dropped["candidates"][:1]
    c = compare_reports(base, new, max_regression=0.05, max_top1_drop=0.5)
    assert c.passed
    assert "'pruned.engine' batch 32: measured in BASE, not in NEW" in c.missing
    assert "'pruned.int8.engine': in NEW only (no baseline)" in c.missing
    c = compare_reports(base, dropped, max_regression=0.05, max_top1_drop=0.5)
    assert c.missing == ["'pruned.engine': in BASE, not in NEW"]


def test_null_latency_and_synthetic_top1_are_not_applicable() -> None:
    base, new = report(), report()
    new["candidates"][0]["latency_ms"][0]["p50"] = None
    for r in (base, new):
        r["candidates"][1]["top1"] = None
    c = compare_reports(base, new, max_regression=0.05, max_top1_drop=0.5)
    assert c.passed and c.latency[0].verdict == "n/a" and c.accuracy[1].verdict == "n/a"
    assert compare_reports(base, new, max_regression=0.05, max_top1_drop=None).passed


def test_legacy_environment_compares_tool_versions_only() -> None:
    legacy = {"python": "3.10.12", "onnxruntime": "1.18.0", "tensorrt": "10.3.0"}
    c = compare_reports(report(legacy), report(), max_regression=0.05, max_top1_drop=0.5)
    assert c.passed and c.fingerprint_id != "unknown" and "no device fingerprint" in c.warnings[0]
    with pytest.raises(ComparisonError, match=re.escape("onnxruntime '1.17.0' vs '1.18.0'")):
        compare_reports(report({**legacy, "onnxruntime": "1.17.0"}), report(),
                        max_regression=0.05, max_top1_drop=0.5)
