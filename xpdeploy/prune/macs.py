"""Exact MACs of a ViT as a linear function of each block's head count and MLP width.

For a block with N tokens, embedding width D, h heads of width d and an MLP of width m:
qkv N*D*3hd, QK^T N*N*hd, AV N*N*hd, proj N*hd*D, fc1 N*D*m, fc2 N*m*D. So a head costs
d*N*(4D + 2N) MACs and a neuron 2*N*D, whatever else the block keeps, and the planner can predict
a pruned model's MACs exactly. Everything outside the blocks (patch embedding, heads of the
classifier) is a constant measured once with the same counter as :func:`count_gmacs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from xpdeploy.models.macs import count_gmacs
from xpdeploy.models.units import unit_sites

if TYPE_CHECKING:
    from collections.abc import Sequence

    from torch import nn


@dataclass(frozen=True)
class MacModel:
    """MACs per image (not G): ``fixed + sum_b heads_b * head_cost[b] + mlp_b * neuron_cost[b]``."""

    fixed: float
    head_cost: tuple[float, ...]
    neuron_cost: tuple[float, ...]
    heads: tuple[int, ...]  # the unpruned model's head counts
    mlp: tuple[int, ...]  # and MLP widths

    @classmethod
    def from_model(cls, model: nn.Module, input_size: tuple[int, int, int]) -> MacModel:
        """Measure ``model`` once (FlopCounterMode) and derive the per-unit costs analytically."""
        import torch

        sites = unit_sites(model)
        tokens: list[int] = []
        hooks = [s.attn.register_forward_pre_hook(
            lambda _m, a: tokens.append(int(a[0].shape[1]))) for s in sites]
        try:
            with torch.inference_mode():
                model.eval()(torch.zeros(1, *input_size))
        finally:
            for h in hooks:
                h.remove()
        head_cost, neuron_cost = [], []
        for site, n in zip(sites, tokens, strict=True):
            dim = int(site.attn.qkv.in_features)
            head_cost.append(float(site.head_dim * n * (4 * dim + 2 * n)))
            neuron_cost.append(float(2 * n * dim))
        heads = tuple(s.heads for s in sites)
        mlp = tuple(s.mlp_hidden for s in sites)
        total = count_gmacs(model, input_size) * 1e9
        blocks = sum(h * c for h, c in zip(heads, head_cost, strict=True)) + sum(
            m * c for m, c in zip(mlp, neuron_cost, strict=True))
        return cls(round(total - blocks), tuple(head_cost), tuple(neuron_cost), heads, mlp)

    def macs(self, heads: Sequence[float], mlp: Sequence[float]) -> float:
        """MACs per image with ``heads[b]`` heads and ``mlp[b]`` neurons kept in block b.

        Linear in both, so it also accepts expected (fractional, even autograd) counts.
        """
        total = self.fixed
        for h, m, hc, nc in zip(heads, mlp, self.head_cost, self.neuron_cost, strict=True):
            total = total + h * hc + m * nc
        return total

    @property
    def original(self) -> float:
        """MACs per image of the unpruned model."""
        return self.macs(self.heads, self.mlp)

    def to_json(self) -> dict[str, object]:
        return {"fixed": self.fixed, "head_cost": list(self.head_cost),
                "neuron_cost": list(self.neuron_cost), "heads": list(self.heads),
                "mlp": list(self.mlp)}
