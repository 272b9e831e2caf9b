"""INT8 calibration sets: manifests of images (path + sha256), class-balanced, verified at use.

A calibration set is described, not stored: the manifest lists image paths relative to a root
folder with each file's sha256, so a set is small, diffable and reproducible, and any image that
changed or went missing since the manifest was made is caught before it skews INT8 ranges.

Manifest format (UTF-8 text, ``.txt``), version 1::

    # xpdeploy calibration manifest, check it with sha256sum -c from the root folder
    # format: 1
    # created-by: xpdeploy calib make
    # count: 500
    # seed: 0
    # source: /data/imagenet/train
    # classes: 100
    # preprocess: size=224x224 crop_pct=0.875 mean=0.485,0.456,0.406 std=0.229,0.224,0.225 ...
    3f0c...e1  n01440764/n01440764_10026.JPEG
    9ab2...07  n01443537/n01443537_10007.JPEG

* Header lines start with ``#``; ``# key: value`` (key in lower case, ``[a-z0-9_-]``) is metadata,
  any other ``#`` line is a free comment. ``format`` and ``count`` are required; ``count`` must
  equal the number of entries, which catches a truncated file.
* ``preprocess`` is the preprocessing the set was made for, on one line ending in
  ``interpolation=NAME`` (size is height x width in pixels,
  crop_pct as in :class:`~xpdeploy.artifacts.DataConfig`, mean/std per RGB channel on the 0..1
  scale) or ``model-default`` when none was given; using the set with another data config is
  allowed but flagged (:func:`preprocess_mismatch`).
* Each entry is ``<sha256 hex>  <relative/posix/path>`` (two spaces), the layout ``sha256sum``
  writes, so ``cd ROOT && sha256sum -c MANIFEST`` checks a set without xpdeploy (GNU sha256sum skips
  ``#`` lines). ``<sha256> *<path>`` (binary mode) is read too. Paths may not be absolute, contain
  ``..``, a backslash or a line break.

Sampling is class-balanced: ``IMAGE_DIR/<class>/<image>`` (images anywhere under a class folder),
or a flat folder of images read as one class; see :func:`make_manifest`.

numpy, Pillow and the standard library only: this module runs on torch-free device machines.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from xpdeploy.data import image_set
from xpdeploy.data.listing import IMAGE_EXTENSIONS, images_under, is_image
from xpdeploy.data.npz import read_npz, write_npz
from xpdeploy.data.preprocess import eval_geometry, normalize
from xpdeploy.data.verify_set import select_indices
from xpdeploy.errors import DataError
from xpdeploy.fileio import sha256_file, write_text_atomic

if TYPE_CHECKING:
    from xpdeploy.artifacts import DataConfig

#: Manifest format version written (and the newest one read).
FORMAT_VERSION = 1
#: Fewest calibration images recommended for ViTs: attention-softmax and GELU activations have long
#: tails that a small sample under-estimates (calibration/README.md).
RECOMMENDED_MIN_VIT = 500
#: File name endings read as images (compared case-insensitively); the same list as the image-folder
#: source, repeated because that module imports torch.
#: Class name of the images of a flat folder (no class sub-folders).
FLAT_CLASS = "."
CREATED_BY = "xpdeploy calib make"

_TITLE = "# xpdeploy calibration manifest, check it with sha256sum -c from the root folder"
_HEADER = re.compile(r"^#\s*([a-z][a-z0-9_-]*)\s*:\s*(.*?)\s*$")
_ENTRY = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")
_NPZ_KEYS = ("files", "manifest_sha256")


class PreprocessMismatchWarning(UserWarning):
    """A calibration set is used with other preprocessing than the one it was made for."""


@dataclass(frozen=True)
class CalibrationEntry:
    """One image: ``path`` relative to the set's root (posix), ``sha256`` of its bytes (hex)."""

    sha256: str
    path: str

    @property
    def class_name(self) -> str:
        """The first folder of the path (the class), or ``"."`` for an image of a flat folder."""
        parts = PurePosixPath(self.path).parts
        return parts[0] if len(parts) > 1 else FLAT_CLASS


