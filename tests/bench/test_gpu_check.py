"""bench/gpu_check.sh: the one-call GPU check, here through its CPU fallback.

The smoke run (``XPDEPLOY_GPU_CHECK_SMOKE=1``, no GPU visible) runs every part for real at the
smallest sizes and checks the layout the script's header and docs/benchmarks.md document; the
failure paths check that a failing part neither stops the others nor leaves a passing exit code.
The ``gpu`` test runs bench/gpu_latency.py's CUDA path where there is a GPU (part 1 of the check
runs it there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.gpu_latency import interleaved_times, speedup, stats

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
PARTS = ["pytest", "quickstart", "latency", "nccl"]
#: OUT_DIR holds exactly these (flat: the run folders go to the work folder).
OUT_FILES = {"summary.json", "summary.md", "pytest.xml", "pytest.log", "quickstart.log",
             "latency.json", "latency.log", "nccl.log"}
SUMMARY_KEYS = {"schema", "kind", "status", "exit_code", "started", "wall_s", "device",
                "device_name", "capability", "bf16_supported", "driver", "torch", "cuda",
                "tensorrt", "python", "python_cmd", "fallback", "smoke", "missing_modules",
                "work_dir", "notes", "parts"}
PART_KEYS = {"status", "wall_s", "timeout_s", "exit_code", "log", "files", "numbers", "note"}


def _check(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run the check into tmp_path/out on the CPU (no GPU visible), smoke sizes."""
    out = tmp_path / "out"
    full_env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "",
                "XPDEPLOY_GPU_CHECK_SMOKE": "1", "XPDEPLOY_GPU_CHECK_WORK": str(tmp_path / "work"),
                **env}
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], env=full_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=400)
    return proc, out


