"""The one preprocessing function: exact arithmetic, resize/crop geometry, mode conversion."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.data import CFG
from xpdeploy.data.preprocess import preprocess_image, to_rgb
from xpdeploy.errors import DataError


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_image_at_size_is_plain_normalisation() -> None:
    arr = _rgb(32, 32)
    out = preprocess_image(Image.fromarray(arr), CFG)
    mean = np.asarray(CFG.mean, dtype=np.float32)
    std = np.asarray(CFG.std, dtype=np.float32)
    expected = ((arr.astype(np.float32) / np.float32(255) - mean) / std).transpose(2, 0, 1)
    assert out.dtype == np.float32
    assert out.flags.c_contiguous
    assert out.tobytes() == np.ascontiguousarray(expected).tobytes()


def test_per_channel_mean_and_std() -> None:
    cfg = CFG.model_copy(update={"mean": (0.0, 0.5, 1.0), "std": (1.0, 0.5, 0.25)})
    out = preprocess_image(Image.new("RGB", (32, 32), (255, 255, 255)), cfg)
    np.testing.assert_allclose(out[:, 0, 0], [1.0, 1.0, 0.0])


def test_non_square_is_resized_and_centre_cropped() -> None:
    # 40 x 80 (h x w): the short side becomes 32, the long side 64, then the centre 32 x 32 is cut.
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, 20:60] = 255  # a white centre band exactly where the crop lands
    out = preprocess_image(
        Image.fromarray(arr), CFG.model_copy(update={"interpolation": "nearest"})
    )
    assert out.shape == (3, 32, 32)
    white = (1.0 - 0.5) / 0.25
    np.testing.assert_allclose(out, white)


def test_crop_pct_resizes_short_side_to_size_over_crop_pct() -> None:
    cfg = CFG.model_copy(update={"crop_pct": 0.5, "interpolation": "nearest"})
    # 64 x 64 -> short side round(32 / 0.5) = 64 (no resize), centre crop keeps rows/cols 16..47
    arr = _rgb(64, 64, seed=3)
    out = preprocess_image(Image.fromarray(arr), cfg)
    expected = preprocess_image(Image.fromarray(arr[16:48, 16:48]), CFG)
    assert out.tobytes() == expected.tobytes()
    assert preprocess_image(Image.fromarray(_rgb(50, 90)), cfg).shape == (3, 32, 32)


def test_non_square_input_size() -> None:
    cfg = CFG.model_copy(update={"input_size": (3, 24, 40)})
    for h, w in [(10, 10), (100, 30), (24, 40)]:
        assert preprocess_image(Image.fromarray(_rgb(h, w)), cfg).shape == (3, 24, 40)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1", "I", "F"])
def test_any_mode_becomes_three_channels(mode: str) -> None:
    img = Image.fromarray(_rgb(20, 30)).convert(mode)
    out = preprocess_image(img, CFG)
    assert out.shape == (3, 32, 32)
    assert np.isfinite(out).all()


def test_grey_gives_equal_channels() -> None:
    out = preprocess_image(Image.fromarray(_rgb(32, 32)).convert("L"), CFG)
    assert (out[0] == out[1]).all() and (out[1] == out[2]).all()


def test_rgba_drops_alpha() -> None:
    arr = _rgb(32, 32)
    rgba = np.dstack([arr, np.full((32, 32), 7, dtype=np.uint8)])
    out = preprocess_image(Image.fromarray(rgba), CFG)
    assert out.tobytes() == preprocess_image(Image.fromarray(arr), CFG).tobytes()


def test_palette_with_transparency_does_not_warn() -> None:
    img = Image.fromarray(_rgb(32, 32)).convert("P")
    img.info["transparency"] = 0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert preprocess_image(img, CFG).shape == (3, 32, 32)


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    grey16 = np.full((32, 32), 65535 // 2, dtype=np.uint16)  # mid grey in 16 bits
    img = Image.fromarray(grey16)
    assert img.mode.startswith("I;16")
    assert np.asarray(to_rgb(img))[0, 0].tolist() == [127, 127, 127]
    as_int32 = Image.fromarray(grey16.astype(np.int32))  # how older Pillows open 16-bit PNGs
    assert as_int32.mode == "I"
    assert np.asarray(to_rgb(as_int32))[0, 0].tolist() == [127, 127, 127]
    eight_bit = Image.fromarray(np.full((4, 4), 200, dtype=np.uint8)).convert("I")
    assert np.asarray(to_rgb(eight_bit))[0, 0].tolist() == [200, 200, 200]


def test_two_calls_are_byte_identical() -> None:
    img = Image.fromarray(_rgb(45, 71))
    a, b = preprocess_image(img, CFG), preprocess_image(img, CFG)
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest", "lanczos"])
def test_every_interpolation(interpolation: str) -> None:
    cfg = CFG.model_copy(update={"interpolation": interpolation})
    assert preprocess_image(Image.fromarray(_rgb(8, 8)), cfg).shape == (3, 32, 32)


def test_wrong_channel_count_is_refused() -> None:
    cfg = CFG.model_copy(update={"input_size": (1, 32, 32)})
    with pytest.raises(DataError, match=r"\(1, 32, 32\) has 1 channels .* in_chans=3"):
        preprocess_image(Image.new("L", (32, 32)), cfg)


def test_module_does_not_import_torch() -> None:
    code = (
        "import sys, xpdeploy.data, xpdeploy.data.preprocess, xpdeploy.data.verify_set, "
        "xpdeploy.data.augment; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("crop_pct", [1.0, 0.9, 0.875])
@pytest.mark.parametrize("size", [(37, 61), (61, 37), (45, 45)])
def test_matches_timm_eval_transform(crop_pct: float, size: tuple[int, int]) -> None:
    """Same geometry as timm's eval transform (torchvision Resize(int) + CenterCrop on PIL)."""
    transforms = pytest.importorskip("torchvision.transforms")
    cfg = CFG.model_copy(update={"crop_pct": crop_pct})
    img = Image.fromarray(_rgb(*size, seed=4))
    reference = transforms.Compose(
        [
            transforms.Resize(int(32 / crop_pct), transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(32),
            transforms.ToTensor(),
            transforms.Normalize(CFG.mean, CFG.std),
        ]
    )(img)
    np.testing.assert_allclose(preprocess_image(img, cfg), reference.numpy(), rtol=0, atol=1e-6)