@dataclass(frozen=True)
class CalibrationManifest:
    """A parsed manifest: the entries in file order and the header metadata (all strings)."""

    entries: tuple[CalibrationEntry, ...]
    metadata: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def seed(self) -> int | None:
        value = self.metadata.get("seed")
        return int(value) if value is not None and value.lstrip("-").isdigit() else None

    @property
    def source(self) -> str | None:
        """The image folder the set was drawn from, as it was given to ``calib make``."""
        return self.metadata.get("source")

    @property
    def preprocess(self) -> DataConfig | None:
        """The preprocessing the set was made for; None for ``model-default`` (or no header)."""
        value = self.metadata.get("preprocess", "model-default")
        return None if value == "model-default" else parse_preprocess(value)

    def class_counts(self) -> dict[str, int]:
        """Images per class (first path folder), sorted by class name."""
        return dict(sorted(Counter(e.class_name for e in self.entries).items()))

    def to_text(self) -> str:
        """The manifest file's content; metadata ``count`` is always the true entry count."""
        meta = {"format": str(FORMAT_VERSION), **self.metadata, "count": str(len(self.entries))}
        lines = [_TITLE, *(f"# {key}: {value}" for key, value in meta.items())]
        lines += [f"{e.sha256}  {e.path}" for e in self.entries]
        return "\n".join(lines) + "\n"

    def digest(self) -> str:
        """sha256 of :meth:`to_text`: ties saved calibration batches to this manifest."""
        return hashlib.sha256(self.to_text().encode("utf-8")).hexdigest()

    def remake_hint(self) -> str:
        """The command that makes this manifest again (used in error messages)."""
        seed = self.seed if self.seed is not None else 0
        return (
            f"xpdeploy calib make {self.source or 'IMAGE_DIR'} --count {len(self)} --seed {seed} "
            "-o MANIFEST"
        )


# --------------------------------------------------------------------------------------------------
# Preprocessing header


def format_preprocess(cfg: DataConfig | None) -> str:
    """The ``preprocess`` header value; ``repr`` of floats so they read back exactly."""
    if cfg is None:
        return "model-default"
    _, h, w = cfg.input_size
    mean = ",".join(repr(float(v)) for v in cfg.mean)
    std = ",".join(repr(float(v)) for v in cfg.std)
    return (
        f"size={h}x{w} crop_pct={float(cfg.crop_pct)!r} mean={mean} std={std} "
        f"interpolation={cfg.interpolation}"
    )


def validate_preprocess(cfg: DataConfig) -> None:
    """Refuse preprocessing no image could go through: crop_pct outside (0, 1], std <= 0."""
    if not 0 < cfg.crop_pct <= 1:
        raise DataError(
            f"crop_pct {cfg.crop_pct} is outside (0, 1]; pass e.g. --crop-pct 0.875 (timm's ViT "
            "default) or 1.0"
        )
    if min(cfg.std) <= 0:
        raise DataError(f"std {tuple(cfg.std)} has a value <= 0; pass e.g. --std 0.229,0.224,0.225")


def parse_preprocess(value: str) -> DataConfig:
    """Inverse of :func:`format_preprocess` (for a value other than ``model-default``)."""
    from pydantic import ValidationError

    from xpdeploy.artifacts import DataConfig

    fix = (
        "expected 'size=HxW crop_pct=F mean=R,G,B std=R,G,B interpolation=NAME' or "
        "'model-default'"
    )
    try:
        fields = dict(item.split("=", 1) for item in value.split())
        h, w = (int(v) for v in fields.pop("size").lower().split("x"))
        cfg = DataConfig(
            input_size=(3, h, w),
            crop_pct=float(fields.pop("crop_pct", "1.0")),
            mean=tuple(float(v) for v in fields.pop("mean").split(",")),
            std=tuple(float(v) for v in fields.pop("std").split(",")),
            interpolation=fields.pop("interpolation", "bicubic"),
        )
    except (ValueError, KeyError, ValidationError):
        raise DataError(f"preprocess {value!r} cannot be read; {fix}") from None
    if fields:
        raise DataError(f"preprocess {value!r} has unknown keys {', '.join(fields)}; {fix}")
    validate_preprocess(cfg)
    return cfg


