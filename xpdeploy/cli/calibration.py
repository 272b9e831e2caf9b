"""Command line: ``xpdeploy calib make | check`` for INT8 calibration manifests.

``make`` draws a seeded, class-balanced sample of an image folder and writes its manifest (paths +
sha256, see :mod:`xpdeploy.data.calibration`); ``check`` verifies that the images under a root still
match a manifest. Errors follow :mod:`xpdeploy.cli.guard`: one stderr line, exit code 1, no
traceback. Registered on the main group with ``cli.add_command(calib)``; imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from xpdeploy.cli.guard import guarded as _guarded
from xpdeploy.errors import DataError

if TYPE_CHECKING:
    from xpdeploy.artifacts import DataConfig
    from xpdeploy.data.calibration import CalibrationManifest

_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")


def _triple(option: str, value: str) -> tuple[float, float, float]:
    """``"0.485,0.456,0.406"`` -> three floats (per RGB channel, 0..1 scale)."""
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise DataError(
            f"{option} {value!r} is not three comma-separated numbers; pass e.g. "
            f"{option} 0.485,0.456,0.406"
        )
    return parts  # type: ignore[return-value]


def _size(value: str) -> tuple[int, int]:
    """``"224"`` or ``"224x192"`` (height x width) -> (height, width) in pixels."""
    try:
        parts = [int(v) for v in value.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise DataError(f"--size {value!r} is not a positive size; pass e.g. --size 224 or 224x192")
    return parts[0], parts[1]


def build_preprocess(
    size: str | None,
    crop_pct: float | None,
    mean: str | None,
    std: str | None,
    interpolation: str | None,
) -> DataConfig | None:
    """The ``--size/--crop-pct/--mean/--std/--interpolation`` options as a DataConfig.

    None when none is given (the manifest then says ``model-default``). ``--size``, ``--mean`` and
    ``--std`` go together, since there is no safe default for them; crop_pct defaults to 1.0 and
    interpolation to bicubic, as in :class:`~xpdeploy.artifacts.DataConfig`.
    """
    given = {"--size": size, "--crop-pct": crop_pct, "--mean": mean, "--std": std,
             "--interpolation": interpolation}
    if all(v is None for v in given.values()):
        return None
    needed = [name for name in ("--size", "--mean", "--std") if given[name] is None]
    if needed:
        present = ", ".join(k for k, v in given.items() if v is not None)
        raise DataError(
            f"{present} given without {', '.join(needed)}; give --size, --mean and --std together "
            "(or none of them to record preprocess: model-default)"
        )
    from pydantic import ValidationError

    from xpdeploy.artifacts import DataConfig

    assert size is not None and mean is not None and std is not None  # checked above
    h, w = _size(size)
    try:
        return DataConfig(
            input_size=(3, h, w),
            mean=_triple("--mean", mean),
            std=_triple("--std", std),
            crop_pct=1.0 if crop_pct is None else crop_pct,
            interpolation=interpolation or "bicubic",  # type: ignore[arg-type]
        )
    except ValidationError as e:
        raise DataError(f"preprocessing options are invalid ({e.errors()[0]['msg']})") from None


def summary(manifest: CalibrationManifest, out: Path | str) -> str:
    """One line: image count, classes, per-class min..max, where it was written."""
    from xpdeploy.data.calibration import format_preprocess

    counts = list(manifest.class_counts().values())
    low, high = min(counts), max(counts)
    per_class = f"{low} per class" if low == high else f"{low}..{high} per class"
    made_for = format_preprocess(manifest.preprocess)
    return (
        f"wrote {out}: {len(manifest)} images from {len(counts)} "
        f"class{'es' if len(counts) != 1 else ''} ({per_class}), seed {manifest.seed}, "
        f"preprocess: {made_for}"
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def calib() -> None:
    """INT8 calibration sets: manifests of image paths + sha256 (see calibration/README.md)."""


@calib.command()
@click.argument("image_dir", type=click.Path(path_type=Path))
@click.option("--count", "-n", type=int, required=True,
              help="Images to draw (500+ for ViTs, see calibration/README.md).")
@click.option("--seed", "-s", type=int, default=0, show_default=True,
              help="Seed of the class-balanced draw.")
@click.option("--out", "-o", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Manifest to write, e.g. calibration/imagenet500.txt.")
@click.option("--size", metavar="H[xW]", help="Input size in pixels the set is made for.")
@click.option("--crop-pct", type=float, help="Centre-crop fraction (default 1.0 with --size).")
@click.option("--mean", metavar="R,G,B", help="Normalisation mean per channel, 0..1 scale.")
@click.option("--std", metavar="R,G,B", help="Normalisation std per channel, 0..1 scale.")
@click.option("--interpolation", type=click.Choice(_INTERPOLATIONS),
              help="Resize filter (default bicubic with --size).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def make(image_dir: Path, count: int, seed: int, out: Path, size: str | None,
         crop_pct: float | None, mean: str | None, std: str | None, interpolation: str | None,
         debug: bool) -> None:
    """Draw COUNT images class-balanced from IMAGE_DIR (<class>/<image>, or a flat folder of
    images) and write their manifest to OUT."""
    from xpdeploy.data.calibration import RECOMMENDED_MIN_VIT, make_manifest

    def go() -> CalibrationManifest:
        preprocess = build_preprocess(size, crop_pct, mean, std, interpolation)
        return make_manifest(image_dir, count, seed, out, preprocess=preprocess)

    manifest = _guarded(debug, go)
    click.echo(summary(manifest, out))
    if len(manifest) < RECOMMENDED_MIN_VIT:
        click.echo(
            f"note: {len(manifest)} images is fewer than the {RECOMMENDED_MIN_VIT}+ recommended "
            "for ViT INT8 calibration (calibration/README.md)"
        )


@calib.command()
@click.argument("manifest", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--root", type=click.Path(path_type=Path),
              help="Folder the paths are relative to (default: the manifest's recorded source).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def check(manifest: Path, root: Path | None, debug: bool) -> None:
    """Verify that every image of MANIFEST exists under ROOT with its recorded sha256 (exit 0/1)."""
    from xpdeploy.data.calibration import read_manifest, verify

    def go() -> tuple[int, Path]:
        parsed = read_manifest(manifest)
        if root is None and parsed.source is None:
            raise DataError(
                f"calibration manifest {manifest} records no source folder; pass --root DIR"
            )
        where = root if root is not None else Path(str(parsed.source))
        return len(verify(parsed, where)), where

    n, where = _guarded(debug, go)
    click.echo(f"OK: {n} images under {where} match {manifest}")
