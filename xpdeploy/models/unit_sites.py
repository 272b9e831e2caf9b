"""Prunable units of a timm ViT or Swin and the one place where their outputs are gated.

A **head**'s output is the slice of ``attn.proj``'s input that the head wrote (after softmax(QK)V,
before the heads are concatenated and projected); a **neuron**'s output is its channel of
``mlp.fc2``'s input (after the activation). Gating multiplies those inputs through forward
pre-hooks on ``proj`` and ``fc2``: no parameter is renamed and no ``forward`` is replaced, so a
gated model loads the same checkpoints as the plain one (docs/method.md, "Units and masks").

Families: timm's ``VisionTransformer`` (blocks in ``model.blocks``) and ``SwinTransformer``
(blocks in ``model.layers[s].blocks``, every stage in order; window attention). A Swin block's
attention runs on windows: ``proj``'s input is (windows x batch, tokens per window, channels), with
the windows of one image next to each other (timm's ``window_partition`` is batch-major), so a
per-sample gate is repeated once per window of its image.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xpdeploy.errors import ModelError

if TYPE_CHECKING:
    import torch
    from torch import nn

#: gate(block_index) -> gates for that block: shape (units,) for every sample, or (batch, units)
#: per sample; None leaves the block ungated.
GateFn = Callable[[int], "torch.Tensor | None"]


@dataclass(frozen=True)
class UnitSite:
    """Where one block's units live. ``index`` counts blocks over the whole model (every stage
    of a Swin in order); ``stage`` is the Swin stage (0 for a ViT)."""

    index: int
    block: nn.Module
    attn: nn.Module
    mlp: nn.Module
    heads: int
    head_dim: int
    mlp_hidden: int
    stage: int = 0


def transformer_blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(stage, block) of every transformer block, in forward order; [] for other models.

    A ViT's blocks are ``model.blocks`` (stage 0); a Swin's are ``model.layers[s].blocks``.
    """
    if hasattr(model, "blocks"):
        return [(0, b) for b in model.blocks]
    layers = getattr(model, "layers", None)
    if layers is not None and all(hasattr(layer, "blocks") for layer in layers):
        return [(s, b) for s, layer in enumerate(layers) for b in layer.blocks]
    return []


def head_dim_of(attn: nn.Module) -> int:
    """Channels per head: timm's ``Attention`` stores it; ``WindowAttention`` only implies it
    through the fused qkv (3 x heads x head_dim rows)."""
    if hasattr(attn, "head_dim"):
        return int(attn.head_dim)
    return int(attn.qkv.out_features) // (3 * int(attn.num_heads))


def unit_sites(model: nn.Module) -> list[UnitSite]:
    """The prunable sites of every transformer block of a timm ViT/DeiT or Swin (in order)."""
    sites = []
    for i, (stage, block) in enumerate(transformer_blocks(model)):
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        if attn is None or mlp is None or not hasattr(attn, "num_heads") or not hasattr(
            attn, "qkv") or not hasattr(mlp, "fc2"):
            raise ModelError(
                f"block {i} of {type(model).__name__} is not a ViT/Swin block (attn with heads "
                "and a fused qkv + mlp with fc1/fc2); X-Pruner supports timm's "
                "VisionTransformer and SwinTransformer families"
            )
        sites.append(UnitSite(i, block, attn, mlp, int(attn.num_heads), head_dim_of(attn),
                              int(mlp.fc1.out_features), stage))
    if not sites:
        raise ModelError(f"{type(model).__name__} has no transformer blocks to prune; X-Pruner "
                         "supports timm's VisionTransformer and SwinTransformer families")
    return sites


def _per_row(g: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-sample gates (batch, units) for ``rows`` activation rows: a Swin attention sees each
    image as consecutive windows, so each sample's row repeats once per window."""
    if g.shape[0] != rows:
        if rows % g.shape[0]:
            raise ValueError(f"{g.shape[0]} per-sample gates for {rows} activation rows; give "
                             "the gates of the batch the model runs on")
        g = g.repeat_interleave(rows // g.shape[0], dim=0)
    return g


def _head_hook(site: UnitSite, gate: GateFn):
    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]):
        g = gate(site.index)
        if g is None:
            return None
        x = args[0]
        b, n, _ = x.shape
        x = x.reshape(b, n, site.heads, site.head_dim)
        g = (_per_row(g, b).reshape(-1, 1, site.heads, 1) if g.dim() == 2
             else g.reshape(1, 1, site.heads, 1))
        return (x * g.to(x.dtype)).reshape(b, n, site.heads * site.head_dim), *args[1:]

    return hook


def _neuron_hook(site: UnitSite, gate: GateFn):
    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]):
        g = gate(site.index)
        if g is None:
            return None
        x = args[0]
        if g.dim() == 2:  # (batch, M) -> (batch, 1, ..., M) over the token axes
            g = g.reshape(g.shape[0], *([1] * (x.dim() - 2)), g.shape[1])
        return (x * g.to(x.dtype)), *args[1:]

    return hook


@contextlib.contextmanager
def gated_units(
    model: nn.Module, heads: GateFn | None = None, neurons: GateFn | None = None
) -> Iterator[list[UnitSite]]:
    """Multiply head / neuron outputs by ``heads(i)`` / ``neurons(i)`` while the block is active.

    Hooks are removed on exit, whatever happens inside.
    """
    sites = unit_sites(model)
    handles = []
    try:
        for site in sites:
            if heads is not None:
                handles.append(site.attn.proj.register_forward_pre_hook(_head_hook(site, heads)))
            if neurons is not None:
                handles.append(site.mlp.fc2.register_forward_pre_hook(_neuron_hook(site, neurons)))
        yield sites
    finally:
        for h in handles:
            h.remove()
