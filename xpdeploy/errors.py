"""The error taxonomy of docs/architecture.md section 5 and the exit codes the CLI maps it to.

Every error a user can cause is an :class:`XpdeployError` whose message is one line that says what
is wrong, the value seen vs the value allowed, and how to fix it. The CLI prints it without a
traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1  # user, config or environment error
EXIT_USAGE = 2  # click's own usage errors
EXIT_PARITY = 3  # a verification gate failed (the report is written first)


class XpdeployError(Exception):
    """Base class: a failure the user can act on. ``exit_code`` is what the CLI returns."""

    exit_code = EXIT_ERROR


class ConfigError(XpdeployError):
    """The pipeline file or a ``--set`` override is invalid."""


class DataError(XpdeployError):
    """A data source is missing, empty, unreadable or inconsistent with the model."""


class ModelError(XpdeployError):
    """A model cannot be created, or a checkpoint cannot be read or does not fit it."""


class MissingDependencyError(XpdeployError):
    """An optional package (onnxsim, tensorrt, pycuda, ...) is needed but not installed."""


class ExportError(XpdeployError):
    """ONNX export, checking or simplification failed, or its output does not match torch."""


class BuildError(XpdeployError):
    """A TensorRT engine could not be built."""


class RunFolderError(XpdeployError):
    """A run folder is missing, incomplete or from another pipeline."""


class ParityError(XpdeployError):
    """At least one verification gate failed; raised after the report has been written."""

    exit_code = EXIT_PARITY


class PruneError(XpdeployError):
    """A pruning target or constraint cannot be met, or a plan does not fit the model."""


class PeerStoppedError(XpdeployError):
    """Under torchrun: rank 0 stopped the run (and printed why); other ranks exit quietly."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(f"rank 0 stopped the run (exit code {exit_code})")
        self.exit_code = exit_code
