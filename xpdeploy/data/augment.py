"""Light, seeded augmentation on preprocessed batches (numpy only).

It works on the already-normalised float32 NCHW arrays the sources yield, so training sees the same
preprocessing as evaluation and export, and a run with the same seed draws the same flips and crops.
Heavier recipes (RandAugment, mixup) belong to ``finetune``.
"""

from __future__ import annotations

import numpy as np


def augment_batch(
    x: np.ndarray, rng: np.random.Generator, *, hflip: bool, crop_padding: int
) -> np.ndarray:
    """Randomly flip and shift each sample of ``x`` (float32, (N, C, H, W)).

    ``hflip``: mirror left-right with probability 0.5 per sample. ``crop_padding``: pad every side
    by this many pixels (reflecting the border) and cut a random H x W window, i.e. shift by up to
    ``crop_padding`` pixels each way. The draws come from ``rng`` (flips first, then offsets), so
    the same generator state gives the same output. With both off, ``x`` itself is returned and
    ``rng`` is not used.
    """
    if x.ndim != 4:
        raise ValueError(f"expected a batch shaped (N, C, H, W), got {x.shape}")
    if crop_padding < 0:
        raise ValueError(f"crop_padding must be >= 0 pixels, got {crop_padding}")
    if not hflip and crop_padding == 0:
        return x
    n, _, h, w = x.shape
    out = np.array(x, dtype=np.float32, order="C")
    if hflip:
        flip = rng.random(n) < 0.5
        out[flip] = out[flip, :, :, ::-1]
    if crop_padding:
        p = crop_padding
        padded = np.pad(out, ((0, 0), (0, 0), (p, p), (p, p)), mode="reflect")
        offsets = rng.integers(0, 2 * p + 1, size=(n, 2))
        for i, (dy, dx) in enumerate(offsets):
            out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out
