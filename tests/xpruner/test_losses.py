"""Sparsity and smoothness penalties on hand-made tables: sum over units, mean over classes."""

from __future__ import annotations

import pytest
import torch

from xpdeploy.xpruner.losses import smoothness_loss, sparsity_loss
from xpdeploy.xpruner.masks import ClassMasks

# Two tables: (C=2, 2 units) and (C=2, 1 unit).
T1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
T2 = torch.tensor([[1.0], [-1.0]])


def test_sparsity_l2_and_l1() -> None:
    assert float(sparsity_loss([T1, T2], "l2")) == pytest.approx((1 + 4 + 9 + 16) / 2 + 2 / 2)
    assert float(sparsity_loss([T1, T2], "l1")) == pytest.approx(10 / 2 + 2 / 2)


def test_sparsity_is_a_mean_over_classes_not_over_elements() -> None:
    # Repeating every class row leaves the penalty unchanged (mean over classes) ...
    assert float(sparsity_loss([torch.cat([T1, T1])])) == pytest.approx(float(sparsity_loss([T1])))
    # ... while doubling the units doubles it (sum over units).
    assert float(sparsity_loss([torch.cat([T1, T1], 1)])) == pytest.approx(
        2 * float(sparsity_loss([T1]))
    )


def test_all_ones_masks_cost_one_per_unit() -> None:
    masks = ClassMasks(5, head_counts=[3, 2], mlp_widths=[8, 4]).requires_grad_(False)
    assert float(sparsity_loss(masks, "l2")) == pytest.approx(3 + 2 + 8 + 4)
    assert float(sparsity_loss(masks, "l1")) == pytest.approx(3 + 2 + 8 + 4)
    assert float(smoothness_loss(masks, "class_tv")) == 0.0
    assert float(smoothness_loss(masks, "unit_tv")) == 0.0


def test_smoothness_variants() -> None:
    # class_tv: T1 |3-1| + |4-2| = 4, /2 = 2; T2 |-1-1| = 2, /2 = 1.
    assert float(smoothness_loss([T1, T2], "class_tv")) == pytest.approx(3.0)
    # unit_tv: T1 |2-1| + |4-3| = 2, /2 = 1; T2 has one unit: 0.
    assert float(smoothness_loss([T1, T2], "unit_tv")) == pytest.approx(1.0)
    assert float(smoothness_loss([T1, T2], "none")) == 0.0


def test_penalties_have_gradients_on_the_masks() -> None:
    masks = ClassMasks(4, head_counts=[2], mlp_widths=[3])
    with torch.no_grad():
        masks.heads[0][1, 0] = 2.0
    (sparsity_loss(masks) + smoothness_loss(masks)).backward()
    g = masks.heads[0].grad
    assert g is not None
    # d/dM of M^2 / C = 2M / C, plus the class-TV subgradient around the raised entry
    assert float(g[0, 1]) == pytest.approx(2 / 4)
    assert float(g[1, 0]) == pytest.approx(2 * 2 / 4 + 2 / 4)


def test_unknown_kinds_are_refused() -> None:
    with pytest.raises(ValueError, match="sparsity"):
        sparsity_loss([T1], "l3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="smoothness"):
        smoothness_loss([T1], "tv")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes, units"):
        sparsity_loss([torch.ones(3)])


def test_entries_normalisation_is_a_mean_over_every_entry() -> None:
    masks = ClassMasks(5, head_counts=[3, 2], mlp_widths=[8, 4]).requires_grad_(False)
    assert float(sparsity_loss(masks, "l2", "entries")) == pytest.approx(1.0)
    # T1, T2: (30 / 2 + 2 / 2) / 3 units; class_tv 3.0 / 3 units.
    assert float(sparsity_loss([T1, T2], "l2", "entries")) == pytest.approx(16 / 3)
    assert float(smoothness_loss([T1, T2], "class_tv", "entries")) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="'units' or 'entries'"):
        sparsity_loss([T1], "l2", "classes")  # type: ignore[arg-type]
