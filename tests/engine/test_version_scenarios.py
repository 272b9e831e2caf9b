"""Our TensorRT code against stand-ins held to the real API of each TensorRT version.

One scenario per version with a table (:mod:`tests.engine.trt_api`): 8.5 (derived from 8.6.1),
8.6.1, 10.3, 10.11, 10.12, 10.13 and 11.4. Each runs the builder, the int8 calibrator where the
version has one, TrtRunner, the engine cache and the device run on a bundle; the stand-in exposes
exactly the version's names, so a call to a name the version lacks fails here as it would on the
device. The last tests delete a version gate (by patching it out) and show the scenario of the
version it guards fails. These check OUR calls, not TensorRT (see fake_trt / ort_backed_trt).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from tests.engine.fake_trt import FakeLayer, Scenario, make_fake_trt
from tests.engine.ort_backed_trt import (
    DeviceMemoryBackend,
    install_stand_in,
    make_ort_backed_trt,
)
from tests.engine.trt_api import TABLE_VERSIONS
from tests.test_bundle import bundle_tiny_run
from xpdeploy.artifacts import EngineSet
from xpdeploy.backends.trt_runner import TrtRunner
from xpdeploy.backends.trt_versions import TrtVersion
from xpdeploy.cli import cli
from xpdeploy.engine import settings as settings_module
from xpdeploy.engine.builder import build_engine
from xpdeploy.engine.calibrator import CalibrationBatches, make_calibrator
from xpdeploy.engine.engines import EngineSource, build_engines
from xpdeploy.engine.settings import plan_builds
from xpdeploy.spec import BuildEngineConfig

pytestmark = pytest.mark.slow

VERSIONS = TABLE_VERSIONS  # 8.5 (derived) ... 11.4
CHW = (3, 16, 16)


def is_weak(version: str) -> bool:
    return TrtVersion.parse(version).as_tuple() < (10, 12, 0)


def network_flags(version: str) -> int:
    """create_network's argument per version: EXPLICIT_BATCH (bit 0) on 8.x, nothing on weak
    10.x, STRONGLY_TYPED: bit 1 on 10.x, bit 0 on 11.x (its value moved)."""
    v = TrtVersion.parse(version)
    if v.major < 10:
        return 1
    if is_weak(version):
        return 0
    return 1 << (1 if v.major == 10 else 0)


def weak_flags(version: str, precision: str) -> list[str]:
    base = {"fp16": ["FP16"], "int8": ["INT8", "FP16"]}[precision]
    pinned = TrtVersion.parse(version).major < 10  # LayerNorm pinned below 10.0
    return [*base, "PREFER_PRECISION_CONSTRAINTS"] if pinned else base


# -- a small bundle every version can parse (opset 16: JetPack 5's 8.5 refuses opset 17) -----------

@dataclass(frozen=True)
class Opset16Bundle:
    tar: Path
    images: int


@pytest.fixture(scope="module")
def opset16_bundle(tmp_path_factory: pytest.TempPathFactory) -> Opset16Bundle:
    _, tar, _, _ = bundle_tiny_run(
        tmp_path_factory.mktemp("opset16"), 6,
        stages=["load", "export_onnx", "simplify", "verify", "report"], export_onnx={"opset": 16},
        verify={"batch_sizes": [1], "warmup": 1, "iters": 2, "rounds": 1})
    return Opset16Bundle(tar, 6)


@pytest.mark.parametrize("version", VERSIONS)
def test_device_run_on_a_bundle(version: str, opset16_bundle: Opset16Bundle, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``xpdeploy run bundle.tar --stages build_engine,verify`` on TensorRT ``version``: both
    engines of ``precision: best`` built on the version's path, run by TrtRunner in verify,
    gated and chosen; a second run with the same engine cache builds nothing."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    trt, calls, loader = install_stand_in(monkeypatch.setattr, version=version)
    cache = tmp_path / "engine-cache"
    for run in ("a", "b"):
        result = CliRunner().invoke(cli, [
            "run", str(opset16_bundle.tar), "--run-dir", str(tmp_path / run), "--stages",
            "build_engine,verify", "--set", f"build_engine.engine_cache={cache}"])
        assert result.exit_code == 0, result.output
    engines = EngineSet.model_validate(json.loads(
        (tmp_path / "b" / "08_build_engine" / "manifest.json").read_text()
    )["outputs"]["engines"]["artifact"])
    assert [e.name for e in engines.engines] == ["original.fp16-b1", "original.int8-b1"]
    assert all(e.cache_hit for e in engines.engines)  # the second run built nothing
    builds = trt._builds
    assert len(builds) == 2
    created = [c[1] for c in calls if c[0] == "builder.create_network"]
    assert created == [network_flags(version)] * 2
    if is_weak(version):
        assert [b["flags"] for b in builds] == [weak_flags(version, "fp16"),
                                                weak_flags(version, "int8")]
        # int8 calibrated at the engine's batch, every image, through the CUDA memory layer
        assert builds[1]["calibration_shape"] == [1, *CHW]
        assert builds[1]["calibration_batches"] == opset16_bundle.images
    else:
        assert [b["flags"] for b in builds] == [[], []]  # precision comes from the graph
        assert all("calibration_batches" not in b for b in builds)
        assert [Path(b["onnx"]).name for b in builds] == ["original.fp16.onnx",
                                                         "original.int8.onnx"]
    # The deprecated API each path relies on (the tables' marks): implicit int8 on weak 10.x,
    # which the int8 engine's warnings say; nothing on 8.x and on the strong path.
    deprecated = set(trt._deprecated_uses)
    v = TrtVersion.parse(version)
    if is_weak(version) and v.major == 10:
        assert deprecated == {"IBuilderConfig.set_calibration_profile"}
    else:
        assert deprecated == set()
    int8_warnings = " ".join(engines.engines[1].warnings)
    assert ("deprecates implicit int8 calibration" in int8_warnings) == bool(deprecated)
    parity = json.loads((tmp_path / "a" / "09_verify" / "parity.json").read_text())
    trt_candidates = [c for c in parity["candidates"] if c["runner"].startswith("trt-")]
    assert {c["name"] for c in trt_candidates} == {"original.fp16-b1.plan",
                                                   "original.int8-b1.plan"}
    assert all(c["gpu_latency_ms"] for c in trt_candidates)  # TrtRunner timed them
    assert all(b.closed and b.live_allocations == 0 for b in loader.opened)


# -- builder, calibrator, runner and engine cache, driven directly ------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_builder_on_every_precision_path(version: str, tmp_path: Path) -> None:
    """build_engine for fp32, fp16 and int8 as plan_builds plans them for ``version``, with
    LayerNorm layers in the network (pinned below 10.0, where the version has the layer type)."""
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx")
    weak = is_weak(version)
    for precision in ("fp32", "fp16", "int8"):
        graph = "fp32" if weak else precision
        cfg = BuildEngineConfig(precision=precision, calibration=Path("c.txt"))  # type: ignore[arg-type]
        (s,) = plan_builds(cfg, TrtVersion.parse(version), "pixels", CHW,
                           graph_precision=graph)  # type: ignore[arg-type]
        layers = [FakeLayer("/blocks.0/norm1/ReduceMean", "REDUCE"),
                  FakeLayer("/blocks.0/attn/qkv/MatMul", "MATRIX_MULTIPLY")]
        trt, calls = make_fake_trt(Scenario(version=version, layers=layers))
        calibrator = object() if s.calibrator else None
        result = build_engine(onnx, s, trt_module=trt, calibrator=calibrator,
                              timing_cache_path=tmp_path / f"{precision}.cache",
                              log_path=tmp_path / f"{precision}.log")
        assert result.plan == b"PLAN"
        flags = [c[1].name for c in calls if c[0] == "config.set_flag"]
        if weak and precision != "fp32":
            assert flags == weak_flags(version, precision)
            assert (layers[0].precision is trt.float32) == (TrtVersion.parse(version).major < 10)
        else:
            assert flags == []
        assert ("config.int8_calibrator" in [c[0] for c in calls]) == (weak and
                                                                      precision == "int8")


@pytest.mark.parametrize("version", VERSIONS)
def test_calibrator_where_the_version_has_one(version: str, tmp_path: Path) -> None:
    trt, _ = make_fake_trt(Scenario(version=version))
    batches = CalibrationBatches(np.zeros((3, *CHW), np.float32), 1)
    backend = DeviceMemoryBackend()
    if not is_weak(version) and TrtVersion.parse(version).major >= 11:
        assert not hasattr(trt, "IInt8MinMaxCalibrator")  # 11.x: Q/DQ on the host only
        with pytest.raises(AttributeError, match="IInt8MinMaxCalibrator"):
            make_calibrator("minmax", batches, tmp_path / "c", backend.alloc, trt_module=trt)
        return
    for kind in ("minmax", "entropy2"):
        cal = make_calibrator(kind, batches, tmp_path / kind, backend.alloc,  # type: ignore[arg-type]
                              trt_module=trt)
        served = 0
        while cal.get_batch(["pixels"]) is not None:
            served += 1
        assert served == 3 and cal.get_batch_size() == 1
    backend.close()


@pytest.mark.parametrize("version", VERSIONS)
def test_runner_and_engine_cache(version: str, tmp_path: Path) -> None:
    """build_engines twice with one engine cache (the second reuses the plan), then TrtRunner
    runs the plan on the stand-in's device memory against onnxruntime's logits."""
    import onnxruntime as ort
    import torch

    from xpdeploy.export.onnx_export import export_onnx

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(CHW)), 10))
    onnx = tmp_path / "m.onnx"
    export_onnx(model, onnx, input_size=CHW, opset=16, trace_batch=2, dynamic_batch=True)
    backend = DeviceMemoryBackend()
    trt, _ = make_ort_backed_trt(backend, version=version)
    source = EngineSource("original", "m.onnx", "pixels", CHW)
    cfg = BuildEngineConfig(precision="fp32", batch_sizes=[2], engine_cache=tmp_path / "cache")
    first = build_engines([source], cfg, tmp_path, tmp_path / "a", backend=backend,
                          trt_module=trt, say=lambda m: None)
    again = build_engines([source], cfg, tmp_path, tmp_path / "b", backend=backend,
                          trt_module=trt, say=lambda m: None)
    assert [e.cache_hit for e in (*first.engines, *again.engines)] == [False, True]
    assert len(trt._builds) == 1
    x = np.random.default_rng(0).normal(size=(2, *CHW)).astype(np.float32)
    with TrtRunner(tmp_path / again.engines[0].file, backend=backend, trt_module=trt) as runner:
        out = runner.infer(x)
        assert runner.batch_range == (2, 2)
    want = ort.InferenceSession(str(onnx)).run(None, {"pixels": x})[0]
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    assert backend.live_allocations == 0


# -- deleting a version gate fails the scenario of the version it guards ---------------------------

def _plan(version: str, precision: str, graph: str | None = None, **cfg: Any) -> Any:
    """One BuildSettings; ``graph``: the ONNX graph's precision (default: what the version's
    path feeds the parser)."""
    graph = graph or ("fp32" if is_weak(version) else precision)
    config = BuildEngineConfig(precision=precision, calibration=Path("c.txt"), **cfg)  # type: ignore[arg-type]
    return plan_builds(config, TrtVersion.parse(version), "pixels", CHW,
                       graph_precision=graph)[0]  # type: ignore[arg-type]


def _build(tmp_path: Path, s: Any, version: str, layers: list[FakeLayer] | None = None) -> Any:
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx")
    trt, _ = make_fake_trt(Scenario(version=version, layers=layers or []))
    return build_engine(onnx, s, trt_module=trt, calibrator=object() if s.calibrator else None,
                        timing_cache_path=tmp_path / "t.cache", log_path=tmp_path / "b.log")


def test_gate_precision_flags_only_on_the_weak_path(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the weak/strong gate (every version planned weak), 11.4 is asked for FP16, which
    it does not have."""
    _build(tmp_path, _plan("11.4.0.106", "fp16"), "11.4.0.106")  # gated: fine
    monkeypatch.setattr(settings_module, "build_path", lambda version: "weak")
    with pytest.raises(AttributeError, match="FP16"):
        _build(tmp_path, _plan("11.4.0.106", "fp16", graph="fp32"), "11.4.0.106")


