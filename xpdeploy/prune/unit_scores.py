"""Per-unit scores and kept-unit sets, the currency between criteria, planner and surgery."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from xpdeploy.errors import PruneError

Normalize = Literal["type", "block", "none"]


def best_first(scores: np.ndarray, indices: np.ndarray | None = None) -> np.ndarray:
    """``indices`` (default: all) by descending score, ties by ascending index: the one order
    every planner and allocator cuts along."""
    idx = np.arange(len(scores)) if indices is None else np.asarray(indices)
    return idx[np.lexsort((idx, -np.asarray(scores)[idx]))]


@dataclass(frozen=True)
class UnitScores:
    """One score per unit, higher = more important: ``heads[b]`` (H_b,), ``neurons[b]`` (M_b,)."""

    heads: list[np.ndarray]
    neurons: list[np.ndarray]

    def __post_init__(self) -> None:
        if len(self.heads) != len(self.neurons):
            raise ValueError("heads and neurons must list the same blocks")

    def normalized(self, mode: Normalize) -> UnitScores:
        """Scores made comparable across unit types (docs/method.md, "Stage 2").

        ``type``: divide every head score by the mean head score of the whole model, every neuron
        score by the mean neuron score (blocks keep their differences: layer-adaptive plans).
        ``block``: divide by the mean of the unit's own block and type. ``none``: unchanged.
        """
        if mode == "none":
            return self

        def by_type(tables: list[np.ndarray]) -> list[np.ndarray]:
            mean = float(np.mean(np.concatenate(tables))) or 1.0
            return [np.asarray(t, dtype=np.float64) / mean for t in tables]

        def by_block(tables: list[np.ndarray]) -> list[np.ndarray]:
            return [np.asarray(t, dtype=np.float64) / (float(np.mean(t)) or 1.0) for t in tables]

        f = by_type if mode == "type" else by_block
        return UnitScores(heads=f(self.heads), neurons=f(self.neurons))

    def best_first(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Each block's head and neuron indices in :func:`best_first` order: the criterion's
        within-block order (a block cut to k keeps the first k)."""
        def order(s: np.ndarray) -> np.ndarray:
            return best_first(np.asarray(s, dtype=np.float64))

        return [order(s) for s in self.heads], [order(s) for s in self.neurons]

    def keep_top(self, heads: Sequence[int], mlp: Sequence[int]) -> KeepSets:
        """In every block b, the ``heads[b]`` best heads and ``mlp[b]`` best neurons."""
        order_h, order_n = self.best_first()
        return KeepSets(heads=[np.sort(o[:k]) for o, k in zip(order_h, heads, strict=True)],
                        neurons=[np.sort(o[:k]) for o, k in zip(order_n, mlp, strict=True)])

    def to_json(self) -> dict[str, list[list[float]]]:
        return {"heads": [t.tolist() for t in self.heads],
                "neurons": [t.tolist() for t in self.neurons]}

    @classmethod
    def from_json(cls, data: dict[str, list[list[float]]]) -> UnitScores:
        return cls(heads=[np.asarray(t, dtype=np.float64) for t in data["heads"]],
                   neurons=[np.asarray(t, dtype=np.float64) for t in data["neurons"]])


@dataclass(frozen=True)
class KeepSets:
    """Kept unit indices per block (sorted, ascending): the content of a pruning plan."""

    heads: list[np.ndarray]
    neurons: list[np.ndarray]

    @property
    def head_counts(self) -> list[int]:
        return [len(h) for h in self.heads]

    @property
    def mlp_widths(self) -> list[int]:
        return [len(n) for n in self.neurons]

    def to_json(self) -> list[dict[str, list[int]]]:
        return [{"kept_heads": [int(i) for i in h], "kept_neurons": [int(i) for i in n]}
                for h, n in zip(self.heads, self.neurons, strict=True)]

    @classmethod
    def from_json(cls, blocks: list[dict[str, list[int]]]) -> KeepSets:
        return cls(heads=[np.asarray(b["kept_heads"], dtype=np.int64) for b in blocks],
                   neurons=[np.asarray(b["kept_neurons"], dtype=np.int64) for b in blocks])

    @classmethod
    def read(cls, path: Path) -> KeepSets:
        """Kept units from a ``plan.json`` written by an earlier ``prune`` stage (replay)."""
        try:
            return cls.from_json(json.loads(path.read_text())["blocks"])
        except FileNotFoundError:
            raise PruneError(f"prune.plan_file {path} does not exist") from None
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise PruneError(f"prune.plan_file {path} is not a plan.json written by xpdeploy "
                             f"({type(e).__name__}: {e})") from None

    @classmethod
    def full(cls, heads: list[int], mlp: list[int]) -> KeepSets:
        """Every unit kept."""
        return cls(heads=[np.arange(h) for h in heads], neurons=[np.arange(m) for m in mlp])
