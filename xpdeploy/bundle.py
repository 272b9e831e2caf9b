"""Device bundles: one tar with everything a torch-free device needs to continue a run.

``make_bundle`` packs a finished run folder (export, simplify and verify done on the host) so that a
device (a Jetson without torch) can build engines and verify them against the host's numbers::

    bundle.json                       BundleManifest: members with sha256 and size, artifacts
    pipeline.yaml                     the resolved pipeline
    01_load/verify.npz                fixed verification pixels and labels
    06_export_onnx/<label>.onnx       every exported ONNX file
    07_simplify/<label>.sim.onnx      every simplified ONNX file (when the stage ran)
    09_verify/reference_logits.npz    torch logits per source model ('original', 'pruned')
    calibration.npz                   preprocessed INT8 calibration pixels (when configured)

Members keep their run-folder-relative paths, so the artifact records in ``bundle.json`` (whose file
references are run-folder-relative) resolve against the extracted folder as they do on the host.
The tar is plain by default: ONNX weights are float32 noise to a compressor (a few percent saved for
a lot of CPU on a small device); ``.tar.gz`` / ``.tgz`` compresses when asked.

Torch-free (standard library, numpy, yaml, pydantic): ``open_bundle`` runs on the device.
"""

from __future__ import annotations

import contextlib
import json
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from xpdeploy import __version__
from xpdeploy.artifacts import Artifact, OnnxModels, ParityReport, TorchModel, VerifySet
from xpdeploy.errors import DataError, RunFolderError
from xpdeploy.fileio import atomic_path, sha256_file
from xpdeploy.runfolder import RESOLVED_PIPELINE, RunFolder, now_iso, parse_outputs
from xpdeploy.spec import PipelineSpec, load_spec

#: Bundle layout version written (and the newest one read).
BUNDLE_FORMAT = 1
BUNDLE_JSON = "bundle.json"
CALIBRATION_NPZ = "calibration.npz"
PRUNED_TORCH = "pruned (torch)"  # the verify stage's name for the pruned torch candidate
_ONNX_STAGES = ("export_onnx", "simplify")
_MODES = {".tar": "w", ".tar.gz": "w:gz", ".tgz": "w:gz"}
_A = TypeVar("_A", bound=Artifact)


class BundleMember(BaseModel):
    """One file of the bundle: ``path`` relative to the bundle root (posix), size in bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    sha256: str
    size: int


class CalibrationInfo(BaseModel):
    """Where ``calibration.npz`` came from: manifest path (as configured), its digest, images."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest: str
    manifest_sha256: str
    samples: int


