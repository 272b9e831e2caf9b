"""Device bundles: packing a finished tiny run, safe extraction, digests, and the CLI."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tests.conftest import tiny_pipeline_dict, write_pipeline
from xpdeploy.artifacts import TorchModel
from xpdeploy.bundle import (
    BUNDLE_JSON,
    CALIBRATION_NPZ,
    DEVICE_STAGES,
    REFERENCE_NPZ,
    BundleManifest,
    continuation_command,
    make_bundle,
    open_bundle,
    read_bundle,
    size_report,
)
from xpdeploy.cli.bundle import bundle as bundle_cmd
from xpdeploy.data.calibration import load_array, load_npz, make_manifest, read_manifest
from xpdeploy.errors import DataError, RunFolderError
from xpdeploy.pipeline import run_pipeline
from xpdeploy.spec import STAGE_ORDER, load_spec
from xpdeploy.stages.verify import load_reference

pytestmark = pytest.mark.slow

STAGES = ["load", "train", "prune", "export_onnx", "simplify", "verify", "report"]


@dataclass(frozen=True)
class BundledRun:
    """A finished tiny run (original + pruned), its bundle tar and the calibration images."""

    run_dir: Path
    tar: Path
    images: Path
    manifest: BundleManifest
    original_top1: float | None


def _calibration_images(root: Path) -> Path:
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            pixels = np.full((16, 16, 3), 30 * i + (c == "b") * 100, dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


def bundle_tiny_run(tmp: Path, calibration_images: int, **sections: Any
                    ) -> tuple[Path, Path, Path, BundleManifest]:
    """Run the tiny pipeline with ``sections`` and an int8 ``precision: best`` calibration set
    of ``calibration_images`` images under ``tmp``, and bundle it: (run folder, bundle tar,
    calibration image folder, bundle manifest)."""
    images = _calibration_images(tmp / "images")
    make_manifest(images, calibration_images, 0, tmp / "calib.txt")
    spec_dict = tiny_pipeline_dict(
        build_engine={"precision": "best", "calibration": str(tmp / "calib.txt")}, **sections)
    run_dir = tmp / "run"
    result = run_pipeline(load_spec(write_pipeline(tmp / "p.yaml", spec_dict)), run_dir)
    assert result.report is not None
    return run_dir, tmp / "run.tar", images, make_bundle(run_dir, tmp / "run.tar")


@pytest.fixture(scope="session")
def bundled_run(tmp_path_factory: pytest.TempPathFactory) -> BundledRun:
    """Run the tiny pipeline with pruning and an int8 calibration set once, and bundle it."""
    run_dir, tar, images, manifest = bundle_tiny_run(
        tmp_path_factory.mktemp("bundle"), 4, stages=STAGES,
        prune={"criterion": "magnitude", "target_ratio": 0.6, "ranking": "global"})
    return BundledRun(run_dir, tar, images, manifest, manifest.reference.top1["original"])


def source_models(manifest: BundleManifest) -> dict[str, TorchModel]:
    """Label -> the newest torch model of that label among the bundle's host stages."""
    found: dict[str, TorchModel] = {}
    for stage in sorted(manifest.stages, key=STAGE_ORDER.index):
        for artifact in manifest.outputs(stage).values():
            if isinstance(artifact, TorchModel):
                found[artifact.label] = artifact
    return found


def test_round_trip_packs_every_member_with_its_digest(bundled_run: BundledRun,
                                                       tmp_path: Path) -> None:
    opened = open_bundle(bundled_run.tar, tmp_path / "x")
    assert opened.root == tmp_path / "x"
    expected = {"pipeline.yaml", "01_load/verify.npz", "07_simplify/original.sim.onnx",
                "07_simplify/pruned.sim.onnx", REFERENCE_NPZ, CALIBRATION_NPZ}
    assert set(opened.member_paths()) == expected
    # One ONNX file per model travels: the exported ones are listed as left out, with why.
    run = bundled_run.run_dir
    assert [(p.path, p.size) for p in opened.left_out] == [
        (f"06_export_onnx/{m}.onnx", (run / "06_export_onnx" / f"{m}.onnx").stat().st_size)
        for m in ("original", "pruned")]
    assert all("device builds and verifies the simplified file" in p.reason
               and "--with-exported" in p.reason for p in opened.left_out)
    assert "export_onnx" not in opened.recorded()  # the device continues without them
    assert (tmp_path / "x" / BUNDLE_JSON).is_file()
    src = (bundled_run.run_dir / "01_load" / "verify.npz").read_bytes()
    assert opened.path("01_load/verify.npz").read_bytes() == src
    logits = load_reference(opened.root, opened.reference)  # type: ignore[arg-type]
    assert set(logits) == {"original", "pruned"}
    assert all(x.shape == (64, 10) and x.dtype == np.float32 for x in logits.values())
    parity = json.loads((bundled_run.run_dir / "09_verify" / "parity.json").read_text())
    assert opened.reference.top1["original"] == parity["original_top1"] is not None
    assert "pruned" in opened.reference.top1
    assert set(source_models(opened)) == {"original", "pruned"}
    assert set(opened.stages) == {"load", "train", "prune", "export_onnx", "simplify"}
    assert opened.calibration is not None and opened.calibration.samples == 4
    assert opened.device_stages == DEVICE_STAGES and opened.format == 4
    calib = load_npz(opened.path(CALIBRATION_NPZ))
    assert calib.pixels.shape == (4, 3, 16, 16)
    manifest = read_manifest(bundled_run.run_dir.parent / "calib.txt")
    cfg = source_models(opened)["original"].data_config
    assert calib.pixels.tobytes() == load_array(manifest, bundled_run.images, cfg).tobytes()


