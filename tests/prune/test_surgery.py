"""Surgery: the physically pruned model equals its hard-gated twin, costs what the planner said,
rebuilds from arch.json + safetensors, and exports to ONNX with uneven heads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import timm
import torch
from safetensors.torch import load_file

from xpdeploy.backends.ort_runner import OrtRunner
from xpdeploy.errors import PruneError
from xpdeploy.export.onnx_export import export_onnx
from xpdeploy.models.arch import describe_arch, save_model
from xpdeploy.models.block_shapes import apply_block_shapes
from xpdeploy.models.complexity import count_gmacs
from xpdeploy.models.unit_sites import gated_units
from xpdeploy.prune.mac_model import MacModel
from xpdeploy.prune.planner import PlanConstraints, plan_global
from xpdeploy.prune.surgery import hard_gates, prune_model
from xpdeploy.prune.unit_scores import KeepSets, UnitScores

INPUT = (3, 16, 16)
BASE: dict[str, Any] = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 3,
                        "num_heads": 4, "num_classes": 10}  # head_dim 8, MLP 128
MODELS = {
    "deit": ("deit_tiny_patch16_224", BASE),
    "distilled": ("deit_tiny_distilled_patch16_224", BASE),
    "vit_qknorm": ("vit_tiny_patch16_224", {**BASE, "qk_norm": True}),
}
# uneven heads (2, 1, 4 of 4), MLP widths (40, 8, 128 of 128); block 2 untouched
UNEVEN = KeepSets(
    heads=[np.array([1, 3]), np.array([2]), np.arange(4)],
    neurons=[np.sort(np.random.default_rng(0).choice(128, 40, replace=False)),
             np.array([3, 9, 17, 30, 64, 100, 101, 127]), np.arange(128)],
)


def _create(key: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model with non-trivial weights (timm's init leaves biases at 0 and tiny logits)."""
    name, kwargs = MODELS[key]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _pixels(batch: int = 4) -> torch.Tensor:
    return torch.from_numpy(
        np.random.default_rng(1).standard_normal((batch, *INPUT)).astype(np.float32))


def _gated_logits(model: torch.nn.Module, keep: KeepSets, x: torch.Tensor) -> torch.Tensor:
    heads, neurons = hard_gates(keep, MacModel.from_model(model, INPUT))
    with gated_units(model, heads=heads, neurons=neurons), torch.inference_mode():
        return model(x)


@pytest.mark.parametrize("key", list(MODELS))
def test_pruned_equals_hard_gated_twin(key: str) -> None:
    model, x = _create(key), _pixels()
    gated = _gated_logits(model, UNEVEN, x)
    pruned = prune_model(model, UNEVEN)
    with torch.inference_mode():
        out = pruned(x)
    assert out.shape == (4, 10), "eval keeps the timm head semantics (distilled: mean of heads)"
    assert (out - gated).abs().max().item() <= 1e-5
    blocks = describe_arch(pruned, MODELS[key][0], MODELS[key][1]).blocks
    assert [(b.heads, b.head_dim, b.mlp_hidden) for b in blocks] == [
        (2, 8, 40), (1, 8, 8), (4, 8, 128)]
    attn = pruned.blocks[0].attn
    assert attn.scale == 8**-0.5 and attn.qkv.out_features == 3 * 2 * 8
    assert attn.fused_attn == pruned.blocks[2].attn.fused_attn


def test_pruned_equals_gated_with_plain_attention_and_planner_plan() -> None:
    model, x = _create("deit", seed=2), _pixels()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    macs = MacModel.from_model(model, INPUT)
    rng = np.random.default_rng(2)
    scores = UnitScores(heads=[rng.random(4) for _ in range(3)],
                        neurons=[rng.random(128) for _ in range(3)])
    keep = plan_global(scores, macs, macs.original * 0.5, PlanConstraints())
    gated = _gated_logits(model, keep, x)
    with torch.inference_mode():
        out = prune_model(model, keep)(x)
    assert (out - gated).abs().max().item() <= 1e-5
    assert all(not b.attn.fused_attn for b in model.blocks)


@pytest.mark.parametrize("key", ["deit", "distilled"])
def test_predicted_macs_equal_counted(key: str) -> None:
    model = _create(key)
    macs = MacModel.from_model(model, INPUT)
    pruned = prune_model(model, UNEVEN)
    counted = count_gmacs(pruned, INPUT) * 1e9
    predicted = macs.macs(UNEVEN.head_counts, UNEVEN.mlp_widths)
    assert round(counted) == predicted and abs(counted - predicted) < 1e-3


