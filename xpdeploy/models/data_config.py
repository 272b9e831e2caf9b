"""The model's preprocessing: timm's pretrained data config, overridden by the pipeline."""

from __future__ import annotations

from typing import TYPE_CHECKING

from xpdeploy.artifacts import DataConfig

if TYPE_CHECKING:
    from torch import nn

    from xpdeploy.spec import PreprocessConfig


def _model_input_hw(model: nn.Module) -> tuple[int, int] | None:
    """The input size the model was built for (timm's pretrained cfg keeps the default 224)."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        return None
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (size, size)


def resolve_data_config(model: nn.Module, override: PreprocessConfig) -> DataConfig:
    """timm's data config for ``model``, with the model's real input size and pipeline overrides."""
    from timm.data import resolve_data_config as timm_resolve

    cfg = timm_resolve({}, model=model)
    channels, height, width = cfg["input_size"]
    hw = _model_input_hw(model)
    if hw is not None:
        height, width = hw
    if override.size is not None:
        height = width = override.size
    interpolation = override.interpolation or cfg.get("interpolation", "bicubic")
    if interpolation not in ("bilinear", "bicubic", "nearest", "lanczos"):
        interpolation = "bicubic"
    return DataConfig(
        input_size=(int(channels), int(height), int(width)),
        mean=tuple(override.mean or cfg["mean"]),
        std=tuple(override.std or cfg["std"]),
        interpolation=interpolation,
        crop_pct=float(override.crop_pct or cfg.get("crop_pct", 1.0)),
    )
