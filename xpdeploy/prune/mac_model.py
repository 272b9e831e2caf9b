"""Exact MACs of a ViT or Swin as a linear function of each block's head count and MLP width.

Attention runs on W windows of A tokens each (a ViT: one window of all N tokens; a Swin: its
(padded) feature map cut into windows, shifted or not, which changes the mask, not the MACs). For
a block of width D with h heads of width d and an MLP of width m over T tokens: qkv W*A*D*3hd,
QK^T W*A*A*hd, AV W*A*A*hd, proj W*A*hd*D, fc1 T*D*m, fc2 T*m*D. So a head costs
d*W*A*(4D + 2A) MACs and a neuron 2*T*D, whatever else the block keeps, and the planner can
predict a pruned model's MACs exactly. W, A and T are read off one forward pass (hooks on the
attention and the MLP). Everything outside the blocks (patch embedding, patch merging, the
classifier) is a constant measured once with the same counter as :func:`count_gmacs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from xpdeploy.models.complexity import count_gmacs
from xpdeploy.models.unit_sites import unit_sites

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
        windows: dict[int, tuple[int, int]] = {}  # block -> (windows, tokens per window)
        tokens: dict[int, int] = {}  # block -> tokens through the MLP

        def on_attn(i: int):  # a pre-hook must return None, or it replaces the inputs
            def hook(_m: nn.Module, a: tuple[torch.Tensor, ...]) -> None:
                windows[i] = (int(a[0].shape[0]), int(a[0].shape[1]))
            return hook

        def on_mlp(i: int):
            def hook(_m: nn.Module, a: tuple[torch.Tensor, ...]) -> None:
                tokens[i] = a[0].numel() // int(a[0].shape[-1])
            return hook

        hooks = [h for s in sites for h in (s.attn.register_forward_pre_hook(on_attn(s.index)),
                                            s.mlp.register_forward_pre_hook(on_mlp(s.index)))]
        try:
            with torch.inference_mode():
                model.eval()(torch.zeros(1, *input_size))
        finally:
            for h in hooks:
                h.remove()
        head_cost, neuron_cost = [], []
        for site in sites:
            w, a = windows[site.index]
            d_in, d_out = int(site.attn.qkv.in_features), int(site.attn.proj.out_features)
            head_cost.append(float(site.head_dim * w * a * (3 * d_in + d_out + 2 * a)))
            d_in, d_out = int(site.mlp.fc1.in_features), int(site.mlp.fc2.out_features)
            neuron_cost.append(float(tokens[site.index] * (d_in + d_out)))
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
