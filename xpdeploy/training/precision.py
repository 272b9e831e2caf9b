"""Mixed precision for training: which autocast dtype, and the loss scaler fp16 needs.

Only activations and matmuls run in low precision; parameters, optimiser state, X-Pruner masks and
Lagrange multipliers stay float32 (autocast never changes a parameter's dtype).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from xpdeploy.errors import ConfigError

if TYPE_CHECKING:
    import torch


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``mode`` (auto | off | bf16 | fp16) on ``device``; None = fp32.

    ``auto``: bf16 on GPUs that support it (Ampere and newer, Jetson Orin), fp16 on older GPUs,
    off on CPU (CPU autocast is slower than fp32 on most CPUs). ``auto-bf16`` is ``auto`` without
    the fp16 fallback, for loops that keep no loss scaler (mask and threshold learning: their
    small gradients would underflow in fp16). fp16 on CPU is refused: torch's
    CPU kernels for it are slow or missing.
    """
    import torch

    if mode == "off":
        return None
    cuda = device.type == "cuda"
    if mode in ("auto", "auto-bf16"):
        if not cuda:
            return None
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if mode == "auto" else None
    if mode == "fp16":
        if not cuda:
            raise ConfigError("amp 'fp16' needs a GPU; on CPU use amp: bf16 or amp: off")
        return torch.float16
    return torch.bfloat16


def grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for fp16 (bf16 has fp32's range and needs none)."""
    import torch

    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def autocast(dtype: torch.dtype | None,
             device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to ``dtype`` on ``device``, or a no-op for fp32 (``dtype`` None)."""
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