class BundleManifest(BaseModel):
    """``bundle.json``: provenance, every member's digest, and the artifacts the device reads.

    ``root`` is not stored: :func:`open_bundle` sets it to the extracted folder.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = BUNDLE_FORMAT
    xpdeploy_version: str
    pipeline: str
    source_run: str = Field(description="absolute path of the run folder it was made from")
    created: str = Field(description="UTC, ISO-8601")
    members: list[BundleMember]
    models: dict[str, TorchModel] = Field(
        description="label -> torch source model (costs, data config); its files are not packed"
    )
    onnx: dict[str, OnnxModels] = Field(description="stage -> ONNX files it produced")
    verify_set: VerifySet
    reference_logits: str = Field(
        description="member holding the host's torch logits per label (the verify artifact's)"
    )
    reference_top1: dict[str, float | None] = Field(
        description="label -> torch top-1 in percent on the verify set (None: synthetic labels)"
    )
    calibration: CalibrationInfo | None = None
    root: Path | None = Field(None, exclude=True)

    def path(self, member: str) -> Path:
        """Absolute path of a member in the extracted bundle."""
        if self.root is None:
            raise ValueError("this manifest is not attached to a folder; use open_bundle")
        return self.root / member

    def member_paths(self) -> list[str]:
        return [m.path for m in self.members]


# --------------------------------------------------------------------------------------------------
# Making a bundle


def _finish_hint(run_dir: Path) -> str:
    return f"xpdeploy run {run_dir / RESOLVED_PIPELINE} --run-dir {run_dir}"


def _require_manifest(folder: RunFolder, stage: str) -> dict[str, Any]:
    manifest = folder.read_manifest(stage)
    if manifest is None:
        raise RunFolderError(
            f"run folder {folder.root} has no finished '{stage}' stage "
            f"({folder.stage_dir(stage).name}/manifest.json is missing); finish the run first with "
            f"{_finish_hint(folder.root)} --until verify"
        )
    return manifest


def _checked_outputs(folder: RunFolder, stage: str) -> dict[str, Artifact]:
    """The stage's artifacts, after checking that their files still have the recorded digests."""
    manifest = _require_manifest(folder, stage)
    try:
        outputs = parse_outputs(manifest)
    except ValueError:  # written by an older xpdeploy whose artifacts lacked a field
        raise RunFolderError(
            f"stage '{stage}' in {folder.root} was run by an older xpdeploy; rerun it with "
            f"{_finish_hint(folder.root)} --from {stage} --force"
        ) from None
    for name, artifact in outputs.items():
        try:
            intact = artifact.digest(folder.root) == manifest["outputs"][name]["digest"]
        except OSError:
            intact = False
        if not intact:
            raise RunFolderError(
                f"stage '{stage}' output '{name}' in {folder.root} changed or went missing since "
                f"the stage ran; rerun it with {_finish_hint(folder.root)} --until verify"
            )
    return outputs


def _models_by_digest(
    folder: RunFolder, stages: list[str], digests: dict[str, str]
) -> dict[str, TorchModel]:
    """The TorchModel artifacts that ``verify`` read, found by the input digests it recorded."""
    wanted = {digest: name for name, digest in digests.items() if name in ("model", "pruned")}
    found: dict[str, TorchModel] = {}
    for stage in stages:
        manifest = folder.read_manifest(stage) or {"outputs": {}}
        for entry in manifest["outputs"].values():
            if entry.get("digest") in wanted and entry.get("type") == "TorchModel":
                model = TorchModel.model_validate(entry["artifact"])
                found[model.label] = model
    if "original" not in found:
        raise RunFolderError(
            f"cannot find the original model that 'verify' used in {folder.root} (a stage before "
            f"it was rerun since); rerun verify with {_finish_hint(folder.root)} --from verify"
        )
    return found


def _reference_top1(parity: ParityReport) -> dict[str, float | None]:
    top1: dict[str, float | None] = {"original": parity.original_top1}
    for c in parity.candidates:
        if c.name == PRUNED_TORCH:
            top1["pruned"] = c.top1
    return top1


def _calibration(
    spec: PipelineSpec, model: TorchModel, root: Path | None, out: Path
) -> CalibrationInfo | None:
    """Preprocess the configured calibration images into ``out``; None when none is configured."""
    from xpdeploy.data import calibration as cal  # Pillow: only needed with a calibration set

    path = spec.build_engine.calibration if spec.build_engine else None
    if path is None:
        return None
    pixels, manifest = cal.load_configured(path, model.data_config, root)
    cal.save_npz(out, pixels, manifest)
    return CalibrationInfo(manifest=str(path), manifest_sha256=manifest.digest(),
                           samples=len(pixels))


def _member(root: Path, rel: str) -> BundleMember:
    file = root / rel
    return BundleMember(path=rel, sha256=sha256_file(file), size=file.stat().st_size)


def _tar_mode(out_tar: Path) -> str:
    for suffix, mode in _MODES.items():
        if out_tar.name.endswith(suffix):
            return mode
    raise DataError(
        f"bundle name {out_tar.name} must end with .tar (recommended: ONNX weights hardly "
        "compress), .tar.gz or .tgz"
    )


