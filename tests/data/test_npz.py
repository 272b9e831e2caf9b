"""One .npz writer: the verification set, calibration batches and reference logits all use it."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from xpdeploy.data import npz
from xpdeploy.errors import DataError


def _stamps(path: Path) -> set[tuple[int, ...]]:
    with zipfile.ZipFile(path) as zf:
        return {info.date_time for info in zf.infolist()}


def test_every_npz_of_a_run_comes_from_the_one_writer(tmp_path: Path) -> None:
    """np.savez would stamp the current time; the one writer stamps 1980-01-01, so each file's
    zip entries show it was written by :func:`npz.write_npz` (and is byte-stable)."""
    from xpdeploy.artifacts import DataConfig
    from xpdeploy.data.calibration import CalibrationEntry, CalibrationManifest, save_npz
    from xpdeploy.data.verify_set import save_verify_set

    images = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    cfg = DataConfig(input_size=(3, 4, 4), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    save_verify_set(tmp_path / "verify.npz", images, np.array([0, 1]), mean=cfg.mean,
                    std=cfg.std, source="test", synthetic=False, class_names=["a", "b"])
    manifest = CalibrationManifest(tuple(CalibrationEntry("0" * 64, f"a/{i}.png")
                                         for i in range(2)))
    save_npz(tmp_path / "calibration.npz", images, manifest, cfg)
    npz.write_npz(tmp_path / "logits.npz", {"original": np.ones((2, 10), dtype=np.float32)})
    for name in ("verify.npz", "calibration.npz", "logits.npz"):
        assert _stamps(tmp_path / name) == {(1980, 1, 1, 0, 0, 0)}, name
    first = (tmp_path / "logits.npz").read_bytes()
    npz.write_npz(tmp_path / "logits.npz", {"original": np.ones((2, 10), dtype=np.float32)})
    assert (tmp_path / "logits.npz").read_bytes() == first


def test_the_reader_names_the_file_and_the_fix(tmp_path: Path) -> None:
    npz.write_npz(tmp_path / "x.npz", {"a": np.arange(3)})
    assert list(npz.read_npz(tmp_path / "x.npz", ("a",), what="test set", fix="redo")["a"]) == \
        [0, 1, 2]
    with pytest.raises(DataError, match=r"test set .*x\.npz lacks b .*; redo"):
        npz.read_npz(tmp_path / "x.npz", ("b",), what="test set", fix="redo")
    # optional keys: returned when present, absent otherwise, never an error
    got = npz.read_npz(tmp_path / "x.npz", (), what="test set", fix="redo", optional=("a", "b"))
    assert set(got) == {"a"}
