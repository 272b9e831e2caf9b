"""Host-side precision for the strongly typed build path (TensorRT >= 10.12, the only mode in 11.x).

A strongly typed network takes every tensor's type from the ONNX graph (see
:mod:`xpdeploy.engine.settings`), so the engine build puts the precision into the graph first, with
the ONNX-to-ONNX transforms :func:`cast_fp16` (:mod:`xpdeploy.export.fp16`) and
:func:`quantize_qdq` (:mod:`xpdeploy.export.qdq`), and reads it back with :func:`graph_precision`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from xpdeploy.export.fp16 import cast_fp16
from xpdeploy.export.graph import load_onnx
from xpdeploy.export.qdq import quantize_qdq

if TYPE_CHECKING:
    from xpdeploy.engine.settings import GraphPrecision

__all__ = ["cast_fp16", "graph_precision", "quantize_qdq"]

_FLOAT16 = 10  # onnx.TensorProto.FLOAT16


def graph_precision(path: Path) -> GraphPrecision:
    """The precision an ONNX file carries: "int8" when it has int8 Q/DQ nodes, "fp16" when any
    float initializer is float16, else "fp32"."""
    model = load_onnx(path)
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        return "int8"
    if any(t.data_type == _FLOAT16 for t in model.graph.initializer):
        return "fp16"
    return "fp32"