@pytest.mark.parametrize("key", ["distilled", "vit_qknorm"])
def test_rebuild_from_arch_and_safetensors(key: str, tmp_path: Path) -> None:
    name, kwargs = MODELS[key]
    pruned, x = prune_model(_create(key), UNEVEN), _pixels()
    arch = describe_arch(pruned, name, kwargs)
    _, weights = save_model(pruned, arch, tmp_path)
    fresh = timm.create_model(name, pretrained=False, **arch.kwargs)
    apply_block_shapes(fresh, arch.blocks)
    fresh.load_state_dict(load_file(str(weights)), strict=True)
    fresh.eval()
    with torch.inference_mode():
        assert torch.equal(fresh(x), pruned(x))
    assert describe_arch(fresh, name, kwargs) == arch


def test_apply_block_shapes_is_a_no_op_at_the_same_shape() -> None:
    model = _create("deit")
    modules = [(b.attn, b.mlp.fc1, b.mlp.fc2) for b in model.blocks]
    apply_block_shapes(model, describe_arch(model, *MODELS["deit"]).blocks)
    assert modules == [(b.attn, b.mlp.fc1, b.mlp.fc2) for b in model.blocks]


def test_extreme_plan_runs_and_matches() -> None:
    keep = KeepSets(heads=[np.array([0]), np.array([3]), np.arange(4)],
                    neurons=[np.arange(128), np.arange(120, 128), np.arange(0, 128, 16)])
    model, x = _create("distilled"), _pixels(3)
    gated = _gated_logits(model, keep, x)
    with torch.inference_mode():
        out = prune_model(model, keep)(x)
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    assert (out - gated).abs().max().item() <= 1e-5


def test_uneven_heads_export_to_onnx(tmp_path: Path) -> None:
    model = prune_model(_create("distilled"), UNEVEN)
    path = tmp_path / "pruned.onnx"
    export_onnx(model, path, input_size=INPUT, opset=17, trace_batch=2, dynamic_batch=True)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Attention" not in ops and "Softmax" in ops
    x = _pixels(5)
    with OrtRunner(path, threads=1) as ort, torch.inference_mode():
        np.testing.assert_allclose(ort.infer(x.numpy()), model(x).numpy(), atol=1e-4)


def test_hard_gates_accept_shapes_and_counts() -> None:
    model = _create("deit")
    arch = describe_arch(model, *MODELS["deit"])
    for src in (MacModel.from_model(model, INPUT), arch, arch.blocks, ([4] * 3, [128] * 3)):
        heads, neurons = hard_gates(UNEVEN, src)
        assert heads(0).tolist() == [0.0, 1.0, 0.0, 1.0]
        assert neurons(1).sum().item() == 8 and neurons(2).sum().item() == 128


def test_training_state_and_grad_flags_are_kept() -> None:
    model = _create("deit").train()
    model.blocks[0].mlp.fc1.weight.requires_grad_(False)
    prune_model(model, UNEVEN)
    assert model.blocks[0].attn.training and model.blocks[0].mlp.fc1.training
    assert not model.blocks[0].mlp.fc1.weight.requires_grad
    assert model.blocks[0].mlp.fc1.bias.requires_grad


def test_plan_that_does_not_fit_raises() -> None:
    model = _create("deit")
    with pytest.raises(PruneError, match="blocks"):
        prune_model(model, KeepSets(heads=UNEVEN.heads[:2], neurons=UNEVEN.neurons[:2]))
    bad = KeepSets(heads=[np.array([0, 4]), *UNEVEN.heads[1:]], neurons=UNEVEN.neurons)
    with pytest.raises(PruneError, match=r"\[0, 4\)"):
        prune_model(model, bad)
    empty = KeepSets(heads=[np.array([], dtype=np.int64), *UNEVEN.heads[1:]],
                     neurons=UNEVEN.neurons)
    with pytest.raises(PruneError, match="keeps no heads"):
        prune_model(model, empty)
    shapes = describe_arch(model, *MODELS["deit"]).blocks
    with pytest.raises(PruneError, match="head_dim"):
        apply_block_shapes(model, [shapes[0].model_copy(update={"head_dim": 4}), *shapes[1:]])


def test_mlp_norm_is_unsupported() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, scale_mlp_norm=True,
                              **BASE)
    with pytest.raises(PruneError, match="MLP has a norm"):
        prune_model(model, UNEVEN)
