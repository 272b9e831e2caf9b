"""Contract tests of build_engine against a recording stand-in for the ``tensorrt`` module.

These test OUR calls into TensorRT and their order and arguments (flags, pool limit, profiles,
calibrator, timing cache, inspector), plus how we turn failures into one-line errors. They do NOT
test TensorRT: the stand-in in ``fake_trt.py`` parses nothing and builds nothing, so a real build
on a device machine is still needed (tests marked ``trt`` and ``gpu``).
"""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

import pytest

from tests.engine.fake_trt import FakeLayer, FakeTensor, Scenario, make_fake_trt, names
from xpdeploy.backends.trt_versions import TrtVersion
from xpdeploy.engine.builder import build_engine, is_fused_attention_layer
from xpdeploy.engine.settings import BuildSettings, plan_builds
from xpdeploy.errors import BuildError, MissingDependencyError
from xpdeploy.spec import BuildEngineConfig

CHW = (3, 16, 16)


def settings(version: str = "10.3.0", graph: str = "fp32", profiles=None, **cfg: Any
             ) -> BuildSettings:
    return plan_builds(BuildEngineConfig(**cfg), TrtVersion.parse(version), "pixels", CHW,
                       graph_precision=graph, profiles=profiles)[0]  # type: ignore[arg-type]


@pytest.fixture
def onnx(tmp_path: Path) -> Path:
    p = tmp_path / "model.onnx"
    p.write_bytes(b"onnx")
    return p


def run(tmp_path: Path, onnx: Path, s: BuildSettings, sc: Scenario | None = None, **kw: Any):
    """build_engine against the stand-in of ``sc.version``; the result, the calls and the
    stand-in module (whose enums are the version's)."""
    trt, calls = make_fake_trt(sc)
    result = build_engine(onnx, s, trt_module=trt, timing_cache_path=tmp_path / "timing.cache",
                          log_path=tmp_path / "build.log", **kw)
    return result, calls, trt


def flags_set(calls: list[tuple]) -> list[Any]:
    return [c[1] for c in calls if c[0] == "config.set_flag"]


def test_weak_fp16_call_order_and_arguments(tmp_path, onnx) -> None:
    result, calls, trt = run(tmp_path, onnx, settings(precision="fp16", workspace_mb=256))
    order = [n for n in names(calls) if not n.startswith("ILogger")]
    assert order == [
        "Builder", "builder.create_network", "OnnxParser", "parser.parse_from_file",
        "builder.create_builder_config", "config.set_memory_pool_limit", "config.set_flag",
        "config.profiling_verbosity", "builder.create_optimization_profile",
        "profile.set_shape", "config.add_optimization_profile", "config.create_timing_cache",
        "config.set_timing_cache", "builder.build_serialized_network", "config.get_timing_cache",
        "Runtime", "runtime.deserialize_cuda_engine", "inspector.get_engine_information",
    ]
    assert ("builder.create_network", 0) in calls  # no EXPLICIT_BATCH on 10.x
    assert ("parser.parse_from_file", str(onnx)) in calls
    workspace = trt.MemoryPoolType.WORKSPACE
    assert ("config.set_memory_pool_limit", workspace, 256 << 20) in calls
    assert flags_set(calls) == [trt.BuilderFlag.FP16]
    assert ("config.profiling_verbosity", trt.ProfilingVerbosity.DETAILED) in calls
    assert ("inspector.get_engine_information", trt.LayerInformationFormat.JSON) in calls
    assert result.plan == b"PLAN"
    assert ("runtime.deserialize_cuda_engine", b"PLAN") in calls


def test_trt8_sets_explicit_batch(tmp_path, onnx) -> None:
    _, calls, trt = run(tmp_path, onnx, settings("8.6.1", precision="fp32"),
                   Scenario(version="8.6.1"))
    explicit = trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH
    assert ("builder.create_network", 1 << explicit) in calls
    assert flags_set(calls) == []


