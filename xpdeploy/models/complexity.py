"""MACs and parameter counts (docs/architecture.md section 6: MACs of one image, labelled gmacs)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def count_gmacs(model: nn.Module, input_size: tuple[int, int, int]) -> float:
    """Multiply-accumulates of one image at ``input_size`` (C, H, W), in 1e9.

    torch's FlopCounterMode counts 2 FLOPs per MAC for matmuls, convolutions and attention, so the
    total is halved. Elementwise ops (GELU, softmax, norms) are not counted, as in the literature.
    Attention is counted through timm's plain (non-fused) path: the counter has no formula for
    the CPU kernel of fused scaled-dot-product attention and would silently count it as zero.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from xpdeploy.models.attention import plain_attention

    was_training = model.training
    model.eval()
    x = torch.zeros(1, *input_size)
    with plain_attention(model), torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9


def count_params_m(model: nn.Module) -> float:
    """Parameters, in millions."""
    return sum(p.numel() for p in model.parameters()) / 1e6
