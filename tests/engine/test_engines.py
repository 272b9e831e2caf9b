"""build_engines and the device run's build_engine stage, driven through a TensorRT stand-in.

These tests check OUR calls and bookkeeping, not TensorRT: the stand-in
(:mod:`tests.engine.ort_backed_trt`) records what we ask of the builder, pulls calibration
batches the way TensorRT does, and "runs" an engine by running its ONNX file in onnxruntime. They
show that planning, host steps, calibration, the engine cache, the build files, TrtRunner, verify
candidates and the ``precision: best`` choice fit together; whether a real TensorRT builds these
engines is for the ``gpu`` + ``trt`` tests on a device.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from tests.engine.ort_backed_trt import (
    DeviceMemoryBackend,
    install_stand_in,
    make_ort_backed_trt,
)
from tests.test_bundle import BundledRun, bundled_run, source_models  # noqa: F401 (fixture)
from xpdeploy.artifacts import EngineSet
from xpdeploy.bundle import open_bundle
from xpdeploy.cli import cli
from xpdeploy.data.calibration import CalibrationBatch
from xpdeploy.engine.engines import (
    DeviceInfo,
    build_engines,
    engine_sources,
)
from xpdeploy.errors import BuildError
from xpdeploy.spec import BuildEngineConfig

pytestmark = pytest.mark.slow


def _setup(bundled: BundledRun, tmp_path: Path):
    manifest = open_bundle(bundled.tar, tmp_path)  # a bundle is a partial run folder
    sources = engine_sources(manifest.outputs("simplify")["onnx"], source_models(manifest))
    pixels = np.random.default_rng(0).normal(size=(6, 3, 16, 16)).astype(np.float32)
    return manifest, sources, CalibrationBatch(pixels, [], "c" * 64)


def test_fp16_engines_of_both_models_with_build_files(bundled_run: BundledRun,  # noqa: F811
                                                      tmp_path: Path) -> None:
    _, sources, _ = _setup(bundled_run, tmp_path)
    assert [s.label for s in sources] == ["original", "pruned"]
    assert sources[0].onnx_file == "07_simplify/original.sim.onnx"
    assert sources[0].input_chw == (3, 16, 16) and sources[0].attention_blocks == 2
    backend = DeviceMemoryBackend("NVIDIA Orin", "8.7")
    trt, _ = make_ort_backed_trt(backend)
    cfg = BuildEngineConfig(precision="fp16", batch_sizes=[1, 4])
    lines: list[str] = []
    out = build_engines(sources, cfg, tmp_path, tmp_path / "eng", backend=backend, trt_module=trt,
                        nv_tegra_release=tmp_path / "absent", say=lines.append)
    assert [e.name for e in out.engines] == ["original.fp16-b1", "original.fp16-b4",
                                             "pruned.fp16-b1", "pruned.fp16-b4"]
    assert out.device == {"name": "NVIDIA Orin", "compute_capability": "8.7",
                          "l4t_release": None, "cuda_binding": "memory"}
    for e in out.engines:
        assert (tmp_path / e.file).is_file() and (tmp_path / e.log_file).is_file()
        assert json.loads((tmp_path / e.layers_file).read_text()) == {"Layers": [],
                                                                       "Bindings": []}
        assert e.build_path == "weak" and not e.cache_hit and e.graph_file == e.onnx_file
        # No fused attention layer in the stand-in's layer list: the count mismatch is a warning.
        assert e.fused_attention_kernels == 0 and e.attention_blocks == 2
        assert any("0 fused attention kernels found for 2 attention blocks" in w
                   for w in e.warnings)
    assert [b["flags"] for b in trt._builds] == [["FP16"]] * 4
    assert [b["profile"][0][0] for b in trt._builds] == [1, 4, 1, 4]  # static: min = opt = max
    assert (tmp_path / "eng" / "timing-nvidia-orin-sm87-trt10.3.0.cache").is_file()
    assert any("TensorRT 10.3.0.26 (weakly typed path) on NVIDIA Orin" in m for m in lines)
    # The artifact lists every file it owns, so the digest covers the plans.
    assert set(out.files()) >= {e.file for e in out.engines}


def test_engine_cache_reuses_only_the_same_key(bundled_run: BundledRun,  # noqa: F811
                                               tmp_path: Path) -> None:
    _, sources, calib = _setup(bundled_run, tmp_path)
    backend = DeviceMemoryBackend()
    cfg = BuildEngineConfig(precision="int8", calibration=Path("c.txt"), batch_sizes=[4],
                            engine_cache=tmp_path / "cache")

    def build(out: str, calibration: CalibrationBatch, device: DeviceMemoryBackend = backend):
        trt, _ = make_ort_backed_trt(device)
        es = build_engines(sources[:1], cfg, tmp_path, tmp_path / out, backend=device,
                           calibration=calibration, trt_module=trt, say=lambda m: None)
        return es, trt._builds

    first, builds = build("a", calib)
    (e,) = first.engines
    assert not e.cache_hit and builds[0]["flags"] == ["INT8", "FP16"]
    assert builds[0]["calibration_batches"] == 1  # 6 images in batches of 4: last 2 dropped
    assert builds[0]["calibration_shape"] == [4, 3, 16, 16]
    again, builds = build("b", calib)
    assert again.engines[0].cache_hit and builds == []
    assert (tmp_path / again.engines[0].file).read_bytes() == (tmp_path / e.file).read_bytes()
    # Another calibration set, another GPU: new keys, new builds.
    other = CalibrationBatch(calib.pixels, [], "d" * 64)
    assert not build("c", other)[0].engines[0].cache_hit
    assert not build("d", calib, DeviceMemoryBackend("Other GPU", "9.0"))[0].engines[0].cache_hit


def test_int8_calibrates_at_each_engines_opt_batch(bundled_run: BundledRun,  # noqa: F811
                                                   tmp_path: Path) -> None:
    """TensorRT reads every calibration batch at the calibration profile's opt shape, which is
    the engine's; the stand-in checks each buffer's byte size against it. Before the fix the
    calibrator served batches of calibration_batch_size (8 by default) to a batch-1 engine, of
    which TensorRT would have read the first image only."""
    _, sources, _ = _setup(bundled_run, tmp_path)
    pixels = np.random.default_rng(1).normal(size=(16, 3, 16, 16)).astype(np.float32)
    calib = CalibrationBatch(pixels, [], "e" * 64)
    backend = DeviceMemoryBackend()
    trt, _ = make_ort_backed_trt(backend)
    lines: list[str] = []
    for cfg in (BuildEngineConfig(precision="int8", calibration=Path("c.txt")),  # batch 1
                BuildEngineConfig(precision="int8", calibration=Path("c.txt"),
                                  profiles=[(1, 4, 8)])):
        build_engines(sources[:1], cfg, tmp_path, tmp_path / "e", backend=backend,
                      calibration=calib, trt_module=trt, say=lines.append)
    assert [(b["calibration_shape"], b["calibration_batches"]) for b in trt._builds] == [
        ([1, 3, 16, 16], 16), ([4, 3, 16, 16], 4)]
    assert any("int8 calibration with 16 batches of 1 (minmax; 0 images dropped)" in m
               for m in lines)


def test_best_builds_fp16_and_int8_and_needs_calibration(bundled_run: BundledRun,  # noqa: F811
                                                         tmp_path: Path) -> None:
    _, sources, calib = _setup(bundled_run, tmp_path)
    backend = DeviceMemoryBackend()
    trt, _ = make_ort_backed_trt(backend)
    cfg = BuildEngineConfig(precision="best", calibration=Path("c.txt"))
    with pytest.raises(BuildError, match="needs calibration images"):
        build_engines(sources, cfg, tmp_path, tmp_path / "x", backend=backend, trt_module=trt)
    out = build_engines(sources, cfg, tmp_path, tmp_path / "e", backend=backend,
                        calibration=calib, trt_module=trt, say=lambda m: None)
    assert [e.name for e in out.engines] == ["original.fp16-b1", "original.int8-b1",
                                             "pruned.fp16-b1", "pruned.int8-b1"]
    assert [b.get("calibration_batches") for b in trt._builds] == [None, 6, None, 6]
    caches = sorted(p.name for p in (tmp_path / "e" / "calibration").iterdir())
    assert len(caches) == 2 and all(".minmax." in c for c in caches)


def test_strong_path_builds_host_cast_and_qdq_graphs(bundled_run: BundledRun,  # noqa: F811
                                                     tmp_path: Path) -> None:
    _, sources, calib = _setup(bundled_run, tmp_path)
    backend = DeviceMemoryBackend()
    trt, calls = make_ort_backed_trt(backend, version="10.12.0.36")
    cfg = BuildEngineConfig(precision="best", calibration=Path("c.txt"))
    out = build_engines(sources[1:], cfg, tmp_path, tmp_path / "s", backend=backend,
                        calibration=calib, trt_module=trt, say=lambda m: None)
    fp16, int8 = out.engines
    assert fp16.graph_file == "s/graphs/pruned.fp16.onnx" and fp16.build_path == "strong"
    assert int8.graph_file == "s/graphs/pruned.int8.onnx"
    assert fp16.host_step is not None and fp16.host_step["parity"]["samples"] == 8 - 2
    assert int8.host_step is not None and int8.host_step["qdq_pairs"] > 0
    assert [b["flags"] for b in trt._builds] == [[], []]  # precision comes from the graph
    assert all("calibration_batches" not in b for b in trt._builds)  # no implicit calibrator
    flags = [c[1] for c in calls if c[0] == "builder.create_network"]
    assert flags == [1 << 1, 1 << 1]  # STRONGLY_TYPED


def test_device_run_builds_verifies_and_chooses_precision(
    bundled_run: BundledRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """``xpdeploy run X.tar --stages build_engine,verify,report`` with the stand-in installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    _, _, loader = install_stand_in(monkeypatch.setattr)
    run_dir = tmp_path / "device"
    result = CliRunner().invoke(cli, ["run", str(bundled_run.tar), "--run-dir", str(run_dir),
                                      "--stages", "build_engine,verify,report"])
    assert result.exit_code == 0, result.output
    assert "PASSED | tiny (device)" in result.output
    engines = _engines(run_dir)
    assert [e.name for e in engines.engines] == ["original.fp16-b1", "original.int8-b1",
                                                 "pruned.fp16-b1", "pruned.int8-b1"]
    parity = json.loads((run_dir / "09_verify" / "parity.json").read_text())
    by_name = {c["name"]: c for c in parity["candidates"]}
    pruned16 = by_name["pruned.fp16-b1.plan"]
    assert pruned16["runner"] == "trt-fp16" and pruned16["baseline"] == "original.fp16-b1.plan"
    original8 = by_name["original.int8-b1.plan"]
    assert original8["baseline"] == "original.sim.onnx"
    # verify.engine_gates, not the fp32 gates: no max_abs_diff gate, cosine >= 0.99.
    assert {g["name"]: g["limit"] for g in original8["gates"]} == {
        "max_top1_drop": 1.0, "min_agreement": 0.97, "min_cosine": 0.99}
    assert pruned16["gpu_latency_ms"][0]["batch"] == 1  # CUDA-event times, next to host times
    assert set(pruned16["runner_info"]) == {"deserialize_ms", "first_inference_ms"}
    assert pruned16["agreement"] > 0.95  # fp16-rounded logits of the same model
    choices = {(c["source"], c["batch"]): c for c in parity["choices"]}
    assert set(choices) == {("original", "b1"), ("pruned", "b1")}
    kept = choices[("pruned", "b1")]
    assert kept["kept"] in {"pruned.fp16-b1.plan", "pruned.int8-b1.plan"}
    assert len(kept["dropped"]) == 1 and kept["reason"].startswith("kept ")
    report_md = (run_dir / "report.md").read_text()
    assert "pruned.int8-b1.plan" in report_md and "precision best" in report_md
    assert len(loader.opened) == 2  # build_engine's and verify's
    assert all(b.live_allocations == 0 and b.closed for b in loader.opened)


