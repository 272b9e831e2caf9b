"""Create timm models from a pipeline's ``model`` section and load user checkpoints safely.

Checkpoints are read with ``torch.load(weights_only=True)`` (never unpickling arbitrary objects) and
must fit the model exactly: missing, unexpected or mis-shaped keys are an error that lists them,
because a silently half-loaded model would make every later accuracy figure meaningless.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xpdeploy.errors import ModelError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from xpdeploy.spec import ModelConfig

_WRAPPER_KEYS = ("model", "state_dict", "model_ema", "module", "net")
_MAX_LISTED = 5  # keys named in an error line before "... and N more"


def _list_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else "")


def create_model(cfg: ModelConfig) -> nn.Module:
    """Build ``cfg.name`` with ``cfg.kwargs``; load pretrained weights or ``cfg.checkpoint``."""
    import timm

    if not timm.is_model(cfg.name):
        close = difflib.get_close_matches(cfg.name, timm.list_models(), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else "; see timm.list_models()"
        raise ModelError(f"model.name: '{cfg.name}' is not a timm model{hint}")
    try:
        model = timm.create_model(cfg.name, pretrained=cfg.pretrained, **cfg.kwargs)
    except TypeError as e:
        raise ModelError(f"model.kwargs {cfg.kwargs} do not fit {cfg.name}: {e}") from None
    except (OSError, RuntimeError, ValueError) as e:
        if cfg.pretrained:
            reason = str(e).splitlines()[0] if str(e) else ""
            reason = reason if len(reason) <= 100 else reason[:97] + "..."
            raise ModelError(
                f"could not fetch pretrained weights for {cfg.name} ({type(e).__name__}: "
                f"{reason}); when offline, download them elsewhere and set "
                "model.pretrained: false and model.checkpoint: PATH (HF_HUB_OFFLINE=1 makes this "
                "check fail fast)"
            ) from None
        raise ModelError(f"cannot build {cfg.name} with kwargs {cfg.kwargs}: {e}") from None
    if cfg.checkpoint is not None:
        load_checkpoint(model, cfg.checkpoint, model_name=cfg.name)
    return model.eval()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch file (weights_only); unwrap wrappers."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist; fix model.checkpoint")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch/zipfile/pickle raise many types for damaged files

        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ModelError(
            f"checkpoint {path} is not a readable weights file ({reason}); it may be truncated or "
            "not a checkpoint: re-download it, or re-save it with "
            "torch.save(model.state_dict(), path)"
        ) from None
    for _ in range(2):  # e.g. {"model": {"module.x": ...}} or {"state_dict": {...}}
        if isinstance(obj, dict):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is not None:
                obj = inner
    if not isinstance(obj, dict) or not obj or not all(
        isinstance(v, torch.Tensor) for v in obj.values()
    ):
        raise ModelError(
            f"checkpoint {path} holds no state dict (expected a mapping of parameter names to "
            f"tensors, or one under a key among {', '.join(_WRAPPER_KEYS)})"
        )
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel / DDP
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def load_checkpoint(model: nn.Module, path: str | Path, *, model_name: str) -> None:
    """Load ``path`` into ``model`` strictly, with an error that lists what does not fit."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_list_keys(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_list_keys(unexpected)})")
        raise ModelError(
            f"checkpoint {path} does not fit {model_name}: {'; '.join(parts)}; is it for another "
            "architecture? check model.name and model.kwargs (depth, embed_dim, patch_size)"
        )
    shape_errors = [
        (k, tuple(state[k].shape), tuple(v.shape))
        for k, v in own.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if shape_errors:
        key, got, want = shape_errors[0]
        classifier = str(getattr(model, "pretrained_cfg", {}).get("classifier", "head"))
        if key.startswith(classifier) and len(got) >= 1 and got[0] != want[0]:
            fix = f"set model.kwargs.num_classes: {got[0]}"
        else:
            fix = "check model.kwargs (embed_dim, num_heads, mlp_ratio, img_size, patch_size)"
        more = f" (and {len(shape_errors) - 1} more)" if len(shape_errors) > 1 else ""
        raise ModelError(
            f"checkpoint {path} does not fit {model_name}: {key} has shape {list(got)} but the "
            f"model expects {list(want)}{more}; {fix}"
        )
    model.load_state_dict(state, strict=True)
