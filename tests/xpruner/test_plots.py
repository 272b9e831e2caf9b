"""Mask plots: valid PNGs written atomically, figures closed, odd inputs still drawn."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xpdeploy.xpruner.masks import ClassMasks, scores
from xpdeploy.xpruner.plots import plot_class_unit_heatmaps, plot_curve, plot_scores

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _masks(num_classes: int = 10, negative: bool = False) -> ClassMasks:
    masks = ClassMasks(num_classes, head_counts=[3, 2], mlp_widths=[16, 8])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in masks.tables():
            t.copy_(torch.rand(t.shape, generator=g) - (0.5 if negative else 0.0))
    return masks


def _check_png(path: Path) -> None:
    import matplotlib.pyplot as plt

    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    assert plt.get_fignums() == []


@pytest.mark.parametrize(("num_classes", "negative"), [(10, False), (3, True), (50, False)])
def test_heatmaps(tmp_path: Path, num_classes: int, negative: bool) -> None:
    path = tmp_path / "heat" / "masks.png"
    names = [f"class {i}" for i in range(num_classes)]
    plot_class_unit_heatmaps(_masks(num_classes, negative), path, names)
    _check_png(path)


def test_heatmaps_refuse_wrong_class_names(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    with pytest.raises(ValueError, match="class names"):
        plot_class_unit_heatmaps(_masks(), tmp_path / "x.png", ["a", "b"])
    assert not (tmp_path / "x.png").exists() and plt.get_fignums() == []


def test_scores_plot(tmp_path: Path) -> None:
    path = tmp_path / "scores" / "scores.png"
    plot_scores(scores(_masks()), path)
    _check_png(path)


def test_curve(tmp_path: Path) -> None:
    history = [
        {"epoch": 1, "loss": 3.0, "ce": 2.3, "sparsity": 200.0, "smoothness": 0.0,
         "moved_heads": 1.0, "moved_neurons": 0.9},
        {"epoch": 2, "loss": 2.5, "ce": 2.1, "sparsity": 150.0, "smoothness": 4.0,
         "moved_heads": 0.2, "moved_neurons": 0.03},
    ]
    path = tmp_path / "curve" / "curve.png"
    plot_curve(history, path)
    _check_png(path)
    empty = tmp_path / "empty" / "curve.png"
    plot_curve([], empty)
    _check_png(empty)