def _engines(run_dir: Path) -> EngineSet:
    """The engines a device run recorded in its build_engine manifest."""
    manifest = json.loads((run_dir / "08_build_engine" / "manifest.json").read_text())
    return EngineSet.model_validate(manifest["outputs"]["engines"]["artifact"])


def _device_run_on(version: str, bundled: BundledRun, run_dir: Path,
                   monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[tuple]]:
    """``xpdeploy run bundle.tar --stages build_engine,verify`` with a TensorRT stand-in of
    ``version``: the CLI result and the builder-side calls it recorded."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    _, calls, _ = install_stand_in(monkeypatch.setattr, version=version)
    result = CliRunner().invoke(cli, ["run", str(bundled.tar), "--run-dir", str(run_dir),
                                      "--stages", "build_engine,verify"])
    return result, calls


def test_device_run_build_errors_are_one_line(
    bundled_run: BundledRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    result, _ = _device_run_on("8.4.3.1", bundled_run, tmp_path / "d", monkeypatch)
    assert result.exit_code != 0
    assert "TensorRT 8.4.3 is too old" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "d" / "08_build_engine" / "manifest.json").exists()


def test_device_refuses_a_graph_its_tensorrt_cannot_parse_in_one_line(
    bundled_run: BundledRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """The bundle's opset-17 files on a JetPack 5 TensorRT (8.5, stand-in): refused before any
    build, with the fix, and nothing written as if it had been built
    (:mod:`xpdeploy.export.tensorrt_ops`)."""
    result, calls = _device_run_on("8.5.2.2", bundled_run, tmp_path / "d", monkeypatch)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "TensorRT 8.5.2 cannot parse" in result.output
    assert "export with export_onnx.opset: 16 for JetPack 5" in result.output
    assert not (tmp_path / "d" / "08_build_engine" / "manifest.json").exists()
    assert not list((tmp_path / "d").rglob("*.plan"))
    assert calls == [], "refused before any builder call"


def test_device_info_slug_and_l4t(tmp_path: Path) -> None:
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic\n")
    info = DeviceInfo.of(DeviceMemoryBackend("Orin (nvgpu)", "8.7"), release)
    assert info.l4t_release == "36.3.0" and info.slug == "orin-nvgpu-sm87"


@pytest.mark.gpu
@pytest.mark.trt
@pytest.mark.parametrize("precision", ["fp16", "best"])
def test_real_tensorrt_builds_verifies_and_reuses_engines(
    bundled_run: BundledRun, tmp_path: Path, precision: str  # noqa: F811
) -> None:
    """On a GPU machine with TensorRT and a CUDA binding: the bundle's engines are really built
    (weak or strong path by the installed version), run by TrtRunner, pass their gates, and a
    second build with the same engine cache reuses every plan."""
    from xpdeploy.device_run import run_bundle
    from xpdeploy.runfolder import RunFolder, parse_outputs

    # The bundle's pipeline builds "best" with 2-image calibration batches; set the precision.
    overrides = (f"build_engine.precision={precision}",
                 f"build_engine.engine_cache={tmp_path / 'cache'}", "verify.batch_sizes=[1]",
                 "verify.warmup=2", "verify.iters=10")
    stages = ["build_engine", "verify"]
    result = run_bundle(bundled_run.tar, tmp_path / "a", stages, overrides=overrides)
    run_bundle(bundled_run.tar, tmp_path / "b", stages, overrides=overrides)
    first, again = (parse_outputs(RunFolder(tmp_path / d).read_manifest("build_engine") or {})
                    ["engines"] for d in ("a", "b"))
    assert all(not e.cache_hit for e in first.engines)  # type: ignore[attr-defined]
    assert all(e.cache_hit for e in again.engines)  # type: ignore[attr-defined]
    parity = result.parity
    assert parity is not None
    trt_results = [c for c in parity.candidates if c.runner.startswith("trt-")]
    assert len(trt_results) == len(first.engines)
    assert all(c.gpu_latency_ms and c.gpu_latency_ms[0].p50 > 0 for c in trt_results)
    assert parity.passed, [(c.name, [g.detail for g in c.gates if not g.passed])
                           for c in parity.candidates if not c.passed]


def test_a_rerun_in_the_same_run_folder_reuses_its_plans(bundled_run: BundledRun,  # noqa: F811
                                                         tmp_path: Path) -> None:
    """No engine_cache configured: the run folder's own cache still saves a resumed build."""
    _, sources, _ = _setup(bundled_run, tmp_path)
    backend = DeviceMemoryBackend()
    trt, _ = make_ort_backed_trt(backend)
    cfg = BuildEngineConfig(precision="fp16")
    for _ in range(2):
        out = build_engines(sources, cfg, tmp_path, tmp_path / "e", backend=backend,
                            trt_module=trt, say=lambda m: None)
    assert len(trt._builds) == 2 and all(e.cache_hit for e in out.engines)
    assert (tmp_path / "engine_cache").is_dir()
