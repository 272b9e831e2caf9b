"""A timm ViT or Swin split at any transformer block: each block's input, and the rest from there.

Measuring what cutting block b alone does needs the model's output with only block b changed. The
blocks before b compute the same whatever happens in b, so their output (block b's input) is
computed once per batch by :func:`block_inputs`, and every variant of block b runs only the rest
of the model through :func:`forward_from_block`. On a 6-block ViT that skips about 40% of a
sensitivity sweep's work (blocks at the front are skipped most often).

The rest of the forward follows timm's own ``forward_features`` / ``forward_head`` of the two
families ``models/unit_sites.py`` supports: a ViT runs ``blocks[b:]``, ``norm``, ``forward_head``; a
Swin runs the remaining blocks of block b's stage, the later stages whole (patch merging, then
blocks), ``norm``, ``forward_head``. A test checks both against ``model(x)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xpdeploy.models.unit_sites import transformer_blocks

if TYPE_CHECKING:
    import torch
    from torch import nn


def block_inputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, the input of every transformer block in forward order) of one forward pass."""
    seen: list[torch.Tensor] = []

    def keep(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.append(args[0])

    handles = [block.register_forward_pre_hook(keep) for _, block in transformer_blocks(model)]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return logits, seen


def forward_from_block(model: nn.Module, index: int, x: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` given ``x`` as the input of transformer block ``index`` (global index,
    every Swin stage in order, as :func:`~xpdeploy.models.unit_sites.transformer_blocks`)."""
    blocks = transformer_blocks(model)
    if not 0 <= index < len(blocks):
        raise IndexError(f"block {index} of a model with {len(blocks)} transformer blocks")
    stage = blocks[index][0]
    for s, block in blocks[index:]:
        if s != stage:
            break
        x = block(x)
    layers = getattr(model, "layers", None)
    if layers is not None and not hasattr(model, "blocks"):  # Swin: the later stages whole
        for layer in list(layers)[stage + 1:]:
            x = layer(x)
    return model.forward_head(model.norm(x))


def without_blocks(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every transformer block removed (identity): what pruning does not
    touch (patch embedding, Swin's patch merging, norm, head), to be timed on its own."""
    import copy

    from torch import nn

    stem = copy.deepcopy(model)
    if hasattr(stem, "blocks"):
        stem.blocks = nn.Sequential()
    else:
        for layer in stem.layers:
            layer.blocks = nn.Sequential()
    return stem
