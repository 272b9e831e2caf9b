"""Cast an fp32 ONNX model to fp16 on the host, for TensorRT's strongly typed build path.

A strongly typed network (TensorRT >= 10.12, the only mode in 11.x) takes every tensor's type from
the ONNX graph, so fp16 is put into the graph here, before ``build_engine``. Weights and
activations are cast to float16 by onnxruntime's bundled converter
(``onnxruntime.transformers.float16``: no extra package, and it already handles shape-inferred
value infos, subgraphs and boundary casts). Graph inputs and outputs stay float32 (a Cast at each
boundary), so callers, runners and the TensorRT I/O bindings do not change. Norm and softmax ops
stay float32: on ViTs the LayerNorm variance and the softmax exponent sums overflow fp16's 65504
range or lose its 11-bit mantissa, which is also why the weak path pins LayerNorm to fp32.

Torch-free (onnx, onnxruntime, numpy). The output is checked with ``onnx.checker`` and, given a
batch, measured against the fp32 model (:func:`xpdeploy.export.parity.measure_parity`). Errors
are one-line :class:`~xpdeploy.errors.ExportError` messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xpdeploy.errors import ExportError, MissingDependencyError
from xpdeploy.export.graph import first_line, load_onnx
from xpdeploy.export.parity import Parity, measure_parity
from xpdeploy.fileio import write_with

if TYPE_CHECKING:
    import onnx

#: Ops kept in float32 by :func:`cast_fp16`. LayerNormalization and Softmax are the ViT overflow
#: risks; ReduceMean/Pow/Sqrt cover a LayerNorm decomposed by an exporter below opset 17. Div is
#: deliberately not here: in our exports it is GELU's ``x / sqrt(2)``, harmless in fp16, and
#: blocking it would add two Casts per MLP.
DEFAULT_KEEP_FP32: tuple[str, ...] = (
    "LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt",
)

_FLOAT = 1  # onnx.TensorProto.FLOAT


@dataclass(frozen=True)
class CastReport:
    """What :func:`cast_fp16` did; ``as_dict`` is what the build stage logs and records."""

    src: str
    dst: str
    converter: str
    nodes_before: int
    nodes_after: int
    casts_added: int
    kept_fp32: dict[str, int]  # op type -> nodes of that type that still compute in float32
    bytes_before: int
    bytes_after: int
    parity: Parity | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)




def cast_fp16(
    src: Path,
    dst: Path,
    *,
    keep_fp32_ops: Sequence[str] = DEFAULT_KEEP_FP32,
    parity_pixels: np.ndarray | None = None,
) -> CastReport:
    """Write an fp16 copy of ``src`` to ``dst`` (atomically) with float32 graph I/O.

    ``keep_fp32_ops`` stay float32, with Casts around them. Given ``parity_pixels`` (float32
    NCHW, the model's input size), both models run in onnxruntime CPU and the report holds the
    difference. The caller decides what difference is acceptable.
    """
    import onnx

    try:
        from onnxruntime.transformers.float16 import (
            DEFAULT_OP_BLOCK_LIST,
            convert_float_to_float16,
        )
    except ImportError:
        raise MissingDependencyError(
            "onnxruntime (with its transformers tools) is needed for the fp16 cast; "
            "pip install onnxruntime"
        ) from None
    model = load_onnx(src)
    # The default block list holds ops without an fp16 kernel in onnxruntime (where parity runs);
    # none of them occurs in a ViT, but replacing it would make the parity run fail on models
    # that have them.
    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_fp32_ops))
    try:
        converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
        # The converter appends the graph-input Casts after their consumers (onnxruntime's own
        # OnnxModel wrapper re-sorts afterwards); ONNX requires topological order.
        _topological_sort(converted.graph)
        onnx.checker.check_model(converted)
    except Exception as e:  # the converter raises bare ValueError/AssertionError
        raise ExportError(f"fp16 cast of {src.name} failed: {first_line(e)}") from None
    types = _elem_types(converted)
    kept = {op: 0 for op in keep_fp32_ops}
    for node in converted.graph.node:
        if node.op_type in kept:
            if types.get(node.input[0]) != _FLOAT:
                raise ExportError(
                    f"fp16 cast of {src.name} left {node.op_type} node {node.name!r} in "
                    f"{_type_name(types.get(node.input[0]))}, expected float32; this is a "
                    "converter bug, report it with the ONNX file"
                )
            kept[node.op_type] += 1
    _check_io_float32(converted, src)
    write_with(dst, lambda tmp: onnx.save(converted, str(tmp)))
    parity = measure_parity(src, dst, parity_pixels) if parity_pixels is not None else None
    casts = sum(n.op_type == "Cast" for n in converted.graph.node)
    return CastReport(
        src=str(src), dst=str(dst), converter="onnxruntime.transformers.float16",
        nodes_before=len(model.graph.node), nodes_after=len(converted.graph.node),
        casts_added=casts - sum(n.op_type == "Cast" for n in model.graph.node),
        kept_fp32={op: n for op, n in kept.items() if n},
        bytes_before=src.stat().st_size, bytes_after=dst.stat().st_size, parity=parity,
    )


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor name that shape inference can type."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for vi in [*g.input, *g.output, *g.value_info]:
        types[vi.name] = vi.type.tensor_type.elem_type
    for node in g.node:  # Constant outputs are not always in value_info
        if node.op_type == "Constant" and node.attribute and node.attribute[0].t.data_type:
            types[node.output[0]] = node.attribute[0].t.data_type
    return types


def _check_io_float32(model: onnx.ModelProto, src: Path) -> None:
    for vi in [*model.graph.input, *model.graph.output]:
        if vi.type.tensor_type.elem_type != _FLOAT:
            raise ExportError(
                f"fp16 cast of {src.name} changed {vi.name} to "
                f"{_type_name(vi.type.tensor_type.elem_type)}; graph I/O must stay float32"
            )


def _topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` in place so every node follows its producers (stable otherwise).

    Names not produced by a node (graph inputs, initializers, outer scope) count as available.
    Our ViT graphs have no subgraphs, so implicit subgraph inputs are not tracked.
    """
    nodes = list(graph.node)
    produced = {o for n in nodes for o in n.output if o}
    ready = {i for n in nodes for i in n.input if i and i not in produced}
    done: list[int] = []
    placed = [False] * len(nodes)
    progress = True
    while progress and len(done) < len(nodes):
        progress = False
        for k, node in enumerate(nodes):
            if not placed[k] and all(not i or i in ready for i in node.input):
                placed[k] = True
                done.append(k)
                ready.update(node.output)
                progress = True
    if len(done) < len(nodes):
        raise ExportError("the fp16 graph has a cycle or a dangling input; report it with the file")
    ordered = [nodes[k] for k in done]
    del graph.node[:]
    graph.node.extend(ordered)



def _type_name(elem_type: int | None) -> str:
    import onnx

    if not elem_type:
        return "an unknown type"
    return onnx.TensorProto.DataType.Name(elem_type).lower()