def preprocess_mismatch(manifest: CalibrationManifest, data_config: DataConfig) -> str | None:
    """What differs between the manifest's recorded preprocessing and ``data_config``, or None.

    None also when the manifest records ``model-default`` (made for whatever the model uses).
    """
    made_for = manifest.preprocess
    if made_for is None:
        return None
    diffs: list[str] = []
    if tuple(made_for.input_size[1:]) != tuple(data_config.input_size[1:]):
        diffs.append(f"size {made_for.input_size[1:]} vs {tuple(data_config.input_size[1:])}")
    for name in ("crop_pct", "mean", "std"):
        a = np.asarray(getattr(made_for, name), dtype=np.float64)
        b = np.asarray(getattr(data_config, name), dtype=np.float64)
        if not np.allclose(a, b, rtol=0, atol=1e-6):
            diffs.append(f"{name} {getattr(made_for, name)} vs {getattr(data_config, name)}")
    if made_for.interpolation != data_config.interpolation:
        diffs.append(f"interpolation {made_for.interpolation} vs {data_config.interpolation}")
    if not diffs:
        return None
    return "made for / used with: " + "; ".join(diffs)


# --------------------------------------------------------------------------------------------------
# Making a manifest


def list_images(image_dir: str | Path) -> tuple[list[str], list[int], list[str]]:
    """``(relative posix paths, labels, class names)`` of the images of a calibration source.

    ``image_dir/<class>/...`` gives one class per (non-hidden) sub-folder that holds images; a
    folder with images directly in it and no class folders is one class named ``"."``.
    """
    root = Path(image_dir)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(
            f"image folder {root} {what}; pass a folder laid out as <class>/<image> or a folder "
            "of images"
        )
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    loose = [e.name for e in entries if e.is_file() and is_image(e.name)]
    sub_dirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    per_class = {name: images_under(root / name) for name in sub_dirs}
    classes = [name for name in sub_dirs if per_class[name]]
    if classes and loose:
        raise DataError(
            f"image folder {root} has both class folders ({len(classes)}) and {len(loose)} loose "
            f"images (e.g. {loose[0]}); move the loose images into a class folder or remove them"
        )
    if loose:
        paths, labels, names = loose, [0] * len(loose), [FLAT_CLASS]
    else:
        paths = [p.relative_to(root).as_posix() for c in classes for p in per_class[c]]
        labels = [i for i, c in enumerate(classes) for _ in per_class[c]]
        names = classes
    if not paths:
        raise DataError(
            f"image folder {root} has no images ({', '.join(IMAGE_EXTENSIONS)}); pass a folder "
            "laid out as <class>/<image> or a folder of images"
        )
    for path in paths:
        _check_path(path, where=f"image {root / path}", fix="rename the file")
    return paths, labels, names


def make_manifest(
    image_dir: str | Path,
    count: int,
    seed: int,
    out: str | Path,
    *,
    preprocess: DataConfig | None = None,
) -> CalibrationManifest:
    """Draw ``count`` images class-balanced with ``seed``, hash them, write the manifest to ``out``.

    Deterministic: the same folder content, ``count`` and ``seed`` give the same manifest bytes.
    Classes are visited round-robin in a seeded order (:func:`select_indices`), so per-class counts
    differ by at most one unless a class runs out of images. ``preprocess`` is recorded as the
    preprocessing the set is meant for (None: ``model-default``). The file is written atomically.
    """
    count = int(count)
    if count <= 0:
        raise DataError(f"count {count} is not positive; pass --count 1 or more (500+ for ViTs)")
    if seed < 0:
        raise DataError(f"seed {seed} is negative; pass --seed 0 or another non-negative integer")
    if preprocess is not None:
        validate_preprocess(preprocess)
    paths, labels, names = list_images(image_dir)
    if count > len(paths):
        raise DataError(
            f"image folder {image_dir} has {len(paths)} images in {len(names)} classes, fewer "
            f"than the {count} asked for; lower --count to at most {len(paths)} or add images"
        )
    chosen = select_indices(np.asarray(labels, dtype=np.int64), count, seed)
    root = Path(image_dir)
    entries = tuple(CalibrationEntry(sha256_file(root / paths[i]), paths[i]) for i in chosen)
    metadata = {
        "format": str(FORMAT_VERSION),
        "created-by": CREATED_BY,
        "count": str(count),
        "seed": str(int(seed)),
        "source": str(image_dir),
        "classes": str(len({e.class_name for e in entries})),
        "preprocess": format_preprocess(preprocess),
    }
    manifest = CalibrationManifest(entries, metadata)
    write_text_atomic(out, manifest.to_text())
    return manifest


