"""prune/unit_scores: the criterion's within-block order and the best units at given counts."""

from __future__ import annotations

import numpy as np

from xpdeploy.prune.unit_scores import UnitScores


def test_keep_top_keeps_the_counts_and_the_best_units() -> None:
    scores = UnitScores(heads=[np.array([0.1, 0.9, 0.5]), np.array([3.0, 1.0, 2.0])],
                        neurons=[np.array([4.0, 1.0, 3.0, 2.0]), np.array([0.0, 5.0])])
    keep = scores.keep_top([2, 1], [3, 1])
    assert keep.head_counts == [2, 1] and keep.mlp_widths == [3, 1]
    assert [h.tolist() for h in keep.heads] == [[1, 2], [0]]
    assert [n.tolist() for n in keep.neurons] == [[0, 2, 3], [1]]


def test_best_first_breaks_ties_by_the_lower_index() -> None:
    scores = UnitScores(heads=[np.array([1.0, 2.0, 1.0])], neurons=[np.array([0.0, 0.0])])
    heads, neurons = scores.best_first()
    assert heads[0].tolist() == [1, 0, 2] and neurons[0].tolist() == [0, 1]
