"""The host pipeline's build_engine stage where TensorRT is installed (a stand-in here).

These tests check OUR pipeline plumbing, not TensorRT: with the stand-in of
:mod:`tests.engine.ort_backed_trt` importable as ``tensorrt``, ``xpdeploy run`` builds the engines
in the run folder instead of deferring, ``verify`` runs them next to the ONNX files, the report
lists them, no bundle is written, and a rerun reuses the stage.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_pipeline_dict, write_pipeline
from tests.engine.ort_backed_trt import DeviceMemoryBackend, make_ort_backed_trt
from xpdeploy.pipeline import run_pipeline
from xpdeploy.spec import load_spec

pytestmark = pytest.mark.slow


def test_engines_are_built_verified_and_reported_on_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[DeviceMemoryBackend] = []  # one CUDA backend per stage, as load_backend does

    def load_backend(*_: object, **__: object) -> DeviceMemoryBackend:
        opened.append(DeviceMemoryBackend("NVIDIA H100 80GB HBM3", "9.0"))
        return opened[-1]

    trt, _ = make_ort_backed_trt(lambda: opened[-1])
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr("xpdeploy.backends.cuda_memory.load_backend", load_backend)
    d = tiny_pipeline_dict(build_engine={"precision": "fp16", "batch_sizes": [4]})
    d["stages"] = ["load", "train", "export_onnx", "build_engine", "verify", "report"]
    spec = load_spec(write_pipeline(tmp_path / "p.yaml", d))
    run_dir = tmp_path / "run"
    result = run_pipeline(spec, run_dir)
    assert result.passed and result.bundle is None  # built here: nothing to hand off
    manifest = json.loads((run_dir / "08_build_engine" / "manifest.json").read_text())
    engines = manifest["outputs"]["engines"]["artifact"]
    assert not engines["deferred"] and engines["device"]["name"] == "NVIDIA H100 80GB HBM3"
    (engine,) = engines["engines"]
    assert engine["name"] == "original.fp16-b4" and (run_dir / engine["file"]).is_file()
    parity = json.loads((run_dir / "09_verify" / "parity.json").read_text())
    trt_candidate = next(c for c in parity["candidates"] if c["runner"] == "trt-fp16")
    assert trt_candidate["baseline"] == "original.onnx"
    assert [s["batch"] for s in trt_candidate["latency_ms"]] == [4]  # the engine's static batch
    report = json.loads((run_dir / "report.json").read_text())
    assert report["engines"]["engines"][0]["name"] == "original.fp16-b4"
    assert "## TensorRT engines" in (run_dir / "report.md").read_text()
    assert len(opened) == 2 and all(b.closed and b.live_allocations == 0 for b in opened)
    again = run_pipeline(spec, run_dir)
    assert "build_engine" in again.skipped and len(trt._builds) == 1
