"""bench/plan_swap.py: another criterion's units inside a plan's per-block budget."""

from __future__ import annotations

import numpy as np

from bench.plan_swap import choose
from xpdeploy.prune.units import KeepSets, UnitScores


def test_choose_keeps_the_budget_counts_and_the_best_units() -> None:
    budget = KeepSets(heads=[np.array([0, 1]), np.array([2])],
                      neurons=[np.array([0, 1, 2]), np.array([0])])
    scores = UnitScores(heads=[np.array([0.1, 0.9, 0.5]), np.array([3.0, 1.0, 2.0])],
                        neurons=[np.array([4.0, 1.0, 3.0, 2.0]), np.array([0.0, 5.0])])
    keep = choose(scores, budget)
    assert keep.head_counts == budget.head_counts and keep.mlp_widths == budget.mlp_widths
    assert [h.tolist() for h in keep.heads] == [[1, 2], [0]]
    assert [n.tolist() for n in keep.neurons] == [[0, 2, 3], [1]]
