"""ONNX export: interface names, dynamic batch, plain attention ops, parity with torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tests.conftest import TINY_MODEL
from xpdeploy.backends.ort_runner import OrtRunner
from xpdeploy.errors import ExportError
from xpdeploy.export.onnx_export import count_nodes, export_onnx
from xpdeploy.export.simplify import simplify_onnx
from xpdeploy.models.factory import create_model
from xpdeploy.spec import ModelConfig


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = create_model(ModelConfig(**TINY_MODEL))
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    export_onnx(model, path, input_size=(3, 16, 16), opset=17, trace_batch=2, dynamic_batch=True)
    return model, path


def test_interface_and_plain_attention(exported) -> None:
    model, path = exported
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["pixels"]
    assert [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    ops = {n.op_type for n in graph.node}
    assert {"MatMul", "Softmax"} <= ops
    assert "Attention" not in ops and not any("ScaledDotProduct" in op for op in ops)
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")), "restored"


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_ort_matches_torch_at_any_batch(exported, batch: int) -> None:
    model, path = exported
    x = np.random.default_rng(batch).standard_normal((batch, 3, 16, 16)).astype(np.float32)
    with OrtRunner(path, threads=1) as ort, torch.inference_mode():
        np.testing.assert_allclose(ort.infer(x), model(torch.from_numpy(x)).numpy(), atol=1e-4)


def test_simplify_reduces_nodes_and_keeps_outputs(exported, tmp_path: Path) -> None:
    _, path = exported
    dst = tmp_path / "m.sim.onnx"
    simplify_onnx(path, dst)
    assert count_nodes(dst) < count_nodes(path)
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    with OrtRunner(path) as a, OrtRunner(dst) as b:
        np.testing.assert_allclose(a.infer(x), b.infer(x), atol=1e-5)


def test_bad_opset_is_an_export_error(tmp_path: Path) -> None:
    model = create_model(ModelConfig(**TINY_MODEL))
    with pytest.raises(ExportError, match=r"export_onnx\.opset"):
        export_onnx(model, tmp_path / "x.onnx", input_size=(3, 16, 16), opset=6, trace_batch=2,
                    dynamic_batch=True)
    assert not (tmp_path / "x.onnx").exists()
