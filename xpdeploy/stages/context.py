"""What a stage function receives besides its input artifacts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from xpdeploy.stages.fingerprint import StageSettings

S = TypeVar("S", bound=StageSettings)


@dataclass(frozen=True)
class StageContext(Generic[S]):
    """The stage's name, folders, its settings, and the fingerprint of its settings + inputs.

    ``settings`` is all of the pipeline a stage may read (its module's ``Settings``), which is
    what the fingerprint covers. ``fingerprint`` lets resumable stages (train) tell whether a
    checkpoint in their folder belongs to this exact config and input.
    """

    stage: str
    run_dir: Path
    stage_dir: Path
    settings: S
    fingerprint: str

    def rel(self, path: Path) -> str:
        """``path`` relative to the run folder (how artifacts refer to files)."""
        return path.relative_to(self.run_dir).as_posix()

    def path(self, ref: str) -> Path:
        """A run-folder-relative reference as a path."""
        return self.run_dir / ref
