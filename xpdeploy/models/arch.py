"""Architecture description (``arch.json``) and rebuilding a model from it plus safetensors.

A model travels as arch.json + model.safetensors, never as a pickled module (docs/architecture.md
section 2): the rebuild creates the timm model from its name and kwargs and loads the weights
strictly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xpdeploy.artifacts import ArchSpec, BlockShape
from xpdeploy.errors import ModelError
from xpdeploy.fileio import write_text_atomic, write_with
from xpdeploy.models.unit_sites import head_dim_of, transformer_blocks

if TYPE_CHECKING:
    from torch import nn


def describe_arch(model: nn.Module, timm_name: str, kwargs: dict[str, Any]) -> ArchSpec:
    """Read the prunable structure (heads, head_dim, MLP width per block) off a timm ViT or
    Swin (every stage's blocks in order; blocks without heads + an MLP are left out)."""
    blocks = []
    for _stage, block in transformer_blocks(model):
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        if attn is None or mlp is None or not hasattr(attn, "num_heads"):
            continue
        blocks.append(
            BlockShape(
                heads=int(attn.num_heads),
                head_dim=head_dim_of(attn),
                mlp_hidden=int(mlp.fc1.out_features),
            )
        )
    return ArchSpec(
        timm_name=timm_name,
        kwargs=dict(kwargs),
        num_classes=int(getattr(model, "num_classes", 0)),
        embed_dim=getattr(model, "embed_dim", None),
        blocks=blocks,
    )


def save_model(model: nn.Module, arch: ArchSpec, folder: Path) -> tuple[Path, Path]:
    """Write ``arch.json`` and ``model.safetensors`` into ``folder`` atomically."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    arch_path, weights_path = folder / "arch.json", folder / "model.safetensors"
    # safetensors refuses shared storage; clone so tied or sliced tensors save cleanly.
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    write_with(weights_path, lambda tmp: save_file(state, str(tmp)))
    write_text_atomic(arch_path, json.dumps(arch.model_dump(mode="json"), indent=2) + "\n")
    return arch_path, weights_path


def rebuild_model(arch: ArchSpec, weights: Path) -> nn.Module:
    """Create the model described by ``arch`` and load ``weights`` strictly (eval mode)."""
    import timm
    from safetensors.torch import load_file

    model = timm.create_model(arch.timm_name, pretrained=False, **arch.kwargs)
    if arch.blocks and describe_arch(model, arch.timm_name, arch.kwargs).blocks != arch.blocks:
        from xpdeploy.models.block_shapes import apply_block_shapes  # a pruned model: uneven blocks

        apply_block_shapes(model, arch.blocks)
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise ModelError(
            f"weights {weights} are unreadable ({e}); rerun the stage that wrote them with --force"
        ) from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(
            f"weights {weights} do not fit arch {arch.timm_name}: {str(e).splitlines()[0]}"
        ) from None
    return model.eval()
