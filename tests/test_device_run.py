"""``xpdeploy run X.tar``: the device side of a pipeline, through the real CLI, without torch."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.test_bundle import BundledRun, bundled_run  # noqa: F401 (session fixture)
from tests.test_torch_free import _BLOCK
from xpdeploy.bundle import continuation_command
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
    """The device's verify (the host's stage, fed the bundle's reference logits) agrees with the
    host; a second run reuses both stages through their manifests."""
    run_dir = tmp_path / "device"
    args = [sys.executable, "-c", _BLOCK + _CLI, "run", str(bundled_run.tar), "--run-dir",
            str(run_dir), "--stages", "verify,report"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("PASSED | tiny (device) |") and last.endswith("report.md")
    assert "digests checked" in out.stdout and "[train] from the bundle" in out.stdout
    report = json.loads((run_dir / "report.json").read_text())
    validate_report(report)
    by_name = {c["name"]: c for c in report["candidates"]}
    # The bundle carries one ONNX file per model (the simplified ones): the device verifies those.
    assert set(by_name) == {"original.sim.onnx", "pruned.sim.onnx"}
    original = by_name["original.sim.onnx"]
    assert original["top1"] == pytest.approx(bundled_run.original_top1)
    assert original["max_abs_diff"] < 1e-3 and original["agreement"] == 1.0
    assert by_name["pruned.sim.onnx"]["source_max_abs_diff"] < 1e-3
    assert by_name["pruned.sim.onnx"]["baseline"] == "original.sim.onnx"
    # Nothing else of the original travels: its file is timed against itself (the noise floor).
    assert original["baseline"] == "original.sim.onnx"
    host = json.loads((bundled_run.run_dir / "09_verify" / "parity.json").read_text())
    assert {n: c["passed"] for n, c in by_name.items()} == {
        c["name"]: c["passed"] for c in host["candidates"] if c["name"] in by_name}
    assert "fingerprint_id" in report["environment"]
    assert report["pruning"]["criterion"] == "magnitude"  # the host's plan travels too
    assert (run_dir / "09_verify" / "manifest.json").is_file()
    assert "(device)" in (run_dir / "report.md").read_text()

    again = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "[verify] unchanged since the last run: reused" in again.stdout
    assert "[report] unchanged since the last run: reused" in again.stdout


def _as_format_3(bundle: Path, dest: Path, work: Path) -> Path:
    """``bundle`` rewritten as xpdeploy wrote bundles before images were stored as PNG (format 3):
    float32 model input in verify.npz and calibration.npz, no ``left_out``."""
    from xpdeploy.bundle import BUNDLE_JSON, CALIBRATION_NPZ, open_bundle
    from xpdeploy.data.calibration import load_npz
    from xpdeploy.data.npz import write_npz
    from xpdeploy.data.verify_set import load_verify_set
    from xpdeploy.fileio import sha256_file

    opened = open_bundle(bundle, work)
    verify = load_verify_set(work / "01_load" / "verify.npz")
    write_npz(work / "01_load" / "verify.npz", {
        "pixels": verify.pixels, "labels": verify.labels, "source": np.array(verify.source),
        "synthetic": np.array(verify.synthetic), "class_names": np.array(verify.class_names)})
    calib = load_npz(work / CALIBRATION_NPZ)
    write_npz(work / CALIBRATION_NPZ, {"pixels": calib.pixels, "files": np.array(calib.files),
                                       "manifest_sha256": np.array(calib.manifest_sha256)})
    data = json.loads((work / BUNDLE_JSON).read_text())
    data["format"] = 3
    del data["left_out"]
    for member in data["members"]:
        member["sha256"] = sha256_file(work / member["path"])
        member["size"] = (work / member["path"]).stat().st_size
    (work / BUNDLE_JSON).write_text(json.dumps(data))
    with tarfile.open(dest, "w") as tar:
        for name in [BUNDLE_JSON, *opened.member_paths()]:
            tar.add(work / name, arcname=name)
    return dest


def test_a_bundle_of_before_pngs_verifies_to_the_same_numbers(bundled_run: BundledRun,  # noqa: F811
                                                               tmp_path: Path) -> None:
    """An older bundle (float32 pixels, format 3) still runs on the device, and today's bundle
    of the same run verifies to exactly the same numbers: its runners are fed the same bytes."""
    from xpdeploy.bundle import make_bundle

    new = tmp_path / "new.tar"
    make_bundle(bundled_run.run_dir, new, include_exported=True,
                calibration_root=bundled_run.images)
    old = _as_format_3(new, tmp_path / "old.tar", tmp_path / "old-x")
    metrics = {}
    for tar in (old, new):
        run_dir = tmp_path / f"device-{tar.stem}"
        out = subprocess.run([sys.executable, "-c", _BLOCK + _CLI, "run", str(tar),
                              "--run-dir", str(run_dir), "--stages", "verify"],
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        parity = json.loads((run_dir / "09_verify" / "parity.json").read_text())
        metrics[tar.stem] = {c["name"]: [c[k] for k in ("top1", "agreement", "max_abs_diff",
                                                        "mean_abs_diff", "cosine")]
                             for c in parity["candidates"]}
    assert len(metrics["new"]) == 4 and metrics["old"] == metrics["new"]
    assert (tmp_path / "old-x" / "01_load" / "verify.npz").stat().st_size > 3 * (
        tmp_path / "device-new" / "01_load" / "verify.npz").stat().st_size


def test_bundle_options_are_checked(bundled_run: BundledRun, tmp_path: Path) -> None:  # noqa: F811
    runner = CliRunner()
    wrong = runner.invoke(cli, ["run", str(bundled_run.tar), "--stages", "verify,deploy"])
    assert wrong.exit_code == 1 and "bundle run.tar continues with build_engine, verify, report " \
        "only (unknown: deploy)" in wrong.output
    latency = runner.invoke(cli, ["run", str(bundled_run.tar), "--run-dir", str(tmp_path / "l"),
                                  "--stages", "latency_table"])
    assert latency.exit_code == 1 and "Traceback" not in latency.output
    assert latency.output.splitlines()[-1] == (
        "error: --stages 'latency_table': bundle run.tar continues with build_engine, verify, "
        "report only (unknown: latency_table); a latency table is measured from a latency "
        f"bundle: xpdeploy bundle {bundled_run.run_dir} -o latency.tar --stages latency_table")
    assert not (tmp_path / "l").exists()  # refused before anything was written
    host_only = runner.invoke(cli, ["run", str(bundled_run.tar), "--from", "verify"])
    assert host_only.exit_code == 1
    assert "apply to pipeline files, not to bundles" in host_only.output
    missing = runner.invoke(cli, ["run", str(tmp_path / "nope.tar")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    engine = runner.invoke(cli, ["run", str(bundled_run.tar), "--run-dir", str(tmp_path / "e"),
                                 "--stages", "build_engine,verify,report"])
    assert engine.exit_code == 1 and "build_engine needs TensorRT" in engine.output
    assert not (tmp_path / "e").exists()  # refused before anything was written
    typo = runner.invoke(cli, ["run", str(bundled_run.tar), "--run-dir", str(tmp_path / "t"),
                               "--set", "verify.itres=3"])
    assert typo.exit_code == 1 and "unknown key 'itres' in section 'verify'" in typo.output


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
    assert "engines of 1 ONNX files (original.onnx) are deferred to the device" in out.stdout
    assert continuation_command(run_dir / "bundle.tar") in out.stdout  # as `xpdeploy bundle`
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
from tests.engine.ort_backed_trt import install_stand_in
install_stand_in(setattr)
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
    assert "[build_engine] done" in out.stdout
    assert (run_dir / "08_build_engine" / "manifest.json").is_file()
    report = json.loads((run_dir / "report.json").read_text())
    validate_report(report)
    assert len(report["engines"]["engines"]) == 4
    assert {c["runner"] for c in report["candidates"]} >= {"trt-fp16", "trt-int8"}


def test_a_device_run_killed_mid_stage_resumes_skipping_finished_stages(
    bundled_run: BundledRun, tmp_path: Path  # noqa: F811
) -> None:
    """SIGKILL while verify runs on the device: the rerun reuses build_engine (its manifest and
    engines are intact), reruns verify from scratch and finishes."""
    run_dir = tmp_path / "device"
    args = [sys.executable, "-u", "-c", _BLOCK + _CLI_WITH_TRT_STAND_IN + _CLI, "run",
            str(bundled_run.tar), "--run-dir", str(run_dir), "--stages",
            "build_engine,verify,report", "--set", "verify.iters=400"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("[verify] running"):
            proc.send_signal(signal.SIGKILL)
            break
    assert proc.wait(timeout=60) == -signal.SIGKILL, "".join(seen)[-2000:]
    assert not (run_dir / "09_verify" / "manifest.json").exists()

    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "[build_engine] unchanged since the last run: reused" in again.stdout
    assert "[verify] running" in again.stdout and "[report] running" in again.stdout
    validate_report(json.loads((run_dir / "report.json").read_text()))


def test_onnxruntime_gpu_providers_become_extra_candidates(
    bundled_run: BundledRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """Where onnxruntime offers a GPU provider, each simplified file also runs on it, timed
    against the same file on the CPU. Here the "CUDA" session is a CPU session in disguise (this
    tests our candidate plumbing and gates, not onnxruntime-gpu)."""
    from xpdeploy.backends import ort_runner
    from xpdeploy.device_run import run_bundle
    from xpdeploy.verify import accelerators as verify_engines

    class DisguisedRunner(ort_runner.OrtRunner):
        def __init__(self, path, *, provider="CPUExecutionProvider", **kw) -> None:
            super().__init__(path, **kw)
            self.name = f"ort-{provider.removesuffix('ExecutionProvider').lower()}-fp32"

    monkeypatch.setattr(verify_engines, "gpu_providers", lambda: ["CUDAExecutionProvider"])
    monkeypatch.setattr(ort_runner, "OrtRunner", DisguisedRunner)
    result = run_bundle(bundled_run.tar, tmp_path / "dev", ["verify"],
                        overrides=("verify.threads=1", "verify.batch_sizes=[1]",
                                   "verify.warmup=0", "verify.iters=2"))
    report = result.parity
    assert report is not None
    by_name = {c.name: c for c in report.candidates}
    cuda = by_name["original.sim.onnx [cuda]"]
    assert cuda.runner == "ort-cuda-fp32" and cuda.baseline == "original.sim.onnx [cpu]"
    assert {g.name for g in cuda.gates} == {"max_top1_drop", "min_agreement", "min_cosine"}
    assert by_name["pruned.sim.onnx [cuda]"].source == "pruned"
    assert report.passed
