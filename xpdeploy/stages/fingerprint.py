"""What each stage reads from the pipeline, and the fingerprint computed from exactly that.

Every stage module declares ``Settings`` (a :class:`StageSettings`: its own config section plus the
shared settings it uses, e.g. ``verify`` reads ``data.batch_size``) (:func:`read_settings`).
The executor passes that object to the stage (``ctx.settings``; stages never see the whole spec)
and fingerprints it with :func:`settings_json`, so a stage reruns when, and only when,
something it reads changed. Fields typed :data:`~xpdeploy.spec.InputFile` or
:data:`~xpdeploy.spec.CalibrationFile` enter the fingerprint by content (bytes of the file; a
calibration manifest's text and every image it lists), not by path: rewrite a calibration set at
the same path and ``build_engine`` and what follows rerun.

Image folders of the data set are not hashed (that would read a whole data set on every run).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, Self

from pydantic import BaseModel, ConfigDict

from xpdeploy.fileio import sha256_file
from xpdeploy.spec import ContentDigest, DataConfigSection, PipelineSpec

if TYPE_CHECKING:
    from xpdeploy.artifacts import TorchModel

#: Stands in for the digest of a file that does not exist (the stage itself then says what to do).
MISSING = "missing"


class StageSettings(BaseModel):
    """Base of each stage's ``Settings``: frozen, no unknown fields, picklable (sent to ranks)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def of(cls, spec: PipelineSpec) -> Self:
        """The settings whose fields are named like the spec's top-level keys, taken from it."""
        return cls(**{name: getattr(spec, name) for name in cls.model_fields})


class DataSettings(StageSettings):
    """What every stage that reads the data set shares: the seed and the ``data`` section."""

    seed: int
    data: DataConfigSection

    def split(self, model: TorchModel, name: Literal["train", "val"]) -> Any:
        """The ``name`` split of the data set as ``model`` reads it (its preprocessing and class
        count), seeded by the pipeline's seed: the one way a stage opens its data."""
        from xpdeploy.data.sources import open_split  # torch Datasets: not on the device

        return open_split(self.data, model.data_config, name,
                          num_classes=model.arch.num_classes, seed=self.seed)


def read_settings(stage: ModuleType, spec: PipelineSpec) -> StageSettings:
    """What ``stage`` (a module of :mod:`xpdeploy.stages`) reads of ``spec``: its ``settings(spec)``
    where it maps fields itself (verify), else ``Settings.of(spec)``."""
    custom = getattr(stage, "settings", None)
    return custom(spec) if custom is not None else stage.Settings.of(spec)


def _file_digest(path: Path) -> str:
    return sha256_file(path) if path.is_file() else MISSING


def _calibration_digest(path: Path) -> str:
    """The manifest's bytes and the bytes of every image it lists (as found now), in one sha256.

    A preprocessed ``.npz`` (a device bundle's calibration batches) is hashed as a file. Images are
    found where :func:`xpdeploy.data.calibration.load_configured` looks for them.
    """
    if path.suffix == ".npz" or not path.is_file():
        return _file_digest(path)
    from xpdeploy.data.calibration import read_manifest
    from xpdeploy.errors import DataError

    h = hashlib.sha256(path.read_bytes())
    try:
        manifest = read_manifest(path)
    except DataError:
        return h.hexdigest()  # unreadable: build_engine reports it
    root = Path(manifest.source or ".")
    for entry in manifest.entries:
        h.update(f"\n{entry.path} {_file_digest(root / entry.path)}".encode())
    return h.hexdigest()


_DIGESTS = {"file": _file_digest, "calibration": _calibration_digest}


def settings_json(settings: BaseModel) -> dict[str, Any]:
    """``settings`` as JSON, with every content-digest field replaced by its file's digest."""
    out = settings.model_dump(mode="json")
    for name, field in type(settings).model_fields.items():
        value = getattr(settings, name)
        marker = next((m for m in field.metadata if isinstance(m, ContentDigest)), None)
        if marker is not None and value is not None:
            out[name] = {"content_sha256": _DIGESTS[marker.kind](Path(value))}
        elif isinstance(value, BaseModel):
            out[name] = settings_json(value)
    return out