def test_int8_sets_flag_and_calibrator(tmp_path, onnx) -> None:
    cal = object()
    s = settings(precision="int8", calibration="c.json")
    _, calls, trt = run(tmp_path, onnx, s, calibrator=cal)
    assert flags_set(calls) == [trt.BuilderFlag.INT8, trt.BuilderFlag.FP16]
    assert ("config.int8_calibrator", cal) in calls
    profile = next(c[1] for c in calls if c[0] == "config.add_optimization_profile")
    assert ("config.set_calibration_profile", profile) in calls


def test_int8_without_calibrator_is_refused_before_tensorrt(tmp_path, onnx) -> None:
    with pytest.raises(BuildError, match="needs a minmax calibrator"):
        run(tmp_path, onnx, settings(precision="int8", calibration="c.json"))


def test_strong_path_creates_strongly_typed_network_without_precision_flags(tmp_path, onnx):
    s = settings("10.12.0", graph="fp16", precision="fp16")
    _, calls, trt = run(tmp_path, onnx, s, Scenario(version="10.12.0"))
    strongly_typed = trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert ("builder.create_network", 1 << strongly_typed) in calls
    assert flags_set(calls) == []
    assert "config.int8_calibrator" not in names(calls)


def test_layernorm_pinned_on_trt8(tmp_path, onnx) -> None:
    layers = [
        FakeLayer("/blocks.0/norm1/ReduceMean", "REDUCE"),
        FakeLayer("/blocks.0/norm1/Constant", "CONSTANT"),
        FakeLayer("/blocks.0/norm1/Shape", "SHAPE", out_dtype="INT32"),  # 8.6 has no INT64
        FakeLayer("/blocks.0/attn/qkv/MatMul", "MATRIX_MULTIPLY"),
        FakeLayer("/fc_norm/LayerNormalization", "NORMALIZATION"),
    ]
    sc = Scenario(version="8.6.1", layers=layers)
    result, calls, trt = run(tmp_path, onnx, settings("8.6.1", precision="fp16"), sc)
    flag = trt.BuilderFlag
    assert flags_set(calls) == [flag.FP16, flag.PREFER_PRECISION_CONSTRAINTS]
    assert result.layernorm_layers_pinned == 2
    fp32 = trt.DataType.FLOAT
    assert layers[0].precision is fp32 and layers[0].output_types == {0: fp32}
    assert layers[4].precision is fp32
    assert layers[1].precision is None and layers[2].precision is None
    assert layers[3].precision is None


def test_static_onnx_input_gets_no_profile_and_mismatch_is_refused(tmp_path, onnx) -> None:
    sc = Scenario(inputs=[FakeTensor("pixels", (1, *CHW))])
    _, calls, _ = run(tmp_path, onnx, settings(batch_sizes=[1]), sc)
    assert "builder.create_optimization_profile" not in names(calls)
    with pytest.raises(BuildError, match=r"fixed at \(1, 3, 16, 16\).*dynamic batch axis"):
        run(tmp_path, onnx, settings(batch_sizes=[8]), Scenario(inputs=sc.inputs))


def test_dynamic_profile_shapes(tmp_path, onnx) -> None:
    _, calls, _ = run(tmp_path, onnx, settings(profiles=[(1, 4, 8)]))
    assert ("profile.set_shape", "pixels", (1, *CHW), (4, *CHW), (8, *CHW)) in calls


def test_missing_input_name(tmp_path, onnx) -> None:
    with pytest.raises(BuildError, match=r"no input 'pixels'.*'input'"):
        run(tmp_path, onnx, settings(), Scenario(inputs=[FakeTensor("input", (-1, *CHW))]))


def test_timing_cache_loaded_and_saved(tmp_path, onnx) -> None:
    (tmp_path / "timing.cache").write_bytes(b"OLD")
    _, calls, _ = run(tmp_path, onnx, settings())
    assert ("config.create_timing_cache", b"OLD") in calls
    assert ("config.set_timing_cache", b"OLD", False) in calls
    assert (tmp_path / "timing.cache").read_bytes() == b"OLD+timed"


def test_rejected_timing_cache_starts_empty_with_a_warning(tmp_path, onnx) -> None:
    (tmp_path / "timing.cache").write_bytes(b"OTHER-GPU")
    result, calls, _ = run(tmp_path, onnx, settings(), Scenario(timing_cache_accepted=False))
    assert ("config.set_timing_cache", b"", False) in calls
    assert any("timing cache" in w for w in result.warnings)
    assert (tmp_path / "timing.cache").read_bytes() == b"+timed"


