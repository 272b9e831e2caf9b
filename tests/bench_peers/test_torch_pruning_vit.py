"""The Torch-Pruning peer of the benchmark: lands at the MAC target, runs, exports to ONNX."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

pytest.importorskip("torch_pruning")

from bench.peers.torch_pruning_vit import prune_with_torch_pruning
from xpdeploy.export.onnx_export import export_onnx
from xpdeploy.models.attention import plain_attention
from xpdeploy.models.complexity import count_gmacs

INPUT_SIZE = (3, 16, 16)


def _macs(model: nn.Module) -> float:
    return count_gmacs(model, INPUT_SIZE) * 1e9


@pytest.fixture(scope="module")
def pruned() -> tuple[nn.Module, nn.Module, dict, float]:
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=64,
                              depth=2, num_heads=2, num_classes=10).eval()
    batches = [(torch.randn(8, *INPUT_SIZE), torch.randint(0, 10, (8,))) for _ in range(2)]
    target = 0.5 * _macs(model)
    out, info = prune_with_torch_pruning(model, batches, target, _macs, input_size=INPUT_SIZE)
    return model, out, info, target


def test_lands_at_target(pruned) -> None:
    _, model, info, target = pruned
    macs = _macs(model)
    assert macs == pytest.approx(info["macs"])
    assert 0.9 * target <= macs <= target
    assert 0.0 < info["pruning_ratio"] < 1.0


def test_heads_kept_and_structure_reported(pruned) -> None:
    original, _, info, _ = pruned
    assert info["num_heads_per_block"] == [2, 2], "the default recipe keeps every head"
    assert len(info["head_dim_per_block"]) == len(info["mlp_per_block"]) == 2
    assert all(0 < d < 32 for d in info["head_dim_per_block"])
    assert all(0 < h < 256 for h in info["mlp_per_block"])
    assert info["embed_dim"] < 64, "the recipe also narrows the residual stream"
    assert all(p.grad is None for p in original.parameters()), "input model left clean"
    assert original.blocks[0].attn.qkv.out_features == 3 * 64, "input model not pruned"


def test_forward_fused_and_plain_agree(pruned) -> None:
    _, model, _, _ = pruned
    x = torch.randn(3, *INPUT_SIZE)
    with torch.no_grad():
        fused = model(x)
        with plain_attention(model):
            plain = model(x)
    assert fused.shape == (3, 10)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)


def test_onnx_export_matches_torch(pruned, tmp_path: Path) -> None:
    import onnxruntime as ort

    _, model, _, _ = pruned
    path = tmp_path / "tp.onnx"
    export_onnx(model, path, input_size=INPUT_SIZE, opset=17, trace_batch=2, dynamic_batch=True)
    x = torch.randn(3, *INPUT_SIZE)  # not the traced batch: the batch axis must be dynamic
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_already_under_target_is_a_no_op(pruned) -> None:
    original, _, _, _ = pruned
    batches = [(torch.randn(2, *INPUT_SIZE), torch.randint(0, 10, (2,)))]
    out, info = prune_with_torch_pruning(original, batches, _macs(original) * 1.01, _macs,
                                         input_size=INPUT_SIZE)
    assert out is original and info["pruning_ratio"] == 0.0


def test_clear_import_error_without_torch_pruning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # as if not installed
    model = nn.Linear(2, 2)
    with pytest.raises(ImportError, match="pip install torch-pruning"):
        prune_with_torch_pruning(model, [], 1.0, lambda m: 2.0)
