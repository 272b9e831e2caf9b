"""Device bundles: one tar with everything a torch-free device needs to continue a run.

A bundle names the device stages it continues with (``device_stages`` in ``bundle.json``); there
are two kinds (:data:`BUNDLE_KINDS`).

An **engine bundle** (:data:`DEVICE_STAGES`, the default) packs a finished run folder (export,
simplify and verify done on the host) so that a device (a Jetson without torch) can build engines
and verify them against the host's numbers::

    bundle.json                       BundleManifest: members with sha256 and size, the outputs
                                      of every host stage (as their manifests recorded them),
                                      the parts left out and why
    pipeline.yaml                     the resolved pipeline
    01_load/verify.npz                fixed verification images (uint8 PNG, resized and cropped)
                                      with their normalisation, and labels
    07_simplify/<label>.sim.onnx      the ONNX file per model the device uses: the simplified
                                      one when the stage ran,
    06_export_onnx/<label>.onnx       else the exported one (both with ``include_exported``)
    reference_logits.npz              torch logits per source model ('original', 'pruned')
    calibration.npz                   INT8 calibration images (uint8 PNG, as the verification set)
                                      with their normalisation (when configured)

Images travel as the uint8 images after resize and crop (:mod:`xpdeploy.data.image_set`) and
become model input through the one ``normalize`` function on the device as on the host, so every
runner there is fed the float32 bytes the host's were: 1,000 images at 224 px took 84 MB instead
of 602 MB in bench/lean_bundle.py. The exported ONNX files stay on the host by default: with
``simplify`` in the pipeline the device builds and verifies the simplified ones, and the exported
files are the same model (``simplify`` checked their parity on the host). ``bundle.json`` lists
what was left out (``left_out``) and :func:`size_report` states the size of every part.

A **latency bundle** (:data:`LATENCY_STAGES`) packs a run that finished ``latency_blocks``, so
that the device measures the latency table of its own runtime (TensorRT) for the host to plan
with (``prune.latency.table``); it holds no verification set, logits or calibration::

    bundle.json, pipeline.yaml
    11_latency_blocks/grid.json       the block grid (shapes, grid points, whole models)
    11_latency_blocks/blocks/*.onnx   every block at every (heads, MLP width)
    11_latency_blocks/models/*.onnx   the original, the stem, the smallest and validation models

A bundle is a partial run folder: members keep their run-folder-relative paths, so the artifact
records in ``bundle.json`` resolve against the extracted folder as on the host, and a device run
(:mod:`xpdeploy.device_run`) continues it through the same executor and stages, writing its own
stages' folders next to them. The reference logits move to the root, out of the ``09_verify``
folder the device's own verify writes.
The tar is plain by default: ONNX weights are float32 noise to a compressor (a few percent saved for
a lot of CPU on a small device); ``.tar.gz`` / ``.tgz`` compresses when asked.

Torch-free (standard library, numpy, Pillow, yaml, pydantic): ``open_bundle`` runs on the device.
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from xpdeploy import __version__
from xpdeploy.artifacts import Artifact, BundleOrigin, ReferenceLogits, TorchModel
from xpdeploy.data import image_set
from xpdeploy.errors import ConfigError, DataError, RunFolderError
from xpdeploy.fileio import atomic_path, sha256_file
from xpdeploy.progress import log
from xpdeploy.runfolder import (
    RESOLVED_PIPELINE,
    RunFolder,
    now_iso,
    parse_outputs,
    stage_folder_name,
)
from xpdeploy.spec import STAGE_ORDER, PipelineSpec, load_spec

#: Bundle layout version written (and the newest one read). 3: ``device_stages`` (latency
#: bundles), ``reference`` optional. 4: images as uint8 PNG with their normalisation, ``left_out``.
BUNDLE_FORMAT = 4
#: Layout versions read: a format-2 bundle is an engine bundle (:data:`DEVICE_STAGES`); formats 2
#: and 3 hold float32 pixels, which the device reads as they are.
READ_FORMATS: tuple[int, ...] = (2, 3, 4)
BUNDLE_JSON = "bundle.json"
CALIBRATION_NPZ = "calibration.npz"
REFERENCE_NPZ = "reference_logits.npz"
#: Stages an engine bundle continues with, in order; the host's stages before them travel as
#: outputs.
DEVICE_STAGES: tuple[str, ...] = ("build_engine", "verify", "report")
#: Stages a latency bundle continues with: the table is measured where its runtime runs.
LATENCY_STAGES: tuple[str, ...] = ("latency_table",)
#: Each kind of bundle: its device stages -> the host stages its run folder must have finished
#: (besides load and every stage before them), the last one being the stage to run it until.
BUNDLE_KINDS: dict[tuple[str, ...], tuple[str, ...]] = {
    DEVICE_STAGES: ("export_onnx", "verify"), LATENCY_STAGES: ("latency_blocks",)}
#: Image the device side runs in (docker/jetson).
DEVICE_IMAGE = "xpdeploy-jetson:r36"
_MODES = {".tar": "w", ".tar.gz": "w:gz", ".tgz": "w:gz"}
_A = TypeVar("_A", bound=Artifact)


class BundleMember(BaseModel):
    """One file of the bundle: ``path`` relative to the bundle root (posix), size in bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    sha256: str
    size: int


