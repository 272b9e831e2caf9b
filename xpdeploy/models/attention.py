"""Switching timm's fused attention off, for export and for counting MACs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


@contextlib.contextmanager
def plain_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Switch timm's fused scaled-dot-product attention off for the duration (then restore).

    timm's ``Attention`` modules read the ``fused_attn`` attribute in ``forward``; setting it is a
    documented switch, not a patch of ``forward``.
    """
    saved = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    try:
        for m, _ in saved:
            m.fused_attn = False
        yield model
    finally:
        for m, value in saved:
            m.fused_attn = value
