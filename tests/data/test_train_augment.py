"""Training augmentation seeded per draw: reproducible in any process, identity when off."""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from tests.data import CFG
from xpdeploy.data.preprocess import preprocess_image
from xpdeploy.data.sources import ArraySplit, ImageFolderSplit, SourceSplit, open_split
from xpdeploy.data.train_augment import (
    AugmentedSplit,
    BatchMixer,
    describe,
    needs_images,
    seeded_draw,
    soft_targets,
)
from xpdeploy.errors import ConfigError, DataError
from xpdeploy.spec import AugmentConfig, DataConfigSection

DEIT = AugmentConfig(
    hflip=True,
    rand_augment="rand-m9-mstd0.5-inc1",
    random_resized_crop=(0.08, 1.0),
    random_erasing=0.25,
)
#: The image-level path with nothing random: RandAugment choosing 0 ops per image.
IMAGE_IDENTITY = AugmentConfig(rand_augment="rand-n0")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> ImageFolderSplit:
    """train/ (and val/) with 4 PNGs of odd sizes (one greyscale) in 2 classes."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i, (cls, size) in enumerate([("a", (40, 29)), ("a", (23, 31)), ("b", (36, 36)),
                                         ("b", (50, 21))]):
            path = root / split / cls / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).convert("L" if i == 1 else "RGB").save(path)
    split = open_split(DataConfigSection(source="imagefolder", root=root), CFG, "train",
                       num_classes=2, seed=0)
    assert isinstance(split, ImageFolderSplit)
    return split


@pytest.fixture(scope="module")
def digits() -> ArraySplit:
    split = open_split(DataConfigSection(source="digits"), CFG, "train", num_classes=10, seed=0)
    assert isinstance(split, ArraySplit) and split.cache is not None
    return split


def _rng_states() -> tuple[Any, ...]:
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _same_states(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return (a[0] == b[0] and all(np.array_equal(x, y) for x, y in zip(a[1], b[1], strict=True))
            and torch.equal(a[2], b[2]))


# --------------------------------------------------------------------------------------------------
# seeded_draw


def test_seeded_draw_repeats_and_restores() -> None:
    def draw(seed: int) -> tuple[float, float, float, float]:
        with seeded_draw(seed) as rng:
            return random.random(), np.random.rand(), torch.rand(1).item(), rng.random()

    before = _rng_states()
    a = draw(2**40 + 7)  # above numpy's legacy 2**32 limit
    assert _same_states(before, _rng_states())
    assert draw(2**40 + 7) == a
    assert draw(3) != a
    assert len(set(a)) == 4  # unrelated streams per generator
    with pytest.raises(RuntimeError), seeded_draw(1):
        random.random()
        raise RuntimeError
    assert _same_states(before, _rng_states())
    with pytest.raises(ValueError, match="non-negative"), seeded_draw(-1):
        pass


# --------------------------------------------------------------------------------------------------
# load_image


def test_load_image_matches_getitem(folder: ImageFolderSplit, digits: ArraySplit) -> None:
    for split in (folder, digits):
        for i in range(3):
            img = split.load_image(i)
            assert img.mode == "RGB"
            assert preprocess_image(img, CFG).tobytes() == split[i][0].tobytes()
    assert folder.load_image(1).size == (23, 31)  # the greyscale file, decoded as is


def test_load_image_unreadable_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    split = ImageFolderSplit([bad], np.zeros(1, dtype=np.int64), ["x"], CFG, "test")
    with pytest.raises(DataError) as from_item:
        split[0]
    with pytest.raises(DataError) as from_load:
        split.load_image(0)
    assert str(from_load.value) == str(from_item.value)
    assert f"cannot read image {bad}" in str(from_load.value)


# --------------------------------------------------------------------------------------------------
# AugmentedSplit


def test_off_is_split_item_and_attributes(digits: ArraySplit) -> None:
    ds = AugmentedSplit(digits, CFG, AugmentConfig())
    assert len(ds) == len(digits) and ds.num_classes == 10
    assert ds.labels is digits.labels
    for i, seed in [(0, 0), (5, 123), (17, 2**63)]:
        pixels, label = ds[(i, seed)]
        assert pixels.tobytes() == digits[i][0].tobytes() and label == digits.labels[i]
    with pytest.raises(TypeError, match=r"\(index, draw_seed\)"):
        ds[3]  # type: ignore[index]


@pytest.mark.parametrize("which", ["folder", "digits"])
def test_image_level_identity_is_preprocess_image(
    which: str, folder: ImageFolderSplit, digits: ArraySplit
) -> None:
    split: SourceSplit = folder if which == "folder" else digits
    ds = AugmentedSplit(split, CFG, IMAGE_IDENTITY)
    assert needs_images(IMAGE_IDENTITY)
    for i in range(4):
        if isinstance(split, ImageFolderSplit):
            with Image.open(split.files[i]) as img:
                expected = preprocess_image(img, CFG)
        else:
            expected = preprocess_image(Image.fromarray(digits.images[i]), CFG)
        assert ds[(i, 99 + i)][0].tobytes() == expected.tobytes()


@pytest.mark.parametrize(
    "cfg",
    [AugmentConfig(hflip=True, crop_padding=2, random_erasing=0.5), DEIT,
     AugmentConfig(rand_augment="rand-m9-n3", crop_padding=1, random_erasing=1.0)],
    ids=["pixels", "deit", "ra-no-rrc"],
)
def test_deterministic_per_key_and_varies(
    cfg: AugmentConfig, folder: ImageFolderSplit, digits: ArraySplit
) -> None:
    for split in (folder, digits):
        ds = AugmentedSplit(split, CFG, cfg)
        before = _rng_states()
        outs = [ds[(1, seed)][0] for seed in range(6)]
        assert _same_states(before, _rng_states())  # draws leave the global generators alone
        for x in outs:
            assert x.shape == (3, 32, 32) and x.dtype == np.float32 and np.isfinite(x).all()
        assert ds[(1, 4)][0].tobytes() == outs[4].tobytes()
        assert len({x.tobytes() for x in outs}) > 1
        assert any(x.tobytes() != split[1][0].tobytes() for x in outs)


def test_dataloader_workers_and_pickle(folder: ImageFolderSplit) -> None:
    """The same keys give the same batches with 0 and 2 workers and after a pickle round trip."""
    ds = AugmentedSplit(folder, CFG, DEIT)
    keys = [(i % len(folder), 1000 + i) for i in range(12)]

    def batches(dataset: AugmentedSplit, workers: int) -> list[torch.Tensor]:
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=keys,
                                             num_workers=workers)
        return [x for x, _ in loader]

    single = batches(ds, 0)
    assert all(torch.equal(a, b) for a, b in zip(single, batches(ds, 2), strict=True))
    copy = pickle.loads(pickle.dumps(ds))
    assert all(torch.equal(a, b) for a, b in zip(single, batches(copy, 0), strict=True))


def test_bad_rand_augment_spec(digits: ArraySplit) -> None:
    # The pipeline file refuses a spec of the wrong shape; timm refuses unknown keys at start-up.
    with pytest.raises(ValidationError, match="not a timm RandAugment spec"):
        AugmentConfig(rand_augment="m9-rand")
    with pytest.raises(ConfigError, match="RandAugment spec"):
        AugmentedSplit(digits, CFG, AugmentConfig(rand_augment="rand-q5"))


def test_needs_images_and_describe() -> None:
    assert not needs_images(AugmentConfig(hflip=True, random_erasing=0.3))
    assert needs_images(AugmentConfig(random_resized_crop=(0.5, 1.0)))
    assert describe(AugmentConfig()) == {}
    assert describe(AugmentConfig(hflip=True, crop_padding=2)) == {
        "hflip": True, "crop_padding": 2, "level": "pixels"}
    assert describe(DEIT.model_copy(update={"mixup": 0.8, "cutmix": 1.0})) == {
        "random_resized_crop": [0.08, 1.0], "hflip": True, "rand_augment": "rand-m9-mstd0.5-inc1",
        "random_erasing": 0.25, "level": "image", "mixup": 0.8, "cutmix": 1.0, "mix_prob": 1.0,
        "mix_switch_prob": 0.5}
    assert describe(AugmentConfig(cutmix=1.0)) == {"cutmix": 1.0, "mix_prob": 1.0}


# --------------------------------------------------------------------------------------------------
# BatchMixer


def _batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 5


def test_mixer_mixes_deterministically() -> None:
    mixer = BatchMixer(AugmentConfig(mixup=0.8, cutmix=1.0), num_classes=5, label_smoothing=0.1)
    assert mixer.enabled
    x, y = _batch(8)
    before = _rng_states()
    out, targets = mixer(x.clone(), y, seed=11)
    assert _same_states(before, _rng_states())
    assert targets.shape == (8, 5) and targets.dtype == torch.float32
    assert torch.allclose(targets.sum(1), torch.ones(8))
    again, targets2 = mixer(x.clone(), y, seed=11)
    assert torch.equal(out, again) and torch.equal(targets, targets2)
    changed = 0
    for seed in range(8):  # mixup and cutmix both change pixels and soften the targets
        mixed, t = mixer(x.clone(), y, seed=seed)
        changed += not torch.equal(mixed, x)
        assert (t.max(1).values < 1 - 0.1 + 0.1 / 5 - 1e-6).any()
    assert changed >= 6


def test_mixer_mixup_only_blends_pairs() -> None:
    mixer = BatchMixer(AugmentConfig(mixup=0.8), num_classes=5)
    x, y = _batch(4)
    out, t = mixer(x.clone(), y, seed=0)
    lam = t[0, int(y[0])].item()  # sample 0 is mixed with sample 3 (timm flips the batch)
    assert 0 < lam < 1
    assert torch.allclose(out[0], lam * x[0] + (1 - lam) * x[3], atol=1e-6)


def test_mixer_odd_batch_and_disabled() -> None:
    mixer = BatchMixer(AugmentConfig(mixup=0.8), num_classes=5, label_smoothing=0.1)
    x, y = _batch(5)
    out, t = mixer(x.clone(), y, seed=3)
    assert t.shape == (5, 5) and torch.allclose(t.sum(1), torch.ones(5))
    assert not torch.equal(out[:4], x[:4])
    assert torch.equal(out[4], x[4])  # the odd one out keeps its image and a smoothed one-hot
    assert torch.equal(t[4], soft_targets(y[4:], 5, 0.1)[0])
    x1, y1 = _batch(1)
    out1, t1 = mixer(x1.clone(), y1, seed=3)
    assert torch.equal(out1, x1) and torch.equal(t1, mixer.soft_targets(y1))

    off = BatchMixer(AugmentConfig(), num_classes=5, label_smoothing=0.1)
    assert not off.enabled
    out, t = off(x.clone(), y, seed=0)
    assert torch.equal(out, x)
    assert torch.allclose(t[0], torch.tensor([0.92, 0.02, 0.02, 0.02, 0.02]))