class LeftOut(BaseModel):
    """A file of a host stage's outputs that the bundle does not carry, and why (``bundle.json``
    lists them, so the device and a reader know what is absent on purpose)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="run-folder relative (posix)")
    size: int = Field(description="bytes on the host")
    reason: str


class CalibrationInfo(BaseModel):
    """Where ``calibration.npz`` came from: manifest path (as configured), its digest, images."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest: str
    manifest_sha256: str
    samples: int


class RecordedOutput(BaseModel):
    """One output of a host stage as its manifest recorded it: type, digest, artifact JSON."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    digest: str
    artifact: dict[str, Any]


class BundleManifest(BaseModel):
    """``bundle.json``: provenance, every member's digest, and the host stages' outputs.

    ``root`` is not stored: :func:`open_bundle` sets it to the extracted folder.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = BUNDLE_FORMAT
    xpdeploy_version: str
    pipeline: str
    source_run: str = Field(description="absolute path of the run folder it was made from")
    created: str = Field(description="UTC, ISO-8601")
    members: list[BundleMember]
    stages: dict[str, dict[str, RecordedOutput]] = Field(
        description="host stage -> its outputs (files of torch models are not packed)"
    )
    device_stages: tuple[str, ...] = Field(
        DEVICE_STAGES, description="what the bundle continues with on the device (one of "
        "BUNDLE_KINDS; a format-2 bundle, which has no such field, is an engine bundle)")
    reference: ReferenceLogits | None = Field(
        None, description="the host's torch logits (a member); engine bundles only")
    calibration: CalibrationInfo | None = None
    left_out: list[LeftOut] = Field(
        default_factory=list, description="host outputs' files not packed, and why")
    root: Path | None = Field(None, exclude=True)
    tar_bytes: int | None = Field(
        None, exclude=True, description="size of the tar make_bundle wrote, or in a dry run would "
        "write (None: a compressed tar in a dry run, whose size only gzip knows)")

    def path(self, member: str) -> Path:
        """Absolute path of a member in the extracted bundle."""
        if self.root is None:
            raise ValueError("this manifest is not attached to a folder; use open_bundle")
        return self.root / member

    def member_paths(self) -> list[str]:
        return [m.path for m in self.members]

    def outputs(self, stage: str) -> dict[str, Artifact]:
        """The typed outputs of host stage ``stage``."""
        entries = {name: r.model_dump() for name, r in self.stages[stage].items()}
        return parse_outputs({"outputs": entries})

    def recorded(self) -> dict[str, dict[str, tuple[Artifact, str]]]:
        """Stage -> output name -> (artifact, digest the host recorded), for the executor.

        An output whose files were left out (``left_out``: the exported ONNX files by default) is
        not handed on, and a stage left without outputs is dropped: the device continues with
        what it has, as if the host's pipeline had not had it (no candidates for those files).
        """
        absent = {p.path for p in self.left_out}
        out: dict[str, dict[str, tuple[Artifact, str]]] = {}
        for stage in self.stages:
            kept = {name: (artifact, self.stages[stage][name].digest)
                    for name, artifact in self.outputs(stage).items()
                    if not absent.intersection(artifact.files())}
            if kept or not self.stages[stage]:
                out[stage] = kept
        return out

    def origin(self) -> BundleOrigin:
        return BundleOrigin(pipeline=self.pipeline, source_run=self.source_run,
                            created=self.created)