def _rewrite_tar(src: Path, dst: Path, *, change: str | None = None,
                 extra: tarfile.TarInfo | None = None, data: bytes = b"") -> None:
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for info in tin.getmembers():
            payload = tin.extractfile(info).read()  # type: ignore[union-attr]
            if info.name == change:
                payload = payload[:-1] + bytes([payload[-1] ^ 1])
            info.size = len(payload)
            tout.addfile(info, io.BytesIO(payload))
        if extra is not None:
            tout.addfile(extra, io.BytesIO(data) if extra.isfile() else None)


def test_a_modified_member_is_named(bundled_run: BundledRun, tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    _rewrite_tar(bundled_run.tar, bad, change="07_simplify/pruned.sim.onnx")
    with pytest.raises(DataError, match=r"07_simplify/pruned\.sim\.onnx was modified"):
        open_bundle(bad, tmp_path / "x")
    opened = open_bundle(bundled_run.tar, tmp_path / "y")
    (tmp_path / "y" / "01_load" / "verify.npz").write_bytes(b"not the verify set")
    with pytest.raises(DataError, match=r"01_load/verify\.npz was modified") as e:
        read_bundle(opened.root)  # type: ignore[arg-type]
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "unlisted"])
def test_unsafe_members_are_refused(bundled_run: BundledRun, tmp_path: Path, kind: str) -> None:
    info = tarfile.TarInfo({"dotdot": "../evil.txt", "absolute": "/tmp/xpdeploy-evil.txt",
                            "symlink": "evil-link", "unlisted": "evil.txt"}[kind])
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    else:
        info.size = 4
    bad = tmp_path / "bad.tar"
    _rewrite_tar(bundled_run.tar, bad, extra=info, data=b"evil")
    why = {"dotdot": "'..' path", "absolute": "absolute path", "symlink": "a link",
           "unlisted": "does not list"}[kind]
    with pytest.raises(DataError, match=why):
        open_bundle(bad, tmp_path / "dest" / "x")
    assert not (tmp_path / "dest" / "evil.txt").exists()
    if kind != "unlisted":
        assert not (tmp_path / "dest" / "x").exists()  # refused before anything was written


