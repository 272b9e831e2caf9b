"""Stages declare what they read; the fingerprint covers exactly that, files by content."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import tiny_pipeline_dict, write_pipeline
from tests.test_bundle import _calibration_images
from xpdeploy.data.calibration import make_manifest
from xpdeploy.errors import DataError
from xpdeploy.spec import STAGE_ORDER, load_spec
from xpdeploy.stages.fingerprint import MISSING, read_settings, settings_json


def _build_settings(tmp_path: Path, calibration: Path):
    from xpdeploy.stages import build_engine

    d = tiny_pipeline_dict(build_engine={"precision": "int8", "calibration": str(calibration)})
    return read_settings(build_engine, load_spec(write_pipeline(tmp_path / "p.yaml", d)))


def test_every_stage_declares_its_settings(tmp_path: Path) -> None:
    spec = load_spec(write_pipeline(tmp_path / "p.yaml", tiny_pipeline_dict()))
    for stage in STAGE_ORDER:
        module = importlib.import_module(f"xpdeploy.stages.{stage}")
        settings = read_settings(module, spec)
        assert isinstance(settings, module.Settings)
        settings_json(settings)  # JSON-able
    from xpdeploy.stages import verify

    assert set(verify.Settings.model_fields) == {"verify", "batch_size", "trace_batch"}


def test_calibration_manifest_and_its_images_enter_by_content(tmp_path: Path) -> None:
    images = _calibration_images(tmp_path / "images")
    manifest = make_manifest(images, 4, 0, tmp_path / "calib.txt")
    first = settings_json(_build_settings(tmp_path, tmp_path / "calib.txt"))
    digest = first["build_engine"]["calibration"]
    assert set(digest) == {"content_sha256"} and digest["content_sha256"] != MISSING
    # The same content at another path: the same fingerprint (a moved set does not rebuild).
    (tmp_path / "moved.txt").write_bytes((tmp_path / "calib.txt").read_bytes())
    assert settings_json(_build_settings(tmp_path, tmp_path / "moved.txt")) == first
    # One listed image rewritten at the same path, manifest untouched: a new fingerprint.
    listed = images / manifest.entries[0].path
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8) + 7).save(listed)
    second = settings_json(_build_settings(tmp_path, tmp_path / "calib.txt"))
    assert second != first
    # The manifest made again (it now records the new image): new again.
    make_manifest(images, 4, 1, tmp_path / "calib.txt")
    assert settings_json(_build_settings(tmp_path, tmp_path / "calib.txt")) not in (first, second)


def test_checkpoint_and_plan_files_enter_by_content(tmp_path: Path) -> None:
    from xpdeploy.stages import load, prune

    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"one")
    d = tiny_pipeline_dict(model={**tiny_pipeline_dict()["model"], "checkpoint": str(ckpt)})
    spec = load_spec(write_pipeline(tmp_path / "p.yaml", d))
    before = settings_json(read_settings(load, spec))
    ckpt.write_bytes(b"two")
    assert settings_json(read_settings(load, spec)) != before
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    d = tiny_pipeline_dict(prune={"criterion": "magnitude", "plan_file": str(plan)})
    spec = load_spec(write_pipeline(tmp_path / "q.yaml", d))
    before = settings_json(read_settings(prune, spec))
    plan.write_text('{"heads": []}')
    assert settings_json(read_settings(prune, spec)) != before


@pytest.mark.slow
def test_rewritten_calibration_set_reruns_build_engine_and_what_follows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With TensorRT (here the onnxruntime-backed stand-in): same set -> nothing reruns; one image
    rewritten -> build_engine reruns and refuses the changed image (no engines calibrated on the
    old set are reused); the manifest made again -> build_engine, verify and report rerun."""
    from tests.engine.ort_backed_trt import install_stand_in
    from xpdeploy.pipeline import run_pipeline

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # restored after the test
    install_stand_in(monkeypatch.setattr)
    images = _calibration_images(tmp_path / "images")
    manifest = make_manifest(images, 4, 0, tmp_path / "calib.txt")
    stages = ["load", "export_onnx", "build_engine", "verify", "report"]
    d = tiny_pipeline_dict(stages=stages, build_engine={
        "precision": "int8", "batch_sizes": [1], "calibration": str(tmp_path / "calib.txt")})
    spec = load_spec(write_pipeline(tmp_path / "p.yaml", d))
    run_dir = tmp_path / "run"
    assert run_pipeline(spec, run_dir).ran == stages
    assert run_pipeline(spec, run_dir).ran == []

    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8) + 7).save(
        images / manifest.entries[0].path)
    with pytest.raises(DataError, match=r"calibration images of .* are not readable"):
        run_pipeline(spec, run_dir)
    make_manifest(images, 4, 0, tmp_path / "calib.txt")
    assert run_pipeline(spec, run_dir).ran == ["build_engine", "verify", "report"]
