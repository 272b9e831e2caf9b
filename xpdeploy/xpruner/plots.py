"""PNG plots of learned masks: class x unit heatmaps, score distributions, the training curve.

The heatmaps are the "explainable" part of X-Pruner: row c of a block's table says how much each
head / neuron contributes to predicting class c. Drawn through :mod:`xpdeploy.figures` (Agg backend,
atomic PNG).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from xpdeploy.figures import figure

if TYPE_CHECKING:
    from xpdeploy.prune.unit_scores import UnitScores
    from xpdeploy.xpruner.masks import ClassMasks

#: Above this many classes the y axis shows a subset of class names (they would overlap).
MAX_CLASS_TICKS = 20


def plot_class_unit_heatmaps(
    masks: ClassMasks, path: str | os.PathLike[str], class_names: Sequence[str] | None = None
) -> None:
    """Write a grid of class x unit heatmaps of the mask values: one row per block, heads | neurons.

    All panels share one colour scale and one colour bar (mask values, dimensionless; 1.0 is the
    initial value), so blocks can be compared at a glance. When some value is negative the scale is
    diverging and centred on 0.
    """
    heads = [t.detach().float().cpu().numpy() for t in masks.heads]
    neurons = [t.detach().float().cpu().numpy() for t in masks.neurons]
    n_blocks, n_classes = len(heads), masks.num_classes
    names = list(class_names) if class_names is not None else [str(c) for c in range(n_classes)]
    if len(names) != n_classes:
        raise ValueError(f"{len(names)} class names given for masks of {n_classes} classes")
    values = np.concatenate([t.ravel() for t in heads + neurons])
    lo, hi = float(values.min()), float(values.max())
    if lo < 0:
        bound = max(abs(lo), abs(hi)) or 1.0
        cmap, lo, hi = "RdBu_r", -bound, bound
    else:
        cmap, lo = "viridis", 0.0
        hi = hi if hi > lo else lo + 1.0
    step = max(1, int(np.ceil(n_classes / MAX_CLASS_TICKS)))
    ticks = list(range(0, n_classes, step))
    row_h = min(max(0.18 * n_classes, 1.4), 4.0)
    with figure(path, n_blocks, 2, figsize=(11, 0.8 + row_h * n_blocks), squeeze=False,
                 gridspec_kw={"width_ratios": [1, 3]}) as (fig, axes):
        image = None
        for b in range(n_blocks):
            for col, (table, kind) in enumerate(((heads[b], "heads"), (neurons[b], "neurons"))):
                ax = axes[b][col]
                image = ax.imshow(table, aspect="auto", interpolation="nearest", cmap=cmap,
                                  vmin=lo, vmax=hi)
                ax.set_yticks(ticks)
                ax.set_yticklabels([names[i] for i in ticks] if col == 0 else [], fontsize=6)
                if table.shape[1] <= 16:
                    ax.set_xticks(range(table.shape[1]))
                ax.tick_params(axis="x", labelsize=6)
                if b == 0:
                    ax.set_title(kind, fontsize=10)
                if col == 0:
                    ax.set_ylabel(f"block {b}\nclass", fontsize=8)
                if b == n_blocks - 1:
                    ax.set_xlabel("head" if kind == "heads" else "neuron", fontsize=8)
        fig.suptitle("X-Pruner class x unit masks (1.0 = initial value)", fontsize=11)
        if image is not None:
            fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02,
                         label="mask value")

def plot_scores(scores: UnitScores, path: str | os.PathLike[str]) -> None:
    """Write per-block distributions of the unit scores s_i = sum_c |M[c, i]| (heads | neurons).

    Box plots with every score drawn as a jittered point on top (heads are few per block, so the
    points say more than the box). A flat distribution means the masks carry little ranking
    information (see docs/method.md on convergence).
    """
    rng = np.random.default_rng(0)  # jitter only; fixed so equal inputs give equal images
    with figure(path, 1, 2, figsize=(11, 4.2), squeeze=False) as (fig, axes):
        for ax, tables, kind in ((axes[0][0], scores.heads, "heads"),
                                 (axes[0][1], scores.neurons, "neurons")):
            data = [np.asarray(t, dtype=np.float64) for t in tables]
            positions = list(range(len(data)))
            if data:
                ax.boxplot(data, positions=positions, widths=0.6, showfliers=False)
            for i, t in enumerate(data):
                jitter = rng.uniform(-0.18, 0.18, size=len(t))
                ax.scatter(i + jitter, t, s=6 if kind == "neurons" else 14, alpha=0.4,
                           color="C0", linewidths=0)
            ax.set_xticks(positions)
            ax.set_xticklabels([str(p) for p in positions], fontsize=7)
            ax.set_xlabel("block")
            ax.set_ylabel("score (sum over classes of |mask|)")
            ax.set_title(kind)
        fig.suptitle("X-Pruner unit scores per block")
        fig.tight_layout()


def plot_curve(history: Sequence[dict[str, float]], path: str | os.PathLike[str]) -> None:
    """Write the mask-learning curve: loss terms per epoch, and the share of masks that moved.

    Left: total loss, the data term (cross-entropy, or KL to the teacher) and the (unweighted)
    sparsity / smoothness terms, log scale.
    Right: share of head and neuron mask entries that moved more than ``converged_eps`` in each
    epoch, with the 5% line under which the run counts as converged.
    """
    from xpdeploy.xpruner.learn import CONVERGED_SHARE

    epochs = [int(h.get("epoch", i + 1)) for i, h in enumerate(history)]
    with figure(path, 1, 2, figsize=(10, 3.8), squeeze=False) as (fig, axes):
        ax_loss, ax_moved = axes[0]
        for key in ("loss", "ce", "sparsity", "smoothness"):
            ys = [h.get(key) for h in history]
            if any(y is not None and y > 0 for y in ys):
                # "ce" is the data term: CE to the label, or KL to the teacher (learn.py).
                ax_loss.plot(epochs, [y if y and y > 0 else np.nan for y in ys], marker="o",
                             label="data (CE / KL)" if key == "ce" else key)
        if ax_loss.get_lines():
            ax_loss.set_yscale("log")
            ax_loss.legend(fontsize=8)
        else:
            ax_loss.text(0.5, 0.5, "no epochs recorded", ha="center", va="center",
                         transform=ax_loss.transAxes)
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel("mean per step")
        ax_loss.set_title("loss terms")
        for key, label in (("moved_heads", "heads"), ("moved_neurons", "neurons")):
            ys = [100.0 * h[key] for h in history if key in h]
            if ys:
                ax_moved.plot(epochs[: len(ys)], ys, marker="o", label=label)
        ax_moved.axhline(100.0 * CONVERGED_SHARE, color="grey", linestyle="--", linewidth=1,
                         label="converged below")
        ax_moved.set_ylim(0, 105)
        ax_moved.set_xlabel("epoch")
        ax_moved.set_ylabel("% of masks that moved")
        ax_moved.set_title("convergence")
        ax_moved.legend(fontsize=8)
        fig.tight_layout()
