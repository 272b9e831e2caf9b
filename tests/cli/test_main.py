"""The CLI's contract: exit codes, one-line errors without tracebacks, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from tests.conftest import TINY_MODEL, tiny_pipeline_dict, write_pipeline
from xpdeploy.cli import cli
from xpdeploy.models.factory import create_model
from xpdeploy.spec import ModelConfig


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, code: int, pattern: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr + result.stdout
    import re

    assert re.search(pattern, lines[0]), lines[0]


def assert_nothing_half_written(run_dir: Path) -> None:
    if not run_dir.exists():
        return
    stage_dirs = [p for p in run_dir.iterdir() if p.is_dir()]
    # a stage folder may only exist with a manifest (or a resumable checkpoint)
    for d in stage_dirs:
        assert (d / "manifest.json").is_file() or (d / "checkpoints").is_dir(), sorted(d.iterdir())
    assert not list(run_dir.rglob("*.tmp"))


def _run_with(tmp_path: Path, **sections) -> tuple[object, Path]:
    pipe = write_pipeline(tmp_path / "p.yaml", tiny_pipeline_dict(**sections))
    run_dir = tmp_path / "run"
    return invoke("run", pipe, "--run-dir", run_dir), run_dir


def test_help_lists_commands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for word in ("run", "validate", "show", "Exit codes"):
        assert word in result.stdout


def test_help_works_without_heavy_packages() -> None:
    # Make importing torch/onnx/onnxsim/tensorrt fail, as on a machine that lacks them.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'torch','timm','onnx','onnxruntime','onnxsim',"
        "'tensorrt','matplotlib'}:\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from xpdeploy.cli import main\n"
        "sys.argv = ['xpdeploy', 'run', '--help']\n"
        "main()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--from STAGE" in out.stdout


def test_validate_prints_resolved_config(tiny_pipeline: Path) -> None:
    result = invoke("validate", tiny_pipeline, "--set", "train.epochs=2")
    assert result.exit_code == 0
    assert "epochs: 2" in result.stdout and "opset: 17" in result.stdout


def test_validate_unknown_key(tmp_path: Path) -> None:
    d = tiny_pipeline_dict()
    d["export_onnx"] = {"opsett": 17}
    result = invoke("validate", write_pipeline(tmp_path / "p.yaml", d))
    assert_one_line_error(result, 1, "unknown key 'opsett' in section 'export_onnx'; did you mean "
                                     "'opset'")


def test_run_wrong_type(tmp_path: Path) -> None:
    result = invoke("run", write_pipeline(tmp_path / "p.yaml", tiny_pipeline_dict()),
                    "--set", "verify.iters=lots", "--run-dir", tmp_path / "run")
    assert_one_line_error(result, 1, r"verify\.iters: expected an integer, got 'lots'")
    assert not (tmp_path / "run").exists()


def test_missing_pipeline_file(tmp_path: Path) -> None:
    result = invoke("run", tmp_path / "none.yaml")
    assert_one_line_error(result, 1, "does not exist")
    assert result.stdout.strip() == "FAILED | none | 0s | invalid pipeline"


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = invoke("run", tmp_path / "none.yaml", "--debug")
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_missing_checkpoint(tmp_path: Path) -> None:
    model = {**TINY_MODEL, "checkpoint": str(tmp_path / "missing.pth")}
    result, run_dir = _run_with(tmp_path, model=model)
    assert_one_line_error(result, 1, r"checkpoint .*missing\.pth does not exist")
    assert "FAILED | tiny |" in result.stdout
    assert_nothing_half_written(run_dir)


def test_corrupt_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "bad.pth").write_bytes(b"\x00garbage" * 100)
    result, run_dir = _run_with(tmp_path, model={**TINY_MODEL, "checkpoint": str(tmp_path /
                                                                                 "bad.pth")})
    assert_one_line_error(result, 1, "is not a readable weights file")
    assert_nothing_half_written(run_dir)


def test_checkpoint_for_another_architecture(tmp_path: Path) -> None:
    other = create_model(ModelConfig(name="vit_tiny_patch16_224",
                                     kwargs={**TINY_MODEL["kwargs"], "embed_dim": 48}))
    torch.save(other.state_dict(), tmp_path / "other.pth")
    result, run_dir = _run_with(tmp_path, model={**TINY_MODEL, "checkpoint": str(tmp_path /
                                                                                 "other.pth")})
    assert_one_line_error(result, 1, "does not fit deit_tiny_patch16_224")
    assert_nothing_half_written(run_dir)


def test_checkpoint_with_wrong_num_classes(tmp_path: Path) -> None:
    other = create_model(ModelConfig(name=TINY_MODEL["name"],
                                     kwargs={**TINY_MODEL["kwargs"], "num_classes": 4}))
    torch.save({"model": other.state_dict()}, tmp_path / "four.pth")
    result, run_dir = _run_with(tmp_path, model={**TINY_MODEL, "checkpoint": str(tmp_path /
                                                                                 "four.pth")})
    assert_one_line_error(result, 1, r"set model\.kwargs\.num_classes: 4")
    assert_nothing_half_written(run_dir)


def test_model_classes_differ_from_data(tmp_path: Path) -> None:
    model = {**TINY_MODEL, "kwargs": {**TINY_MODEL["kwargs"], "num_classes": 5}}
    result, run_dir = _run_with(tmp_path, model=model)
    assert_one_line_error(result, 1, r"data has 10 classes .*model has 5 outputs")
    assert_nothing_half_written(run_dir)


def _imagefolder_data(root: Path) -> dict:
    return {"source": "imagefolder", "root": str(root), "verify_samples": 8,
            "preprocess": {"size": 16, "crop_pct": 1.0}}


def test_missing_image_folder(tmp_path: Path) -> None:
    result, run_dir = _run_with(tmp_path, data=_imagefolder_data(tmp_path / "nowhere"))
    assert_one_line_error(result, 1, "nowhere")
    assert_nothing_half_written(run_dir)


def test_empty_image_folder(tmp_path: Path) -> None:
    (tmp_path / "imgs" / "train").mkdir(parents=True)
    (tmp_path / "imgs" / "val").mkdir(parents=True)
    result, run_dir = _run_with(tmp_path, data=_imagefolder_data(tmp_path / "imgs"))
    assert_one_line_error(result, 1, "no class folders with images")
    assert_nothing_half_written(run_dir)


def test_unreadable_image(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for cls in range(10):
            d = tmp_path / "imgs" / split / f"c{cls}"
            d.mkdir(parents=True)
            Image.new("RGB", (20, 20), (cls * 20, 0, 0)).save(d / "a.png")
    (tmp_path / "imgs" / "val" / "c3" / "broken.jpg").write_bytes(b"not a jpeg at all")
    result, run_dir = _run_with(tmp_path, data=_imagefolder_data(tmp_path / "imgs"))
    assert_one_line_error(result, 1, r"broken\.jpg")
    assert_nothing_half_written(run_dir)


def test_from_stage_typo(tiny_pipeline: Path, tmp_path: Path) -> None:
    result = invoke("run", tiny_pipeline, "--from", "expor_onnx", "--run-dir", tmp_path / "run")
    assert_one_line_error(result, 1, "--from 'expor_onnx' is not a stage of this pipeline.*did "
                                     "you mean 'export_onnx'")
    assert not (tmp_path / "run").exists()


def test_usage_error_exit_code_2(tiny_pipeline: Path) -> None:
    assert invoke("run", tiny_pipeline, "--bogus").exit_code == 2


def test_show_on_non_run_folder(tmp_path: Path) -> None:
    assert_one_line_error(invoke("show", tmp_path), 1, "is not an xpdeploy run folder")


@pytest.mark.slow
def test_parity_gate_failure_writes_report_then_exits_3(tmp_path: Path) -> None:
    d = tiny_pipeline_dict(stages=["load", "export_onnx", "verify", "report"])
    d["verify"]["gates"] = {"max_abs_diff": 1e-15}
    pipe = write_pipeline(tmp_path / "p.yaml", d)
    result = invoke("run", pipe, "--run-dir", tmp_path / "run")
    assert result.exit_code == 3, result.stderr
    assert_one_line_error(result, 3, r"1 of 1 candidates failed their gates .*max abs diff")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["status"] == "failed"
    assert result.stdout.strip().splitlines()[-1].startswith("FAILED | tiny |")
