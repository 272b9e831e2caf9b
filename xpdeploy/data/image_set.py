"""Stored image sets: the uint8 images after resize and crop, as PNG, with their normalisation.

The verification set and the INT8 calibration batches are fixed sets of images that every runner,
on the host and on the device, is fed. Stored as float32 model input they cost 4 bytes a value
(1,000 images at 224 px: 602 MB) and barely compress; the uint8 images that input comes from (steps
1-3 of :func:`~xpdeploy.data.preprocess.preprocess_image`) are a quarter of that, and PNG takes
photos to about 60% of it again. The normalisation (mean, std, layout) is stored beside the images
and applied by :func:`~xpdeploy.data.preprocess.normalize`, the function ``preprocess_image``
ends with, so the float32 tensors read back are byte-identical to what ``preprocess_image`` gives
for the same images, on any machine.

Arrays these sets keep in their ``.npz`` (:data:`IMAGE_KEYS`)::

    png          uint8 (total bytes,)  the N PNG files, one after the other
    png_offsets  int64 (N + 1,)        image i is png[png_offsets[i]:png_offsets[i + 1]]
    image_shape  int64 (3,)            (H, W, 3) of every image, in pixels
    mean, std    float64 (3,)          per RGB channel on the 0..1 scale
    layout       str                   'NCHW': the layout normalize produces (model input)

Files written before this layout hold the float32 model input itself as ``pixels``
(:data:`LEGACY_KEY`); :func:`model_input` reads them as they are, so older run folders and
bundles still load.

Why PNG, through Pillow rather than a hand-made filter: lossless, a format any viewer opens, and
the best of what was measured on the 250 ImageNet sample images at 224 px (size of the raw uint8):
PNG 60%, deflate 79%, deflate after a row delta 64%, lzma 67% at 15 times the time. Noise does not
compress: then PNG costs about 0.2% over the raw bytes. The PNG bytes are stored, not deflated
again, inside the npz of :mod:`xpdeploy.data.npz`.

numpy and Pillow only: this module runs on torch-free device machines.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from xpdeploy.data.preprocess import normalize
from xpdeploy.errors import DataError

#: The keys of an image set in an .npz, in the order they are written.
IMAGE_KEYS: tuple[str, ...] = ("png", "png_offsets", "image_shape", "mean", "std", "layout")
#: Key of the float32 model input in files written before images were stored as PNG.
LEGACY_KEY = "pixels"
#: The layout :func:`~xpdeploy.data.preprocess.normalize` produces.
LAYOUT = "NCHW"
#: zlib level of the PNG encoder (Pillow's default): level 9 saved under 1% more on photos.
PNG_LEVEL = 6


def holds_float32(path: str | Path) -> bool:
    """Whether the .npz at ``path`` holds float32 model input (:data:`LEGACY_KEY`, written before
    images were stored) instead of images; read from the zip's listing, nothing is decoded."""
    try:
        with zipfile.ZipFile(path) as zf:
            return f"{LEGACY_KEY}.npy" in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def check_images(images: np.ndarray) -> np.ndarray:
    """``images`` as uint8 (N, H, W, 3), C-contiguous; anything else is a ValueError (our bug)."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


def encode(images: np.ndarray, mean: Sequence[float], std: Sequence[float]
           ) -> dict[str, np.ndarray]:
    """The arrays of :data:`IMAGE_KEYS` for uint8 (N, H, W, 3) ``images`` normalised with
    ``mean`` and ``std`` (per RGB channel, 0..1 scale). Equal input gives equal bytes."""
    arr = check_images(images)
    files: list[bytes] = []
    for image in arr:
        buf = io.BytesIO()
        Image.fromarray(image, mode="RGB").save(buf, format="PNG", compress_level=PNG_LEVEL)
        files.append(buf.getvalue())
    offsets = np.zeros(len(files) + 1, dtype=np.int64)
    np.cumsum([len(f) for f in files], out=offsets[1:])
    return {
        "png": np.frombuffer(b"".join(files), dtype=np.uint8),
        "png_offsets": offsets,
        "image_shape": np.asarray(arr.shape[1:], dtype=np.int64),
        "mean": np.asarray(mean, dtype=np.float64),
        "std": np.asarray(std, dtype=np.float64),
        "layout": np.array(LAYOUT, dtype=str),
    }


def decode_images(arrays: Mapping[str, np.ndarray], *, what: str, fix: str) -> np.ndarray:
    """The stored uint8 (N, H, W, 3) images; a damaged set is a DataError naming ``what``."""
    png, offsets, shape = _checked(arrays, what=what, fix=fix)
    out = np.empty((len(offsets) - 1, *shape), dtype=np.uint8)
    for i in range(len(out)):
        out[i] = _decode_one(png, offsets, i, shape, what=what, fix=fix)
    return out


def model_input(arrays: Mapping[str, np.ndarray], *, what: str, fix: str,
                limit: int | None = None) -> np.ndarray:
    """float32 (N, 3, H, W) model input: each stored image through
    :func:`~xpdeploy.data.preprocess.normalize` with the stored mean and std, or the legacy
    float32 ``pixels`` as they are. ``limit``: only the first ``limit`` samples (the others are
    not decoded).

    One image at a time into the result, so the peak memory is the result itself (1,000 images
    at 224 px: 602 MB), not several temporaries of its size.
    """
    if LEGACY_KEY in arrays:
        return np.ascontiguousarray(arrays[LEGACY_KEY][:limit], dtype=np.float32)
    png, offsets, shape = _checked(arrays, what=what, fix=fix)
    mean, std = arrays["mean"], arrays["std"]
    h, w, c = shape
    n = len(offsets) - 1 if limit is None else min(limit, len(offsets) - 1)
    out = np.empty((n, c, h, w), dtype=np.float32)
    for i in range(len(out)):
        out[i] = normalize(_decode_one(png, offsets, i, shape, what=what, fix=fix), mean, std)
    return out


def _checked(arrays: Mapping[str, np.ndarray], *, what: str, fix: str
             ) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """(png bytes, offsets, (H, W, 3)) after checking that the arrays describe an image set."""
    missing = [k for k in IMAGE_KEYS if k not in arrays]
    if missing:
        raise DataError(f"{what} holds neither images ({', '.join(missing)} missing) nor "
                        f"{LEGACY_KEY}; {fix}")
    png = np.asarray(arrays["png"])
    offsets = np.asarray(arrays["png_offsets"])
    shape = tuple(int(v) for v in np.asarray(arrays["image_shape"]).reshape(-1))
    layout = str(arrays["layout"])
    problem = (
        "png is not a uint8 byte string" if png.dtype != np.uint8 or png.ndim != 1
        else f"image_shape {shape} is not (H, W, 3)" if len(shape) != 3 or shape[2] != 3
        or min(shape) <= 0
        else "png_offsets do not cover png" if offsets.ndim != 1 or len(offsets) == 0
        or offsets[0] != 0 or offsets[-1] != len(png) or bool(np.any(np.diff(offsets) <= 0))
        else f"mean/std are not 3 values each ({np.shape(arrays['mean'])}, "
        f"{np.shape(arrays['std'])})" if np.shape(arrays["mean"]) != (3,)
        or np.shape(arrays["std"]) != (3,)
        else f"layout {layout!r} is not {LAYOUT!r}" if layout != LAYOUT
        else None
    )
    if problem:
        raise DataError(f"{what} is damaged ({problem}); {fix}")
    return png, offsets, (shape[0], shape[1], shape[2])


def _decode_one(png: np.ndarray, offsets: np.ndarray, i: int, shape: tuple[int, int, int], *,
                what: str, fix: str) -> np.ndarray:
    """Image ``i`` as uint8 (H, W, 3), checked to be an RGB image of ``shape``."""
    data = png[int(offsets[i]):int(offsets[i + 1])].tobytes()
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            img.load()
            mode, arr = img.mode, np.asarray(img)
    except (OSError, ValueError, SyntaxError) as e:
        reason = str(e).replace("\n", " ") or type(e).__name__
        raise DataError(f"{what}: image {i} is not a readable PNG ({reason}); {fix}") from None
    if mode != "RGB" or arr.shape != shape:
        raise DataError(f"{what}: image {i} is {mode} {arr.shape}, expected RGB {shape}; {fix}")
    return arr