def continuation_command(tar: Path, stages: tuple[str, ...] = DEVICE_STAGES) -> str:
    """The command that continues a run from its bundle ``tar`` on the device (Jetson image),
    typed in the folder that holds the bundle there."""
    return (f'docker run --rm --runtime nvidia -v "$PWD":/work {DEVICE_IMAGE} '
            f"xpdeploy run {tar.name} --stages {','.join(stages)}")


def bundle_command(run_dir: Path, out_tar: Path, stages: tuple[str, ...] = DEVICE_STAGES) -> str:
    """The host command (``xpdeploy bundle``) that packs ``run_dir`` into ``out_tar`` for the
    device stages ``stages``."""
    option = "" if stages == DEVICE_STAGES else f" --stages {','.join(stages)}"
    return f"xpdeploy bundle {run_dir} -o {out_tar}{option}"


def plan_command(run_dir: str | Path, table: str | Path) -> str:
    """The host command that continues the run in ``run_dir`` with the latency table ``table``
    measured on the device (the prune stage plans with it)."""
    return f"{_finish_hint(Path(run_dir))} --set prune.latency.table={table}"


def bundle_stages(text: str | None) -> tuple[str, ...]:
    """The device stages of the bundle asked for with ``--stages text`` (comma-separated, any
    of one kind's stages; None: an engine bundle)."""
    if text is None:
        return DEVICE_STAGES
    wanted = {s.strip() for s in text.split(",") if s.strip()}
    for kind in BUNDLE_KINDS:
        if wanted and wanted <= set(kind):
            return kind
    kinds = " or ".join(f"{','.join(k)} (a run finished up to {needs[-1]})"
                        for k, needs in BUNDLE_KINDS.items())
    raise ConfigError(f"--stages {text!r}: a bundle continues with {kinds}; one kind per bundle")


# --------------------------------------------------------------------------------------------------
# Making a bundle


def _finish_hint(run_dir: Path) -> str:
    return f"xpdeploy run {run_dir / RESOLVED_PIPELINE} --run-dir {run_dir}"


def _require_manifest(folder: RunFolder, stage: str, until: str) -> dict[str, Any]:
    """``stage``'s manifest; ``until``: the stage the run must reach for this bundle."""
    manifest = folder.read_manifest(stage)
    if manifest is None:
        raise RunFolderError(
            f"run folder {folder.root} has no finished '{stage}' stage "
            f"({folder.stage_dir(stage).name}/manifest.json is missing); finish the run first with "
            f"{_finish_hint(folder.root)} --until {until}"
        )
    return manifest


def _checked_outputs(folder: RunFolder, stage: str, until: str
                     ) -> tuple[dict[str, Any], dict[str, Artifact]]:
    """The stage's manifest and artifacts, after checking that their files still have the
    recorded digests."""
    manifest = _require_manifest(folder, stage, until)
    outputs = folder.current_outputs(stage, manifest.get("fingerprint", ""))
    if outputs is None:
        raise RunFolderError(
            f"stage '{stage}' in {folder.root} changed since it ran (an output was modified or "
            f"removed, or an older xpdeploy wrote it); rerun it with {_finish_hint(folder.root)} "
            f"--from {stage} --force"
        )
    return manifest, outputs


def _check_verify_inputs(folder: RunFolder, verify: dict[str, Any],
                         recorded: dict[str, dict[str, RecordedOutput]]) -> None:
    """Refuse a run whose verify read other artifacts than the host stages now hold."""
    known = {r.digest for outputs in recorded.values() for r in outputs.values()}
    build = folder.read_manifest("build_engine")
    known |= {e["digest"] for e in (build or {"outputs": {}})["outputs"].values()}
    stale = sorted(name for name, digest in verify["inputs"].items() if digest not in known)
    if stale:
        raise RunFolderError(
            f"'verify' in {folder.root} read another {', '.join(stale)} than the run folder holds "
            f"now (a stage before it was rerun since); rerun verify with "
            f"{_finish_hint(folder.root)} --from verify"
        )


def _calibration(
    spec: PipelineSpec, model: TorchModel, root: Path | None, out: Path
) -> CalibrationInfo | None:
    """Preprocess the configured calibration images into ``out``; None when none is configured."""
    from xpdeploy.data import calibration as cal  # Pillow: only needed with a calibration set

    path = spec.build_engine.calibration if spec.build_engine else None
    if path is None:
        return None
    images, manifest = cal.load_configured(path, model.data_config, root)
    cal.save_npz(out, images, manifest, model.data_config)
    return CalibrationInfo(manifest=str(path), manifest_sha256=manifest.digest(),
                           samples=len(images))


