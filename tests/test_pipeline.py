"""End-to-end runs of a tiny pipeline: outputs, reuse, slicing, and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import kill_at_mid_epoch_checkpoint, tiny_pipeline_dict, write_pipeline
from xpdeploy.errors import ConfigError, RunFolderError
from xpdeploy.fileio import sha256_file
from xpdeploy.pipeline import run_pipeline
from xpdeploy.report.schema import validate_report
from xpdeploy.spec import load_spec
from xpdeploy.summary import summarize_run

pytestmark = pytest.mark.slow


def _spec(tmp_path: Path, *overrides: str, **sections):
    return load_spec(write_pipeline(tmp_path / "p.yaml", tiny_pipeline_dict(**sections)),
                     overrides)


def test_full_run_outputs_and_rerun_reuses_everything(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = run_pipeline(_spec(tmp_path), run_dir)
    assert first.passed
    assert first.ran == ["load", "train", "export_onnx", "simplify", "verify", "report"]
    report = json.loads((run_dir / "report.json").read_text())
    validate_report(report)
    assert report["status"] == "passed" and report["data"]["synthetic"] is False
    assert [c["name"] for c in report["candidates"]] == ["original.onnx", "original.sim.onnx"]
    assert report["original"]["top1"] is not None
    for name in ("01_load", "02_train", "06_export_onnx", "07_simplify", "09_verify",
                 "10_report"):
        manifest = json.loads((run_dir / name / "manifest.json").read_text())
        assert manifest["versions"]["torch"] and manifest["fingerprint"]
    assert (run_dir / "pipeline.yaml").is_file() and (run_dir / "report.md").is_file()
    weights = sha256_file(run_dir / "02_train" / "model.safetensors")

    again = run_pipeline(_spec(tmp_path), run_dir)
    assert again.ran == [] and len(again.skipped) == 6
    assert sha256_file(run_dir / "02_train" / "model.safetensors") == weights
    assert "done" in summarize_run(run_dir) and "PASSED" in summarize_run(run_dir)


def test_config_change_reruns_only_what_depends_on_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_pipeline(_spec(tmp_path), run_dir)
    result = run_pipeline(_spec(tmp_path, "verify.iters=4"), run_dir)
    assert result.ran == ["verify", "report"]
    assert result.skipped == ["load", "train", "export_onnx", "simplify"]


def test_tampered_output_is_detected_and_rebuilt(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_pipeline(_spec(tmp_path), run_dir)
    onnx_file = run_dir / "06_export_onnx" / "original.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:100])
    result = run_pipeline(_spec(tmp_path), run_dir)
    assert "export_onnx" in result.ran and "train" in result.skipped


def test_until_from_and_force(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(RunFolderError, match="stage 'load' has no current output"):
        run_pipeline(_spec(tmp_path), run_dir, from_stage="export_onnx")
    partial = run_pipeline(_spec(tmp_path), run_dir, until="train")
    assert partial.ran == ["load", "train"] and partial.report is None
    summary = summarize_run(run_dir)
    assert "02_train         done" in summary and "06_export_onnx   pending" in summary
    sliced = run_pipeline(_spec(tmp_path), run_dir, from_stage="export_onnx", until="simplify")
    assert sliced.ran == ["export_onnx", "simplify"] and sliced.skipped == ["load", "train"]
    redo = run_pipeline(_spec(tmp_path), run_dir, from_stage="simplify")
    assert redo.ran[0] == "simplify" and "export_onnx" in redo.skipped
    from_first = run_pipeline(_spec(tmp_path), run_dir, from_stage="load", until="load")
    assert from_first.ran == ["load"]
    forced = run_pipeline(_spec(tmp_path), run_dir, force=True)
    assert len(forced.ran) == 6
    with pytest.raises(ConfigError, match="comes after"):
        run_pipeline(_spec(tmp_path), run_dir, from_stage="verify", until="load")


def test_run_folder_of_another_pipeline_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_pipeline(_spec(tmp_path), run_dir, until="load")
    other = _spec(tmp_path, "name=other")
    with pytest.raises(RunFolderError, match="holds a run of pipeline 'tiny'"):
        run_pipeline(other, run_dir, until="load")


def test_synthetic_data_reports_no_accuracy(tmp_path: Path) -> None:
    data = {"source": "synthetic", "synthetic_samples": 32, "verify_samples": 16,
            "preprocess": {"size": 16, "crop_pct": 1.0}}
    spec = _spec(tmp_path, data=data, stages=["load", "export_onnx", "verify", "report"])
    run_pipeline(spec, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["data"]["synthetic"] is True
    assert report["original"]["top1"] is None
    assert all(c["top1"] is None and c["top1_delta"] is None for c in report["candidates"])
    assert "synthetic" in (tmp_path / "run" / "report.md").read_text().lower()


def _cli(pipe: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "xpdeploy", "run", str(pipe), "--run-dir", str(run_dir), *extra]


def _uninterrupted(tmp_path: Path, **train: Any) -> tuple[Path, dict[str, str], Path]:
    """(pipeline, env, run folder) of the tiny pipeline with ``train`` settings, trained once
    without interruption (the reference a killed and resumed run must reproduce)."""
    d = tiny_pipeline_dict()
    d["train"].update(train)
    pipe = write_pipeline(tmp_path / "p.yaml", d)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    clean = tmp_path / "clean"
    subprocess.run(_cli(pipe, clean, "--until", "train"), check=True, env=env,
                   capture_output=True)
    return pipe, env, clean


def test_sigkill_during_training_resumes_with_the_same_result(tmp_path: Path) -> None:
    pipe, env, clean = _uninterrupted(tmp_path, epochs=4)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(pipe, killed), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    checkpoint = killed / "02_train" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the first checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "02_train" / "manifest.json").exists()

    rerun = subprocess.run(_cli(pipe, killed), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resuming from the checkpoint after epoch" in rerun.stdout
    assert "[load] unchanged" in rerun.stdout
    assert rerun.stdout.strip().splitlines()[-1].startswith("PASSED | tiny |")
    history = json.loads((killed / "02_train" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert sha256_file(killed / "02_train" / "model.safetensors") == sha256_file(
        clean / "02_train" / "model.safetensors"
    )


def test_sigkill_mid_epoch_resumes_from_the_step_checkpoint(tmp_path: Path) -> None:
    """``checkpoint_every_steps``: a kill inside an epoch loses at most k steps, and the resumed
    run ends with the same weights as an uninterrupted one."""
    pipe, env, clean = _uninterrupted(tmp_path, epochs=3, batch_size=16,
                                      checkpoint_every_steps=10, threads=1)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(pipe, killed, "--until", "train"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = kill_at_mid_epoch_checkpoint(
        proc, killed / "02_train" / "checkpoints" / "last.pt",
        lambda: proc.send_signal(signal.SIGKILL), timeout_s=240)
    assert state, "the run ended before a mid-epoch checkpoint was seen"
    position = (state["epoch"], state["step_in_epoch"])

    rerun = subprocess.run(_cli(pipe, killed, "--until", "train"), env=env,
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    resumed = re.search(r"resuming from step (\d+) of epoch (\d+)/3", rerun.stdout)
    assert resumed is not None, rerun.stdout
    step, epoch = int(resumed.group(1)), int(resumed.group(2))
    assert epoch == position[0] + 1 and step >= position[1] and step % 10 == 0
    assert sha256_file(killed / "02_train" / "model.safetensors") == sha256_file(
        clean / "02_train" / "model.safetensors"
    )
    history = json.loads((killed / "02_train" / "history.json").read_text())
    expected = json.loads((clean / "02_train" / "history.json").read_text())
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in expected])


@pytest.mark.parametrize("delay_s", [1.0, 2.5, 5.0])
def test_sigkill_at_any_moment_then_rerun_finishes(tmp_path: Path, delay_s: float) -> None:
    pipe = write_pipeline(tmp_path / "p.yaml", tiny_pipeline_dict())
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_cli(pipe, run_dir), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(delay_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rerun = subprocess.run(_cli(pipe, run_dir), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    validate_report(json.loads((run_dir / "report.json").read_text()))
    assert not list(run_dir.rglob("*.tmp"))
    final = subprocess.run(_cli(pipe, run_dir), capture_output=True, text=True)
    assert final.stdout.count("unchanged since the last run") == 6


def test_a_stage_reruns_when_a_setting_it_reads_changes_and_only_then(tmp_path: Path) -> None:
    """verify reads data.batch_size (not its own section): changing it reruns verify; changing
    nothing reruns nothing. The manifest records exactly what the stage read."""
    stages = ["load", "export_onnx", "verify", "report"]
    run_dir = tmp_path / "run"
    run_pipeline(_spec(tmp_path, stages=stages), run_dir)
    same = run_pipeline(_spec(tmp_path, stages=stages), run_dir)
    assert same.ran == [] and same.skipped == stages
    changed = run_pipeline(_spec(tmp_path, "data.batch_size=32", stages=stages), run_dir)
    assert "verify" in changed.ran and "report" in changed.ran
    config = json.loads((run_dir / "09_verify" / "manifest.json").read_text())["config"]
    assert config == {"verify": config["verify"], "batch_size": 32, "trace_batch": 2}
    export = json.loads((run_dir / "06_export_onnx" / "manifest.json").read_text())["config"]
    assert set(export) == {"export_onnx"}  # export reads no data setting
