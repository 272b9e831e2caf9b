"""The host fp16 cast (strongly typed TensorRT path) on the tiny exported ViT (see conftest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.export.conftest import FLOAT, FLOAT16, elem_types, init_bytes
from xpdeploy.errors import ExportError
from xpdeploy.export.fp16 import cast_fp16


def test_fp16_cast_keeps_fp32_io_and_norms(fp32_onnx: Path, eval_pixels: np.ndarray) -> None:
    dst = fp32_onnx.with_name("m.fp16.onnx")
    report = cast_fp16(fp32_onnx, dst, parity_pixels=eval_pixels)
    model = onnx.load(str(dst))
    onnx.checker.check_model(model, full_check=True)

    # I/O stays float32: runners and TensorRT bindings are unchanged.
    assert [v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]] == [
        FLOAT, FLOAT]
    types = elem_types(model)
    norms = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert len(norms) == 2 * 2 + 1 + 2  # 2 LN per block + final LN, 1 softmax per block
    assert all(types[i] == FLOAT for n in norms for i in n.input if i), "norms must stay fp32"
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert matmuls and all(types[n.input[0]] == FLOAT16 for n in matmuls), "GEMMs run in fp16"
    assert report.kept_fp32 == {"LayerNormalization": 5, "Softmax": 2}
    assert report.casts_added > 0 and report.nodes_after == report.nodes_before + report.casts_added

    # Weights halve. The whole file of this tiny model does not quite (graph structure and the
    # fp32 LayerNorm parameters are a large share of 130 kB); measured 0.69.
    src_model = onnx.load(str(fp32_onnx))
    assert init_bytes(model) / init_bytes(src_model) < 0.55
    assert report.bytes_after / report.bytes_before < 0.75

    # Measured: top-1 agreement 1.0, min cosine 0.9999995, max |diff| 1.5e-4 logits (the logits
    # of this untrained model have a std of 0.06 and a median top-1 margin of 0.04).
    p = report.parity
    assert p is not None and p.samples == 256
    assert p.top1_agreement >= 0.98 and p.min_cosine >= 0.9999 and p.max_abs_diff < 2e-3


def test_corrupt_source_is_a_one_line_export_error(tmp_path: Path) -> None:
    src, dst = tmp_path / "bad.onnx", tmp_path / "out.onnx"
    src.write_bytes(b"\x08\x07this is not an onnx protobuf\xff\xff")
    with pytest.raises(ExportError) as info:
        cast_fp16(src, dst)
    assert "\n" not in str(info.value) and "bad.onnx" in str(info.value)
    assert not dst.exists()
