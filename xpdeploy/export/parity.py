"""The parity checks every export step runs on its output before handing it on: two runners
(:func:`check_output_parity`) or two ONNX files (:func:`measure_parity`), compared by
:func:`xpdeploy.logits.compare_logits`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xpdeploy.backends.ort_runner import OrtRunner
from xpdeploy.backends.runner import Runner, infer_all
from xpdeploy.errors import ExportError, MissingDependencyError
from xpdeploy.export.graph import first_line, graph_input, load_onnx
from xpdeploy.logits import compare_logits

PARITY_SAMPLES = 64  # images of the verify set used by the export and simplify parity checks


def check_output_parity(
    reference: Runner, candidate: Runner, pixels: np.ndarray, *, atol: float, artifact: Path,
    compared_to: str, option: str, fix: str,
) -> float:
    """Max abs logit difference of ``candidate`` vs ``reference`` on ``pixels``.

    Above ``atol`` the artifact is deleted (a wrong file must not be handed on) and an
    :class:`ExportError` names the difference, the option that set the limit and a fix.
    """
    diff = compare_logits(reference.infer(pixels), candidate.infer(pixels)).max_abs_diff
    if not diff <= atol:  # also catches NaN
        artifact.unlink(missing_ok=True)
        raise ExportError(
            f"{artifact.name} differs from {compared_to} by {diff:.3g} > {option} {atol:g}; {fix}"
        )
    return diff


@dataclass(frozen=True)
class Parity:
    """A converted ONNX model vs the fp32 one in onnxruntime CPU on one batch of images."""

    samples: int
    max_abs_diff: float  # largest |logit difference| over the batch (logit units)
    min_cosine: float  # lowest per-image cosine similarity of the two logit vectors
    top1_agreement: float  # fraction of images with the same arg-max class (0..1)


def measure_parity(reference: Path, candidate: Path, pixels: np.ndarray) -> Parity:
    """Run both ONNX files in onnxruntime CPU, fusion off, on ``pixels``; compare their logits."""
    ref = _run(reference, pixels)
    out = _run(candidate, pixels)
    c = compare_logits(ref.reshape(len(ref), -1), out.reshape(len(out), -1))
    return Parity(samples=len(ref), max_abs_diff=c.max_abs_diff, min_cosine=c.min_cosine,
                  top1_agreement=c.agreement)


def _run(path: Path, pixels: np.ndarray) -> np.ndarray:
    """Outputs of ``path`` for ``pixels``; a static-batch model runs in padded chunks."""
    input_name, static_batch, _ = graph_input(load_onnx(path), path)
    try:  # fusion off: Q/DQ pairs run as exact fake quantization (ort_session says why)
        runner = OrtRunner(path, input_name=input_name, optimize=False).__enter__()
    except MissingDependencyError:
        raise
    except Exception as e:
        raise ExportError(f"onnxruntime cannot load {path.name}: {first_line(e)}") from None
    try:
        return infer_all(runner, pixels, static_batch or len(pixels),
                         fixed_batch=static_batch is not None)
    finally:
        runner.__exit__()
