"""Swin: the ViT invariants hold for window attention (shifted and not, padded feature maps).

All-ones masks reproduce the logits, per-sample gates follow each image's windows, the physically
pruned model equals its hard-gated twin, costs what the planner predicted, rebuilds strictly from
arch.json + safetensors, and exports to ONNX that onnxruntime runs with the same logits.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import timm
import torch

from tests.conftest import TINY_SWIN
from xpdeploy.backends.ort_runner import OrtRunner
from xpdeploy.errors import PruneError
from xpdeploy.export.onnx_export import export_onnx
from xpdeploy.export.simplify import simplify_onnx
from xpdeploy.models.arch import describe_arch, rebuild_model, save_model
from xpdeploy.models.complexity import count_gmacs
from xpdeploy.models.unit_sites import gated_units, unit_sites
from xpdeploy.prune.mac_model import MacModel
from xpdeploy.prune.planner import PlanConstraints, plan_global
from xpdeploy.prune.surgery import hard_gates, prune_model
from xpdeploy.prune.unit_scores import KeepSets, UnitScores
from xpdeploy.xpruner.masks import ClassMasks, masked

NAME = TINY_SWIN["name"]
INPUT = (3, 16, 16)
SWIN: dict[str, Any] = TINY_SWIN["kwargs"]
# uneven: heads (1, 2, 2, 1 of 2, 2, 4, 4), MLP widths (32, 64, 3, 128 of 64, 64, 128, 128)
UNEVEN = KeepSets(
    heads=[np.array([1]), np.arange(2), np.array([0, 2]), np.array([3])],
    neurons=[np.arange(0, 64, 2), np.arange(64), np.array([1, 5, 7]), np.arange(128)],
)


def _create(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny Swin with non-trivial weights (timm's init leaves biases at 0 and tiny logits)."""
    torch.manual_seed(seed)
    model = timm.create_model(NAME, pretrained=False, **{**SWIN, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _pixels(batch: int = 4, size: tuple[int, int, int] = INPUT) -> torch.Tensor:
    return torch.from_numpy(
        np.random.default_rng(1).standard_normal((batch, *size)).astype(np.float32))


def _gated_logits(model: torch.nn.Module, keep: KeepSets, x: torch.Tensor,
                  size: tuple[int, int, int] = INPUT) -> torch.Tensor:
    heads, neurons = hard_gates(keep, MacModel.from_model(model, size))
    with gated_units(model, heads=heads, neurons=neurons), torch.inference_mode():
        return model(x)


def test_sites_cover_every_block_of_every_stage() -> None:
    model = _create()
    sites = unit_sites(model)
    assert [(s.index, s.stage, s.heads, s.head_dim, s.mlp_hidden) for s in sites] == [
        (0, 0, 2, 8, 64), (1, 0, 2, 8, 64), (2, 1, 4, 8, 128), (3, 1, 4, 8, 128)]
    assert model.layers[0].blocks[1].shift_size == (2, 2), "the fixture must shift windows"
    arch = describe_arch(model, NAME, SWIN)
    assert [(b.heads, b.head_dim, b.mlp_hidden) for b in arch.blocks] == [
        (2, 8, 64), (2, 8, 64), (4, 8, 128), (4, 8, 128)]


def test_all_ones_masks_reproduce_the_logits() -> None:
    model, x = _create(), _pixels()
    labels = torch.tensor([0, 3, 3, 9])
    masks = ClassMasks.for_model(model, num_classes=10)
    with torch.inference_mode():
        plain = model(x)
        with masked(model, masks, labels):
            gated = model(x)
    assert torch.equal(plain, gated)


def test_per_sample_gates_follow_each_images_windows() -> None:
    """Sample n's gate row must reach exactly sample n's windows (timm's window order is
    batch-major): the batch gated row by row equals each image gated alone."""
    model, x = _create(), _pixels(3)
    rng = np.random.default_rng(3)
    heads = [torch.from_numpy(rng.random((3, s.heads)).astype(np.float32))
             for s in unit_sites(model)]
    neurons = [torch.from_numpy(rng.random((3, s.mlp_hidden)).astype(np.float32))
               for s in unit_sites(model)]
    with gated_units(model, heads=heads.__getitem__, neurons=neurons.__getitem__), \
            torch.inference_mode():
        batch = model(x)
    for n in range(3):
        with gated_units(model, heads=lambda b, n=n: heads[b][n:n + 1],
                         neurons=lambda b, n=n: neurons[b][n:n + 1]), torch.inference_mode():
            alone = model(x[n:n + 1])
        torch.testing.assert_close(batch[n:n + 1], alone, rtol=0, atol=1e-6)


def test_pruned_equals_hard_gated_twin() -> None:
    model, x = _create(), _pixels()
    gated = _gated_logits(model, UNEVEN, x)
    table = model.layers[1].blocks[0].attn.relative_position_bias_table.detach().clone()
    pruned = prune_model(model, UNEVEN)
    with torch.inference_mode():
        out = pruned(x)
    assert (out - gated).abs().max().item() <= 1e-5
    attn = pruned.layers[1].blocks[0].attn
    assert type(attn).__name__ == "WindowAttention" and attn.num_heads == 2
    assert attn.scale == 8**-0.5 and attn.qkv.out_features == 3 * 2 * 8
    assert torch.equal(attn.relative_position_bias_table, table[:, [0, 2]])
    assert pruned.layers[0].blocks[1].mlp.fc1.out_features == 64, "a full block is untouched"


def test_planner_plan_round_trips_and_costs_what_it_predicted(tmp_path: Path) -> None:
    model, x = _create(seed=2), _pixels()
    macs = MacModel.from_model(model, INPUT)
    assert macs.original == pytest.approx(count_gmacs(model, INPUT) * 1e9, abs=1e-3)
    rng = np.random.default_rng(2)
    scores = UnitScores(heads=[rng.random(s.heads) for s in unit_sites(model)],
                        neurons=[rng.random(s.mlp_hidden) for s in unit_sites(model)])
    keep = plan_global(scores, macs, macs.original * 0.5, PlanConstraints())
    replayed = KeepSets.from_json(json.loads(json.dumps(keep.to_json())))
    gated = _gated_logits(model, replayed, x)
    pruned = prune_model(copy.deepcopy(model), replayed)
    with torch.inference_mode():
        assert (pruned(x) - gated).abs().max().item() <= 1e-5
    counted = count_gmacs(pruned, INPUT) * 1e9
    assert counted == pytest.approx(macs.macs(keep.head_counts, keep.mlp_widths), abs=1e-3)
    assert counted <= macs.original * 0.5 + 1e-3


def test_macs_are_exact_on_padded_feature_maps() -> None:
    """20 px / patch 2 = 10x10 tokens, cut into 4x4 windows: timm pads to 12x12, so attention
    runs on 9 windows (144 tokens) while the MLP sees 100; the model counts both exactly."""
    size = (3, 20, 20)
    model = _create(img_size=20)
    macs = MacModel.from_model(model, size)
    assert macs.original == pytest.approx(count_gmacs(model, size) * 1e9, abs=1e-3)
    pruned = prune_model(model, UNEVEN)
    assert count_gmacs(pruned, size) * 1e9 == pytest.approx(
        macs.macs(UNEVEN.head_counts, UNEVEN.mlp_widths), abs=1e-3)


def test_rebuild_from_arch_and_safetensors_is_strict(tmp_path: Path) -> None:
    pruned, x = prune_model(_create(), UNEVEN), _pixels()
    arch = describe_arch(pruned, NAME, SWIN)
    _, weights = save_model(pruned, arch, tmp_path)
    fresh = rebuild_model(arch, weights)
    with torch.inference_mode():
        assert torch.equal(fresh(x), pruned(x))
    assert describe_arch(fresh, NAME, SWIN) == arch


@pytest.mark.parametrize("dynamic_batch", [True, False])
def test_pruned_swin_exports_and_matches_in_onnxruntime(tmp_path: Path,
                                                        dynamic_batch: bool) -> None:
    model = prune_model(_create(), UNEVEN)
    path, sim = tmp_path / "pruned.onnx", tmp_path / "pruned.sim.onnx"
    export_onnx(model, path, input_size=INPUT, opset=17, trace_batch=4,
                dynamic_batch=dynamic_batch)
    simplify_onnx(path, sim)
    ops = {n.op_type for n in onnx.load(str(sim)).graph.node}
    assert "Softmax" in ops and not ops & {"Mod", "Pad", "Roll", "NonZero"}, ops
    x = _pixels(4)
    with torch.inference_mode():
        want = model(x).numpy()
    for f in (path, sim):
        with OrtRunner(f, threads=1) as ort:
            np.testing.assert_allclose(ort.infer(x.numpy()), want, atol=1e-4)


def test_swin_v2_attention_is_refused_with_a_reason() -> None:
    torch.manual_seed(0)
    model = timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=16,
                              patch_size=2, window_size=4, embed_dim=16, depths=(2, 2),
                              num_heads=(2, 4), num_classes=10)
    with pytest.raises(PruneError, match="SwinTransformer \\(v1\\)"):
        prune_model(model, UNEVEN)


def test_swin_tiny_costs_its_published_4_5_gmacs() -> None:
    """Full-size Swin-T (224 px, 7x7 windows, 4 stages): the planner's MAC model equals the counter
    and the figure papers quote for it (4.5 G)."""
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False).eval()
    macs = MacModel.from_model(model, (3, 224, 224))
    assert macs.original / 1e9 == pytest.approx(4.4906, abs=1e-4)
    assert len(macs.heads) == 12 and macs.heads[-1] == 24
