"""Sparsity and smoothness penalties on the class-wise masks (docs/method.md, "Stage 1").

Both are **summed over units and averaged over classes**: for each (num_classes, units) table the
sum of the per-element penalty divided by num_classes, then summed over all tables. Not a mean over
all elements: with a mean, the penalty's gradient per mask entry is about 1e-5 of the cross-entropy
gradient, Adam's update then follows the sign of the cross-entropy gradient alone, the masks grow
above 1 by exploiting the label, and their scores rank units worse than random (measured). Summing
over units keeps a unit's penalty gradient independent of how many units its block has; dividing by
C matches the cross-entropy, which is a mean over samples (each class row sees ~1/C of them).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch

from xpdeploy.xpruner.masks import ClassMasks

Sparsity = Literal["l2", "l1"]
Smoothness = Literal["class_tv", "unit_tv", "none"]
#: ``units``: summed over units, averaged over classes (the default, see above); ``entries``: the
#: same sum divided by every unit's count as well, i.e. a mean over all entries (the prototype's
#: scaling, kept as an option so the sweep can show what it does).
PenaltyNorm = Literal["units", "entries"]
Tables = ClassMasks | Iterable[torch.Tensor]


def _tables(masks: Tables) -> list[torch.Tensor]:
    tables = masks.tables() if isinstance(masks, ClassMasks) else list(masks)
    if not tables:
        raise ValueError("no mask tables given")
    for t in tables:
        if t.dim() != 2:
            raise ValueError(f"mask tables are (num_classes, units), got shape {tuple(t.shape)}")
    return tables


def _per_entry(total: torch.Tensor, tables: list[torch.Tensor], norm: PenaltyNorm) -> torch.Tensor:
    """``total`` (already / C) divided by the model's unit count for ``entries``."""
    if norm == "units":
        return total
    if norm == "entries":
        return total / sum(int(t.shape[1]) for t in tables)
    raise ValueError(f"unknown penalty normalisation {norm!r}; use 'units' or 'entries'")


def sparsity_loss(masks: Tables, kind: Sparsity = "l2", norm: PenaltyNorm = "units"
                  ) -> torch.Tensor:
    """sum over tables of sum(M^2) / C (``l2``) or sum(|M|) / C (``l1``); a 0-d tensor.

    Units: mask-value^2 (or mask-value) per class, summed over every unit of the model. At the
    initial all-ones masks it equals the number of units (heads + neurons); 1 with ``norm:
    entries`` (a mean over all entries).
    """
    tables = _tables(masks)
    if kind == "l2":
        terms = [t.square().sum() / t.shape[0] for t in tables]
    elif kind == "l1":
        terms = [t.abs().sum() / t.shape[0] for t in tables]
    else:
        raise ValueError(f"unknown sparsity kind {kind!r}; use 'l2' or 'l1'")
    return _per_entry(torch.stack(terms).sum(), tables, norm)


def smoothness_loss(masks: Tables, kind: Smoothness = "class_tv", norm: PenaltyNorm = "units"
                    ) -> torch.Tensor:
    """Total variation of the masks, normalised like :func:`sparsity_loss`; a 0-d tensor.

    ``class_tv``: sum |M[c+1, i] - M[c, i]| / C per table (neighbouring classes share information,
    and each class row sees only ~1/C of the images, so tying rows together steadies them).
    ``unit_tv``: the same along the unit axis, sum |M[c, i+1] - M[c, i]| / C. ``none``: 0. This is
    the least certain part of our reading of the paper, hence the options.
    """
    tables = _tables(masks)
    if kind == "none":
        return tables[0].new_zeros(())
    if kind == "class_tv":
        terms = [(t[1:] - t[:-1]).abs().sum() / t.shape[0] for t in tables]
    elif kind == "unit_tv":
        terms = [(t[:, 1:] - t[:, :-1]).abs().sum() / t.shape[0] for t in tables]
    else:
        raise ValueError(f"unknown smoothness kind {kind!r}; use 'class_tv', 'unit_tv' or 'none'")
    return _per_entry(torch.stack(terms).sum(), tables, norm)
