"""TensorRT version parsing, build path selection and the LayerNorm rule (pure, no TensorRT)."""

from __future__ import annotations

import types

import pytest

from xpdeploy.engine.versions import (
    TrtVersion,
    build_path,
    detect,
    l4t_release,
    needs_layernorm_fp32,
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


def test_l4t_release(tmp_path) -> None:
    f = tmp_path / "nv_tegra_release"
    f.write_text("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64\n")
    assert l4t_release(f) == "35.4.1"
    assert l4t_release(tmp_path / "absent") is None