@pytest.mark.parametrize("blob", ["none", "raise"])
def test_corrupt_timing_cache_is_a_warning_and_a_fresh_cache(tmp_path, onnx, blob) -> None:
    """A truncated or foreign file where the timing cache should be: TensorRT returns no cache
    (or raises); the build goes on with a fresh one and saves it over the bad file."""
    (tmp_path / "timing.cache").write_bytes(b"\x00garbage")
    result, calls, _ = run(tmp_path, onnx, settings(), Scenario(timing_cache_blob=blob))
    assert result.plan == b"PLAN"
    assert ("config.set_timing_cache", b"", False) in calls
    (warning,) = [w for w in result.warnings if "timing cache" in w]
    assert "is corrupt or was written by another GPU or TensorRT; starting a fresh one" in warning
    assert (tmp_path / "timing.cache").read_bytes() == b"+timed"


def test_unreadable_or_unwritable_timing_cache_is_a_warning(tmp_path, onnx) -> None:
    (tmp_path / "timing.cache").mkdir()  # a folder where the file should be: neither read nor
    result, _, _ = run(tmp_path, onnx, settings())  # written, and the build still succeeds
    assert result.plan == b"PLAN"
    assert any("could not be saved" in w for w in result.warnings)


def test_parse_errors_become_one_line_build_error(tmp_path, onnx) -> None:
    sc = Scenario(parse_ok=False, parser_errors=[(3, "Unsupported op\nFooOp"), (7, "bad attr")])
    with pytest.raises(BuildError) as info:
        run(tmp_path, onnx, settings(), sc)
    msg = str(info.value)
    assert "\n" not in msg
    assert "could not parse" in msg and "node 3: Unsupported op FooOp; node 7: bad attr" in msg
    assert "[E] bad attr" in (tmp_path / "build.log").read_text()  # log written on failure too
    assert not (tmp_path / "timing.cache").exists()


def test_build_failure_quotes_the_last_error(tmp_path, onnx) -> None:
    with pytest.raises(BuildError, match="could not build the fp16-b1 engine: out of memory;"):
        run(tmp_path, onnx, settings(), Scenario(build_ok=False))
    assert not (tmp_path / "timing.cache").exists()


def test_build_log_and_fused_attention_count(tmp_path, onnx) -> None:
    info = {"Layers": [
        {"Name": "/blocks.0/attn/qkv/MatMul", "LayerType": "CaskGemm", "TacticName": "sm87_gemm"},
        {"Name": "{ForeignNode[/blocks.0/attn/Transpose.../blocks.0/attn/MatMul_1]}",
         "LayerType": "Myelin"},
        {"Name": "mha_1", "LayerType": "kgen", "TacticName": "fmha_v2_flash_attention"},
    ]}
    result, _, _ = run(tmp_path, onnx, settings(), Scenario(layer_info=info), attention_blocks=2)
    assert result.fused_attention_kernels == 2 and result.warnings == []
    result, _, _ = run(tmp_path, onnx, settings(), Scenario(layer_info=info), attention_blocks=12)
    assert any("2 fused attention kernels found for 12" in w for w in result.warnings)
    assert (tmp_path / "build.log").is_file()


def test_fused_attention_heuristic_on_plain_names() -> None:
    assert is_fused_attention_layer("_gemm_mha_v2_0")
    assert not is_fused_attention_layer("/blocks.0/attn/proj/MatMul")


def test_missing_tensorrt_gives_install_hint(tmp_path, onnx, monkeypatch) -> None:
    real_import = builtins.__import__

    def no_tensorrt(name: str, *args: Any, **kwargs: Any):
        if name == "tensorrt":
            raise ImportError("No module named 'tensorrt'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorrt)
    with pytest.raises(MissingDependencyError) as info:
        build_engine(onnx, settings(), timing_cache_path=tmp_path / "t", log_path=tmp_path / "l")
    msg = str(info.value)
    assert "pip install 'xpdeploy[tensorrt]'" in msg and "JetPack" in msg and "\n" not in msg
