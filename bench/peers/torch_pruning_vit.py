"""External peer for the pruning benchmark: Torch-Pruning's recipe for timm ViTs, at equal MACs.

Why a peer at all: the benchmark's other criteria share our planner and surgery, so they cannot
show whether that machinery itself is the limit. Torch-Pruning (``pip install torch-pruning``,
an optional dependency of the benchmark only) is an independent, widely used implementation.

The recipe follows its own timm ViT example (``examples/transformers/prune_timm_vit.py``) with
its defaults: ``BasePruner`` (``MetaPruner``) with ``GroupTaylorImportance`` from cross-entropy
gradients, each ``Attention.qkv`` registered with its head count, head *dimensions* pruned with
the number of heads kept (``prune_head_dims=True, prune_num_heads=False``), one uniform ratio for
every group (``global_pruning=False``) and only the classifier ``model.head`` left alone. Note
that this also narrows the residual stream (patch embedding, tokens, norms, every block's input
and output width), not only the attention and MLP insides as our surgery does.

Torch-Pruning has no MAC target, only a channel ratio, so the ratio is found by bisection on the
caller's own MAC counter; every trial prunes a fresh copy of the input model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from torch import Tensor, nn

# The widest channel ratio tried. Beyond it whole groups would shrink to a channel or two and
# no benchmark target (a MAC ratio around 0.3 to 0.7) needs it.
MAX_RATIO = 0.9
DEFAULT_TRIALS = 8


def _import_torch_pruning() -> Any:
    """Import Torch-Pruning lazily, so the rest of the benchmark runs without it."""
    try:
        import torch_pruning
    except ModuleNotFoundError as e:
        raise ImportError(
            "the torch-pruning peer needs the optional package torch_pruning; install it with "
            "`pip install torch-pruning` (tested with torch-pruning==1.6.1)"
        ) from e
    return torch_pruning


def _attentions(model: nn.Module) -> list[Attention]:
    """timm ``Attention`` modules in block order; the recipe only knows how to fix these up."""
    found = [m for m in model.modules() if isinstance(m, Attention)]
    if not found:
        raise ValueError("no timm Attention module in the model; the Torch-Pruning ViT recipe "
                         "only supports timm VisionTransformer-style models")
    return found


def _taylor_gradients(
    model: nn.Module, batches: list[tuple[Tensor, Tensor]]
) -> dict[str, Tensor]:
    """Summed cross-entropy gradients over ``batches``, by parameter name.

    Computed once on the input model and copied into every trial, because a deep copy does not
    carry ``.grad``. Eval mode (no dropout/drop-path) as the benchmark's Taylor criterion uses.
    Every parameter gets a gradient: GroupTaylorImportance reads ``weight.grad`` of each layer
    in a group and fails on ``None``, so frozen flags are lifted here and restored after.
    """
    if not batches:
        raise ValueError("Taylor importance needs at least one (images, labels) batch")
    device = next(model.parameters()).device
    was_training = model.training
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad():
            for images, labels in batches:
                loss = F.cross_entropy(model(images.to(device)), labels.to(device))
                loss.backward()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()
                 if p.grad is not None}
    finally:
        for name, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(flags[name])
        model.train(was_training)
    return grads


def _fix_attention(attn: Attention, heads: int) -> None:
    """Make a pruned Attention's bookkeeping match its new ``qkv`` width.

    timm's forward reshapes with ``num_heads``/``head_dim`` and ``attn_dim``, so they must
    follow the weights. The softmax scale is reset to ``head_dim**-0.5`` (the upstream example
    leaves it at the old value): timm's fused path calls scaled_dot_product_attention without a
    scale, which then uses the new head_dim, and the plain path (our MAC counter, the ONNX
    export) must compute the same function.
    """
    qkv_out = attn.qkv.out_features
    if qkv_out % (3 * heads):
        raise RuntimeError(f"pruned qkv width {qkv_out} is not 3 x {heads} heads x head_dim")
    attn.num_heads = heads
    attn.head_dim = qkv_out // (3 * heads)
    attn.attn_dim = heads * attn.head_dim
    attn.scale = attn.head_dim**-0.5


def _prune_once(
    source: nn.Module,
    grads: dict[str, Tensor],
    ratio: float,
    input_size: tuple[int, int, int],
) -> nn.Module:
    """One pruning of a fresh copy of ``source`` at channel ratio ``ratio``."""
    tp = _import_torch_pruning()
    model = copy.deepcopy(source).eval()
    for name, p in model.named_parameters():
        p.grad = grads[name].clone() if name in grads else torch.zeros_like(p)
    old_width = model.patch_embed.proj.out_channels if hasattr(model, "patch_embed") else None
    attentions = _attentions(model)
    num_heads = {a.qkv: a.num_heads for a in attentions}
    head = model.get_classifier() if hasattr(model, "get_classifier") else model.head
    # Class/distillation/register tokens and position embeddings hang on the model itself; their
    # last dimension is the embedding width. Naming them keeps Torch-Pruning's own default (prune
    # the last non-singleton dim) without its warning about guessing.
    unwrapped = [(p, p.dim() - 1) for p in model.parameters(recurse=False)]
    example = torch.zeros(1, *input_size, device=next(model.parameters()).device)
    with torch.enable_grad():
        pruner = tp.pruner.BasePruner(
            model,
            example,
            importance=tp.importance.GroupTaylorImportance(),
            global_pruning=False,
            pruning_ratio=ratio,
            ignored_layers=[head],
            num_heads=num_heads,
            prune_num_heads=False,
            prune_head_dims=True,
            unwrapped_parameters=unwrapped,
        )
        for group in pruner.step(interactive=True):
            group.prune()
    for attn in attentions:
        _fix_attention(attn, pruner.num_heads[attn.qkv])
    new_width = model.patch_embed.proj.out_channels if old_width is not None else None
    for attr in ("embed_dim", "num_features", "head_hidden_size"):
        # Stale widths would mislead anything that reads them (e.g. reset_classifier).
        if old_width is not None and getattr(model, attr, None) == old_width:
            setattr(model, attr, new_width)
    model.zero_grad(set_to_none=True)
    return model


def _structure(model: nn.Module) -> dict[str, Any]:
    """Kept widths per block, in the benchmark's vocabulary."""
    mlps = [m for m in model.modules() if isinstance(m, Mlp)]
    info: dict[str, Any] = {
        "head_dim_per_block": [int(a.head_dim) for a in _attentions(model)],
        "num_heads_per_block": [int(a.num_heads) for a in _attentions(model)],
        "mlp_per_block": [int(m.fc1.out_features) for m in mlps],
    }
    if hasattr(model, "patch_embed"):
        info["embed_dim"] = int(model.patch_embed.proj.out_channels)
    return info