def test_unfinished_run_is_refused_with_the_command_to_finish(bundled_run: BundledRun,
                                                              tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(bundled_run.run_dir, run_dir)
    (run_dir / "09_verify" / "manifest.json").unlink()
    with pytest.raises(RunFolderError, match="no finished 'verify' stage") as e:
        make_bundle(run_dir, tmp_path / "x.tar")
    assert "xpdeploy run" in str(e.value) and "--until verify" in str(e.value)
    assert not (tmp_path / "x.tar").exists()


def test_unreadable_calibration_images_and_bad_names(bundled_run: BundledRun,
                                                     tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"calibration images of .* are not readable"):
        make_bundle(bundled_run.run_dir, tmp_path / "x.tar", calibration_root=tmp_path / "empty")
    with pytest.raises(DataError, match=r"must end with \.tar"):
        make_bundle(bundled_run.run_dir, tmp_path / "x.zip")
    assert not list(tmp_path.glob("*.tar*"))


def test_gz_bundle_opens_too(bundled_run: BundledRun, tmp_path: Path) -> None:
    manifest = make_bundle(bundled_run.run_dir, tmp_path / "x.tgz",
                           calibration_root=bundled_run.images)
    opened = open_bundle(tmp_path / "x.tgz", tmp_path / "x")
    assert opened.member_paths() == manifest.member_paths()


def test_cli_prints_summary_and_continuation(bundled_run: BundledRun, tmp_path: Path) -> None:
    out = tmp_path / "dev.tar"
    result = CliRunner().invoke(bundle_cmd, [str(bundled_run.run_dir), "-o", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"bundle {out}: {out.stat().st_size / 2**20:.1f} MiB, 7 files"
    parts = {line.split("  ")[1].strip() for line in lines[1:7]}
    assert parts == {"verification set (64 images)", "original.sim.onnx", "pruned.sim.onnx",
                     "reference logits (torch, per model)", "calibration set (4 images)",
                     "bundle.json + pipeline.yaml"}
    assert lines[7].startswith("  left out (") and "listed in bundle.json" in lines[7]
    assert lines[8].startswith("    06_export_onnx/original.onnx, 06_export_onnx/pruned.onnx: ")
    # The one continuation command (the pipeline's deferral message prints the same line).
    assert continuation_command(out) in result.output
    assert "xpdeploy run dev.tar --stages build_engine,verify,report" in result.output
    missing = CliRunner().invoke(bundle_cmd, [str(tmp_path / "nope"), "-o", str(out)])
    assert missing.exit_code == 1
    assert missing.output.count("\n") == 1 and "error:" in missing.output


@pytest.mark.parametrize("fmt, fix", [(1, "make it again with this xpdeploy"),
                                      (99, "upgrade xpdeploy on the device")])
def test_a_bundle_of_another_format_is_refused_with_the_fix(bundled_run: BundledRun,
                                                            tmp_path: Path, fmt: int,
                                                            fix: str) -> None:
    opened = open_bundle(bundled_run.tar, tmp_path / "x")
    data = json.loads((tmp_path / "x" / BUNDLE_JSON).read_text())
    (tmp_path / "x" / BUNDLE_JSON).write_text(json.dumps({**data, "format": fmt}))
    with pytest.raises(DataError, match=f"has format {fmt}, .* reads formats 2, 3, 4; {fix}"):
        read_bundle(opened.root)  # type: ignore[arg-type]


def test_with_exported_packs_both_onnx_files_of_each_model(bundled_run: BundledRun,
                                                           tmp_path: Path) -> None:
    manifest = make_bundle(bundled_run.run_dir, tmp_path / "all.tar", include_exported=True,
                           calibration_root=bundled_run.images)
    assert {"06_export_onnx/original.onnx", "06_export_onnx/pruned.onnx",
            "07_simplify/original.sim.onnx", "07_simplify/pruned.sim.onnx"} <= set(
        manifest.member_paths())
    assert manifest.left_out == []
    opened = open_bundle(tmp_path / "all.tar", tmp_path / "x")
    assert set(opened.recorded()) == {"load", "train", "prune", "export_onnx", "simplify"}


@pytest.mark.parametrize("name", ["dry.tar", "dry.tar.gz"])
def test_a_dry_run_sizes_every_part_and_writes_nothing(bundled_run: BundledRun, tmp_path: Path,
                                                       name: str) -> None:
    """The dry run's total is the size the real tar then has (a .tar.gz: before gzip)."""
    out = tmp_path / name
    result = CliRunner().invoke(bundle_cmd, [str(bundled_run.run_dir), "-o", str(out),
                                             "--dry-run"])
    assert result.exit_code == 0, result.output
    assert not out.exists() and not list(tmp_path.iterdir())
    head = result.output.splitlines()[0]
    assert head.startswith(f"bundle {out} (dry run: nothing written): ")
    assert "continue on the device" not in result.output
    real = make_bundle(bundled_run.run_dir, out)
    if name == "dry.tar":
        assert head.endswith(f": {out.stat().st_size / 2**20:.1f} MiB, 7 files")
        dry = make_bundle(bundled_run.run_dir, tmp_path / "again.tar", dry_run=True)
        assert dry.tar_bytes == real.tar_bytes == out.stat().st_size
        assert not (tmp_path / "again.tar").exists()
    else:
        assert head.endswith(" MiB before gzip, 7 files")
    lines = size_report(real, out)
    assert lines[0].startswith(f"{out}: ") and all(line.startswith("  ") for line in lines[1:])


def test_the_cli_needs_an_out_file_unless_dry_run(bundled_run: BundledRun) -> None:
    result = CliRunner().invoke(bundle_cmd, [str(bundled_run.run_dir)])
    assert result.exit_code == 1
    assert result.output == ("error: missing -o/--out: name the bundle file, e.g. -o bundle.tar "
                             "(or pass --dry-run to only size it)\n")
    dry = CliRunner().invoke(bundle_cmd, [str(bundled_run.run_dir), "--dry-run"])
    assert dry.exit_code == 0 and f"bundle {bundled_run.run_dir / 'bundle.tar'} (dry run" in (
        dry.output)