# --------------------------------------------------------------------------------------------------
# Reading a manifest


def _check_path(path: str, *, where: str, fix: str) -> None:
    """Entry paths stay inside the root and survive the sha256sum layout unescaped."""
    pure = PurePosixPath(path)
    bad = (
        "is absolute" if pure.is_absolute() or re.match(r"^[A-Za-z]:", path)
        else "contains '..'" if ".." in pure.parts
        else "contains a backslash or line break" if re.search(r"[\\\r\n]", path)
        else None
    )
    if bad:
        raise DataError(f"{where}: path {path!r} {bad}, which a manifest cannot hold; {fix}")


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def read_manifest(path: str | Path) -> CalibrationManifest:
    """Parse a manifest file; a malformed line is a DataError naming the file and line number."""
    path = Path(path)
    fix = "fix the line or re-make the manifest with xpdeploy calib make"
    if not path.is_file():
        raise DataError(
            f"calibration manifest {path} does not exist; make one with xpdeploy calib make "
            f"IMAGE_DIR --count 500 --seed 0 -o {path}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = str(e).replace("\n", " ") or type(e).__name__
        raise DataError(f"calibration manifest {path} is unreadable ({reason}); {fix}") from None
    metadata: dict[str, str] = {}
    entries: list[CalibrationEntry] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"calibration manifest {path} line {number}"
        if not line.strip():
            continue
        if line.startswith("#"):
            if header := _HEADER.match(line):
                metadata[header.group(1)] = header.group(2)
            continue
        match = _ENTRY.match(line)
        if not match:
            raise DataError(
                f"{where}: expected '<sha256>  <relative/path>', got {_short(line)}; {fix}"
            )
        rel = match.group(2)
        _check_path(rel, where=where, fix=fix)
        if rel in seen:
            raise DataError(f"{where}: {rel} is listed again (first on line {seen[rel]}); {fix}")
        seen[rel] = number
        entries.append(CalibrationEntry(match.group(1).lower(), rel))
    _check_metadata(path, metadata, len(entries))
    return CalibrationManifest(tuple(entries), metadata)


def _check_metadata(path: Path, metadata: dict[str, str], n_entries: int) -> None:
    fix = "re-make the manifest with xpdeploy calib make"
    version = metadata.get("format")
    if version is None or not version.isdigit():
        raise DataError(
            f"calibration manifest {path} has format {version!r}, expected a header line "
            f"'# format: {FORMAT_VERSION}'; {fix}"
        )
    if int(version) > FORMAT_VERSION:
        raise DataError(
            f"calibration manifest {path} has format {version}, newer than the {FORMAT_VERSION} "
            "this xpdeploy reads; upgrade xpdeploy or re-make the manifest with it"
        )
    count = metadata.get("count")
    if count is None or not count.isdigit() or int(count) != n_entries:
        raise DataError(
            f"calibration manifest {path} says count {count} but lists {n_entries} images "
            f"(truncated or edited?); {fix}"
        )
    if n_entries == 0:
        raise DataError(f"calibration manifest {path} lists no images; {fix}")
    if "preprocess" in metadata and metadata["preprocess"] != "model-default":
        try:
            parse_preprocess(metadata["preprocess"])
        except DataError as e:
            raise DataError(f"calibration manifest {path}: {e}") from None


# --------------------------------------------------------------------------------------------------
# Using a manifest


def verify(manifest: CalibrationManifest, root: str | Path) -> list[Path]:
    """Paths of every image under ``root``, after checking each exists and matches its sha256.

    All files are checked before failing, so the error says how many are wrong, not just the first.
    """
    root = Path(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(
            f"calibration root {root} {what}; pass the folder the manifest was made from "
            f"(recorded source: {manifest.source or 'unknown'})"
        )
    files: list[Path] = []
    missing: list[str] = []
    changed: list[tuple[str, str, str]] = []  # (path, recorded, found)
    for entry in manifest.entries:
        file = root / entry.path
        files.append(file)
        if not file.is_file():
            missing.append(entry.path)
            continue
        found = sha256_file(file)
        if found != entry.sha256:
            changed.append((entry.path, entry.sha256, found))
    if missing or changed:
        raise DataError(_verify_message(manifest, root, missing, changed))
    return files


def _verify_message(
    manifest: CalibrationManifest,
    root: Path,
    missing: list[str],
    changed: list[tuple[str, str, str]],
) -> str:
    if changed:
        rel, recorded, found = changed[0]
        first = (
            f"calibration image {root / rel} changed (sha256 {recorded[:12]}... in the manifest, "
            f"{found[:12]}... now)"
        )
    else:
        first = f"calibration image {root / missing[0]} is missing"
    others = len(missing) + len(changed) - 1
    tail = (
        f" and {others} other image{'s' if others != 1 else ''} of {len(manifest)} "
        f"{'are' if others != 1 else 'is'} wrong ({len(missing)} missing, {len(changed)} changed "
        "in all)"
        if others else ""
    )
    return (
        f"{first}{tail}; restore the files or re-make the manifest with "
        f"{manifest.remake_hint()}"
    )


def _load_one(file: Path, data_config: DataConfig) -> np.ndarray:
    """One image as uint8 (H, W, 3) after the evaluation resize and crop (not normalised)."""
    try:
        with Image.open(file) as img:
            img.load()
            return np.asarray(eval_geometry(img, data_config))
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = str(e).replace("\n", " ") or type(e).__name__
        raise DataError(
            f"cannot read calibration image {file}: {reason}; replace the file and re-make the "
            "manifest"
        ) from None


def _warn_mismatch(manifest: CalibrationManifest, data_config: DataConfig) -> str | None:
    mismatch = preprocess_mismatch(manifest, data_config)
    if mismatch:
        warnings.warn(
            f"calibration set made for other preprocessing ({mismatch}); INT8 ranges may not "
            "fit the model's input, re-make it with the model's data config",
            PreprocessMismatchWarning,
            stacklevel=3,
        )
    return mismatch


def load_batches(
    manifest: CalibrationManifest,
    root: str | Path,
    data_config: DataConfig,
    batch_size: int,
) -> Iterator[np.ndarray]:
    """float32 (B, 3, H, W) batches in manifest order, each image as
    :func:`~xpdeploy.data.preprocess.preprocess_image` gives it.

    Every digest is checked (and a preprocessing mismatch warned about with
    :class:`PreprocessMismatchWarning`) before the first batch is yielded; the last batch may be
    shorter than ``batch_size``.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    files = verify(manifest, root)
    _warn_mismatch(manifest, data_config)
    return (normalize(images, data_config.mean, data_config.std)
            for images in _image_batches(files, data_config, batch_size))


def _image_batches(
    files: Sequence[Path], data_config: DataConfig, batch_size: int
) -> Iterator[np.ndarray]:
    """uint8 (B, H, W, 3) batches of the images of ``files`` after resize and crop."""
    _, h, w = data_config.input_size
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        out = np.empty((len(chunk), h, w, 3), dtype=np.uint8)
        for i, file in enumerate(chunk):
            out[i] = _load_one(file, data_config)
        yield out


def load_images(
    manifest: CalibrationManifest, root: str | Path, data_config: DataConfig
) -> np.ndarray:
    """The whole set as uint8 (N, H, W, 3) images after resize and crop (N x 147 KB at 224 px),
    digests checked first; :func:`~xpdeploy.data.preprocess.normalize` makes them model input."""
    _, h, w = data_config.input_size
    files = verify(manifest, root)
    _warn_mismatch(manifest, data_config)
    batches = list(_image_batches(files, data_config, batch_size=64))
    if not batches:
        return np.empty((0, h, w, 3), dtype=np.uint8)
    return np.concatenate(batches, axis=0)


def load_array(
    manifest: CalibrationManifest, root: str | Path, data_config: DataConfig
) -> np.ndarray:
    """The whole set as one float32 (N, 3, H, W) array (about N x 0.6 MB at 224 px)."""
    images = load_images(manifest, root, data_config)
    return normalize(images, data_config.mean, data_config.std)


def load_configured(
    path: str | Path, data_config: DataConfig, root: str | Path | None = None
) -> tuple[np.ndarray, CalibrationManifest]:
    """The pipeline's calibration set (``build_engine.calibration``) as uint8 (N, H, W, 3)
    images after resize and crop, with its manifest.

    ``root``: the folder the manifest's paths are relative to (default: the source folder the
    manifest records). Unreadable or changed images are one DataError naming the fix.
    """
    manifest = read_manifest(path)
    image_root = root if root is not None else Path(manifest.source or ".")
    try:
        images = load_images(manifest, image_root, data_config)
    except DataError as e:
        raise DataError(
            f"calibration images of {path} are not readable ({e}); pass --calibration-root with "
            "the folder the manifest was made from"
        ) from None
    return images, manifest


def load_for_engine(path: str | Path, data_config: DataConfig) -> CalibrationBatch:
    """``build_engine.calibration`` as preprocessed batches: from a manifest (its images are
    preprocessed with ``data_config``) or, in a device bundle, the ``.npz`` of :func:`save_npz`."""
    if Path(path).suffix == ".npz":
        return load_npz(path)
    images, manifest = load_configured(path, data_config)
    pixels = normalize(images, data_config.mean, data_config.std)
    return CalibrationBatch(pixels, [e.path for e in manifest.entries], manifest.digest())


# --------------------------------------------------------------------------------------------------
# Preprocessed batches on disk (for the device bundle)


@dataclass(frozen=True)
class CalibrationBatch:
    """Preprocessed calibration pixels with the manifest they came from."""

    pixels: np.ndarray  # float32 (N, 3, H, W), C-contiguous
    files: list[str]  # manifest-relative paths, one per sample
    manifest_sha256: str  # CalibrationManifest.digest() of the source manifest

    def __len__(self) -> int:
        return len(self.pixels)


def save_npz(path: str | Path, images: np.ndarray, manifest: CalibrationManifest,
             data_config: DataConfig) -> None:
    """Write the calibration images (uint8 (N, H, W, 3) after resize and crop, in manifest order)
    with ``data_config``'s normalisation to ``path`` (.npz) atomically
    (:mod:`xpdeploy.data.image_set`: 500 photos at 224 px take about 45 MB, not 301 MB of float32).

    Byte-stable (fixed zip timestamps, as the verification set), so equal content gives an equal
    digest.
    """
    images = image_set.check_images(images)
    if len(images) != len(manifest):
        raise ValueError(f"images must be ({len(manifest)}, H, W, 3), got {images.shape}")
    arrays = {
        **image_set.encode(images, data_config.mean, data_config.std),
        "files": np.array([e.path for e in manifest.entries], dtype=str),
        "manifest_sha256": np.array(manifest.digest(), dtype=str),
    }
    write_npz(path, arrays)


def load_npz(path: str | Path, manifest: CalibrationManifest | None = None) -> CalibrationBatch:
    """Read :func:`save_npz` output (or float32 ``pixels`` an older xpdeploy wrote) as float32
    model input; with ``manifest``, refuse batches made from another one."""
    fix = "write it again from its manifest (load_images + save_npz: make the bundle again)"
    z = read_npz(path, _NPZ_KEYS, what="calibration batches", fix=fix,
                 optional=(image_set.LEGACY_KEY, *image_set.IMAGE_KEYS))
    pixels = image_set.model_input(z, what=f"calibration batches {path}", fix=fix)
    batch = CalibrationBatch(pixels, [str(f) for f in z["files"]], str(z["manifest_sha256"]))
    if batch.pixels.ndim != 4 or len(batch.files) != len(batch.pixels):
        raise DataError(
            f"calibration batches {path} hold pixels {batch.pixels.shape} for "
            f"{len(batch.files)} files, expected (N, 3, H, W) for N files; {fix}"
        )
    if manifest is not None and batch.manifest_sha256 != manifest.digest():
        raise DataError(
            f"calibration batches {path} were made from another manifest (sha256 "
            f"{batch.manifest_sha256[:12]}..., this one {manifest.digest()[:12]}...); {fix}"
        )
    return batch
