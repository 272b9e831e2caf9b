"""The parity check every export step runs on its output before handing it on."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xpdeploy.errors import ExportError
from xpdeploy.verify.latency import Runner

PARITY_SAMPLES = 64  # images of the verify set used by the export and simplify parity checks


def check_output_parity(
    reference: Runner, candidate: Runner, pixels: np.ndarray, *, atol: float, artifact: Path,
    compared_to: str, option: str, fix: str,
) -> float:
    """Max abs logit difference of ``candidate`` vs ``reference`` on ``pixels``.

    Above ``atol`` the artifact is deleted (a wrong file must not be handed on) and an
    :class:`ExportError` names the difference, the option that set the limit and a fix.
    """
    diff = float(np.abs(reference.infer(pixels) - candidate.infer(pixels)).max())
    if not diff <= atol:  # also catches NaN
        artifact.unlink(missing_ok=True)
        raise ExportError(
            f"{artifact.name} differs from {compared_to} by {diff:.3g} > {option} {atol:g}; {fix}"
        )
    return diff
