"""Which op types each TensorRT release's parser reads (the device refusal: tests/engine)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import timm
import torch
from onnx import TensorProto, helper

from tests.conftest import TINY_SWIN
from xpdeploy.export.onnx_export import export_onnx
from xpdeploy.export.simplify import simplify_onnx
from xpdeploy.export.tensorrt_ops import op_types, parser_concerns


def _export(tmp_path: Path, name: str, kwargs: dict, opset: int) -> Path:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    raw, sim = tmp_path / f"{opset}.onnx", tmp_path / f"{opset}.sim.onnx"
    export_onnx(model, raw, input_size=(3, 16, 16), opset=opset, trace_batch=2,
                dynamic_batch=True)
    simplify_onnx(raw, sim)
    return sim


def test_layernorm_of_opset_17_needs_tensorrt_8_6_and_opset_16_avoids_it(tmp_path: Path) -> None:
    """A Swin's window shift and partition simplify to ops every supported TensorRT parses; only
    opset 17's LayerNormalization needs 8.6+, and opset 16 writes it decomposed."""
    name, kwargs = TINY_SWIN["name"], TINY_SWIN["kwargs"]
    ops17 = op_types(_export(tmp_path, name, kwargs, 17))
    assert ops17["LayerNormalization"] == 11 and "Mod" not in ops17
    assert parser_concerns(ops17, (10, 3, 0)) == []
    assert parser_concerns(ops17, (8, 6, 1)) == []
    (concern,) = parser_concerns(ops17, (8, 5, 2))
    assert concern.startswith("LayerNormalization x11 needs TensorRT >= 8.6")
    assert "export_onnx.opset: 16" in concern
    ops16 = op_types(_export(tmp_path, name, kwargs, 16))
    assert "LayerNormalization" not in ops16 and parser_concerns(ops16, None) == []


def test_unknown_release_lists_every_version_gate_and_never_parsed_ops() -> None:
    ops = Counter({"Mod": 2, "Unique": 1, "MatMul": 4})
    never = "Unique x1 is not parsed by TensorRT (8.5's operator table)"
    assert parser_concerns(ops, None) == ["Mod x2 needs TensorRT >= 8.5", never]
    assert parser_concerns(ops, (8, 5)) == [never]


def test_op_types_counts_subgraph_nodes(tmp_path: Path) -> None:
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "b", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=[helper.make_tensor("x", TensorProto.FLOAT, [1], [1.0])])
    path = tmp_path / "if.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert op_types(path) == Counter({"If": 1, "Identity": 2})