def prune_with_torch_pruning(
    model: nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    target_macs: float,
    count_macs: Callable[[nn.Module], float],
    input_size: tuple[int, int, int] = (3, 32, 32),
    trials: int = DEFAULT_TRIALS,
) -> tuple[nn.Module, dict[str, Any]]:
    """Prune ``model`` with Torch-Pruning's timm-ViT recipe to just at or under ``target_macs``.

    ``model`` is left as it was (each trial prunes a deep copy; the caller's copy is not
    modified beyond having its gradients cleared). ``batches`` feed the Taylor importance;
    ``count_macs(model)`` returns MACs of one image (not G) and is the same counter the caller
    uses for every other method, so "equal MACs" means the same thing for the peer.

    Returns the pruned model (eval mode) and ``{"pruning_ratio", "macs", "head_dim_per_block",
    "mlp_per_block", "num_heads_per_block", "embed_dim"}``. Raises ImportError without
    torch_pruning, ValueError when even ``MAX_RATIO`` does not reach the target.
    """
    _import_torch_pruning()
    base_macs = float(count_macs(model))
    if base_macs <= target_macs:
        return model.eval(), {"pruning_ratio": 0.0, "macs": base_macs, **_structure(model)}

    grads = _taylor_gradients(model, batches)
    best = _prune_once(model, grads, MAX_RATIO, input_size)
    best_macs, best_ratio = float(count_macs(best)), MAX_RATIO
    if best_macs > target_macs:
        raise ValueError(f"even pruning ratio {MAX_RATIO} leaves {best_macs:.4g} MACs > target "
                         f"{target_macs:.4g}")
    # Bisection for the smallest ratio still under the target: MACs fall with the ratio (in
    # integer steps, so not strictly), and the feasible trial with the most MACs is kept.
    lo, hi = 0.0, MAX_RATIO
    for _ in range(trials):
        mid = (lo + hi) / 2
        trial = _prune_once(model, grads, mid, input_size)
        macs = float(count_macs(trial))
        if macs <= target_macs:
            hi = mid
            if macs > best_macs:
                best, best_macs, best_ratio = trial, macs, mid
        else:
            lo = mid
    info = {"pruning_ratio": best_ratio, "macs": best_macs, **_structure(best)}
    return best.eval(), info
