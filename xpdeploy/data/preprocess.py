"""The one preprocessing function: image -> model input (float32, CHW, normalised).

Every backend (torch, onnxruntime, TensorRT) and every source (image folders, digits, synthetic,
calibration sets) goes through :func:`preprocess_image`, so all of them see **byte-identical**
arrays for the same image and data config; a logit difference between backends is then a property of
the backends, never of two slightly different resize paths (docs/architecture.md section 6).

Only numpy and Pillow are used: this module runs on torch-free device machines.

Steps, in this order:

1. Convert any Pillow mode to 8-bit RGB (16-bit grey ``I;16*`` is scaled by 1/257, as is ``I``
   when a value exceeds 255; palette images with transparency go through RGBA; alpha is dropped,
   as timm does).
2. Resize, keeping the aspect ratio, so that the image covers ``floor(H / crop_pct)`` x
   ``floor(W / crop_pct)`` pixels (for a square input: the short side becomes
   ``floor(size / crop_pct)``, as in timm's eval transform), with the config's interpolation.
   Skipped when the image already has that size, so an image at the input size with
   ``crop_pct=1`` is only normalised.
3. Centre crop to ``H x W`` pixels (skipped when the image already is ``H x W``).
4. ``(x / 255 - mean) / std`` per channel in float32, channels first (:func:`normalize`).

Steps 1-3 give the uint8 image a stored image set keeps (the verification set, calibration
batches: :mod:`xpdeploy.data.image_set`); step 4 is the one function that turns it into model
input, on the host and on the device alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from xpdeploy.errors import DataError

if TYPE_CHECKING:
    from xpdeploy.artifacts import DataConfig

#: ``DataConfig.interpolation`` -> Pillow's resampling filter.
RESAMPLE: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB.

    Why not just ``convert("RGB")``: Pillow clips 16-bit grey to 0..255 (most pixels turn white),
    and palette images with transparency warn unless they go through RGBA first.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT:
        grey = np.asarray(img).astype(np.float64)
        # 'I' (32-bit) holds 16-bit files in older Pillows but also 8-bit values converted up:
        # only values above 255 tell that it is the 16-bit range.
        if img.mode != "I" or grey.max(initial=0) > 255:
            grey = grey / 257.0
        grey8 = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return Image.fromarray(grey8).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise DataError(
            f"cannot convert an image of mode {img.mode!r} to RGB ({e}); "
            "save it as an 8-bit RGB or greyscale PNG/JPEG"
        ) from None


def _resized_size(width: int, height: int, cfg: DataConfig) -> tuple[int, int]:
    """(width, height) in pixels after the aspect-keeping resize of step 2.

    The size that must be covered is ``floor(H / crop_pct)`` x ``floor(W / crop_pct)`` and the free
    side is truncated, exactly as timm's eval transform (torchvision ``Resize(int)``) computes it,
    so top-1 measured here matches timm's published numbers for the same weights.
    """
    _, out_h, out_w = cfg.input_size
    cover_h, cover_w = math.floor(out_h / cfg.crop_pct), math.floor(out_w / cfg.crop_pct)
    if cover_h / height >= cover_w / width:  # the height is the side that must fit
        return max(cover_w, int(cover_h * width / height)), cover_h
    return cover_w, max(cover_h, int(cover_w * height / width))


def _check_config(cfg: DataConfig) -> None:
    channels, out_h, out_w = cfg.input_size
    if channels != 3:
        raise DataError(
            f"data config input_size {tuple(cfg.input_size)} has {channels} channels but images "
            "are fed as RGB (3 channels); use a model with in_chans=3"
        )
    if out_h <= 0 or out_w <= 0 or not 0 < cfg.crop_pct <= 1:
        raise DataError(
            f"data config input_size {tuple(cfg.input_size)} / crop_pct {cfg.crop_pct} is invalid; "
            "height and width must be positive and 0 < crop_pct <= 1"
        )


def preprocess_image(img: Image.Image, cfg: DataConfig) -> np.ndarray:
    """One image -> float32 array (3, H, W): RGB, resized, centre-cropped, normalised.

    ``cfg.input_size`` is (channels, height, width) in pixels; ``mean`` and ``std`` are per channel
    on the 0..1 scale. The result is C-contiguous and the same bytes on every machine.
    """
    return normalize(np.asarray(eval_geometry(img, cfg)), cfg.mean, cfg.std)


def eval_geometry(img: Image.Image, cfg: DataConfig) -> Image.Image:
    """Steps 1-3 of :func:`preprocess_image`: RGB, aspect-keeping resize, centre crop to H x W.

    Separate from the normalisation so that training augmentation can work on the decoded image
    between the two (RandAugment) and still see exactly the evaluation geometry.
    """
    _check_config(cfg)
    _, out_h, out_w = cfg.input_size
    rgb = to_rgb(img)
    new_w, new_h = _resized_size(rgb.width, rgb.height, cfg)
    if (new_w, new_h) != rgb.size:
        rgb = rgb.resize((new_w, new_h), resample=RESAMPLE[cfg.interpolation])
    if rgb.size != (out_w, out_h):
        left = round((new_w - out_w) / 2.0)  # torchvision's CenterCrop offsets
        top = round((new_h - out_h) / 2.0)
        rgb = rgb.crop((left, top, left + out_w, top + out_h))
    return rgb


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) as ``(x / 255 - mean) / std``, all in float32.

    The only place pixels become model input: :func:`preprocess_image`, training augmentation and
    the stored image sets (:mod:`xpdeploy.data.image_set`, on a torch-free device too) all call
    it, so the same uint8 image gives the same float32 bytes everywhere. Each operation is one
    IEEE float32 operation per element, so a batch gives the same bytes as its images one by one.
    ``mean`` and ``std`` are per RGB channel on the 0..1 scale.
    """
    x = np.asarray(images).astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))
