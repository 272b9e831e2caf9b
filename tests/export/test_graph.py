"""graph_precision reads which host transform (xpdeploy.export.fp16 / .qdq) a graph went through."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.backends.test_ort_runner import CHW, linear_onnx
from xpdeploy.export.fp16 import cast_fp16
from xpdeploy.export.graph import graph_precision
from xpdeploy.export.qdq import quantize_qdq


def test_graph_precision_of_each_transform(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    src = linear_onnx(tmp_path / "m.onnx", rng.standard_normal((12, 4)))
    calibration = rng.standard_normal((8, *CHW)).astype(np.float32)
    half = cast_fp16(src, tmp_path / "m.fp16.onnx").dst
    int8 = quantize_qdq(src, tmp_path / "m.int8.onnx", calibration).dst
    assert graph_precision(src) == "fp32"
    assert graph_precision(Path(half)) == "fp16"
    assert graph_precision(Path(int8)) == "int8"
