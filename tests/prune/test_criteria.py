"""Baseline criteria: magnitude, taylor and random scores on a tiny ViT (CPU, under a second)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from tests.conftest import TINY_SWIN
from xpdeploy.errors import PruneError
from xpdeploy.models.unit_sites import unit_sites
from xpdeploy.prune.criteria import (
    CRITERIA,
    hybrid_scores,
    magnitude_scores,
    random_scores,
    taylor_scores,
)
from xpdeploy.prune.unit_scores import UnitScores
from xpdeploy.spec import PruneConfig


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32,
                             depth=2, num_heads=4, num_classes=10).eval()


def _batches(n: int = 24, batch: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def _shapes_match(scores, model) -> None:
    sites = unit_sites(model)
    assert [t.shape for t in scores.heads] == [(s.heads,) for s in sites]
    assert [t.shape for t in scores.neurons] == [(s.mlp_hidden,) for s in sites]


def test_criteria_names_match_the_config_choices() -> None:
    assert set(CRITERIA) == set(PruneConfig.model_fields["criterion"].annotation.__args__)


def test_magnitude_is_the_l1_norm_of_the_unit_weights() -> None:
    model = _model()
    scores = magnitude_scores(model)
    _shapes_match(scores, model)
    attn, mlp = model.blocks[1].attn, model.blocks[1].mlp
    hd, dim = attn.head_dim, attn.num_heads * attn.head_dim
    h = 2
    rows = torch.cat([torch.arange(j * dim + h * hd, j * dim + (h + 1) * hd) for j in range(3)])
    with torch.no_grad():
        want = (attn.qkv.weight[rows].abs().sum()
                + attn.proj.weight[:, h * hd:(h + 1) * hd].abs().sum())
    assert scores.heads[1][h] == pytest.approx(float(want), rel=1e-6)
    j = 17
    with torch.no_grad():
        want_n = mlp.fc1.weight[j].abs().sum() + mlp.fc2.weight[:, j].abs().sum()
    assert scores.neurons[1][j] == pytest.approx(float(want_n), rel=1e-6)


def test_magnitude_of_a_zeroed_head_is_zero_and_lowest() -> None:
    model = _model()
    attn = model.blocks[0].attn
    hd, dim, h = attn.head_dim, attn.num_heads * attn.head_dim, 1
    with torch.no_grad():
        for j in range(3):  # its q, k and v rows ...
            attn.qkv.weight[j * dim + h * hd:j * dim + (h + 1) * hd] = 0
        attn.proj.weight[:, h * hd:(h + 1) * hd] = 0  # ... and its proj columns
    scores = magnitude_scores(model)
    assert scores.heads[0][h] == 0.0
    assert int(np.argmin(scores.heads[0])) == h
    assert np.all(np.delete(scores.heads[0], h) > 0)


def test_taylor_scores_are_finite_non_negative_and_leave_the_model_alone() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    scores = taylor_scores(model, _batches(), max_images=24)
    _shapes_match(scores, model)
    for t in [*scores.heads, *scores.neurons]:
        assert np.all(np.isfinite(t)) and np.all(t >= 0)
        assert t.max() > 0
    assert model.training  # mode restored
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
    again = taylor_scores(model, _batches(), max_images=24)
    for a, b in zip([*scores.heads, *scores.neurons], [*again.heads, *again.neurons], strict=True):
        np.testing.assert_array_equal(a, b)


def test_taylor_neuron_with_zero_fc2_column_scores_zero() -> None:
    # dL/dgate_j = sum over tokens of a_j * (fc2.weight[:, j] . dL/dout): zero when the column is.
    model = _model()
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight[:, 5] = 0
    scores = taylor_scores(model, _batches(), max_images=24)
    assert scores.neurons[1][5] == 0.0
    assert np.delete(scores.neurons[1], 5).min() > 0


def test_taylor_is_per_sample_and_equals_activation_times_gradient() -> None:
    model = _model()
    (x, y), = _batches(n=4, batch=4)
    batch = taylor_scores(model, [(x, y)], max_images=4)
    singles = [taylor_scores(model, [(x[i:i + 1], y[i:i + 1])], max_images=1) for i in range(4)]
    # |grad| accumulates per sample (a batch-level gate would give |sum| instead of sum |.|).
    want = np.mean([s.neurons[0] for s in singles], axis=0)
    np.testing.assert_allclose(batch.neurons[0], want, rtol=1e-4, atol=1e-9)

    # one image: |sum over tokens and channels of activation x gradient| at fc2's input
    saved = {}
    fc2 = model.blocks[0].mlp.fc2

    def keep_input(_m, args):
        args[0].retain_grad()
        saved["a"] = args[0]

    handle = fc2.register_forward_pre_hook(keep_input)
    try:
        torch.nn.functional.cross_entropy(model(x[:1]), y[:1], reduction="sum").backward()
    finally:
        handle.remove()
    a = saved["a"]
    manual = (a * a.grad).sum(dim=(0, 1)).abs().detach().numpy()
    np.testing.assert_allclose(singles[0].neurons[0], manual, rtol=1e-4, atol=1e-8)


def test_taylor_stops_after_max_images() -> None:
    model = _model()
    batches = _batches(n=24, batch=8)
    capped = taylor_scores(model, batches, max_images=12)
    x = torch.cat([b[0] for b in batches])[:12]
    y = torch.cat([b[1] for b in batches])[:12]
    whole = taylor_scores(model, [(x, y)], max_images=12)
    for a, b in zip([*capped.heads, *capped.neurons], [*whole.heads, *whole.neurons], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
    with pytest.raises(PruneError, match="no images"):
        taylor_scores(model, [], max_images=12)


def test_random_scores_are_seeded() -> None:
    a = random_scores([4, 4], [128, 64], seed=3)
    b = random_scores([4, 4], [128, 64], seed=3)
    c = random_scores([4, 4], [128, 64], seed=4)
    assert [t.shape for t in a.heads] == [(4,), (4,)]
    assert [t.shape for t in a.neurons] == [(128,), (64,)]
    for x, y in zip([*a.heads, *a.neurons], [*b.heads, *b.neurons], strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.neurons[0], c.neurons[0])
    assert all(np.all((t >= 0) & (t < 1)) for t in [*a.heads, *a.neurons])


def test_swin_taylor_scores_are_per_image_whatever_the_batch() -> None:
    """In a Swin, each image's attention runs as several windows: its per-sample gate must get the
    gradient of its own windows only, so scores from batches of 8 equal those from single images."""
    torch.manual_seed(0)
    model = timm.create_model(TINY_SWIN["name"], **TINY_SWIN["kwargs"]).eval()
    batched = taylor_scores(model, _batches(16, 8), max_images=16)
    single = taylor_scores(model, _batches(16, 1), max_images=16)
    _shapes_match(batched, model)
    for a, b in zip(batched.heads + batched.neurons, single.heads + single.neurons, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)
    assert all(t.max() > 0 for t in batched.heads + batched.neurons)
    _shapes_match(magnitude_scores(model), model)


def test_hybrid_is_the_geometric_mean_of_type_normalised_scores() -> None:
    """A unit one criterion calls useless ranks last whatever the other says; scaling either
    criterion changes nothing; heads and neurons are normalised apart."""
    a = UnitScores(heads=[np.array([1.0, 2.0, 3.0])], neurons=[np.array([10.0, 0.0, 20.0, 10.0])])
    b = UnitScores(heads=[np.array([3.0, 2.0, 1.0])], neurons=[np.array([5.0, 100.0, 5.0, 5.0])])
    h = hybrid_scores(a, b)
    expected = np.sqrt(np.array([1, 2, 3]) / 2 * np.array([3, 2, 1]) / 2)  # means: 2 and 2
    np.testing.assert_allclose(h.heads[0], expected)
    assert int(np.argmin(h.neurons[0])) == 1  # zero mask score: last, despite Taylor's 100
    scaled = hybrid_scores(UnitScores(heads=[t * 7 for t in a.heads],
                                      neurons=[t * 1e-3 for t in a.neurons]), b)
    for x, y in zip(scaled.heads + scaled.neurons, h.heads + h.neurons, strict=True):
        np.testing.assert_allclose(x, y)
    with pytest.raises(ValueError):
        hybrid_scores(a, UnitScores(heads=[np.ones(3), np.ones(3)], neurons=[np.ones(4)] * 2))