def _summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("argv", [[], ["a", "b"], [""]])
def test_without_exactly_one_out_dir_it_prints_one_usage_line(tmp_path: Path,
                                                             argv: list[str]) -> None:
    proc = subprocess.run(["bash", str(SCRIPT), *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("usage: ")
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.slow
def test_cpu_fallback_smoke_run_writes_the_documented_layout(tmp_path: Path) -> None:
    proc, out = _check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == OUT_FILES

    s = _summary(out)
    assert set(s) == SUMMARY_KEYS
    assert (s["schema"], s["kind"], s["status"], s["exit_code"]) == (1, "xpdeploy-gpu-check",
                                                                      "pass", 0)
    assert s["device"] == "cpu" and s["fallback"] is True and s["smoke"] is True
    assert s["torch"] and s["python"] and s["wall_s"] > 0
    assert any("CPU fallback" in n for n in s["notes"])
    assert list(s["parts"]) == PARTS
    for name, part in s["parts"].items():
        assert set(part) == PART_KEYS, name
        assert part["status"] in ("pass", "skip"), (name, part)
        assert part["log"] == f"{name}.log" and part["wall_s"] > 0
        assert part["log"] in part["files"]
        for f in part["files"]:
            assert (out / f).is_file(), (name, f)

    pytest_part = s["parts"]["pytest"]  # no GPU: every gpu test reports its skip
    assert pytest_part["status"] == "skip" and "pytest.xml" in pytest_part["files"]
    assert pytest_part["numbers"]["skipped"] >= 1 and pytest_part["numbers"]["passed"] == 0

    qs = s["parts"]["quickstart"]["numbers"]
    assert qs["report_status"] == "passed"
    for key in ("top1_original", "top1_one_shot", "top1_finetuned"):
        assert 0 <= qs[key] <= 100
    assert {"load", "train", "learn_masks", "prune", "finetune", "verify"} <= set(qs["stage_s"])
    assert qs["train"]["device"] == "cpu" and qs["train"]["amp"] == "off"  # auto is off on CPU
    assert "train.amp=auto" in qs["overrides"] and "finetune.amp=auto" in qs["overrides"]
    assert Path(qs["run_dir"], "report.json").is_file()  # in the work folder, not in OUT_DIR

    lat = s["parts"]["latency"]["numbers"]
    assert "latency.json" in s["parts"]["latency"]["files"]
    assert {(r["model"], r["batch"]) for r in lat["rows"]} == {
        ("deit_tiny", 1), ("deit_tiny", 2), ("quickstart", 1), ("quickstart", 2)}
    for r in lat["rows"]:
        assert 0 < r["original_p10_ms"] <= r["original_p50_ms"] <= r["original_p90_ms"]
        assert 0 < r["pruned_p10_ms"] <= r["pruned_p50_ms"] <= r["pruned_p90_ms"]
        assert r["speedup"] > 0
    assert 0.45 < lat["models"]["deit_tiny"]["mac_ratio"] <= 0.5  # xpdeploy's planner: exact

    nccl = s["parts"]["nccl"]
    assert nccl["numbers"]["pipeline_exit"] == 0 and nccl["numbers"]["pipeline_passed"]
    # one process under torchrun: a group of one, the collective stages' distributed path
    assert nccl["numbers"]["pipeline_backend"] == "gloo"
    assert nccl["numbers"]["pipeline_processes"] == 1
    assert nccl["numbers"]["probe"]["backend"] == "gloo" and nccl["numbers"]["probe"]["ok"]
    assert "gloo in place of NCCL" in nccl["note"]

    md = (out / "summary.md").read_text()
    assert md.startswith("# xpdeploy GPU check: PASS")
    assert all(f"| {name} |" in md for name in PARTS)


@pytest.mark.slow
def test_a_failing_part_fails_the_check_and_the_later_parts_still_run(tmp_path: Path) -> None:
    proc, out = _check(tmp_path, XPDEPLOY_GPU_CHECK_FAIL="pytest",
                       XPDEPLOY_GPU_CHECK_PARTS="pytest,latency")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = _summary(out)
    assert (s["status"], s["exit_code"]) == ("fail", 1)
    parts = s["parts"]
    assert parts["pytest"]["status"] == "fail" and "injected" in parts["pytest"]["note"]
    assert parts["latency"]["status"] == "pass"  # ran after the failed part
    assert parts["latency"]["numbers"]["models"]["quickstart"]["skipped"]  # no quickstart run
    assert parts["quickstart"]["status"] == parts["nccl"]["status"] == "skip"
    assert "# xpdeploy GPU check: FAIL" in (out / "summary.md").read_text()


def test_a_python_that_does_not_run_fails_every_part_and_still_writes_a_summary(
        tmp_path: Path) -> None:
    proc, out = _check(tmp_path, PYTHON=str(tmp_path / "no-such-python"))
    assert proc.returncode == 1
    s = _summary(out)  # written by the shell: the summary writer needs a python too
    assert set(s) == SUMMARY_KEYS
    assert (s["status"], s["exit_code"], s["device"]) == ("fail", 1, "unknown")
    assert list(s["parts"]) == PARTS
    assert all(p["status"] == "fail" and p["exit_code"] != 0 for p in s["parts"].values())
    assert all((out / p["log"]).is_file() for p in s["parts"].values())
    assert "summary writer failed" in s["notes"][0]


def test_interleaving_alternates_the_order_and_the_speedup_is_a_median_of_rounds() -> None:
    order: list[str] = []
    calls = [lambda: order.append("o"), lambda: order.append("p")]

    def fake_time(call: Any) -> float:  # original 2 ms, pruned 1 ms, order recorded
        call()
        return 2.0 if order[-1] == "o" else 1.0

    times = interleaved_times(calls, fake_time, warmup=1, iters=4, rounds=2)
    assert order == ["o", "p"] + ["o", "p", "p", "o"] * 2  # warm-up, then 2 rounds of 2
    assert [len(r) for r in times[0]] == [2, 2]
    assert speedup(times[0], times[1]) == {"speedup": 2.0, "speedup_spread": 0.0,
                                          "speedup_rounds": [2.0, 2.0]}
    s = stats([[1.0, 2.0], [3.0, 4.0]], batch=8)
    assert (s["p50"], s["iters"], s["images_per_s"]) == (2.5, 4, 8 / 2.5 * 1000)
    assert s["p10"] < s["p50"] < s["p90"]


def test_the_nccl_part_runs_the_two_process_tests_pipeline(tmp_path: Path) -> None:
    from bench.gpu_nccl import write_pipeline
    from tests.test_torchrun import two_process_pipeline

    ours = write_pipeline(tmp_path / "ours")
    (tmp_path / "test").mkdir()
    assert ours.read_text() == two_process_pipeline(tmp_path / "test").read_text()


@pytest.mark.gpu
def test_cuda_latency_of_deit_tiny_and_its_pruned_copy(tmp_path: Path) -> None:
    from bench.gpu_latency import main

    out = tmp_path / "latency.json"
    assert main(["--out", str(out), "--device", "cuda", "--batches", "1,8", "--warmup", "3",
                 "--iters", "6", "--rounds", "2", "--dtypes", "fp32,bf16"]) == 0
    data = json.loads(out.read_text())
    assert data["device"] == "cuda" and data["device_name"]
    assert len(data["rows"]) == 4  # 2 dtypes x 2 batches
    assert all(r["original"]["p50"] > 0 and r["pruned"]["p50"] > 0 for r in data["rows"])
