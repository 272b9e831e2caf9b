"""How closely one model's logits follow another's: the one comparison every parity check uses.

The export and simplify checks, the host fp16 / int8 graph checks and the verify stage all judge a
candidate by these numbers. Every function takes logits as arrays of shape (N, C): N samples,
C classes, in the runner's native dtype. Statistics are computed in float64 so that a float16
candidate is judged on its own error, not on rounding inside the comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xpdeploy.errors import ExportError


@dataclass(frozen=True)
class LogitComparison:
    """How closely a candidate's logits follow the reference's on the same samples.

    agreement: share (0..1) of samples whose argmax class equals the reference's.
    max_abs_diff, mean_abs_diff: over every logit, in logit units.
    cosine, min_cosine: mean and lowest over samples of the cosine similarity of the two logit
    vectors (-1..1).
    """

    agreement: float
    max_abs_diff: float
    mean_abs_diff: float
    cosine: float
    min_cosine: float


def _as_logits(x: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ExportError(
            f"{what} logits must have shape (samples, classes) with at least one sample, "
            f"got shape {arr.shape}"
        )
    return arr


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent (0..100): share of samples whose argmax equals the label.

    Only meaningful on real labels; callers must not report it on synthetic data.
    """
    arr = _as_logits(logits, "top-1")
    lab = np.asarray(labels).reshape(-1)
    if lab.shape[0] != arr.shape[0]:
        raise ValueError(
            f"top-1: {arr.shape[0]} rows of logits but {lab.shape[0]} labels; "
            "pass one label per row"
        )
    return float(np.mean(arr.argmax(axis=1) == lab) * 100.0)


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity per row; two all-zero rows count as identical (1), one as unrelated (0)."""
    dot = np.einsum("ij,ij->i", a, b)
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    denom = na * nb
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / denom  # NaN rows stay NaN on purpose
    cos[denom == 0] = 0.0
    cos[(na == 0) & (nb == 0)] = 1.0
    return np.clip(cos, -1.0, 1.0)


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> LogitComparison:
    """Compare a candidate's logits with the reference's, sample by sample.

    A NaN anywhere makes the diffs and the cosines NaN, which fails every gate that reads them
    (a NaN never compares as within a limit).
    """
    ref = np.asarray(reference)
    cand = np.asarray(candidate)
    if ref.shape != cand.shape:
        raise ExportError(
            f"logit shapes differ: reference {ref.shape} vs candidate {cand.shape}; both runners "
            "must see the same batch and produce (samples, classes)"
        )
    ref = _as_logits(ref, "reference").astype(np.float64)
    cand = _as_logits(cand, "candidate").astype(np.float64)
    diff = np.abs(ref - cand)
    cosine = _row_cosine(ref, cand)
    return LogitComparison(
        agreement=float(np.mean(ref.argmax(axis=1) == cand.argmax(axis=1))),
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        cosine=float(np.mean(cosine)),
        min_cosine=float(np.min(cosine)),
    )
