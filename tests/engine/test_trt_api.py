"""The stand-ins' names equal the real API of the TensorRT version they stand for."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.backends.test_trt_runner_contract import MemoryBackend
from tests.engine.fake_trt import Scenario, make_fake_trt
from tests.engine.ort_backed_trt import make_ort_backed_trt
from tests.engine.trt_api import (
    ADDED_IN_8_6,
    TABLE_VERSIONS,
    TABLES,
    load_table,
    module_names,
    table_names,
    table_version,
)

SHARED = Path(__file__).resolve().parents[3] / "shared" / "tensorrt-api"


@pytest.mark.parametrize("version", TABLE_VERSIONS)
@pytest.mark.parametrize("stand_in", ["recording", "onnxruntime-backed"])
def test_stand_in_names_equal_the_versions_table(version: str, stand_in: str) -> None:
    """Every module name, every class's public attributes and every enum member with its value:
    read back from the stand-in by introspection, equal to the table (so neither fake can grow
    a name the version lacks, nor lose one it has)."""
    if stand_in == "recording":
        trt, _ = make_fake_trt(Scenario(version=version))
    else:
        trt, _ = make_ort_backed_trt(MemoryBackend(), version=version)
    got, want = module_names(trt), table_names(load_table(version))
    assert sorted(got) == sorted(want)
    different = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert different == {}


def test_facts_of_the_tables_the_engine_code_depends_on() -> None:
    def trt(version: str):
        return make_fake_trt(Scenario(version=version))[0]

    t86, t103, t1013, t114 = (trt(v) for v in ("8.6.1", "10.3.0", "10.13.0.35", "11.4.0.106"))
    flag = "NetworkDefinitionCreationFlag"
    assert getattr(t103, flag).STRONGLY_TYPED == 1 and getattr(t1013, flag).STRONGLY_TYPED == 1
    assert getattr(t114, flag).STRONGLY_TYPED == 0  # deprecated and ignored on 11.x
    assert not hasattr(getattr(t86, flag), "STRONGLY_TYPED")
    assert not hasattr(getattr(t114, flag), "EXPLICIT_BATCH")
    for name in ("FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"):
        assert hasattr(t1013.BuilderFlag, name) and not hasattr(t114.BuilderFlag, name)
    assert not [n for n in dir(t114) if "Calibrator" in n]
    config = t114.Builder(t114.ILogger()).create_builder_config()
    assert not hasattr(config, "int8_calibrator")
    with pytest.raises(AttributeError, match=r"int8_calibrator.*11\.4"):
        config.int8_calibrator = object()  # as pybind11 refuses an unknown attribute
    assert not hasattr(t114.IBuilderConfig, "set_calibration_profile")
    assert not hasattr(t86, "int64")  # 8.6 has no INT64 DataType


def test_the_8_5_table_is_8_6_without_what_8_6_added() -> None:
    t85, t86 = load_table("8.5.2.2"), load_table("8.6.1")
    assert set(t86) - set(t85) == set(ADDED_IN_8_6["module"])
    assert "NORMALIZATION" not in t85["LayerType"]["members"]
    assert set(t86["LayerType"]["members"]) - set(t85["LayerType"]["members"]) == {
        "CAST", "NORMALIZATION", "REVERSE_SEQUENCE"}
    # What our code needs from 8.5 is there: the v3 tensor API, pools, calibrators, inspector.
    assert {"execute_async_v3", "set_input_shape", "set_tensor_address"} <= set(
        t85["IExecutionContext"]["attrs"])
    assert {"set_memory_pool_limit", "int8_calibrator", "set_calibration_profile",
            "create_timing_cache"} <= set(t85["IBuilderConfig"]["attrs"])
    assert "IInt8MinMaxCalibrator" in t85 and "TensorIOMode" in t85


@pytest.mark.parametrize(("version", "table"), [
    ("8.5.2.2", "8.5.2.2"), ("8.4.3.1", "8.5.2.2"), ("8.6.1.6", "8.6.1"),
    ("10.3.0.26", "10.3.0"), ("10.4.0", "10.3.0"), ("10.12.0", "10.12.0.36"),
    ("11.4.0.106", "11.4.0.106"), ("12.0.0", "11.4.0.106")])
def test_each_version_is_held_to_its_own_or_the_nearest_older_table(version: str,
                                                                     table: str) -> None:
    assert table_version(version) == table


def test_unimplemented_names_fail_loudly_instead_of_passing() -> None:
    """A name the version has but the fake does not implement raises NotImplementedError, so a
    test cannot pass by calling it."""
    trt, _ = make_fake_trt(Scenario(version="10.3.0"))
    builder = trt.Builder(trt.ILogger())
    assert hasattr(trt.Builder, "is_network_supported")
    with pytest.raises(NotImplementedError, match=r"Builder\.is_network_supported"):
        builder.is_network_supported(None, None)
    with pytest.raises(NotImplementedError, match="get_nv_onnx_parser_version"):
        trt.get_nv_onnx_parser_version()


@pytest.mark.skipif(not SHARED.is_dir(), reason="the team's shared tensorrt-api folder is absent")
@pytest.mark.parametrize("version", [v for v in TABLE_VERSIONS if v != "8.5.2.2"])
def test_the_repository_copies_equal_the_shared_tables(version: str) -> None:
    name = f"tensorrt-{version}.json"
    assert (TABLES / name).read_bytes() == (SHARED / name).read_bytes()
