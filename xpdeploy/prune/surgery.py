"""Physical pruning of a timm ViT or Swin (docs/method.md, "Stage 3: surgery and fine-tuning").

A pruned block is an ordinary timm block whose ``attn`` is a ``timm.layers.Attention`` (ViT) or a
Swin ``WindowAttention`` with fewer heads of the **original** head_dim (the softmax scale
``head_dim**-0.5`` stays the original's, and TensorRT's fused attention stays usable) and whose
``mlp.fc1`` / ``mlp.fc2`` are narrower ``nn.Linear``. A Swin head also owns its column of the
relative position bias table ((2W-1)^2, heads); the index buffer does not depend on the heads.
Submodules are replaced, ``forward`` never is, so a pruned model is rebuilt from ``arch.json``
(:func:`xpdeploy.models.block_shapes.apply_block_shapes` on a fresh model) and loaded strictly,
and it exports to ONNX through the same path as the original.

Invariant (tested): with hard 0/1 gates (:func:`hard_gates` + ``gated_units``) the gated model and
the pruned one give the same logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from xpdeploy.errors import PruneError
from xpdeploy.models.block_shapes import attention_like, check_attention, check_mlp, new_linear
from xpdeploy.models.unit_sites import GateFn, UnitSite, head_dim_of, unit_sites
from xpdeploy.prune.unit_scores import KeepSets

if TYPE_CHECKING:
    from xpdeploy.artifacts import ArchSpec, BlockShape
    from xpdeploy.prune.mac_model import MacModel

    #: where the unpruned unit counts per block come from (see :func:`hard_gates`)
    UnitCounts = (
        MacModel | ArchSpec | Sequence[BlockShape] | tuple[Sequence[int], Sequence[int]]
    )


def prune_model(model: nn.Module, keep: KeepSets) -> nn.Module:
    """Keep only ``keep``'s heads and MLP neurons in every block, in place; returns ``model``.

    Blocks (or unit types) that keep everything in the original order are left untouched. Raises
    :class:`PruneError` when the plan does not fit the model or a block has a structure whose
    pruning would change its function (attention output norm, MLP hidden norm, non-timm attention).
    """
    sites = unit_sites(model)
    _check_plan(keep, sites)
    for site, heads, neurons in zip(sites, keep.heads, keep.neurons, strict=True):
        prune_block(site, heads, neurons)
    return model


def prune_block(site: UnitSite, heads: np.ndarray, neurons: np.ndarray) -> None:
    """Keep only ``heads`` and ``neurons`` (sorted indices) in ``site``'s block, in place; a unit
    type that keeps everything in order is left untouched (see :func:`prune_model`)."""
    heads = np.asarray(heads, dtype=np.int64)
    neurons = np.asarray(neurons, dtype=np.int64)
    if not np.array_equal(heads, np.arange(site.heads)):
        check_attention(site)
        site.block.attn = _pruned_attention(site.attn, heads)
    if not np.array_equal(neurons, np.arange(site.mlp_hidden)):
        check_mlp(site)
        mlp = site.mlp
        mlp.fc1 = _linear_rows(mlp.fc1, torch.as_tensor(neurons, device=mlp.fc1.weight.device))
        mlp.fc2 = _linear_cols(mlp.fc2, torch.as_tensor(neurons, device=mlp.fc2.weight.device))


def hard_gates(
    keep: KeepSets,
    macs_or_shapes: UnitCounts,
    device: torch.device | str | None = None,
) -> tuple[GateFn, GateFn]:
    """0/1 gates (head gate, neuron gate) that zero exactly the units ``keep`` removes.

    ``macs_or_shapes`` gives the unpruned unit counts per block: a :class:`MacModel`, an
    :class:`ArchSpec` or its ``blocks``, or a ``(heads, mlp)`` pair of sequences. The gates are
    float32 on ``device`` (cast to the activations' dtype by the hooks of ``gated_units``).
    """
    heads, mlp = _unit_counts(macs_or_shapes)
    if len(keep.heads) != len(heads):
        raise PruneError(f"plan has {len(keep.heads)} blocks but the model has {len(heads)}")
    head_gates, neuron_gates = [], []
    for b, (kh, kn) in enumerate(zip(keep.heads, keep.neurons, strict=True)):
        g = torch.zeros(heads[b], dtype=torch.float32, device=device)
        g[torch.as_tensor(np.asarray(kh, dtype=np.int64), device=device)] = 1.0
        head_gates.append(g)
        g = torch.zeros(mlp[b], dtype=torch.float32, device=device)
        g[torch.as_tensor(np.asarray(kn, dtype=np.int64), device=device)] = 1.0
        neuron_gates.append(g)
    return head_gates.__getitem__, neuron_gates.__getitem__


# ---------------------------------------------------------------------------------------------


def _pruned_attention(old: nn.Module, heads: np.ndarray) -> nn.Module:
    """``old`` with only ``heads``: their q, k, v rows of the fused qkv, proj columns, gate rows
    (ViT) or relative position bias columns (Swin)."""
    hd = head_dim_of(old)
    attn_dim = hd * int(old.num_heads)
    device = old.qkv.weight.device
    cols = torch.as_tensor((heads[:, None] * hd + np.arange(hd)[None, :]).reshape(-1),
                           device=device)
    qkv_rows = torch.cat([cols + part * attn_dim for part in range(3)])
    new = attention_like(old, len(heads))
    with torch.no_grad():
        _copy_linear(new.qkv, old.qkv, rows=qkv_rows)
        _copy_linear(new.proj, old.proj, cols=cols)
        if getattr(old, "gate", None) is not None:
            _copy_linear(new.gate, old.gate, rows=cols)
        table = getattr(old, "relative_position_bias_table", None)
        if table is not None:
            new.relative_position_bias_table.copy_(table[:, torch.as_tensor(heads, device=device)])
            new.relative_position_bias_table.requires_grad_(table.requires_grad)
    return new


def _linear_rows(old: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    new = new_linear(old, old.in_features, len(rows))
    with torch.no_grad():
        _copy_linear(new, old, rows=rows)
    return new


def _linear_cols(old: nn.Linear, cols: torch.Tensor) -> nn.Linear:
    new = new_linear(old, len(cols), old.out_features)
    with torch.no_grad():
        _copy_linear(new, old, cols=cols)
    return new


def _copy_linear(
    new: nn.Linear, old: nn.Linear, rows: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
) -> None:
    """Copy ``old``'s weight (selected output rows or input columns) and bias (rows, or all)."""
    weight = old.weight
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    new.weight.copy_(weight)
    new.weight.requires_grad_(old.weight.requires_grad)
    if old.bias is not None:
        new.bias.copy_(old.bias[rows] if rows is not None else old.bias)
        new.bias.requires_grad_(old.bias.requires_grad)


def _check_plan(keep: KeepSets, sites: list[UnitSite]) -> None:
    if len(keep.heads) != len(sites) or len(keep.neurons) != len(sites):
        raise PruneError(f"plan has {len(keep.heads)} blocks but the model has {len(sites)}; "
                         "make the plan on this model")
    for site, heads, neurons in zip(sites, keep.heads, keep.neurons, strict=True):
        for idx, size, what in ((heads, site.heads, "heads"), (neurons, site.mlp_hidden,
                                                               "neurons")):
            idx = np.asarray(idx)
            if idx.size == 0:
                raise PruneError(f"block {site.index}: the plan keeps no {what}; every block keeps "
                                 "at least one head and one neuron (raise the floors)")
            if idx.min() < 0 or idx.max() >= size or np.any(np.diff(idx) <= 0):
                raise PruneError(f"block {site.index}: kept {what} must be sorted unique indices "
                                 f"in [0, {size}); this plan was made for another model")


def _unit_counts(src: UnitCounts) -> tuple[list[int], list[int]]:
    if hasattr(src, "neuron_cost"):  # MacModel
        return list(src.heads), list(src.mlp)
    if hasattr(src, "blocks"):  # ArchSpec
        src = src.blocks
    if (isinstance(src, tuple) and len(src) == 2 and not hasattr(src[0], "heads")):
        return [int(h) for h in src[0]], [int(m) for m in src[1]]
    return [int(b.heads) for b in src], [int(b.mlp_hidden) for b in src]
