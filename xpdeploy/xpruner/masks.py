"""Class-wise unit masks and the label-gated model that learns them
(docs/method.md, "Units and masks").

Every block gets two fp32 tables, ``heads[b]`` of shape (num_classes, H_b) and ``neurons[b]`` of
shape (num_classes, M_b), initialised to 1.0 and unconstrained (no sigmoid: a value may go
negative, which is why scores use absolute values). For a sample of class y, row y multiplies the
block's head outputs (before ``attn.proj``) and neuron activations (before ``mlp.fc2``); a soft
label (mixup) uses the label-weighted mix of the rows.

The tables live in a :class:`ClassMasks` module *outside* the model, and are applied through the
forward pre-hooks of :func:`xpdeploy.models.unit_sites.gated_units`: the model's parameter names and
``state_dict`` are untouched, so a checkpoint loads into it with zero missing or unexpected keys
while masks are attached.

**Never measure an accuracy with these masks.** The row is chosen by the true label, so the masked
model has seen the answer (a public reproduction "improved" 76% -> 99.5% this way). The masked
model exists for mask learning only; accuracy is measured on the pruned model, without masks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from xpdeploy.models.unit_sites import gated_units, unit_sites
from xpdeploy.prune.unit_scores import UnitScores


class ClassMasks(nn.Module):
    """Per-block (num_classes, units) mask tables for heads and MLP neurons, all 1.0 at start.

    ``heads[b]`` is (num_classes, H_b) and ``neurons[b]`` is (num_classes, M_b), fp32 whatever the
    model's dtype (the masks move by ~lr per Adam step; fp16 would round small steps away).
    """

    def __init__(self, num_classes: int, head_counts: list[int], mlp_widths: list[int]) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if len(head_counts) != len(mlp_widths):
            raise ValueError("head_counts and mlp_widths must list the same blocks")
        self.num_classes = int(num_classes)
        self.heads = nn.ParameterList(
            [nn.Parameter(torch.ones(num_classes, h, dtype=torch.float32)) for h in head_counts]
        )
        self.neurons = nn.ParameterList(
            [nn.Parameter(torch.ones(num_classes, m, dtype=torch.float32)) for m in mlp_widths]
        )

    @classmethod
    def for_model(cls, model: nn.Module, num_classes: int) -> ClassMasks:
        """Masks shaped for every block of ``model``, on the model's device."""
        sites = unit_sites(model)
        masks = cls(num_classes, [s.heads for s in sites], [s.mlp_hidden for s in sites])
        param = next(model.parameters(), None)
        return masks.to(param.device) if param is not None else masks

    @property
    def head_counts(self) -> list[int]:
        return [int(t.shape[1]) for t in self.heads]

    @property
    def mlp_widths(self) -> list[int]:
        return [int(t.shape[1]) for t in self.neurons]

    @property
    def num_blocks(self) -> int:
        return len(self.heads)

    def tables(self) -> list[torch.Tensor]:
        """Every table: the head tables of all blocks, then the neuron tables."""
        return [*self.heads, *self.neurons]

    def rows(self, targets: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-sample gates for every block: (heads (B, H_b) per block, neurons (B, M_b) per block).

        ``targets`` is int labels (B,) (row y is taken) or soft labels (B, C) (the label-weighted
        mix ``targets @ M``; a one-hot row gives exactly row y).
        """
        if targets.dim() == 1:
            if targets.is_floating_point():
                raise ValueError("1-D targets must be integer class labels")
            idx = targets.long()
            return [t[idx] for t in self.heads], [t[idx] for t in self.neurons]
        if targets.dim() != 2 or targets.shape[1] != self.num_classes:
            raise ValueError(
                f"soft targets must be (batch, {self.num_classes}), got {tuple(targets.shape)}"
            )
        w = targets.to(torch.float32)
        return [w @ t for t in self.heads], [w @ t for t in self.neurons]


@contextlib.contextmanager
def masked(model: nn.Module, masks: ClassMasks, targets: torch.Tensor) -> Iterator[nn.Module]:
    """Inside the block, ``model(x)`` gates every sample's units with its label's mask rows.

    ``targets`` must describe the same batch as the ``x`` given to the model inside the block. The
    hooks are removed on exit. For mask learning only: never report an accuracy from this model
    (the label chooses the masks, see the module docstring).
    """
    head_rows, neuron_rows = masks.rows(targets)
    with gated_units(model, heads=head_rows.__getitem__, neurons=neuron_rows.__getitem__):
        yield model


class MaskedModel(nn.Module):
    """``model`` + ``masks``; ``forward(x, targets)`` = the model with label-chosen mask rows.

    A thin holder: the model's own ``state_dict`` keys are untouched (this wrapper's keys carry the
    ``model.`` / ``masks.`` prefixes). For mask learning only: its logits have seen the label, so an
    accuracy measured on them is meaningless.
    """

    def __init__(self, model: nn.Module, masks: ClassMasks) -> None:
        super().__init__()
        self.model = model
        self.masks = masks

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with masked(self.model, self.masks, targets):
            return self.model(x)


def scores(masks: ClassMasks) -> UnitScores:
    """Per-unit X-Pruner score s_i = sum_c |M[c, i]| (float64), higher = more important.

    Absolute values because the masks are unconstrained: a strongly negative mask still means the
    unit matters for that class.
    """
    def score(t: torch.Tensor) -> np.ndarray:
        return t.detach().to("cpu", torch.float64).abs().sum(0).numpy()

    return UnitScores(heads=[score(t) for t in masks.heads],
                      neurons=[score(t) for t in masks.neurons])


def coverage_scores(masks: ClassMasks) -> UnitScores:
    """Class coverage: a unit ranks by the best place it takes in any one class's order.

    In every block each class orders the units by |M[c, i]| (its own row); a unit's key is
    ``units - best place over the classes``, so cutting a block to k units keeps, for every class,
    the units that matter most to *it* first, where the plain sum (:func:`scores`) can drop a unit
    that one class relies on because the other classes ignore it. Ties (units whose best place is
    the same) go by the sum, scaled into [0, 0.5] so it never overrides a place. Higher = kept.

    The keys are places, so they order units **within** a block only; comparing them across
    blocks (``ranking: global`` or ``threshold``) would cut every block alike, which is why
    ``prune.mask_score: coverage`` goes with ``ranking: sensitivity`` (docs/benchmarks.md, issue
    15: 67.66% one-shot at 50% MACs against 66.96% for the sum, same allocator).
    """
    sums = scores(masks)  # the tie-break

    def key(t: torch.Tensor, total: np.ndarray) -> np.ndarray:
        m = t.detach().to("cpu", torch.float64).abs().numpy()  # (classes, units)
        place = np.argsort(np.argsort(-m, axis=1, kind="stable"), axis=1, kind="stable")
        return (m.shape[1] - place.min(0)) + 0.5 * total / max(float(total.max()), 1e-300)

    return UnitScores(heads=[key(t, s) for t, s in zip(masks.heads, sums.heads, strict=True)],
                      neurons=[key(t, s) for t, s in zip(masks.neurons, sums.neurons,
                                                         strict=True)])
