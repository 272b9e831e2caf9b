"""The fixed verification set: balanced selection, exact round trip, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xpdeploy.data.verify_set import load_verify_set, save_verify_set, select_indices
from xpdeploy.errors import DataError


def _batch(n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, 3, 4, 4)).astype(np.float32), np.arange(n, dtype=np.int64) % 3


def test_round_trip_is_exact(tmp_path: Path) -> None:
    pixels, labels = _batch()
    path = tmp_path / "verify" / "verify_set.npz"
    save_verify_set(path, pixels, labels, source="digits", synthetic=False, class_names=["a", "b"])
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    got = load_verify_set(path)
    assert got.pixels.dtype == np.float32 and got.pixels.flags.c_contiguous
    assert got.pixels.tobytes() == pixels.tobytes()
    assert got.labels.dtype == np.int64 and got.labels.tolist() == labels.tolist()
    assert (got.source, got.synthetic, got.class_names) == ("digits", False, ["a", "b"])
    assert len(got) == 5


def test_same_content_same_bytes(tmp_path: Path) -> None:
    """Fixed zip timestamps: re-saving equal content gives an equal digest (resume relies on it)."""
    pixels, labels = _batch()
    for name in ("a.npz", "b.npz"):
        save_verify_set(tmp_path / name, pixels, labels, source="s", synthetic=True, class_names=[])
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    got = load_verify_set(tmp_path / "b.npz")
    assert got.synthetic is True and got.class_names == []


def test_path_without_npz_suffix_is_kept(tmp_path: Path) -> None:
    pixels, labels = _batch()
    save_verify_set(tmp_path / "batch", pixels, labels, source="s", synthetic=False, class_names=[])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch"]
    assert load_verify_set(tmp_path / "batch").pixels.shape == (5, 3, 4, 4)


def test_save_refuses_wrong_arrays(tmp_path: Path) -> None:
    pixels, labels = _batch()
    with pytest.raises(ValueError, match="float32"):
        save_verify_set(
            tmp_path / "v.npz",
            pixels.astype(np.float64),
            labels,
            source="s",
            synthetic=False,
            class_names=[],
        )
    with pytest.raises(ValueError, match=r"shaped \(5,\)"):
        save_verify_set(
            tmp_path / "v.npz", pixels, labels[:3], source="s", synthetic=False, class_names=[]
        )
    assert not (tmp_path / "v.npz").exists()


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
    pixels, labels = _batch()
    path = tmp_path / "v.npz"
    save_verify_set(path, pixels, labels, source="s", synthetic=False, class_names=[])
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
