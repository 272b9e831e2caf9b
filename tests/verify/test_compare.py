"""compare_logits and top1 on arrays whose answers are known by hand."""

from __future__ import annotations

import numpy as np
import pytest

from xpdeploy.errors import ExportError
from xpdeploy.verify.compare import LogitComparison, compare_logits, top1


def test_identical_logits_agree_fully() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(16, 10)).astype(np.float32)
    c = compare_logits(a, a.copy())
    assert c == LogitComparison(agreement=1.0, max_abs_diff=0.0, mean_abs_diff=0.0, cosine=c.cosine)
    assert c.cosine == pytest.approx(1.0, abs=1e-12)


def test_flipped_argmax_is_counted_and_diffs_are_exact() -> None:
    ref = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    cand = ref.copy()
    cand[1] = [3.0, 2.0]  # argmax flips from 1 to 0; one logit moves by 3
    c = compare_logits(ref, cand)
    assert c.agreement == 0.75
    assert c.max_abs_diff == 3.0
    assert c.mean_abs_diff == pytest.approx(3.0 / 8)
    # row 1: cos([0,2],[3,2]) = 4 / (2 * sqrt(13)); the other rows are 1
    assert c.cosine == pytest.approx((3 + 2 / np.sqrt(13)) / 4)


def test_cosine_is_mean_over_samples() -> None:
    ref = np.array([[1.0, 0.0], [1.0, 0.0]])
    cand = np.array([[2.0, 0.0], [0.0, 1.0]])  # parallel (1) and orthogonal (0)
    assert compare_logits(ref, cand).cosine == pytest.approx(0.5)


def test_zero_rows_cosine() -> None:
    ref = np.array([[0.0, 0.0], [0.0, 0.0]])
    cand = np.array([[0.0, 0.0], [1.0, 0.0]])
    assert compare_logits(ref, cand).cosine == pytest.approx(0.5)  # both zero: 1; one zero: 0


def test_float16_candidate_is_compared_in_float64() -> None:
    ref = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    cand = ref.astype(np.float16) + np.float16(0.0009765625)  # 2**-10, exact in both dtypes
    c = compare_logits(ref, cand)
    assert c.max_abs_diff == pytest.approx(2**-10, rel=0.05)
    assert isinstance(c.max_abs_diff, float)


def test_nan_propagates() -> None:
    ref = np.ones((2, 3))
    cand = ref.copy()
    cand[0, 0] = np.nan
    c = compare_logits(ref, cand)
    assert np.isnan(c.max_abs_diff) and np.isnan(c.cosine)


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ExportError) as e:
        compare_logits(np.zeros((4, 10)), np.zeros((4, 9)))
    msg = str(e.value)
    assert "(4, 10)" in msg and "(4, 9)" in msg and "\n" not in msg


def test_non_2d_or_empty_is_rejected() -> None:
    with pytest.raises(ExportError):
        compare_logits(np.zeros(10), np.zeros(10))
    with pytest.raises(ExportError):
        compare_logits(np.zeros((0, 10)), np.zeros((0, 10)))


def test_top1_percent() -> None:
    logits = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    assert top1(logits, np.array([0, 1, 1, 0])) == 50.0
    assert top1(logits, [0, 1, 0, 1]) == 100.0


def test_top1_label_count_mismatch() -> None:
    with pytest.raises(ValueError, match="3 labels"):
        top1(np.zeros((4, 2)), np.zeros(3, dtype=np.int64))


def test_verify_and_report_import_without_torch() -> None:
    """Device machines have no torch: these packages must not pull it (or onnx/timm) in."""
    import subprocess
    import sys

    code = (
        "import sys, xpdeploy.verify, xpdeploy.report; "
        "bad = [m for m in ('torch', 'timm', 'onnx', 'matplotlib') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