def _member(rel: str, file: Path) -> BundleMember:
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
    run_dir: str | Path, out_tar: str | Path, *, stages: tuple[str, ...] = DEVICE_STAGES,
    calibration_root: str | Path | None = None, include_exported: bool = False,
    dry_run: bool = False,
) -> BundleManifest:
    """Pack a run folder into ``out_tar`` for the device stages ``stages`` (one of
    :data:`BUNDLE_KINDS`): an engine bundle needs export, simplify and verify finished, a latency
    bundle ``latency_blocks`` (module doc).

    ``calibration_root``: the folder the calibration manifest's paths are relative to (default:
    the ``source`` recorded in the manifest). ``include_exported``: pack the exported ONNX files
    next to the simplified ones (module doc). ``dry_run``: check and size everything (the
    calibration set is read and compressed, to know its size) but write no tar; the manifest says
    what it would hold (:func:`size_report`). The tar is written atomically (temp file + rename).
    """
    if stages not in BUNDLE_KINDS:
        raise ConfigError(f"a bundle continues with {' or '.join(map(','.join, BUNDLE_KINDS))}, "
                          f"not {','.join(stages)}")
    needs = BUNDLE_KINDS[stages]
    until = needs[-1]
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
    pipeline_stages = spec.stage_list()
    if until not in pipeline_stages:
        why = " (prune.target_latency_ms plans with a latency table)" if (
            stages == LATENCY_STAGES) else ""
        raise RunFolderError(
            f"pipeline '{spec.name}' in {run_dir} has no '{until}' stage, so there is nothing "
            f"to continue with {','.join(stages)} on a device{why}")
    host = [s for s in pipeline_stages if STAGE_ORDER.index(s) < STAGE_ORDER.index(stages[0])]
    for stage in dict.fromkeys(("load", *needs[:-1], *host, until)):
        _require_manifest(folder, stage, until)
    manifests, outputs = {}, {}
    for stage in host:
        manifests[stage], outputs[stage] = _checked_outputs(folder, stage, until)
    recorded = {stage: {name: RecordedOutput.model_validate(entry)
                        for name, entry in manifest["outputs"].items()}
                for stage, manifest in manifests.items()}
    reference = None
    left_out: list[LeftOut] = []
    if stages == LATENCY_STAGES:
        packed = [RESOLVED_PIPELINE, *_files_of(outputs, "latency_blocks")]
    else:
        reference = _reference(folder, recorded)
        onnx, left_out = _device_onnx(outputs, run_dir, include_exported)
        verify_files = outputs["load"]["verify_set"].files()
        packed = [RESOLVED_PIPELINE, *verify_files, *onnx]
        if any(image_set.holds_float32(run_dir / f) for f in verify_files):
            log(f"[bundle] {verify_files[0]} holds float32 pixels (written by an older "
                "xpdeploy, 4 to 7 times the size of today's images); to shrink the bundle, "
                f"store it again with {_finish_hint(run_dir)} --from load")
    sources = {rel: run_dir / rel for rel in packed}
    if reference is not None:
        sources[REFERENCE_NPZ] = run_dir / reference.file
    with tempfile.TemporaryDirectory(prefix="xpdeploy-bundle-") as tmp:
        staging = Path(tmp)
        calibration = None
        if stages == DEVICE_STAGES:
            calibration = _calibration(spec, _typed(outputs["load"]["model"], TorchModel),
                                       calibration_root and Path(calibration_root),
                                       staging / CALIBRATION_NPZ)
        if calibration is not None:
            sources[CALIBRATION_NPZ] = staging / CALIBRATION_NPZ
        manifest = BundleManifest(
            xpdeploy_version=__version__, pipeline=spec.name, source_run=str(run_dir),
            created=now_iso(), members=[_member(rel, f) for rel, f in sources.items()],
            stages=recorded, device_stages=stages,
            reference=reference and reference.model_copy(update={"file": REFERENCE_NPZ}),
            calibration=calibration, left_out=left_out,
        )
        (staging / BUNDLE_JSON).write_text(_manifest_json(manifest))
        members = {BUNDLE_JSON: staging / BUNDLE_JSON, **sources}
        if dry_run:
            size = _plain_tar_bytes(members) if mode == "w" else None
        else:
            _write_tar(out_tar, mode, members)
            size = out_tar.stat().st_size
    return manifest.model_copy(update={"tar_bytes": size})


