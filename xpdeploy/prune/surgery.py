"""Physical pruning of a timm ViT or Swin (method.md, "Stage 3: surgery"), and rebuilding its shape.

A pruned block is an ordinary timm block whose ``attn`` is a ``timm.layers.Attention`` (ViT) or a
Swin ``WindowAttention`` with fewer heads of the **original** head_dim (the softmax scale
``head_dim**-0.5`` stays the original's, and TensorRT's fused attention stays usable) and whose
``mlp.fc1`` / ``mlp.fc2`` are narrower ``nn.Linear``. A Swin head also owns its column of the
relative position bias table ((2W-1)^2, heads); the index buffer does not depend on the heads.
Submodules are replaced, ``forward`` never is, so a pruned model is rebuilt from ``arch.json``
(:func:`apply_block_shapes` on a fresh model) and loaded strictly, and it exports to ONNX through
the same path as the original.

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
from xpdeploy.models.units import GateFn, UnitSite, head_dim_of, unit_sites
from xpdeploy.prune.units import KeepSets

if TYPE_CHECKING:
    from xpdeploy.artifacts import ArchSpec, BlockShape
    from xpdeploy.prune.macs import MacModel

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
        heads = np.asarray(heads, dtype=np.int64)
        neurons = np.asarray(neurons, dtype=np.int64)
        if not np.array_equal(heads, np.arange(site.heads)):
            _check_attention(site)
            site.block.attn = _pruned_attention(site.attn, heads)
        if not np.array_equal(neurons, np.arange(site.mlp_hidden)):
            _check_mlp(site)
            mlp = site.mlp
            mlp.fc1 = _linear_rows(mlp.fc1, torch.as_tensor(neurons, device=mlp.fc1.weight.device))
            mlp.fc2 = _linear_cols(mlp.fc2, torch.as_tensor(neurons, device=mlp.fc2.weight.device))
    return model


def apply_block_shapes(model: nn.Module, blocks: Sequence[BlockShape]) -> nn.Module:
    """Give a freshly created model the per-block head counts and MLP widths of ``blocks``.

    The new modules are freshly initialised (their weights come from ``load_state_dict`` next);
    blocks already at the given shape are left as they are. head_dim must be the model's own
    (whole heads are pruned, never head channels). In place; returns ``model``.
    """
    sites = unit_sites(model)
    if len(blocks) != len(sites):
        raise PruneError(f"arch lists {len(blocks)} blocks but the model has {len(sites)}; "
                         "rebuild with the timm name and kwargs recorded in arch.json")
    for site, shape in zip(sites, blocks, strict=True):
        if shape.head_dim != site.head_dim:
            raise PruneError(f"block {site.index}: arch head_dim {shape.head_dim} != model "
                             f"head_dim {site.head_dim}; only whole heads are pruned")
        if shape.heads < 1 or shape.mlp_hidden < 1:
            raise PruneError(f"block {site.index}: {shape.heads} heads / {shape.mlp_hidden} MLP "
                             "neurons; every block keeps at least one of each")
        if shape.heads != site.heads:
            _check_attention(site)
            site.block.attn = _attention_like(site.attn, shape.heads)
        if shape.mlp_hidden != site.mlp_hidden:
            _check_mlp(site)
            fc1, fc2 = site.mlp.fc1, site.mlp.fc2
            site.mlp.fc1 = _new_linear(fc1, fc1.in_features, shape.mlp_hidden)
            site.mlp.fc2 = _new_linear(fc2, shape.mlp_hidden, fc2.out_features)
    return model


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


def _timm_attention() -> type[nn.Module]:
    from timm.layers import Attention

    return Attention


def _timm_window_attention() -> type[nn.Module]:
    from timm.models.swin_transformer import WindowAttention

    return WindowAttention


def _check_attention(site: UnitSite) -> None:
    attn = site.attn
    if type(attn) is _timm_window_attention():
        return  # Swin v1: per-head state is qkv rows, proj columns and the bias table column
    if type(attn) is not _timm_attention():
        raise PruneError(f"block {site.index}: attention is {type(attn).__name__}, not timm's "
                         "Attention or Swin WindowAttention; head pruning supports timm's "
                         "VisionTransformer and SwinTransformer (v1) families")
    if not isinstance(attn.norm, nn.Identity):
        raise PruneError(f"block {site.index}: attention has an output norm (scale_attn_norm) "
                         "over all heads; pruning heads would change it (unsupported)")


def _check_mlp(site: UnitSite) -> None:
    mlp = site.mlp
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        raise PruneError(f"block {site.index}: the MLP has a norm over its hidden neurons "
                         "(scale_mlp_norm); pruning neurons would change it (unsupported)")
    if type(mlp.fc1) is not nn.Linear or type(mlp.fc2) is not nn.Linear:
        raise PruneError(f"block {site.index}: MLP fc1/fc2 are {type(mlp.fc1).__name__}/"
                         f"{type(mlp.fc2).__name__}, not nn.Linear (unsupported)")


def _attention_like(old: nn.Module, num_heads: int) -> nn.Module:
    """A fresh timm Attention or Swin WindowAttention like ``old`` (same width, head_dim, window,
    biases, dropout, device/dtype, fused_attn, train mode) with ``num_heads`` heads. qk-norm modules
    act per head over head_dim, so they are shared with ``old`` as they are (their parameters do not
    depend on the heads)."""
    w = old.qkv.weight
    common = dict(num_heads=num_heads, qkv_bias=old.qkv.bias is not None,
                  attn_drop=float(old.attn_drop.p), proj_drop=float(old.proj_drop.p),
                  device=w.device, dtype=w.dtype)
    if type(old) is _timm_window_attention():
        new = _timm_window_attention()(int(old.qkv.in_features), head_dim=head_dim_of(old),
                                       window_size=old.window_size, **common)
    else:
        new = _timm_attention()(int(old.qkv.in_features), attn_head_dim=int(old.head_dim),
                                dim_out=int(old.proj.out_features),
                                proj_bias=old.proj.bias is not None, gated=old.gate is not None,
                                **common)
        new.q_norm, new.k_norm = old.q_norm, old.k_norm
    new.fused_attn = old.fused_attn
    new.train(old.training)
    return new


def _pruned_attention(old: nn.Module, heads: np.ndarray) -> nn.Module:
    """``old`` with only ``heads``: their q, k, v rows of the fused qkv, proj columns, gate rows
    (ViT) or relative position bias columns (Swin)."""
    hd = head_dim_of(old)
    attn_dim = hd * int(old.num_heads)
    device = old.qkv.weight.device
    cols = torch.as_tensor((heads[:, None] * hd + np.arange(hd)[None, :]).reshape(-1),
                           device=device)
    qkv_rows = torch.cat([cols + part * attn_dim for part in range(3)])
    new = _attention_like(old, len(heads))
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


def _new_linear(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    w = old.weight
    new = nn.Linear(in_features, out_features, bias=old.bias is not None, device=w.device,
                    dtype=w.dtype)
    new.train(old.training)
    return new


def _linear_rows(old: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    new = _new_linear(old, old.in_features, len(rows))
    with torch.no_grad():
        _copy_linear(new, old, rows=rows)
    return new


def _linear_cols(old: nn.Linear, cols: torch.Tensor) -> nn.Linear:
    new = _new_linear(old, len(cols), old.out_features)
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