def test_gate_explicit_batch_only_below_10(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """EXPLICIT_BATCH requested on every version: 11.4 has no such member."""
    weak = settings_module._weak

    def always_explicit(*args: Any) -> Any:
        _, builder_flags, calibrator = weak(*args)
        return ("EXPLICIT_BATCH",), builder_flags, calibrator

    monkeypatch.setattr(settings_module, "build_path", lambda version: "weak")
    monkeypatch.setattr(settings_module, "_weak", always_explicit)
    with pytest.raises(AttributeError, match="EXPLICIT_BATCH"):
        _build(tmp_path, _plan("11.4.0.106", "fp32", graph="fp32"), "11.4.0.106")


def test_gate_implicit_calibrator_only_on_the_weak_path(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """An int8 calibrator set on the strong path: 11.4's config has no int8_calibrator."""
    strong = settings_module._strong
    monkeypatch.setattr(settings_module, "_strong",
                        lambda *a: (*strong(*a)[:2], "minmax"))
    with pytest.raises(AttributeError, match="int8_calibrator"):
        _build(tmp_path, _plan("11.4.0.106", "int8"), "11.4.0.106")


def test_gate_no_layer_precisions_on_the_strong_path(tmp_path: Path) -> None:
    """Pinning LayerNorm on 11.4 (whose ILayer has no precision) is refused by plan_builds;
    forced past that refusal, the stand-in fails where the device would."""
    layers = [FakeLayer("/blocks.0/norm1/ReduceMean", "REDUCE")]
    s = _plan("11.4.0.106", "fp16")
    forced = type(s)(**{**s.__dict__, "layernorm_fp32": True})
    with pytest.raises(AttributeError, match="precision"):
        _build(tmp_path, forced, "11.4.0.106", layers)


def test_gate_normalization_layer_type_only_from_8_6(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """LayerType.NORMALIZATION (8.6+) is looked up with a fallback; read directly, 8.5 fails."""
    from xpdeploy.engine import builder

    layers = [FakeLayer("/blocks.0/norm1/ReduceMean", "REDUCE")]
    s = _plan("8.5.2.2", "fp16")
    assert _build(tmp_path, s, "8.5.2.2", layers).layernorm_layers_pinned == 1

    def direct(trt: Any, layer: Any) -> bool:
        return bool(layer.type == trt.LayerType.NORMALIZATION)

    monkeypatch.setattr(builder, "_is_norm_layer", direct)
    with pytest.raises(AttributeError, match="NORMALIZATION"):
        _build(tmp_path, s, "8.5.2.2", layers)
