"""BuildSettings from the build_engine config (pure, no TensorRT)."""

from __future__ import annotations

from typing import Any

import pytest

from xpdeploy.backends.trt_versions import TrtVersion
from xpdeploy.engine.settings import Profile, build_precisions, plan_builds
from xpdeploy.errors import BuildError
from xpdeploy.spec import BuildEngineConfig

V85, V103, V1012 = TrtVersion(8, 5, 2), TrtVersion(10, 3, 0), TrtVersion(10, 12, 0)
CHW = (3, 224, 224)


def cfg(**kw: Any) -> BuildEngineConfig:
    return BuildEngineConfig(**kw)


def test_static_batch_is_one_engine_per_batch_size() -> None:
    out = plan_builds(cfg(precision="fp16", batch_sizes=[1, 8, 1]), V103, "pixels", CHW)
    assert [s.label for s in out] == ["fp16-b1", "fp16-b8"]
    assert out[1].profile == Profile("pixels", (8, *CHW), (8, *CHW), (8, *CHW))
    assert out[1].profile.is_static


def test_weak_flags_and_workspace_in_bytes() -> None:
    (s,) = plan_builds(cfg(precision="fp16", workspace_mb=512), V103, "pixels", CHW)
    assert s.path == "weak"
    assert s.builder_flags == ("FP16",)
    assert s.network_flags == ()  # EXPLICIT_BATCH is deprecated from 10.0
    assert s.workspace_bytes == 512 * 1024 * 1024
    assert s.calibrator is None and not s.layernorm_fp32


def test_trt8_fp16_pins_layernorm_and_sets_explicit_batch() -> None:
    (s,) = plan_builds(cfg(precision="fp16"), V85, "pixels", CHW)
    assert s.network_flags == ("EXPLICIT_BATCH",)
    assert s.builder_flags == ("FP16", "PREFER_PRECISION_CONSTRAINTS")
    assert s.layernorm_fp32


def test_layernorm_override_and_fp32_never_pins() -> None:
    (s,) = plan_builds(cfg(precision="fp16"), V103, "pixels", CHW, layernorm_fp32=True)
    assert s.layernorm_fp32 and "PREFER_PRECISION_CONSTRAINTS" in s.builder_flags
    (s,) = plan_builds(cfg(precision="fp32"), V85, "pixels", CHW, layernorm_fp32=True)
    assert not s.layernorm_fp32 and s.builder_flags == ()


def test_int8_needs_a_calibration_set() -> None:
    with pytest.raises(BuildError, match=r"int8 calibration set.*build_engine\.calibration"):
        plan_builds(cfg(precision="int8"), V103, "pixels", CHW)


def test_int8_uses_the_configured_calibrator() -> None:
    (s,) = plan_builds(
        cfg(precision="int8", calibration="cal.json", calibrator="entropy2"), V85, "pixels", CHW
    )
    assert s.builder_flags[:2] == ("INT8", "FP16") and s.calibrator == "entropy2"
    (s,) = plan_builds(cfg(precision="int8", calibration="cal.json"), V103, "pixels", CHW)
    assert s.builder_flags == ("INT8", "FP16") and s.calibrator == "minmax"
    assert any("deprecates implicit int8" in w for w in s.warnings)


def test_best_is_an_fp16_and_an_int8_build() -> None:
    config = cfg(precision="best", calibration="cal.json")
    assert build_precisions("best") == ("fp16", "int8")
    assert build_precisions("fp16") == ("fp16",)
    with pytest.raises(BuildError, match="best is two builds"):
        plan_builds(config, V103, "pixels", CHW)
    (fp16,) = plan_builds(config, V103, "pixels", CHW, precision="fp16")
    (int8,) = plan_builds(config, V103, "pixels", CHW, precision="int8")
    assert (fp16.label, fp16.builder_flags, fp16.calibrator) == ("fp16-b1", ("FP16",), None)
    assert (int8.label, int8.builder_flags, int8.calibrator) == ("int8-b1", ("INT8", "FP16"),
                                                                 "minmax")
    with pytest.raises(BuildError, match=r"precision best on TensorRT 10\.3\.0 needs an int8"):
        plan_builds(cfg(precision="best"), V103, "pixels", CHW, precision="int8")
    # Strong path: one host-cast graph and one Q/DQ graph.
    (s16,) = plan_builds(config, V1012, "pixels", CHW, precision="fp16", graph_precision="fp16")
    (s8,) = plan_builds(config, V1012, "pixels", CHW, precision="int8", graph_precision="int8")
    assert s16.builder_flags == s8.builder_flags == () and s8.calibrator is None


def test_strong_path_takes_precision_from_the_graph() -> None:
    (s,) = plan_builds(cfg(precision="fp16"), V1012, "pixels", CHW, graph_precision="fp16")
    assert s.path == "strong"
    assert s.network_flags == ("STRONGLY_TYPED",)
    assert s.builder_flags == () and s.calibrator is None and not s.layernorm_fp32


def test_strong_path_fp16_on_fp32_graph_explains_the_missing_step() -> None:
    with pytest.raises(BuildError, match=r"must come from the ONNX graph.*cast the ONNX model"):
        plan_builds(cfg(precision="fp16"), V1012, "pixels", CHW)
    with pytest.raises(BuildError, match="Q/DQ"):
        plan_builds(cfg(precision="int8", calibration="c.json"), V1012, "pixels", CHW)
    with pytest.raises(BuildError, match="strongly typed networks forbid layer precisions"):
        plan_builds(cfg(precision="fp16"), V1012, "pixels", CHW, graph_precision="fp16",
                    layernorm_fp32=True)


def test_weak_path_refuses_a_precast_graph() -> None:
    with pytest.raises(BuildError, match=r"weakly typed.*got a fp16 graph"):
        plan_builds(cfg(precision="fp16"), V103, "pixels", CHW, graph_precision="fp16")


def test_dynamic_profiles_replace_batch_sizes() -> None:
    out = plan_builds(cfg(batch_sizes=[4]), V103, "pixels", CHW, profiles=[(1, 8, 32)])
    (s,) = out
    assert s.label == "fp16-b1-8-32" and s.batch == 8 and not s.profile.is_static
    assert s.profile.min == (1, *CHW) and s.profile.max == (32, *CHW)


@pytest.mark.parametrize("bad", [(8, 4, 16), (1, 16, 8), (0, 1, 1)])
def test_bad_profiles(bad: tuple[int, int, int]) -> None:
    with pytest.raises(BuildError, match="min <= opt <= max"):
        plan_builds(cfg(), V103, "pixels", CHW, profiles=[bad])


def test_profile_checks_every_dimension() -> None:
    with pytest.raises(BuildError, match="min <= opt <= max"):
        Profile("x", (1, 3, 32, 32), (1, 3, 16, 16), (1, 3, 64, 64))
    with pytest.raises(BuildError, match="same rank"):
        Profile("x", (1, 3), (1, 3, 16), (1, 3, 16))


def test_bad_batch_sizes() -> None:
    with pytest.raises(BuildError, match="empty"):
        plan_builds(cfg(batch_sizes=[]), V103, "pixels", CHW)
    with pytest.raises(BuildError, match="must be positive"):
        plan_builds(cfg(batch_sizes=[1, 0]), V103, "pixels", CHW)


def test_too_old_tensorrt_is_refused() -> None:
    with pytest.raises(BuildError, match="too old"):
        plan_builds(cfg(), TrtVersion(8, 2, 5), "pixels", CHW)
