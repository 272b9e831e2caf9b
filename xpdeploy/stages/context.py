"""What a stage function receives besides its input artifacts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xpdeploy.spec import PipelineSpec


@dataclass(frozen=True)
class StageContext:
    """The stage's name, folders, the whole spec, and the fingerprint of its config + inputs.

    ``fingerprint`` lets resumable stages (train) tell whether a checkpoint in their folder belongs
    to this exact config and input.
    """

    stage: str
    run_dir: Path
    stage_dir: Path
    spec: PipelineSpec
    fingerprint: str

    def rel(self, path: Path) -> str:
        """``path`` relative to the run folder (how artifacts refer to files)."""
        return path.relative_to(self.run_dir).as_posix()

    def path(self, ref: str) -> Path:
        """A run-folder-relative reference as a path."""
        return self.run_dir / ref
