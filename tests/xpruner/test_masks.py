"""Class masks: exact identity at 1.0, untouched state_dict, label / soft-label rows, scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import TINY_MODEL
from xpdeploy.models.factory import create_model
from xpdeploy.models.unit_sites import gated_units
from xpdeploy.spec import ModelConfig
from xpdeploy.xpruner.masks import ClassMasks, MaskedModel, coverage_scores, masked, scores

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(ModelConfig(**TINY_MODEL)).eval()


def _batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def _randomize(masks: ClassMasks, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in masks.tables():
            t.copy_(torch.randn(t.shape, generator=g))


def test_shapes_follow_the_model(model: torch.nn.Module) -> None:
    masks = ClassMasks.for_model(model, NUM_CLASSES)
    assert masks.num_blocks == 2
    assert masks.head_counts == [2, 2] and masks.mlp_widths == [128, 128]
    for t in masks.tables():
        assert t.dtype == torch.float32 and t.shape[0] == NUM_CLASSES
        assert torch.equal(t, torch.ones_like(t)) and t.requires_grad


def test_all_ones_masks_reproduce_the_logits_exactly(model: torch.nn.Module) -> None:
    x, y = _batch()
    masks = ClassMasks.for_model(model, NUM_CLASSES)
    with torch.no_grad():
        plain = model(x)
        gated = MaskedModel(model, masks)(x, y)
        soft = MaskedModel(model, masks)(x, torch.full((len(y), NUM_CLASSES), 0.1))
    assert torch.equal(plain, gated)
    assert torch.allclose(plain, soft, atol=1e-6, rtol=0)  # 10 x 0.1 sums to 1 up to rounding


def test_masks_leave_the_models_state_dict_alone(model: torch.nn.Module) -> None:
    keys = list(model.state_dict())
    names = [n for n, _ in model.named_parameters()]
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}
    masks = ClassMasks.for_model(model, NUM_CLASSES)
    wrapper = MaskedModel(model, masks)
    x, y = _batch()
    with masked(model, masks, y):
        assert list(model.state_dict()) == keys
        assert [n for n, _ in model.named_parameters()] == names
        result = model.load_state_dict(checkpoint)
        assert result.missing_keys == [] and result.unexpected_keys == []
        model(x)
    result = wrapper.model.load_state_dict(checkpoint)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert not any("mask" in k for k in model.state_dict())
    # hooks are gone after the block: the plain model is the plain model again
    _randomize(masks)
    with torch.no_grad():
        assert torch.equal(model(x), create_model_copy(model, checkpoint)(x))


def create_model_copy(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    copy = create_model(ModelConfig(**TINY_MODEL)).eval()
    copy.load_state_dict(state)
    return copy


def test_each_sample_uses_its_labels_row(model: torch.nn.Module) -> None:
    masks = ClassMasks.for_model(model, NUM_CLASSES)
    _randomize(masks)
    x, y = _batch()
    with torch.no_grad():
        batched = MaskedModel(model, masks)(x, y)
        for i in range(len(y)):
            c = int(y[i])
            with gated_units(model, heads=lambda b, c=c: masks.heads[b][c],
                             neurons=lambda b, c=c: masks.neurons[b][c]):
                alone = model(x[i : i + 1])
            torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(batched, model(x), atol=1e-3)


def test_soft_labels_mix_rows(model: torch.nn.Module) -> None:
    masks = ClassMasks.for_model(model, NUM_CLASSES)
    _randomize(masks)
    x, y = _batch()
    one_hot = torch.nn.functional.one_hot(y, NUM_CLASSES).float()
    with torch.no_grad():
        hard = MaskedModel(model, masks)(x, y)
        soft = MaskedModel(model, masks)(x, one_hot)
    assert torch.equal(hard, soft)

    mix = 0.3 * one_hot + 0.7 * torch.nn.functional.one_hot((y + 1) % NUM_CLASSES, NUM_CLASSES)
    heads, neurons = masks.rows(mix)
    for b in range(masks.num_blocks):
        want_h = 0.3 * masks.heads[b][y] + 0.7 * masks.heads[b][(y + 1) % NUM_CLASSES]
        want_n = 0.3 * masks.neurons[b][y] + 0.7 * masks.neurons[b][(y + 1) % NUM_CLASSES]
        torch.testing.assert_close(heads[b], want_h)
        torch.testing.assert_close(neurons[b], want_n)


def test_gradients_reach_only_the_rows_of_the_batchs_classes(model: torch.nn.Module) -> None:
    masks = ClassMasks.for_model(model, NUM_CLASSES)
    x, _ = _batch(4)
    y = torch.tensor([1, 1, 4, 4])
    MaskedModel(model, masks)(x, y).logsumexp(1).sum().backward()
    for t in masks.tables():
        touched = (t.grad.abs().sum(1) > 0).nonzero().flatten().tolist()
        assert touched == [1, 4]


def test_bad_targets_are_refused(model: torch.nn.Module) -> None:
    masks = ClassMasks.for_model(model, NUM_CLASSES)
    with pytest.raises(ValueError, match="soft targets"):
        masks.rows(torch.zeros(3, NUM_CLASSES + 1))
    with pytest.raises(ValueError, match="integer"):
        masks.rows(torch.zeros(3))


def test_scores_are_sums_of_absolute_values() -> None:
    masks = ClassMasks(3, head_counts=[2], mlp_widths=[3])
    with torch.no_grad():
        masks.heads[0].copy_(torch.tensor([[1.0, -2.0], [0.5, 0.0], [-1.5, 1.0]]))
        masks.neurons[0].copy_(torch.tensor([[0.0, 1.0, -1.0], [0.0, 1.0, 2.0], [0.0, -1.0, 3.0]]))
    s = scores(masks)
    np.testing.assert_allclose(s.heads[0], [3.0, 3.0])
    np.testing.assert_allclose(s.neurons[0], [0.0, 3.0, 6.0])
    assert s.heads[0].dtype == np.float64


def test_coverage_keeps_each_classs_best_unit_before_the_largest_sum() -> None:
    """Unit 0 is the only unit class 0 relies on but small for the others; units 1 and 2 have
    larger sums. The sum drops unit 0 first; coverage keeps it (class 0's best) and cuts unit 2,
    which is no class's first choice and has the smaller sum of the two."""
    masks = ClassMasks(3, head_counts=[1], mlp_widths=[4])
    with torch.no_grad():
        masks.neurons[0].copy_(torch.tensor([[2.0, 0.1, 0.5, 0.0],
                                             [0.0, 3.0, 2.0, 0.1],
                                             [0.1, 2.5, 2.4, 0.0]]))
    by_sum = scores(masks).keep_top([1], [2])
    by_coverage = coverage_scores(masks).keep_top([1], [2])
    assert by_sum.neurons[0].tolist() == [1, 2]
    assert by_coverage.neurons[0].tolist() == [0, 1]
    key = coverage_scores(masks).neurons[0]
    assert key[1] > key[0] > key[2] > key[3]  # both firsts, then the larger sum breaks ties
    assert key.dtype == np.float64