def _reset_owner(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Owner-neutral, read-write entries: the device's user extracts them, not the host's."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o644
    return info


def make_bundle(
    run_dir: str | Path, out_tar: str | Path, *, calibration_root: str | Path | None = None
) -> BundleManifest:
    """Pack a run folder whose export, simplify and verify stages finished into ``out_tar``.

    ``calibration_root``: the folder the calibration manifest's paths are relative to (default:
    the ``source`` recorded in the manifest). The tar is written atomically (temp file + rename).
    """
    run_dir = Path(run_dir).resolve()
    out_tar = Path(out_tar)
    mode = _tar_mode(out_tar)
    if not (run_dir / RESOLVED_PIPELINE).is_file():
        raise RunFolderError(
            f"{run_dir} is not a run folder (no {RESOLVED_PIPELINE}); pass the folder a "
            "'xpdeploy run' wrote, e.g. runs/<pipeline name>"
        )
    spec = load_spec(run_dir / RESOLVED_PIPELINE)
    folder = RunFolder(run_dir)
    stages = spec.stage_list()
    onnx_stages = [s for s in _ONNX_STAGES if s in stages or s == "export_onnx"]
    for stage in ("load", *onnx_stages, "verify"):
        _require_manifest(folder, stage)
    verify_set = _typed(_checked_outputs(folder, "load")["verify_set"], VerifySet)
    onnx = {s: _typed(_checked_outputs(folder, s)["onnx"], OnnxModels) for s in onnx_stages}
    verify_manifest = _require_manifest(folder, "verify")
    parity = _typed(_checked_outputs(folder, "verify")["parity"], ParityReport)
    before_verify = stages[: stages.index("verify")] if "verify" in stages else stages
    models = _models_by_digest(folder, before_verify, verify_manifest["inputs"])
    rels = [RESOLVED_PIPELINE, verify_set.file, *(r for g in onnx.values() for r in g.files()),
            parity.reference_file]
    with tempfile.TemporaryDirectory(prefix="xpdeploy-bundle-") as tmp:
        staging = Path(tmp)
        calibration = _calibration(spec, _load_model(folder), _opt_path(calibration_root),
                                   staging / CALIBRATION_NPZ)
        members = [_member(run_dir, rel) for rel in rels]
        sources = {rel: run_dir / rel for rel in rels}
        if calibration is not None:
            members.append(_member(staging, CALIBRATION_NPZ))
            sources[CALIBRATION_NPZ] = staging / CALIBRATION_NPZ
        manifest = BundleManifest(
            xpdeploy_version=__version__, pipeline=spec.name, source_run=str(run_dir),
            created=now_iso(), members=members, models=models, onnx=onnx,
            verify_set=verify_set, reference_logits=parity.reference_file,
            reference_top1=_reference_top1(parity),
            calibration=calibration,
        )
        (staging / BUNDLE_JSON).write_text(_manifest_json(manifest))
        _write_tar(out_tar, mode, {BUNDLE_JSON: staging / BUNDLE_JSON, **sources})
    return manifest


def _opt_path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)


def _load_model(folder: RunFolder) -> TorchModel:
    """The load stage's model: its data config is how the calibration images are preprocessed."""
    return _typed(_checked_outputs(folder, "load")["model"], TorchModel)


def _typed(artifact: Artifact, cls: type[_A]) -> _A:
    """The artifact, checked to be of the type this module reads (a manifest could say else)."""
    if not isinstance(artifact, cls):
        raise RunFolderError(
            f"expected a {cls.__name__} artifact, the manifest records a {type(artifact).__name__};"
            " the run folder was written by another xpdeploy version, rerun it"
        )
    return artifact


def _manifest_json(manifest: BundleManifest) -> str:
    return json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def _write_tar(out_tar: Path, mode: str, sources: dict[str, Path]) -> None:
    """``bundle.json`` first (a reader can stop after it), then the members in order."""
    with atomic_path(out_tar) as tmp, tarfile.open(tmp, mode) as tar:
        for arcname, src in sources.items():
            tar.add(src, arcname=arcname, recursive=False, filter=_reset_owner)