def _device_onnx(outputs: dict[str, dict[str, Artifact]], run_dir: Path, include_exported: bool
                 ) -> tuple[list[str], list[LeftOut]]:
    """The ONNX files an engine bundle packs, and those it leaves out: one file per model, the
    simplified one when ``simplify`` ran (all of them with ``include_exported``)."""
    exported = _files_of(outputs, "export_onnx")
    if "simplify" not in outputs or include_exported:
        return [*exported, *_files_of(outputs, "simplify")], []
    reason = ("exported ONNX file: the device builds and verifies the simplified file of the same "
              "model (simplify checked their parity on the host); --with-exported packs it too")
    return _files_of(outputs, "simplify"), [
        LeftOut(path=rel, size=(run_dir / rel).stat().st_size, reason=reason) for rel in exported]


def _files_of(outputs: dict[str, dict[str, Artifact]], *stages: str) -> list[str]:
    """Every file of the outputs of ``stages`` (those that ran), run-folder relative."""
    return [f for stage in stages for a in outputs.get(stage, {}).values() for f in a.files()]


def _reference(folder: RunFolder, recorded: dict[str, dict[str, RecordedOutput]]
               ) -> ReferenceLogits:
    """The torch logits of the run's verify stage, after checking that verify read what the
    host stages hold now."""
    verify_manifest, verify = _checked_outputs(folder, "verify", "verify")
    reference = verify.get("reference")
    if not isinstance(reference, ReferenceLogits):
        raise RunFolderError(
            f"stage 'verify' in {folder.root} was run by an older xpdeploy (no reference logits "
            f"artifact); rerun it with {_finish_hint(folder.root)} --from verify --force"
        )
    _check_verify_inputs(folder, verify_manifest, recorded)
    return reference


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


def _plain_tar_bytes(sources: dict[str, Path]) -> int:
    """Bytes of the plain tar :func:`_write_tar` writes from ``sources``, without writing it:
    each member's header as tarfile encodes it (a pax header included where one is needed), its
    data padded to whole blocks, the two end blocks, all padded to tarfile's record size."""
    total = 2 * tarfile.BLOCKSIZE
    with tarfile.open(fileobj=io.BytesIO(), mode="w") as tar:
        for arcname, src in sources.items():
            info = _reset_owner(tar.gettarinfo(src, arcname=arcname))
            total += len(info.tobuf(tar.format, tar.encoding, tar.errors))
            total += -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return -(-total // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _write_tar(out_tar: Path, mode: str, sources: dict[str, Path]) -> None:
    """``bundle.json`` first (a reader can stop after it), then the members in order."""
    with atomic_path(out_tar) as tmp, tarfile.open(tmp, mode) as tar:
        for arcname, src in sources.items():
            tar.add(src, arcname=arcname, recursive=False, filter=_reset_owner)


# --------------------------------------------------------------------------------------------------
# Sizes


_MIB = 2**20


def _part_of(path: str, manifest: BundleManifest) -> str:
    """The part of the bundle a member belongs to, as the size report names it."""
    if path in (BUNDLE_JSON, RESOLVED_PIPELINE):
        return "bundle.json + pipeline.yaml"
    if path == REFERENCE_NPZ:
        return "reference logits (torch, per model)"
    if path == CALIBRATION_NPZ:
        samples = manifest.calibration.samples if manifest.calibration else "?"
        return f"calibration set ({samples} images)"
    verify = manifest.stages.get("load", {}).get("verify_set")
    if verify is not None and path == verify.artifact.get("file"):
        return f"verification set ({verify.artifact.get('samples', '?')} images)"
    parts = PurePosixPath(path).parts
    if len(parts) > 2 and parts[0] == stage_folder_name("latency_blocks"):
        return f"latency grid: {parts[1]}/"
    return PurePosixPath(path).name


def size_report(manifest: BundleManifest, out_tar: str | Path, *, dry_run: bool = False
                ) -> list[str]:
    """Lines that state the bundle's size per part (MiB), its total, and what was left out; the
    first is ``OUT_TAR: TOTAL, N files``, the others are indented.

    For the end of a run and for ``xpdeploy bundle`` (``--dry-run``: nothing was written).
    """
    sizes: dict[str, list[int]] = {}
    json_bytes = len(_manifest_json(manifest).encode())
    for path, size in [(BUNDLE_JSON, json_bytes), *((m.path, m.size) for m in manifest.members)]:
        sizes.setdefault(_part_of(path, manifest), []).append(size)
    width = max(len(part) for part in sizes)
    total = manifest.tar_bytes
    head = (f"{out_tar}" + (" (dry run: nothing written)" if dry_run else "") + ": "
            + (f"{total / _MIB:.1f} MiB" if total is not None else
               f"{sum(map(sum, sizes.values())) / _MIB:.1f} MiB before gzip")
            + f", {len(manifest.members) + 1} files")
    lines = [head]
    for part, files in sorted(sizes.items(), key=lambda kv: -sum(kv[1])):
        count = f"  ({len(files)} files)" if len(files) > 1 else ""
        lines.append(f"  {part:<{width}}  {sum(files) / _MIB:8.2f} MiB{count}")
    if manifest.left_out:
        gone = sum(p.size for p in manifest.left_out)
        lines.append(f"  left out ({gone / _MIB:.1f} MiB, listed in bundle.json):")
        for reason in dict.fromkeys(p.reason for p in manifest.left_out):
            paths = [p.path for p in manifest.left_out if p.reason == reason]
            lines.append(f"    {', '.join(paths)}: {reason}")
    return lines


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
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path} is missing or invalid ({e.strerror or e}); make the bundle "
                        "again") from None
    manifest = _parse_manifest(raw, root, path)
    listed = set(manifest.member_paths())
    extra = sorted(set(names or ()) - listed - {BUNDLE_JSON})
    if extra:
        raise DataError(f"bundle {root} holds {extra[0]}, which bundle.json does not list; "
                        "make the bundle again")
    for member in manifest.members:
        _verify_member(root, member)
    return manifest.model_copy(update={"root": root})


