"""Per-block head counts and MLP widths of a timm ViT or Swin: the shape of a pruned model.

A pruned model is an ordinary timm model whose blocks have fewer heads (of the original head_dim)
and narrower MLPs (docs/method.md, "Stage 3: surgery and fine-tuning"). :func:`apply_block_shapes`
gives a freshly created model the shapes recorded in ``arch.json``, so that
:func:`xpdeploy.models.arch.rebuild_model` can load a pruned model's weights strictly. The module
builders here are shared with the surgery that copies the kept units' weights
(:mod:`xpdeploy.prune.surgery`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn

from xpdeploy.errors import PruneError
from xpdeploy.models.unit_sites import UnitSite, head_dim_of, unit_sites

if TYPE_CHECKING:
    from xpdeploy.artifacts import BlockShape


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
            check_attention(site)
            site.block.attn = attention_like(site.attn, shape.heads)
        if shape.mlp_hidden != site.mlp_hidden:
            check_mlp(site)
            fc1, fc2 = site.mlp.fc1, site.mlp.fc2
            site.mlp.fc1 = new_linear(fc1, fc1.in_features, shape.mlp_hidden)
            site.mlp.fc2 = new_linear(fc2, shape.mlp_hidden, fc2.out_features)
    return model


def _timm_attention() -> type[nn.Module]:
    from timm.layers import Attention

    return Attention


def _timm_window_attention() -> type[nn.Module]:
    from timm.models.swin_transformer import WindowAttention

    return WindowAttention


def check_attention(site: UnitSite) -> None:
    """Raise :class:`PruneError` unless the block's attention can change its head count
    (timm's ``Attention`` without an output norm, or Swin's ``WindowAttention``)."""
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


def check_mlp(site: UnitSite) -> None:
    """Raise :class:`PruneError` unless the block's MLP can change its width (plain
    ``nn.Linear`` fc1/fc2, no norm over the hidden neurons)."""
    mlp = site.mlp
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        raise PruneError(f"block {site.index}: the MLP has a norm over its hidden neurons "
                         "(scale_mlp_norm); pruning neurons would change it (unsupported)")
    if type(mlp.fc1) is not nn.Linear or type(mlp.fc2) is not nn.Linear:
        raise PruneError(f"block {site.index}: MLP fc1/fc2 are {type(mlp.fc1).__name__}/"
                         f"{type(mlp.fc2).__name__}, not nn.Linear (unsupported)")


def attention_like(old: nn.Module, num_heads: int) -> nn.Module:
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


def new_linear(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """A fresh ``nn.Linear`` of the given size like ``old`` (bias, device, dtype, train mode)."""
    w = old.weight
    new = nn.Linear(in_features, out_features, bias=old.bias is not None, device=w.device,
                    dtype=w.dtype)
    new.train(old.training)
    return new
