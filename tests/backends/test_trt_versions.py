"""TensorRT version parsing, build path selection and the LayerNorm rule (pure, no TensorRT)."""

from __future__ import annotations

import importlib.metadata
import types
from pathlib import Path

import pytest

from xpdeploy.backends.trt_versions import (
    TrtVersion,
    build_path,
    detect,
    l4t_release,
    needs_layernorm_fp32,
    tensorrt_version,
)
from xpdeploy.errors import BuildError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.3.0.26", (10, 3, 0)),
        ("8.5.2.2", (8, 5, 2)),
        ("10.12", (10, 12, 0)),
        ("11.0.0+cuda13", (11, 0, 0)),
    ],
)
def test_parse(text: str, expected: tuple[int, int, int]) -> None:
    assert TrtVersion.parse(text).as_tuple() == expected


def test_parse_rejects_garbage() -> None:
    with pytest.raises(BuildError, match="cannot read TensorRT version 'ten'"):
        TrtVersion.parse("ten")


def test_detect_uses_the_given_module_and_none_without_tensorrt() -> None:
    assert detect(types.SimpleNamespace(__version__="10.3.0.26")) == TrtVersion(10, 3, 0)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert detect() is None


@pytest.mark.parametrize(
    ("text", "path"),
    [("8.5.2", "weak"), ("8.6.1", "weak"), ("10.3.0", "weak"), ("10.11.9", "weak"),
     ("10.12.0", "strong"), ("10.16.1", "strong"), ("11.0.0", "strong")],
)
def test_build_path(text: str, path: str) -> None:
    assert build_path(TrtVersion.parse(text)) == path


def test_too_old_names_version_and_minimum() -> None:
    with pytest.raises(BuildError, match=r"TensorRT 8\.4\.3 is too old.*>= 8\.5"):
        build_path(TrtVersion.parse("8.4.3.1"))


@pytest.mark.parametrize(
    ("text", "precision", "pin"),
    [("8.5.2", "fp16", True), ("8.6.1", "int8", True), ("8.6.1", "best", True),
     ("8.6.1", "fp32", False), ("10.3.0", "fp16", False), ("10.12.0", "fp16", False)],
)
def test_layernorm_rule(text: str, precision: str, pin: bool) -> None:
    assert needs_layernorm_fp32(TrtVersion.parse(text), precision) is pin  # type: ignore[arg-type]


TEGRA_RELEASE = (
    "# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, "
    "DATE: Mon May  6 17:34:21 UTC 2024\n# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n"
)


def test_l4t_release(tmp_path: Path) -> None:
    f = tmp_path / "nv_tegra_release"
    assert l4t_release(f) is None  # not a Jetson
    f.write_text("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64\n")
    assert l4t_release(f) == "35.4.1"
    f.write_text(TEGRA_RELEASE)
    assert l4t_release(f) == "36.3.0"
    f.write_text("garbage")
    assert l4t_release(f) is None


def test_tensorrt_version_from_the_package_else_the_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    header = tmp_path / "usr/include/aarch64-linux-gnu/NvInferVersion.h"
    header.parent.mkdir(parents=True)
    header.write_text("#define TRT_MAJOR_ENTERPRISE 10\n"
                      "#define NV_TENSORRT_MAJOR TRT_MAJOR_ENTERPRISE\n"
                      "#define NV_TENSORRT_MINOR 3\n#define NV_TENSORRT_PATCH 0\n")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "10.3.0.26")
    assert tensorrt_version(tmp_path) == "10.3.0.26"

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert tensorrt_version(tmp_path) == "10.3.0"
    assert tensorrt_version(tmp_path / "elsewhere") is None


def test_engine_cache_key_and_report_share_the_probes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine build's device identity and the report's environment read the same L4T release
    and TensorRT version through these functions."""
    from xpdeploy import environment
    from xpdeploy.engine import engines

    assert engines.l4t_release is l4t_release is environment.l4t_release
    assert environment.tensorrt_version is tensorrt_version
    release = tmp_path / "etc/nv_tegra_release"
    release.parent.mkdir(parents=True)
    release.write_text(TEGRA_RELEASE)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "10.3.0.26")
    env = environment.capture(tmp_path, lambda argv: None, tools=dict)
    assert env["jetson"]["l4t"] == l4t_release(release) == "36.3.0"
    assert env["libraries"]["tensorrt"] == tensorrt_version(tmp_path) == "10.3.0.26"
