"""The fixed verification set: balanced selection, exact round trip, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xpdeploy.data.image_set import holds_float32
from xpdeploy.data.npz import write_npz
from xpdeploy.data.preprocess import normalize
from xpdeploy.data.verify_set import load_verify_set, save_verify_set, select_indices
from xpdeploy.errors import DataError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _batch(n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8)
    return images, np.arange(n, dtype=np.int64) % 3


def _save(path: Path, images: np.ndarray, labels: np.ndarray, **kw: object) -> None:
    meta = {"source": "s", "synthetic": False, "class_names": [], **kw}
    save_verify_set(path, images, labels, mean=MEAN, std=STD, **meta)  # type: ignore[arg-type]


def test_round_trip_is_exact(tmp_path: Path) -> None:
    images, labels = _batch()
    path = tmp_path / "verify" / "verify_set.npz"
    _save(path, images, labels, source="digits", class_names=["a", "b"])
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    got = load_verify_set(path)
    assert got.pixels.dtype == np.float32 and got.pixels.flags.c_contiguous
    assert got.pixels.shape == (5, 3, 4, 4)
    assert got.pixels.tobytes() == normalize(images, MEAN, STD).tobytes()
    assert got.labels.dtype == np.int64 and got.labels.tolist() == labels.tolist()
    assert (got.source, got.synthetic, got.class_names) == ("digits", False, ["a", "b"])
    assert len(got) == 5
    first = load_verify_set(path, 2)  # the first samples only (parity checks), nothing else decoded
    assert first.pixels.tobytes() == got.pixels[:2].tobytes() and first.labels.tolist() == [0, 1]


def test_same_content_same_bytes(tmp_path: Path) -> None:
    """Fixed zip timestamps: re-saving equal content gives an equal digest (resume relies on it)."""
    images, labels = _batch()
    for name in ("a.npz", "b.npz"):
        _save(tmp_path / name, images, labels, synthetic=True)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    got = load_verify_set(tmp_path / "b.npz")
    assert got.synthetic is True and got.class_names == []


def test_path_without_npz_suffix_is_kept(tmp_path: Path) -> None:
    images, labels = _batch()
    _save(tmp_path / "batch", images, labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch"]
    assert load_verify_set(tmp_path / "batch").pixels.shape == (5, 3, 4, 4)


def test_save_refuses_wrong_arrays(tmp_path: Path) -> None:
    images, labels = _batch()
    with pytest.raises(ValueError, match=r"uint8 \(N, H, W, 3\)"):
        _save(tmp_path / "v.npz", images.astype(np.float32), labels)
    with pytest.raises(ValueError, match=r"uint8 \(N, H, W, 3\)"):
        _save(tmp_path / "v.npz", images.transpose(0, 3, 1, 2), labels)  # NCHW
    with pytest.raises(ValueError, match=r"shaped \(5,\)"):
        _save(tmp_path / "v.npz", images, labels[:3])
    assert not (tmp_path / "v.npz").exists()


def test_a_float32_file_of_an_older_xpdeploy_is_read_as_it_is(tmp_path: Path) -> None:
    """Run folders and bundles written before images were stored hold the model input itself."""
    pixels = np.random.default_rng(1).standard_normal((3, 3, 4, 4)).astype(np.float32)
    write_npz(tmp_path / "old.npz", {
        "pixels": pixels, "labels": np.arange(3, dtype=np.int64), "source": np.array("s"),
        "synthetic": np.array(False), "class_names": np.array(["a"])})
    got = load_verify_set(tmp_path / "old.npz")
    assert got.pixels.tobytes() == pixels.tobytes() and got.labels.tolist() == [0, 1, 2]
    assert load_verify_set(tmp_path / "old.npz", 2).pixels.tobytes() == pixels[:2].tobytes()
    # make_bundle tells such a run how to store its images (a bundle 4-7 times smaller)
    _save(tmp_path / "new.npz", *_batch())
    assert holds_float32(tmp_path / "old.npz") and not holds_float32(tmp_path / "new.npz")
    assert not holds_float32(tmp_path / "missing.npz")


def test_a_file_with_neither_images_nor_pixels(tmp_path: Path) -> None:
    write_npz(tmp_path / "v.npz", {
        "labels": np.arange(3, dtype=np.int64), "source": np.array("s"),
        "synthetic": np.array(False), "class_names": np.array(["a"])})
    with pytest.raises(DataError) as e:
        load_verify_set(tmp_path / "v.npz")
    assert str(e.value) == (
        f"verification set {tmp_path / 'v.npz'} holds neither images (png, png_offsets, "
        "image_shape, mean, std, layout missing) nor pixels; rerun the 'load' stage with --force "
        "to write it again")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_verify_set(tmp_path / "nope.npz")
    assert str(e.value) == (
        f"verification set {tmp_path / 'nope.npz'} does not exist; "
        "rerun the 'load' stage with --force to write it again"
    )


def test_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "v.npz"
    path.write_bytes(b"garbage, not a zip")
    with pytest.raises(DataError) as e:
        load_verify_set(path)
    msg = str(e.value)
    assert msg.startswith(f"verification set {path} is unreadable (")
    assert msg.endswith("rerun the 'load' stage with --force to write it again")
    assert "\n" not in msg


def test_file_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "v.npz"
    np.savez(path, pixels=np.zeros((1, 3, 2, 2), np.float32))
    with pytest.raises(DataError, match=r"lacks labels, source, synthetic, class_names \(has: "):
        load_verify_set(path)


def test_truncated_file(tmp_path: Path) -> None:
    images, labels = _batch()
    path = tmp_path / "v.npz"
    _save(path, images, labels)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="is unreadable"):
        load_verify_set(path)


def test_selection_is_balanced_sorted_and_seeded() -> None:
    labels = np.repeat(np.arange(4), [50, 30, 10, 2])
    idx = select_indices(labels, 20, seed=0)
    assert idx.dtype == np.int64 and len(idx) == 20 and len(set(idx.tolist())) == 20
    assert (np.diff(idx) > 0).all()
    counts = np.bincount(labels[idx], minlength=4)
    # round-robin: the 2-sample class gives both, the others share the rest evenly
    assert counts[3] == 2 and sorted(counts[:3].tolist()) == [6, 6, 6]
    assert select_indices(labels, 20, seed=0).tolist() == idx.tolist()
    assert select_indices(labels, 20, seed=1).tolist() != idx.tolist()


def test_selection_uneven_round() -> None:
    labels = np.repeat(np.arange(3), 10)
    counts = np.bincount(labels[select_indices(labels, 7, seed=5)], minlength=3)
    assert sorted(counts.tolist()) == [2, 2, 3]


def test_selection_caps_at_available() -> None:
    labels = np.array([2, 0, 1])
    assert select_indices(labels, 100, seed=0).tolist() == [0, 1, 2]
    assert select_indices(labels, 0, seed=0).tolist() == []
    assert select_indices(np.array([], dtype=np.int64), 5, seed=0).tolist() == []
