"""PNG plots of how a plan's per-block budget was decided: the threshold search's record and the
sensitivity curves. They go into the run report next to the mask plots, so a reader sees why a
block kept what it kept. Drawn through :mod:`xpdeploy.figures` (Agg backend, atomic PNG).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xpdeploy.figures import figure


def plot_threshold_record(history: Sequence[dict[str, Any]], alpha: float,
                          path: str | os.PathLike[str]) -> None:
    """The threshold search step by step: the removed share of MACs (soft and hard) against
    the target's, the loss terms, and per block the kept heads and neurons and the thresholds.

    A search that reallocates shows the per-block lines crossing or parting; one that only
    meets the budget shows them moving together.
    """
    steps = [int(h["step"]) for h in history]
    blocks = len(history[0]["kept_heads"]) if history else 0
    with figure(path, 2, 3, figsize=(14, 7), squeeze=False) as (fig, axes):
        ax = axes[0][0]
        ax.plot(steps, [h["R"] for h in history], label="R (soft gates)")
        ax.plot(steps, [h["R_hard"] for h in history], label="R (hard, s > theta)")
        ax.axhline(alpha, color="k", ls=":", lw=0.8, label=f"alpha (target) {alpha:.3f}")
        ax.set_title("removed share of MACs")
        ax.legend(fontsize=7)
        ax = axes[0][1]
        ax.plot(steps, [h["ce"] for h in history], label="data term (CE / KL)")
        ax.plot(steps, [h["budget"] for h in history], label="budget term")
        ax.set_title("loss terms (nats)")
        ax.legend(fontsize=7)
        panels = ((axes[1][0], "kept_heads", "heads kept (hard)"),
                  (axes[1][1], "kept_neurons", "MLP neurons kept (hard)"),
                  (axes[0][2], "theta_heads", "head thresholds (normalised score)"),
                  (axes[1][2], "theta_neurons", "neuron thresholds (normalised score)"))
        for ax, key, title in panels:
            for b in range(blocks):
                ax.plot(steps, [h[key][b] for h in history], label=f"block {b}")
            ax.set_title(title)
            ax.legend(fontsize=6, ncol=2)
        for row in axes:
            for ax in row:
                ax.set_xlabel("step")
                ax.grid(alpha=0.3)
        fig.suptitle("threshold search: does the per-block allocation move?")
        fig.tight_layout()


def plot_sensitivity(curves: dict[str, Any], heads: Sequence[int], mlp: Sequence[int],
                     path: str | os.PathLike[str]) -> None:
    """The measured loss of each block cut alone, heads and MLP width, with the plan's choice
    marked: the steeper a block's curve, the more of it the plan keeps."""
    with figure(path, 1, 2, figsize=(12, 4.5), squeeze=False) as (fig, axes):
        for ax, key, chosen, title in ((axes[0][0], "heads", heads, "heads kept"),
                                       (axes[0][1], "neurons", mlp, "MLP width kept")):
            for b, curve in enumerate(curves[key]):
                line, = ax.plot(curve["kept"], curve["loss"], "o-", ms=3, label=f"block {b}")
                k = chosen[b]
                ax.plot([k], [_interp(curve, k)], "*", ms=12, color=line.get_color())
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.set_xlabel(title)
            ax.set_ylabel("KL to the original (nats per image)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
        fig.suptitle(f"sensitivity of each block cut alone ({curves['images']} images); "
                     "star: the plan")
        fig.tight_layout()


def _interp(curve: dict[str, Any], k: float) -> float:
    import numpy as np

    return float(np.interp(k, curve["kept"], curve["loss"]))


def plot_allocation(record: dict[str, Any], heads: Sequence[int], mlp: Sequence[int],
                    folder: Path) -> list[Path]:
    """The plot of how a plan's allocation was decided, from what ``plan.json`` records of it:
    ``threshold.png`` for a threshold search, ``sensitivity.png`` for the sensitivity allocator,
    none for a global queue or a replayed plan. Returns the paths written."""
    if "threshold_history" in record:
        path = folder / "threshold.png"
        plot_threshold_record(record["threshold_history"], float(record["alpha"]), path)
        return [path]
    if "sensitivity" in record:
        path = folder / "sensitivity.png"
        plot_sensitivity(record["sensitivity"]["rounds"][0]["curves"], heads, mlp, path)
        return [path]
    return []
