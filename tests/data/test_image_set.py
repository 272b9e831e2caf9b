"""Stored image sets: uint8 PNG images that become byte-identical float32 model input anywhere."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from tests.test_torch_free import _BLOCK
from xpdeploy.artifacts import DataConfig
from xpdeploy.data import image_set
from xpdeploy.data.calibration import CalibrationEntry, CalibrationManifest, load_npz, save_npz
from xpdeploy.data.preprocess import normalize
from xpdeploy.data.sources import open_split
from xpdeploy.data.verify_set import save_verify_set, select_indices
from xpdeploy.errors import DataError
from xpdeploy.spec import DataConfigSection

#: DeiT's eval preprocessing (timm's data config for deit_tiny_patch16_224).
DEIT = DataConfig(input_size=(3, 224, 224), mean=(0.485, 0.456, 0.406),
                  std=(0.229, 0.224, 0.225), interpolation="bicubic", crop_pct=0.875)
FIX = "redo it"


def _photo_folder(root: Path) -> Path:
    """val/<class>/ of real photos (scikit-learn's two sample photos, 427 x 640 JPEGs), cut and
    re-encoded in the modes and sizes an ImageNet folder has: JPEG, PNG, grey, RGBA, small."""
    photos = load_sample_images().images
    for c, photo in enumerate(photos):
        folder = root / "val" / f"n{c:08d}"
        folder.mkdir(parents=True)
        img = Image.fromarray(photo)
        img.save(folder / "full.JPEG", quality=90)
        img.crop((100, 50, 400, 420)).save(folder / "portrait.png")
        img.convert("L").save(folder / "grey.jpg")
        img.convert("RGBA").resize((320, 213)).save(folder / "rgba.png")
        img.resize((150, 100)).save(folder / "small.jpg")
    return root


def _old_and_new(split, tmp: Path) -> tuple[np.ndarray, Path]:
    """The float32 verification pixels as the load stage wrote them before images were stored
    (``np.stack(split[i][0])``), and the path of today's file for the same samples."""
    idx = select_indices(split.labels, 1000, seed=0)
    old = np.stack([split[int(i)][0] for i in idx]).astype(np.float32)
    images = np.stack([split.eval_image(int(i)) for i in idx])
    cfg = split.data_config
    save_verify_set(tmp / "verify.npz", images, split.labels[idx], mean=cfg.mean, std=cfg.std,
                    source=split.source, synthetic=False, class_names=split.class_names)
    return old, tmp / "verify.npz"


def _device_pixels(path: Path, out: Path) -> np.ndarray:
    """``load_verify_set(path).pixels`` computed in a fresh interpreter that cannot import torch
    (as on the device)."""
    code = textwrap.dedent(f"""
        import numpy as np, sys
        from xpdeploy.data.verify_set import load_verify_set
        np.save({str(out)!r}, load_verify_set({str(path)!r}).pixels)
        assert "torch" not in sys.modules
    """)
    done = subprocess.run([sys.executable, "-c", _BLOCK + code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return np.load(out)


def test_device_tensors_of_real_photos_equal_the_float32_file_of_before(tmp_path: Path) -> None:
    """The acceptance: the float32 a torch-free device feeds its runners from the stored uint8
    images is, byte for byte, what the host's float32 verify.npz held before."""
    root = _photo_folder(tmp_path / "photos")
    section = DataConfigSection(source="imagefolder", root=str(root))
    split = open_split(section, DEIT, "val", num_classes=None, seed=0)
    old, path = _old_and_new(split, tmp_path)
    new = _device_pixels(path, tmp_path / "device.npy")
    assert new.dtype == old.dtype == np.float32 and new.shape == old.shape == (10, 3, 224, 224)
    assert new.tobytes() == old.tobytes()
    assert path.stat().st_size < old.nbytes / 4  # uint8 and PNG: under a quarter of float32


def test_digits_upsampled_give_the_same_bytes_too(tmp_path: Path) -> None:
    cfg = DataConfig(input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    split = open_split(DataConfigSection(source="digits"), cfg, "val", num_classes=10, seed=0)
    old, path = _old_and_new(split, tmp_path)
    assert len(old) == len(split)  # every held-out digit
    assert _device_pixels(path, tmp_path / "device.npy").tobytes() == old.tobytes()


def test_a_batch_normalises_to_the_bytes_of_its_images_one_by_one() -> None:
    images = np.random.default_rng(0).integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    batch = normalize(images, DEIT.mean, DEIT.std)
    assert batch.shape == (4, 3, 5, 6) and batch.flags.c_contiguous
    for row, image in zip(batch, images, strict=True):
        assert row.tobytes() == normalize(image, DEIT.mean, DEIT.std).tobytes()


def test_encode_is_lossless_and_byte_stable() -> None:
    images = np.stack([np.asarray(Image.fromarray(p).resize((64, 48)))
                       for p in load_sample_images().images])
    arrays = image_set.encode(images, DEIT.mean, DEIT.std)
    assert set(arrays) == set(image_set.IMAGE_KEYS)
    again = image_set.encode(images, DEIT.mean, DEIT.std)
    assert all(np.array_equal(arrays[k], again[k]) for k in arrays)
    back = image_set.decode_images(arrays, what="set", fix=FIX)
    assert back.dtype == np.uint8 and np.array_equal(back, images)
    pixels = image_set.model_input(arrays, what="set", fix=FIX)
    assert pixels.tobytes() == normalize(images, DEIT.mean, DEIT.std).tobytes()


def test_photos_compress_and_noise_costs_little() -> None:
    photos = np.stack([np.asarray(Image.fromarray(p).crop((0, 0, 224, 224)))
                       for p in load_sample_images().images])
    assert image_set.encode(photos, DEIT.mean, DEIT.std)["png"].nbytes < 0.8 * photos.nbytes
    noise = np.random.default_rng(0).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    assert image_set.encode(noise, DEIT.mean, DEIT.std)["png"].nbytes < 1.005 * noise.nbytes


def test_500_calibration_images_at_224_px_stay_under_80_mib(tmp_path: Path) -> None:
    """The issue's bound, on the worst case: noise, which no compressor shrinks."""
    noise = np.random.default_rng(0).integers(0, 256, (500, 224, 224, 3), dtype=np.uint8)
    manifest = CalibrationManifest(tuple(CalibrationEntry("0" * 64, f"c/{i}.png")
                                         for i in range(500)))
    save_npz(tmp_path / "calibration.npz", noise, manifest, DEIT)
    size = (tmp_path / "calibration.npz").stat().st_size
    assert size <= 80 * 2**20, f"{size / 2**20:.1f} MiB"
    batch = load_npz(tmp_path / "calibration.npz", manifest)
    assert batch.pixels[-1].tobytes() == normalize(noise[-1], DEIT.mean, DEIT.std).tobytes()


def _damaged(**change: np.ndarray) -> dict[str, np.ndarray]:
    images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    return {**image_set.encode(images, DEIT.mean, DEIT.std), **change}


@pytest.mark.parametrize(("change", "message"), [
    ({"png_offsets": np.array([0, 5, 7])}, r"damaged \(png_offsets do not cover png\)"),
    ({"image_shape": np.array([4, 4, 4])}, r"damaged \(image_shape \(4, 4, 4\) is not"),
    ({"layout": np.array("NHWC")}, r"damaged \(layout 'NHWC' is not 'NCHW'\)"),
    ({"mean": np.array([0.5])}, r"damaged \(mean/std are not 3 values each"),
    ({"image_shape": np.array([4, 5, 3])}, r"image 0 is RGB \(4, 4, 3\), expected RGB \(4, 5, 3\)"),
])
def test_a_damaged_set_is_one_line_with_the_fix(change: dict[str, np.ndarray], message: str
                                                ) -> None:
    with pytest.raises(DataError, match=message) as e:
        image_set.model_input(_damaged(**change), what="set x", fix=FIX)
    assert str(e.value).startswith("set x") and str(e.value).endswith(FIX)
    assert "\n" not in str(e.value)


def test_a_corrupt_png_names_the_image() -> None:
    arrays = _damaged()
    png = arrays["png"].copy()
    second = int(arrays["png_offsets"][1])
    png[second + 20: second + 40] = 0  # inside the second image's header chunk
    with pytest.raises(DataError, match=r"^set x: image 1 is not a readable PNG \(.*\); redo it$"):
        image_set.decode_images({**arrays, "png": png}, what="set x", fix=FIX)
