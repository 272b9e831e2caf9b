"""graph_precision reads which host transform (xpdeploy.export.fp16 / .qdq) a graph went through.

The transforms themselves are tested in tests/export; the engine build reaches them through
:mod:`xpdeploy.engine.host_precision`, so they are called through it here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.backends.test_ort_runner import CHW, linear_onnx
from xpdeploy.engine import host_precision as hp
from xpdeploy.export import fp16, qdq


def test_graph_precision_of_each_transform(tmp_path: Path) -> None:
    assert hp.cast_fp16 is fp16.cast_fp16 and hp.quantize_qdq is qdq.quantize_qdq
    rng = np.random.default_rng(0)
    src = linear_onnx(tmp_path / "m.onnx", rng.standard_normal((12, 4)))
    calibration = rng.standard_normal((8, *CHW)).astype(np.float32)
    half = hp.cast_fp16(src, tmp_path / "m.fp16.onnx").dst
    int8 = hp.quantize_qdq(src, tmp_path / "m.int8.onnx", calibration).dst
    assert hp.graph_precision(src) == "fp32"
    assert hp.graph_precision(Path(half)) == "fp16"
    assert hp.graph_precision(Path(int8)) == "int8"