# --------------------------------------------------------------------------------------------------
# Opening a bundle


def _check_member(info: tarfile.TarInfo, tar_path: Path) -> None:
    """Refuse what could write outside the destination or is not plain data."""
    name = PurePosixPath(info.name)
    why = None
    if name.is_absolute() or info.name.startswith("/"):
        why = "an absolute path"
    elif ".." in name.parts:
        why = "a '..' path"
    elif info.issym() or info.islnk():
        why = "a link"
    elif not (info.isfile() or info.isdir()):
        why = "not a regular file"
    if why:
        raise DataError(
            f"bundle {tar_path} member {info.name!r} is {why}; refusing to extract it (make the "
            "bundle again with xpdeploy bundle)"
        )


@contextlib.contextmanager
def _open_tar(tar_path: Path) -> Iterator[tarfile.TarFile]:
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            yield tar
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(
            f"bundle {tar_path} is not a readable tar ({e}); copy it again or make it again"
        ) from None


def open_bundle(tar_path: str | Path, dest_dir: str | Path) -> BundleManifest:
    """Extract ``tar_path`` into ``dest_dir`` safely and check every member's sha256.

    Safe: absolute paths, ``..``, links and devices are refused before anything is written, and on
    Python >= 3.11.4 the ``data`` extraction filter checks again. Returns the manifest with
    ``root`` set to ``dest_dir``.
    """
    tar_path = Path(tar_path)
    dest = Path(dest_dir)
    if not tar_path.is_file():
        raise DataError(f"bundle {tar_path} does not exist; make it with xpdeploy bundle RUN_DIR")
    with _open_tar(tar_path) as tar:
        infos = tar.getmembers()
        for info in infos:
            _check_member(info, tar_path)
        dest.mkdir(parents=True, exist_ok=True)
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=infos, filter="data")
        else:  # pragma: no cover - Python < 3.11.4; members were checked above
            tar.extractall(dest, members=infos)
    return read_bundle(dest, names=[i.name for i in infos if i.isfile()])


def read_bundle(root: str | Path, *, names: list[str] | None = None) -> BundleManifest:
    """The manifest of an extracted bundle, after checking every member's size and sha256.

    ``names``: the files the tar held; one not listed in ``bundle.json`` is refused too.
    """
    root = Path(root)
    path = root / BUNDLE_JSON
    try:
        manifest = BundleManifest.model_validate_json(path.read_bytes())
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:200]
        raise DataError(f"{path} is missing or invalid ({reason}); make the bundle again") from None
    if manifest.format > BUNDLE_FORMAT:
        raise DataError(
            f"bundle {root} has format {manifest.format}, this xpdeploy {__version__} reads up to "
            f"{BUNDLE_FORMAT}; upgrade xpdeploy on the device"
        )
    listed = set(manifest.member_paths())
    extra = sorted(set(names or ()) - listed - {BUNDLE_JSON})
    if extra:
        raise DataError(f"bundle {root} holds {extra[0]}, which bundle.json does not list; "
                        "make the bundle again")
    for member in manifest.members:
        _verify_member(root, member)
    return manifest.model_copy(update={"root": root})


def _verify_member(root: Path, member: BundleMember) -> None:
    file = root / member.path
    if not file.is_file():
        raise DataError(f"bundle member {member.path} is missing in {root}; copy the bundle again")
    if file.stat().st_size != member.size or sha256_file(file) != member.sha256:
        raise DataError(
            f"bundle member {member.path} was modified (sha256 differs from bundle.json); copy "
            "the bundle again or make it again with xpdeploy bundle"
        )


def load_reference_logits(manifest: BundleManifest) -> dict[str, np.ndarray]:
    """Label -> torch logits (samples, classes) float32 recorded by the host's verify stage."""
    with np.load(manifest.path(manifest.reference_logits), allow_pickle=False) as z:
        return {key: np.asarray(z[key], dtype=np.float32) for key in z.files}
