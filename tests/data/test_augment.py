"""Seeded flip + padded-crop augmentation on NCHW batches."""

from __future__ import annotations

import numpy as np
import pytest

from xpdeploy.data.augment import augment_batch


def _x(n: int = 8) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 3, 6, 5)).astype(np.float32)


def test_identity_when_off() -> None:
    x = _x()
    rng = np.random.default_rng(0)
    out = augment_batch(x, rng, hflip=False, crop_padding=0)
    assert out is x
    assert rng.random() == np.random.default_rng(0).random()  # no draws were made


def test_shape_dtype_kept_and_input_untouched() -> None:
    x = _x()
    before = x.copy()
    out = augment_batch(x, np.random.default_rng(1), hflip=True, crop_padding=2)
    assert out.shape == x.shape and out.dtype == np.float32 and out.flags.c_contiguous
    assert np.array_equal(x, before)


def test_deterministic_for_a_seed() -> None:
    x = _x(16)
    a = augment_batch(x, np.random.default_rng(7), hflip=True, crop_padding=2)
    b = augment_batch(x, np.random.default_rng(7), hflip=True, crop_padding=2)
    c = augment_batch(x, np.random.default_rng(8), hflip=True, crop_padding=2)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


def test_hflip_only_flips_whole_samples() -> None:
    x = _x(32)
    out = augment_batch(x, np.random.default_rng(0), hflip=True, crop_padding=0)
    flipped = [np.array_equal(o, s[:, :, ::-1]) for o, s in zip(out, x, strict=True)]
    kept = [np.array_equal(o, s) for o, s in zip(out, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 0 < sum(flipped) < 32


def test_crop_is_a_shifted_window_of_the_reflected_image() -> None:
    x = _x(16)
    p = 2
    out = augment_batch(x, np.random.default_rng(3), hflip=False, crop_padding=p)
    padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), mode="reflect")
    shifts = set()
    for i in range(len(x)):
        match = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if np.array_equal(out[i], padded[i, :, dy : dy + 6, dx : dx + 5])
        ]
        assert match, f"sample {i} is not a window of its padded image"
        shifts.add(match[0])
    assert len(shifts) > 1


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        augment_batch(
            np.zeros((3, 4, 4), np.float32), np.random.default_rng(0), hflip=True, crop_padding=0
        )
    with pytest.raises(ValueError, match=">= 0"):
        augment_batch(_x(), np.random.default_rng(0), hflip=False, crop_padding=-1)
