"""Calibration manifests: class-balanced draw, sha256sum layout, digest checks at use, CLI."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from xpdeploy.artifacts import DataConfig
from xpdeploy.cli.calibration import calib
from xpdeploy.data.calibration import (
    PreprocessMismatchWarning,
    load_array,
    load_batches,
    load_images,
    load_npz,
    make_manifest,
    preprocess_mismatch,
    read_manifest,
    save_npz,
    verify,
)
from xpdeploy.data.preprocess import preprocess_image
from xpdeploy.errors import DataError

CFG = DataConfig(input_size=(3, 16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                 interpolation="bilinear", crop_pct=0.875)
PER_CLASS = {"cat": 7, "dog": 5, "fox": 6}


def _write_image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(20 + seed % 5, 24, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """Three classes (PNG and JPEG mixed), one nested image, plus a hidden file and a text file."""
    root = tmp_path / "images"
    seed = 0
    for name, n in PER_CLASS.items():
        for i in range(n):
            ext = ".png" if i % 2 else ".JPG"
            sub = "nested/" if i == 0 else ""
            _write_image(root / name / f"{sub}{name}_{i}{ext}", seed)
            seed += 1
    (root / "cat" / ".hidden.png").write_bytes(b"not an image")
    (root / "dog" / "notes.txt").write_text("ignored")
    return root


def _make(image_dir: Path, tmp_path: Path, count: int = 9, seed: int = 0, name: str = "m.txt",
          preprocess: DataConfig | None = None):
    return make_manifest(image_dir, count, seed, tmp_path / name, preprocess=preprocess)


def test_balanced_and_deterministic(image_dir: Path, tmp_path: Path) -> None:
    manifest = _make(image_dir, tmp_path, count=12)
    assert manifest.class_counts() == {"cat": 4, "dog": 4, "fox": 4}
    assert len({e.path for e in manifest.entries}) == 12
    _make(image_dir, tmp_path, count=12, name="again.txt")
    assert (tmp_path / "m.txt").read_bytes() == (tmp_path / "again.txt").read_bytes()
    other = _make(image_dir, tmp_path, count=12, seed=1, name="other.txt")
    assert [e.path for e in other.entries] != [e.path for e in manifest.entries]
    # a class that runs out gives its share to the others
    counts = _make(image_dir, tmp_path, count=17, name="most.txt").class_counts()
    assert counts["dog"] == 5 and sum(counts.values()) == 17


def test_flat_folder_is_one_class(tmp_path: Path) -> None:
    for i in range(4):
        _write_image(tmp_path / "flat" / f"{i}.png", i)
    manifest = make_manifest(tmp_path / "flat", 3, 0, tmp_path / "flat.txt")
    assert manifest.class_counts() == {".": 3}
    assert all("/" not in e.path for e in manifest.entries)


def test_round_trip_and_header(image_dir: Path, tmp_path: Path) -> None:
    manifest = _make(image_dir, tmp_path, preprocess=CFG)
    text = (tmp_path / "m.txt").read_text(encoding="utf-8")
    assert "# created-by: xpdeploy calib make" in text
    assert "# preprocess: size=16x16 crop_pct=0.875" in text
    assert re.search(r"^[0-9a-f]{64}  cat/", text, re.M)
    back = read_manifest(tmp_path / "m.txt")
    assert back.entries == manifest.entries
    assert back.metadata == manifest.metadata
    assert back.seed == 0 and back.source == str(image_dir)
    assert back.preprocess == CFG
    assert back.to_text() == text
    _make(image_dir, tmp_path, name="d.txt")
    default = read_manifest(tmp_path / "d.txt")
    assert default.metadata["preprocess"] == "model-default" and default.preprocess is None


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="no sha256sum binary here")
def test_sha256sum_can_check_it(image_dir: Path, tmp_path: Path) -> None:
    _make(image_dir, tmp_path)
    done = subprocess.run(["sha256sum", "--strict", "-c", str(tmp_path / "m.txt")],
                          cwd=image_dir, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(": OK") == 9


def test_changed_and_missing_images(image_dir: Path, tmp_path: Path) -> None:
    manifest = _make(image_dir, tmp_path)
    assert len(verify(manifest, image_dir)) == 9
    first, second = manifest.entries[0].path, manifest.entries[1].path
    _write_image(image_dir / first, 99)
    with pytest.raises(DataError) as err:
        verify(manifest, image_dir)
    message = str(err.value)
    assert f"calibration image {image_dir / first} changed" in message
    assert "re-make the manifest with xpdeploy calib make" in message and "\n" not in message
    (image_dir / second).unlink()
    with pytest.raises(DataError, match=r"and 1 other image of 9 is wrong \(1 missing, 1 changed"):
        verify(manifest, image_dir)
    with pytest.raises(DataError, match="changed"):
        next(load_batches(manifest, image_dir, CFG, batch_size=4))


def test_missing_image_error(image_dir: Path, tmp_path: Path) -> None:
    manifest = _make(image_dir, tmp_path)
    (image_dir / manifest.entries[3].path).unlink()
    with pytest.raises(DataError, match=r"calibration image .* is missing; restore the files"):
        verify(manifest, image_dir)


@pytest.mark.parametrize(
    ("line", "pattern"),
    [
        ("not a digest  cat/x.png", r"line 10: expected '<sha256>  <relative/path>'"),
        ("a" * 64 + "  ../escape.png", r"line 10: path '../escape.png' contains '\.\.'"),
        ("a" * 64 + "  /abs.png", r"line 10: path '/abs.png' is absolute"),
    ],
)
def test_malformed_line(image_dir: Path, tmp_path: Path, line: str, pattern: str) -> None:
    _make(image_dir, tmp_path)
    lines = (tmp_path / "m.txt").read_text().splitlines()
    lines[9] = line  # 1 title + 7 header lines + the first entry, then this
    (tmp_path / "bad.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=pattern):
        read_manifest(tmp_path / "bad.txt")


def test_truncated_manifest(image_dir: Path, tmp_path: Path) -> None:
    _make(image_dir, tmp_path)
    lines = (tmp_path / "m.txt").read_text().splitlines()
    (tmp_path / "cut.txt").write_text("\n".join(lines[:-2]) + "\n")
    with pytest.raises(DataError, match="says count 9 but lists 7 images"):
        read_manifest(tmp_path / "cut.txt")


def test_bad_counts_and_folders(image_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"has 18 images in 3 classes, fewer than the 19 asked"):
        _make(image_dir, tmp_path, count=19)
    with pytest.raises(DataError, match="count 0 is not positive"):
        _make(image_dir, tmp_path, count=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no images"):
        make_manifest(tmp_path / "empty", 1, 0, tmp_path / "e.txt")
    _write_image(image_dir / "loose.png", 1)
    with pytest.raises(DataError, match=r"both class folders .* and 1 loose"):
        _make(image_dir, tmp_path)
    assert not (tmp_path / "m.txt").exists()


def test_load_array_matches_preprocess_image(image_dir: Path, tmp_path: Path) -> None:
    manifest = _make(image_dir, tmp_path, count=5, preprocess=CFG)
    pixels = load_array(manifest, image_dir, CFG)
    assert pixels.shape == (5, 3, 16, 16) and pixels.dtype == np.float32
    for row, entry in zip(pixels, manifest.entries, strict=True):
        with Image.open(image_dir / entry.path) as img:
            np.testing.assert_array_equal(row, preprocess_image(img, CFG))
    batches = list(load_batches(manifest, image_dir, CFG, batch_size=2))
    assert [len(b) for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(batches), pixels)
    images = load_images(manifest, image_dir, CFG)
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
    save_npz(tmp_path / "calib.npz", images, manifest, CFG)
    back = load_npz(tmp_path / "calib.npz", manifest)
    assert back.pixels.tobytes() == pixels.tobytes()  # the float32 preprocess_image gives
    assert back.files == [e.path for e in manifest.entries]
    other = _make(image_dir, tmp_path, count=5, seed=3, name="o.txt")
    with pytest.raises(DataError, match="made from another manifest"):
        load_npz(tmp_path / "calib.npz", other)


def test_preprocess_mismatch_flagged(image_dir: Path, tmp_path: Path) -> None:
    manifest = _make(image_dir, tmp_path, count=3, preprocess=CFG)
    assert preprocess_mismatch(manifest, CFG) is None
    used = CFG.model_copy(update={"input_size": (3, 8, 8), "interpolation": "bicubic"})
    mismatch = preprocess_mismatch(manifest, used)
    assert mismatch is not None and "size (16, 16) vs (8, 8)" in mismatch
    assert "interpolation bilinear vs bicubic" in mismatch
    with pytest.warns(PreprocessMismatchWarning, match="made for other preprocessing"):
        assert load_array(manifest, image_dir, used).shape == (3, 3, 8, 8)
    default = _make(image_dir, tmp_path, count=3, name="d.txt")
    assert preprocess_mismatch(default, used) is None


def test_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import xpdeploy.data.calibration, xpdeploy.cli.calibration\n"
        "assert sys.modules['torch'] is None\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr


def test_cli_make_and_check(image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "calibration" / "set.txt"
    result = CliRunner().invoke(calib, [
        "make", str(image_dir), "--count", "6", "--seed", "2", "-o", str(out), "--size", "16",
        "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--crop-pct", "0.875",
        "--interpolation", "bilinear",
    ])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 6 images from 3 classes (2 per class), seed 2" in result.stdout
    assert "fewer than the 500+" in result.stdout
    assert read_manifest(out).preprocess == CFG
    ok = CliRunner().invoke(calib, ["check", str(out), "--root", str(image_dir)])
    assert ok.exit_code == 0 and "OK: 6 images" in ok.stdout
    assert CliRunner().invoke(calib, ["check", str(out)]).exit_code == 0  # recorded source

    (image_dir / read_manifest(out).entries[0].path).unlink()
    bad = CliRunner().invoke(calib, ["check", str(out), "--root", str(image_dir)])
    _assert_one_line_error(bad, r"^error: calibration image .* is missing; restore the files")


def test_cli_errors(image_dir: Path, tmp_path: Path) -> None:
    too_many = CliRunner().invoke(calib, ["make", str(image_dir), "-n", "50", "-o",
                                          str(tmp_path / "x.txt")])
    _assert_one_line_error(too_many, r"has 18 images in 3 classes, fewer than the 50 asked for")
    partial = CliRunner().invoke(calib, ["make", str(image_dir), "-n", "3", "-o",
                                         str(tmp_path / "x.txt"), "--size", "16"])
    _assert_one_line_error(partial, r"--size given without --mean, --std")
    crop = CliRunner().invoke(calib, ["make", str(image_dir), "-n", "3", "-o",
                                      str(tmp_path / "x.txt"), "--size", "16", "--mean", "0,0,0",
                                      "--std", "1,1,1", "--crop-pct", "1.5"])
    _assert_one_line_error(crop, r"crop_pct 1.5 is outside \(0, 1\]")
    assert not (tmp_path / "x.txt").exists()


def _assert_one_line_error(result, pattern: str) -> None:
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    assert re.search(pattern, lines[0]), lines[0]


def test_per_class_counts_differ_by_at_most_one(image_dir: Path, tmp_path: Path) -> None:
    """Per-class counts never differ by more than one while every class still has images."""
    for count in (3, 8, 15):
        counts = list(_make(image_dir, tmp_path, count=count).class_counts().values())
        assert max(counts) - min(counts) <= 1
