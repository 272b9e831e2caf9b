"""export/block_grid: every grid point is the real pruned block, runnable in onnxruntime."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch

from tests.conftest import TINY_MODEL, TINY_SWIN
from xpdeploy.export.block_grid import export_block_grid, validation_plans
from xpdeploy.latency.grid import TOKENS, BlockGrid
from xpdeploy.models.block_io import block_inputs, without_blocks
from xpdeploy.models.unit_sites import transformer_blocks


def _grid(arch: dict, folder: Path, step: int = 32) -> tuple[torch.nn.Module, BlockGrid]:
    torch.manual_seed(0)
    model = timm.create_model(arch["name"], **arch["kwargs"]).eval()
    grid = export_block_grid(model, (3, 16, 16), folder, arch_name=arch["name"],
                             arch_digest="d" * 64, mlp_step=step, validation_models=4, seed=0,
                             opset=17)
    return model, grid


def test_a_vit_grid_has_one_shape_and_every_point_runs(tmp_path: Path) -> None:
    model, grid = _grid(TINY_MODEL, tmp_path)
    # depth 2, 2 heads, MLP 128 every 32: one shape shared by both blocks, 2 x 4 points
    assert [s.blocks for s in grid.shapes] == [[0, 1]]
    shape = grid.shapes[0]
    assert sorted((p.heads, p.mlp) for p in shape.points) == [
        (h, m) for h in (1, 2) for m in (32, 64, 96, 128)]
    assert shape.input_shape == [17, 32]  # 16 patches + the class token, width 32
    assert BlockGrid.read(tmp_path / "grid.json") == grid
    tokens = np.random.default_rng(0).standard_normal((3, 17, 32)).astype(np.float32)
    for point in shape.points:
        session = ort.InferenceSession(str(tmp_path / point.file))
        out = session.run(None, {TOKENS: tokens})[0]
        assert out.shape == (3, 17, 32)  # dynamic batch: traced at 2, run at 3
    # The full point is the block itself: same output as torch.
    block = transformer_blocks(model)[0][1]
    full = ort.InferenceSession(str(tmp_path / shape.reference().file))
    with torch.no_grad():
        want = block(torch.from_numpy(tokens)).numpy()
    assert np.allclose(full.run(None, {TOKENS: tokens})[0], want, atol=1e-5)
    # The stem is the model without blocks, the smallest every block at its smallest point.
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        stem_want = without_blocks(model)(torch.from_numpy(x)).numpy()
    stem = ort.InferenceSession(str(tmp_path / grid.stem.file))
    assert np.allclose(stem.run(None, {"pixels": x})[0], stem_want, atol=1e-5)
    assert (grid.smallest.heads, grid.smallest.mlp) == ([1, 1], [32, 32])
    assert len(grid.validation) == 4 and len(grid.files()) == 8 + 3 + 4
    assert all((tmp_path / f).is_file() for f in grid.files())
    assert not list(tmp_path.rglob("*.raw.onnx"))  # the unsimplified exports are removed


def test_a_swin_grid_has_a_shape_per_stage_and_shift(tmp_path: Path) -> None:
    _, grid = _grid(TINY_SWIN, tmp_path, step=64)
    # Two stages of two blocks (unshifted, shifted); the last stage's 4x4 map is one window, so
    # timm turns its shift off and both its blocks share a shape.
    assert sorted(s.blocks for s in grid.shapes) == [[0], [1], [2, 3]]
    model = timm.create_model(TINY_SWIN["name"], **TINY_SWIN["kwargs"]).eval()
    with torch.no_grad():
        _, inputs = block_inputs(model, torch.zeros(1, 3, 16, 16))
    for shape in grid.shapes:
        assert shape.input_shape == list(inputs[shape.blocks[0]].shape[1:])
        x = np.zeros((1, *shape.input_shape), dtype=np.float32)
        for point in shape.points:
            ort.InferenceSession(str(tmp_path / point.file)).run(None, {TOKENS: x})


def test_validation_plans_differ_and_stay_on_the_grid() -> None:
    plans = validation_plans([3] * 6, [768] * 6, 5, 8, seed=0)
    assert len({(tuple(h), tuple(m)) for h, m in plans}) == 5
    assert plans[1] == ([2] * 6, [384] * 6)  # the uniform half
    for heads, mlp in plans:
        assert all(1 <= h <= 3 for h in heads)
        assert all(m % 8 == 0 and 8 <= m <= 768 for m in mlp)


def test_the_model_is_not_changed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model(TINY_MODEL["name"], **TINY_MODEL["kwargs"]).eval()
    before = copy.deepcopy(model.state_dict())
    export_block_grid(model, (3, 16, 16), tmp_path, arch_name="t", arch_digest="d",
                      mlp_step=64, validation_models=0, seed=0, opset=17)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("count", [0, 2])
def test_fewer_validation_models_than_the_uniform_cuts(count: int) -> None:
    assert len(validation_plans([2, 2], [64, 64], count, 16, seed=0)) == count