def bundle_header(tar_path: str | Path) -> BundleManifest:
    """``bundle.json`` of a bundle tar, read without extracting anything (members unchecked):
    what the bundle continues with, before a device run decides what to extract and run."""
    tar_path = Path(tar_path)
    if not tar_path.is_file():
        raise DataError(f"bundle {tar_path} does not exist; make it with xpdeploy bundle RUN_DIR")
    with _open_tar(tar_path) as tar:
        for info in tar:  # bundle.json comes first (_write_tar)
            if info.name == BUNDLE_JSON and info.isfile():
                fh = tar.extractfile(info)
                assert fh is not None  # a regular file
                return _parse_manifest(fh.read(), tar_path, tar_path / BUNDLE_JSON)
    raise DataError(f"bundle {tar_path} has no {BUNDLE_JSON}; make the bundle again with "
                    "xpdeploy bundle")


def _parse_manifest(raw: bytes, bundle: Path, path: Path) -> BundleManifest:
    """``bundle.json``'s content, checked: a format this xpdeploy reads, every field valid."""
    try:
        data = json.loads(raw)
        fmt = data.get("format") if isinstance(data, dict) else None
        if fmt not in READ_FORMATS and isinstance(fmt, int):
            fix = ("upgrade xpdeploy on the device" if fmt > BUNDLE_FORMAT else
                   "make it again with this xpdeploy (xpdeploy bundle RUN_DIR)")
            raise DataError(f"bundle {bundle} has format {fmt}, this xpdeploy {__version__} reads "
                            f"formats {', '.join(map(str, READ_FORMATS))}; {fix}")
        return BundleManifest.model_validate(data)
    except ValueError as e:
        reason = " ".join(str(e).split())[:200]
        raise DataError(f"{path} is missing or invalid ({reason}); make the bundle again") from None


def _verify_member(root: Path, member: BundleMember) -> None:
    file = root / member.path
    if not file.is_file():
        raise DataError(f"bundle member {member.path} is missing in {root}; copy the bundle again")
    if file.stat().st_size != member.size or sha256_file(file) != member.sha256:
        raise DataError(
            f"bundle member {member.path} was modified (sha256 differs from bundle.json); copy "
            "the bundle again or make it again with xpdeploy bundle"
        )
