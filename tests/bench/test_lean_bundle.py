"""bench/lean_bundle.py's ImageNet-layout tree, on a made-up copy of the shared files' layout."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.lean_bundle import OVERRIDES, build_tree


def _datasets(root: Path) -> Path:
    """imagenet-classes.tsv (3 classes) and a sample tar with photos of 2 of them."""
    root.mkdir()
    (root / "imagenet-classes.tsv").write_text(
        "0\tn0001\ttench\n1\tn0002\tgoldfish\n2\tn0003\tshark\n")
    with tarfile.open(root / "imagenet-sample-250.tar", "w") as tar:
        for wnid, value in (("n0001", 10), ("n0003", 200)):
            buf = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="JPEG")
            info = tarfile.TarInfo(f"imagenet-sample/{wnid}_x.JPEG")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    return root


def test_every_class_gets_a_folder_with_its_photo_or_a_copy(tmp_path: Path) -> None:
    tree = build_tree(_datasets(tmp_path / "shared"), tmp_path / "tree")
    for split in ("train", "val"):
        assert sorted(p.name for p in (tree / split).iterdir()) == ["n0001", "n0002", "n0003"]
        assert [p.name for p in (tree / split / "n0003").iterdir()] == ["n0003_x.JPEG"]
        # the class without a photo holds a copy of the first one
        assert [p.name for p in (tree / split / "n0002").iterdir()] == ["n0001_x.JPEG"]
    assert build_tree(tmp_path / "nowhere", tree) == tree  # complete: reused, nothing read


def test_missing_shared_files_say_where_to_point(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"imagenet-classes\.tsv is missing; pass --datasets"):
        build_tree(tmp_path / "nowhere", tmp_path / "tree")


def test_the_overrides_are_the_issues_command() -> None:
    assert "data.verify_samples=1000" in OVERRIDES and "model.pretrained=false" in OVERRIDES
