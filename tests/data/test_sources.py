"""Data sources: image folders (layout, errors), digits (stratified split), synthetic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.data import CFG
from xpdeploy.data.preprocess import preprocess_image
from xpdeploy.data.sources import ArraySplit, open_split
from xpdeploy.errors import DataError
from xpdeploy.spec import DataConfigSection


def _save(path: Path, size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)


def _make_folder(root: Path, classes: dict[str, list[str]] | None = None) -> Path:
    """train/ and val/ with a few tiny images of odd sizes; one greyscale, one upper-case .JPG."""
    classes = classes or {"cat": ["a.png", "b.JPG"], "dog": ["c.png"], "emu": ["d.jpeg"]}
    for split in ("train", "val"):
        for i, (name, files) in enumerate(classes.items()):
            for j, f in enumerate(files):
                mode = "L" if (i, j) == (1, 0) else "RGB"
                _save(root / split / name / f, (17 + 3 * j, 23 + i), mode, seed=i * 10 + j)
    return root


def _section(root: Path, **kw: object) -> DataConfigSection:
    return DataConfigSection(source="imagefolder", root=root, **kw)


def test_imagefolder_labels_names_shapes(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "data")
    ds = open_split(_section(root), CFG, "train", num_classes=3, seed=0)
    assert isinstance(ds, torch.utils.data.Dataset)
    assert ds.class_names == ["cat", "dog", "emu"]
    assert ds.num_classes == 3
    assert ds.labels.dtype == np.int64
    assert ds.labels.tolist() == [0, 0, 1, 2]
    assert ds.source == f"imagefolder:{root / 'train'}"
    assert ds.synthetic is False
    assert len(ds) == 4
    for i in range(len(ds)):
        pixels, label = ds[i]
        assert pixels.shape == (3, 32, 32) and pixels.dtype == np.float32
        assert isinstance(label, int) and label == ds.labels[i]
    # the grey image (dog/c.png) came out as 3 equal channels
    grey, _ = ds[2]
    assert (grey[0] == grey[1]).all()
    # decoding goes through the one preprocessing function
    with Image.open(root / "train" / "cat" / "a.png") as img:
        assert ds[0][0].tobytes() == preprocess_image(img, CFG).tobytes()


def test_imagefolder_ignores_hidden_and_non_images(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "data")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "cat" / "._a.png").write_bytes(b"macOS resource fork")
    (root / "train" / ".cache").mkdir()
    ds = open_split(_section(root), CFG, "train", num_classes=None, seed=0)
    assert len(ds) == 4 and ds.class_names == ["cat", "dog", "emu"]


def test_dataloader_batches(tmp_path: Path) -> None:
    ds = open_split(_section(_make_folder(tmp_path)), CFG, "val", num_classes=3, seed=0)
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert tuple(x.shape) == (4, 3, 32, 32) and y.tolist() == [0, 0, 1, 2]


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.root .*nowhere does not exist; set data\.root"):
        open_split(_section(tmp_path / "nowhere"), CFG, "train", num_classes=None, seed=0)


def test_missing_val_folder(tmp_path: Path) -> None:
    _save(tmp_path / "train" / "cat" / "a.png", (8, 8))
    with pytest.raises(DataError) as e:
        open_split(_section(tmp_path), CFG, "val", num_classes=None, seed=0)
    msg = str(e.value)
    assert f"val folder {tmp_path / 'val'} does not exist" in msg
    assert "(folders there: train)" in msg and "data.val_dir" in msg
    assert "\n" not in msg


def test_custom_split_dir_names(tmp_path: Path) -> None:
    _save(tmp_path / "training" / "cat" / "a.png", (8, 8))
    _save(tmp_path / "training" / "dog" / "b.png", (8, 8))
    section = _section(tmp_path, train_dir="training")
    ds = open_split(section, CFG, "train", num_classes=2, seed=0)
    assert ds.class_names == ["cat", "dog"]
    with pytest.raises(DataError, match=r"set data\.train_dir"):
        open_split(_section(tmp_path), CFG, "train", num_classes=2, seed=0)


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError) as e:
        open_split(_section(tmp_path), CFG, "train", num_classes=None, seed=0)
    assert str(e.value) == (
        f"image folder {tmp_path / 'train'} has no class folders with images "
        "(.jpg, .jpeg, .png, .bmp, .webp, .gif, .tif, .tiff); "
        f"expected {tmp_path / 'train'}/<class>/<image>"
    )


def test_flat_folder_says_what_it_found(tmp_path: Path) -> None:
    _save(tmp_path / "train" / "a.png", (8, 8))
    with pytest.raises(DataError, match=r"found 1 images directly in it"):
        open_split(_section(tmp_path), CFG, "train", num_classes=None, seed=0)


def test_class_folder_without_images(tmp_path: Path) -> None:
    _save(tmp_path / "train" / "cat" / "a.png", (8, 8))
    (tmp_path / "train" / "dog").mkdir()
    with pytest.raises(DataError, match=r"class folders without images in .*train: dog; add"):
        open_split(_section(tmp_path), CFG, "train", num_classes=None, seed=0)


def test_corrupt_image_raises_when_decoded(tmp_path: Path) -> None:
    root = _make_folder(tmp_path)
    bad = root / "train" / "emu" / "x.jpg"
    bad.write_bytes(b"this is not a jpeg at all")
    ds = open_split(_section(root), CFG, "train", num_classes=3, seed=0)  # listing does not decode
    index = [str(f) for f in ds.files].index(str(bad))
    with pytest.raises(DataError) as e:
        ds[index]
    msg = str(e.value)
    assert msg.startswith(f"cannot read image {bad}: ")
    assert "cannot identify image file" in msg and msg.endswith("replace the file or delete it")


def test_truncated_image(tmp_path: Path) -> None:
    root = _make_folder(tmp_path)
    path = root / "train" / "cat" / "a.png"
    path.write_bytes(path.read_bytes()[:60])
    ds = open_split(_section(root), CFG, "train", num_classes=3, seed=0)
    with pytest.raises(DataError, match=rf"cannot read image {path}: .*replace the file"):
        ds[0]


def test_class_mismatch_train_vs_val(tmp_path: Path) -> None:
    root = _make_folder(tmp_path)
    _save(root / "val" / "fox" / "z.png", (8, 8))
    msg = "only in train: none; only in val: fox"
    with pytest.raises(DataError, match=msg):
        open_split(_section(root), CFG, "val", num_classes=None, seed=0)
    with pytest.raises(DataError, match=msg):  # caught from either side
        open_split(_section(root), CFG, "train", num_classes=None, seed=0)


def test_val_only_folder_opens(tmp_path: Path) -> None:
    _save(tmp_path / "val" / "cat" / "a.png", (8, 8))
    _save(tmp_path / "val" / "dog" / "b.png", (8, 8))
    ds = open_split(_section(tmp_path), CFG, "val", num_classes=2, seed=0)
    assert ds.labels.tolist() == [0, 1]


def test_wrong_model_class_count(tmp_path: Path) -> None:
    root = _make_folder(tmp_path)
    with pytest.raises(DataError) as e:
        open_split(_section(root), CFG, "train", num_classes=1000, seed=0)
    assert str(e.value) == (
        "data has 3 classes (cat, dog, emu) but the model has 1000 outputs; "
        "set model.kwargs.num_classes: 3"
    )


# --------------------------------------------------------------------------------------------------
# digits


def test_digits_split() -> None:
    section = DataConfigSection(source="digits")
    train = open_split(section, CFG, "train", num_classes=10, seed=0)
    val = open_split(section, CFG, "val", num_classes=10, seed=0)
    assert len(train) + len(val) == 1797
    assert len(val) == pytest.approx(0.2 * 1797, abs=1)
    assert train.class_names == [str(i) for i in range(10)] and train.num_classes == 10
    assert train.source == "digits" and not train.synthetic
    # stratified: every class holds out val_fraction of its samples, to within one sample
    per_class = np.bincount(train.labels, minlength=10) + np.bincount(val.labels, minlength=10)
    assert np.abs(np.bincount(val.labels, minlength=10) - 0.2 * per_class).max() <= 1
    pixels, label = val[0]
    assert pixels.shape == (3, 32, 32) and pixels.dtype == np.float32
    assert np.isfinite(pixels).all() and label == val.labels[0]
    assert pixels.min() < 0 < pixels.max()  # upsampled strokes on a black background


def test_digits_deterministic_per_seed() -> None:
    section = DataConfigSection(source="digits", val_fraction=0.1)
    small = CFG.model_copy(update={"input_size": (3, 8, 8)})
    a = open_split(section, small, "val", num_classes=None, seed=1)
    b = open_split(section, small, "val", num_classes=None, seed=1)
    c = open_split(section, small, "val", num_classes=None, seed=2)
    assert a.labels.tolist() == b.labels.tolist()
    assert a[5][0].tobytes() == b[5][0].tobytes()
    assert a.labels.tolist() != c.labels.tolist()


def test_digits_wrong_model_classes() -> None:
    with pytest.raises(DataError, match=r"data has 10 classes \(0, 1, 2, \.\.\. \(10 in all\)\) "):
        open_split(DataConfigSection(source="digits"), CFG, "train", num_classes=1000, seed=0)


def test_array_split_without_cache_gives_same_bytes() -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8), dtype=np.uint8)
    labels = np.array([0, 1, 0])
    cached = ArraySplit(images, labels, ["a", "b"], CFG, "digits", False)
    lazy = ArraySplit(images, labels, ["a", "b"], CFG, "digits", False, cache_limit_bytes=0)
    assert cached.cache is not None and lazy.cache is None
    for i in range(3):
        assert cached[i][0].tobytes() == lazy[i][0].tobytes()
    cached[0][0][:] = 0  # editing a returned sample does not touch the cache
    assert cached[0][0].tobytes() == lazy[0][0].tobytes()


# --------------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_flagged_and_deterministic() -> None:
    section = DataConfigSection(source="synthetic", synthetic_samples=6)
    a = open_split(section, CFG, "train", num_classes=4, seed=3)
    b = open_split(section, CFG, "train", num_classes=4, seed=3)
    v = open_split(section, CFG, "val", num_classes=4, seed=3)
    assert a.synthetic and a.source == "synthetic"
    assert a.class_names == ["class_0", "class_1", "class_2", "class_3"]
    assert len(a) == 6 and a.labels.dtype == np.int64
    assert ((a.labels >= 0) & (a.labels < 4)).all()
    assert a.labels.tolist() == b.labels.tolist()
    assert all(a[i][0].tobytes() == b[i][0].tobytes() for i in range(6))
    assert a[0][0].tobytes() != v[0][0].tobytes()  # val draws from seed + 1
    assert a[0][0].shape == (3, 32, 32)


def test_synthetic_class_count() -> None:
    section = DataConfigSection(source="synthetic", synthetic_samples=4, num_classes=5)
    assert open_split(section, CFG, "val", num_classes=None, seed=0).num_classes == 5
    with pytest.raises(DataError, match=r"set data\.num_classes: 10"):
        open_split(DataConfigSection(source="synthetic"), CFG, "val", num_classes=None, seed=0)
    with pytest.raises(DataError, match=r"data\.num_classes is 5 but the model has 3 outputs"):
        open_split(section, CFG, "val", num_classes=3, seed=0)
