"""Reading an exported ONNX file: one-line errors, its single input, its precision."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from xpdeploy.errors import ExportError

if TYPE_CHECKING:
    import onnx

#: The precision an ONNX graph carries (what a strongly typed TensorRT build takes from it).
GraphPrecision = Literal["fp32", "fp16", "int8"]
_FLOAT16 = 10  # onnx.TensorProto.FLOAT16


def first_line(e: BaseException) -> str:
    """The first line of an exception's text (at most 200 characters), else its type name."""
    text = str(e).strip()
    return (text.splitlines()[0][:200] if text else type(e).__name__)


def load_onnx(path: Path) -> onnx.ModelProto:
    """Load an ONNX file; anything unreadable is a one-line :class:`ExportError`."""
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as e:  # FileNotFoundError, protobuf DecodeError, ...
        raise ExportError(
            f"cannot read ONNX file {path}: {first_line(e)}; re-run export_onnx"
        ) from None


def graph_input(model: onnx.ModelProto, path: Path) -> tuple[str, int | None, tuple[int, ...]]:
    """(input name, static batch or None, one sample's shape) of the model's single input.

    A whole model takes pixels (N, C, H, W); a block of a latency grid takes tokens (N, T, D) for
    a ViT or (N, H, W, C) for a Swin. Every axis but the batch must be fixed.
    """
    init = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    dims = inputs[0].type.tensor_type.shape.dim if len(inputs) == 1 else []
    if len(inputs) != 1 or len(dims) < 2 or not all(d.dim_value > 0 for d in dims[1:]):
        raise ExportError(
            f"{path.name} must have one input (batch first) with fixed other axes, has "
            f"{[i.name for i in inputs]}; re-run export_onnx"
        )
    batch = dims[0].dim_value or None
    return inputs[0].name, batch, tuple(d.dim_value for d in dims[1:])


def graph_precision(path: Path) -> GraphPrecision:
    """The precision an ONNX file carries: "int8" when it has int8 Q/DQ nodes (:mod:`.qdq`),
    "fp16" when any float initializer is float16 (:mod:`.fp16`), else "fp32"."""
    model = load_onnx(path)
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        return "int8"
    if any(t.data_type == _FLOAT16 for t in model.graph.initializer):
        return "fp16"
    return "fp32"
