"""``xpdeploy run X.tar``: the device side of a pipeline, through the real CLI, without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.test_bundle import BundledRun, bundled_run  # noqa: F401 (session fixture)
from tests.test_torch_free import _BLOCK
from xpdeploy.cli import cli
from xpdeploy.device_run import parse_stages
from xpdeploy.errors import ConfigError
from xpdeploy.report.schema import validate_report

pytestmark = pytest.mark.slow

_CLI = """
import sys
from xpdeploy.cli import main
sys.argv = ["xpdeploy", *sys.argv[1:]]
try:
    main()
finally:
    assert "torch" not in sys.modules, "the device run imported torch"
"""


def test_run_bundle_verifies_and_reports_without_torch(bundled_run: BundledRun,  # noqa: F811
                                                       tmp_path: Path) -> None:
    run_dir = tmp_path / "device"
    out = subprocess.run([sys.executable, "-c", _BLOCK + _CLI, "run", str(bundled_run.tar),
                          "--run-dir", str(run_dir), "--stages", "verify,report"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("PASSED | tiny (device) |") and last.endswith("report.md")
    assert "digests checked" in out.stdout
    report = json.loads((run_dir / "report.json").read_text())
    validate_report(report)
    names = {c["name"] for c in report["candidates"]}
    assert names == {"original.onnx", "pruned.onnx", "original.sim.onnx", "pruned.sim.onnx"}
    original = next(c for c in report["candidates"] if c["name"] == "original.onnx")
    assert original["top1"] == pytest.approx(bundled_run.original_top1)
    assert "fingerprint_id" in report["environment"]
    assert (run_dir / "09_verify" / "parity.json").is_file()
    assert "(device)" in (run_dir / "report.md").read_text()


def test_bundle_options_are_checked(bundled_run: BundledRun, tmp_path: Path) -> None:  # noqa: F811
    runner = CliRunner()
    wrong = runner.invoke(cli, ["run", str(bundled_run.tar), "--stages", "verify,deploy"])
    assert wrong.exit_code == 1 and "a bundle continues with build_engine, verify, report" \
        in wrong.output
    host_only = runner.invoke(cli, ["run", str(bundled_run.tar), "--from", "verify"])
    assert host_only.exit_code == 1
    assert "apply to pipeline files, not to bundles" in host_only.output
    missing = runner.invoke(cli, ["run", str(tmp_path / "nope.tar")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    engine = runner.invoke(cli, ["run", str(bundled_run.tar), "--run-dir", str(tmp_path / "e"),
                                 "--stages", "build_engine,verify,report"])
    assert engine.exit_code == 1 and "build_engine needs TensorRT" in engine.output
    assert not (tmp_path / "e").exists()  # refused before anything was written


def test_stage_lists() -> None:
    assert parse_stages(None) == ["verify", "report"]
    assert parse_stages("report, verify") == ["verify", "report"]
    with pytest.raises(ConfigError, match="'report' needs 'verify'"):
        parse_stages("report")


def test_a_pipeline_without_tensorrt_ends_with_the_bundle_and_the_command(tmp_path: Path) -> None:
    from tests.conftest import tiny_pipeline_dict, write_pipeline

    d = tiny_pipeline_dict(build_engine={"precision": "fp16", "batch_sizes": [1]})
    d["stages"] = ["load", "train", "export_onnx", "build_engine", "verify", "report"]
    pipe = write_pipeline(tmp_path / "p.yaml", d)
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "xpdeploy", "run", str(pipe), "--run-dir",
                          str(run_dir)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "engines for 1 ONNX files are deferred to the device" in out.stdout
    assert (f"xpdeploy run {run_dir / 'bundle.tar'} --stages build_engine,verify,report"
            in out.stdout)
    assert out.stdout.strip().splitlines()[-1].startswith("PASSED | tiny |")
    assert (run_dir / "bundle.tar").is_file()
    device = CliRunner().invoke(cli, ["run", str(run_dir / "bundle.tar"), "--run-dir",
                                      str(tmp_path / "device")])
    assert device.exit_code == 0, device.output
    assert "PASSED | tiny (device)" in device.output

    required = subprocess.run(
        [sys.executable, "-m", "xpdeploy", "run", str(pipe), "--run-dir", str(run_dir),
         "--set", "build_engine.required=true"], capture_output=True, text=True, timeout=300)
    assert required.returncode == 1
    assert required.stderr.strip().startswith(
        "error: build_engine.required is true but TensorRT is not installed")


_CLI_WITH_TRT_STAND_IN = """
import sys
from tests.engine.ort_backed_trt import DeviceMemoryBackend, make_ort_backed_trt
import xpdeploy.engine.cuda_memory as cuda_memory
backend = DeviceMemoryBackend("NVIDIA Orin", "8.7")
sys.modules["tensorrt"], _ = make_ort_backed_trt(backend)
cuda_memory.load_backend = lambda *a, **k: backend
"""


def test_build_engine_on_a_bundle_runs_without_torch(bundled_run: BundledRun,  # noqa: F811
                                                     tmp_path: Path) -> None:
    """The device's build_engine + verify + report import no torch (TensorRT: a stand-in that
    runs each engine's ONNX file in onnxruntime, see tests/engine/ort_backed_trt.py)."""
    run_dir = tmp_path / "device"
    out = subprocess.run([sys.executable, "-c", _BLOCK + _CLI_WITH_TRT_STAND_IN + _CLI, "run",
                          str(bundled_run.tar), "--run-dir", str(run_dir), "--stages",
                          "build_engine,verify,report"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "[build_engine] done" in out.stdout and "4 engines (4 built" in out.stdout
    report = json.loads((run_dir / "report.json").read_text())
    validate_report(report)
    assert len(report["engines"]["engines"]) == 4
    assert {c["runner"] for c in report["candidates"]} >= {"trt-fp16", "trt-int8"}
