"""Prunable units of a timm ViT and the one place where their outputs are gated.

A **head**'s output is the slice of ``attn.proj``'s input that the head wrote (after softmax(QK)V,
before the heads are concatenated and projected); a **neuron**'s output is its channel of
``mlp.fc2``'s input (after the activation). Gating multiplies those inputs through forward
pre-hooks on ``proj`` and ``fc2``: no parameter is renamed and no ``forward`` is replaced, so a
gated model loads the same checkpoints as the plain one (method.md, "Units and masks").
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
    """Where one block's units live."""

    index: int
    block: nn.Module
    attn: nn.Module
    mlp: nn.Module
    heads: int
    head_dim: int
    mlp_hidden: int


def unit_sites(model: nn.Module) -> list[UnitSite]:
    """The prunable sites of every transformer block of a timm ViT/DeiT (in order)."""
    sites = []
    for i, block in enumerate(getattr(model, "blocks", [])):
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        if attn is None or mlp is None or not hasattr(attn, "num_heads") or not hasattr(
            mlp, "fc2"
        ):
            raise ModelError(
                f"block {i} of {type(model).__name__} is not a ViT block (attn with heads + mlp "
                "with fc1/fc2); X-Pruner supports timm's VisionTransformer family here"
            )
        sites.append(UnitSite(i, block, attn, mlp, int(attn.num_heads), int(attn.head_dim),
                              int(mlp.fc1.out_features)))
    if not sites:
        raise ModelError(f"{type(model).__name__} has no transformer blocks to prune")
    return sites


def _head_hook(site: UnitSite, gate: GateFn):
    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]):
        g = gate(site.index)
        if g is None:
            return None
        x = args[0]
        b, n, _ = x.shape
        x = x.reshape(b, n, site.heads, site.head_dim)
        g = g.reshape(-1, 1, site.heads, 1) if g.dim() == 2 else g.reshape(1, 1, site.heads, 1)
        return (x * g.to(x.dtype)).reshape(b, n, site.heads * site.head_dim), *args[1:]

    return hook


def _neuron_hook(site: UnitSite, gate: GateFn):
    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]):
        g = gate(site.index)
        if g is None:
            return None
        x = args[0]
        g = g.unsqueeze(1) if g.dim() == 2 else g
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
