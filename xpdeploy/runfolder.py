"""The run folder: one sub-folder per stage with a manifest, and the resume rules.

Layout (docs/architecture.md section 2)::

    runs/<pipeline>/
      pipeline.yaml          resolved pipeline (every default filled in)
      01_load/ manifest.json artifact files ...
      02_train/ manifest.json checkpoints/last.pt ...
      ...
      report.json report.md latency.png

A stage counts as done only when its ``manifest.json`` exists, its fingerprint (digest of the
stage's resolved config and of its input artifacts) equals the current one, and every output file
still has the digest recorded. The manifest is written last and atomically, and removed before a
stage reruns, so a process killed at any moment leaves either a complete stage or one that reruns.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import platform
import shutil
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from xpdeploy import __version__
from xpdeploy.artifacts import (
    Artifact,
    BundleOrigin,
    EngineSet,
    LatencyBlocks,
    LatencyTable,
    MaskSet,
    OnnxModels,
    ParityReport,
    PrunePlan,
    ReferenceLogits,
    RunReport,
    TorchModel,
    VerifySet,
)
from xpdeploy.errors import RunFolderError
from xpdeploy.fileio import write_json_atomic, write_text_atomic
from xpdeploy.spec import FOLDER_ORDER, PipelineSpec, dump_spec

MANIFEST_SCHEMA = 1
MANIFEST = "manifest.json"
RESOLVED_PIPELINE = "pipeline.yaml"
KEEP_ON_RERUN = ("checkpoints",)  # resumable state survives a rerun of an unfinished stage
ARTIFACT_TYPES: dict[str, type[Artifact]] = {
    cls.__name__: cls
    for cls in (TorchModel, VerifySet, OnnxModels, ParityReport, RunReport, MaskSet, PrunePlan,
                EngineSet, ReferenceLogits, BundleOrigin, LatencyBlocks, LatencyTable)
}
Digest = Callable[[Artifact], str]
_TOOLS = ("torch", "torchvision", "timm", "onnx", "onnxruntime", "onnxsim", "tensorrt", "numpy")


def stage_folder_name(stage: str) -> str:
    """``01_load`` ... ``10_report``, ``11_latency_blocks``: numbered by :data:`FOLDER_ORDER`,
    which only ever grows at its end, so names never shift."""
    return f"{FOLDER_ORDER.index(stage) + 1:02d}_{stage}"


def now_iso() -> str:
    """UTC timestamp, ISO-8601, second precision."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def tool_versions() -> dict[str, str | None]:
    """Versions of Python, xpdeploy and the tools whose behaviour shapes the artifacts."""
    versions: dict[str, str | None] = {
        "python": platform.python_version(),
        "xpdeploy": __version__,
        "platform": platform.platform(),
    }
    for name in _TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class RunFolder:
    """Reads and writes one run folder; holds an exclusive lock while a run uses it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage_folder_name(stage)

    # -- pipeline and lock ---------------------------------------------------------------------

    def check_pipeline(self, spec: PipelineSpec) -> None:
        """Refuse a folder that holds a run of another pipeline (its outputs would be mixed)."""
        path = self.root / RESOLVED_PIPELINE
        if not path.is_file():
            return
        try:
            other = (yaml.safe_load(path.read_text()) or {}).get("name")
        except yaml.YAMLError:
            other = None
        if other and other != spec.name:
            raise RunFolderError(
                f"{self.root} holds a run of pipeline '{other}', not '{spec.name}'; pass another "
                "--run-dir or delete that folder"
            )

    def write_pipeline(self, spec: PipelineSpec) -> None:
        write_text_atomic(self.root / RESOLVED_PIPELINE, dump_spec(spec))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive lock: two runs writing one folder would corrupt each other's stages."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunFolderError(
                    f"another xpdeploy run is using {self.root}; wait for it or pass --run-dir"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- manifests -----------------------------------------------------------------------------

    def read_manifest(self, stage: str) -> dict[str, Any] | None:
        path = self.stage_dir(stage) / MANIFEST
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return manifest if manifest.get("schema") == MANIFEST_SCHEMA else None

    def _digest(self, artifact: Artifact) -> str:
        return artifact.digest(self.root)

    def current_outputs(
        self, stage: str, fingerprint: str, digest: Digest | None = None
    ) -> dict[str, Artifact] | None:
        """The stage's outputs if its manifest matches ``fingerprint`` and its files are intact.

        ``digest`` hashes an artifact (default: :meth:`Artifact.digest`); a caller that reuses
        the artifacts passes a memoising one so their files are not hashed again as inputs.
        """
        digest = digest or self._digest
        manifest = self.read_manifest(stage)
        if manifest is None or manifest.get("fingerprint") != fingerprint:
            return None
        try:
            outputs = parse_outputs(manifest)
            for name, artifact in outputs.items():
                if digest(artifact) != manifest["outputs"][name]["digest"]:
                    return None
        except (OSError, KeyError, ValueError):
            return None
        return outputs

    def begin_stage(self, stage: str, *, keep_checkpoints: bool) -> Path:
        """Remove the old manifest first, then stale outputs; keep checkpoints if asked."""
        folder = self.stage_dir(stage)
        (folder / MANIFEST).unlink(missing_ok=True)
        self.clear_stage(stage, keep=KEEP_ON_RERUN if keep_checkpoints else ())
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def clear_stage(self, stage: str, *, keep: tuple[str, ...] = KEEP_ON_RERUN) -> None:
        """Delete a stage's files (not ``keep``); remove the folder if nothing is left."""
        folder = self.stage_dir(stage)
        if not folder.is_dir():
            return
        for child in folder.iterdir():
            if child.name in keep:
                continue
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            folder.rmdir()  # only succeeds when empty

    def write_manifest(
        self,
        stage: str,
        *,
        config: dict[str, Any],
        fingerprint: str,
        inputs: dict[str, str],
        outputs: dict[str, Artifact],
        started: str,
        duration_s: float,
        digest: Digest | None = None,
    ) -> None:
        digest = digest or self._digest
        manifest = {
            "schema": MANIFEST_SCHEMA,
            "stage": stage,
            "fingerprint": fingerprint,
            "config": config,
            "inputs": inputs,
            "outputs": {
                name: {
                    "type": type(a).__name__,
                    "digest": digest(a),
                    "artifact": a.model_dump(mode="json"),
                }
                for name, a in outputs.items()
            },
            "versions": tool_versions(),
            "started": started,
            "finished": now_iso(),
            "duration_s": round(duration_s, 3),
            "pid": os.getpid(),
        }
        write_json_atomic(self.stage_dir(stage) / MANIFEST, manifest)


def parse_outputs(manifest: dict[str, Any]) -> dict[str, Artifact]:
    """Rebuild the typed artifacts recorded in a manifest."""
    out: dict[str, Artifact] = {}
    for name, entry in manifest["outputs"].items():
        cls = ARTIFACT_TYPES.get(entry["type"])
        if cls is None:
            raise ValueError(f"unknown artifact type {entry['type']}")
        out[name] = cls.model_validate(entry["artifact"])
    return out
