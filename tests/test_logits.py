"""compare_logits and top1 on arrays whose answers are known by hand, and the callers that share
them: the export and simplify check, the host fp16 / int8 graph check and the verify stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xpdeploy.errors import ExportError
from xpdeploy.logits import LogitComparison, compare_logits, top1


def test_identical_logits_agree_fully() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(16, 10)).astype(np.float32)
    c = compare_logits(a, a.copy())
    assert c == LogitComparison(agreement=1.0, max_abs_diff=0.0, mean_abs_diff=0.0, cosine=c.cosine,
                             min_cosine=c.min_cosine)
    assert c.cosine == pytest.approx(1.0, abs=1e-12)
    assert c.min_cosine == pytest.approx(1.0, abs=1e-12)


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
    c = compare_logits(ref, cand)
    assert c.cosine == pytest.approx(0.5) and c.min_cosine == pytest.approx(0.0)


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
    assert np.isnan(c.max_abs_diff) and np.isnan(c.cosine) and np.isnan(c.min_cosine)


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


class _Fixed:
    """A runner that returns the same logits whatever it is fed."""

    name = "fixed"

    def __init__(self, logits: np.ndarray) -> None:
        self.logits = logits

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        return self.logits


def test_export_host_and_verify_checks_share_compare_logits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export/simplify check, the host fp16/int8 check and the verify stage all compare
    through this one function, and report its numbers unchanged."""
    from tests.backends.test_ort_runner import CHW, linear_onnx
    from xpdeploy.backends.ort_runner import ort_session
    from xpdeploy.export import parity
    from xpdeploy.verify import candidates

    assert parity.compare_logits is compare_logits and candidates.compare_logits is compare_logits
    calls: list[LogitComparison] = []

    def spy(reference: np.ndarray, candidate: np.ndarray) -> LogitComparison:
        calls.append(compare_logits(reference, candidate))
        return calls[-1]

    monkeypatch.setattr(parity, "compare_logits", spy)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 5))
    ref_file = linear_onnx(tmp_path / "ref.onnx", w)
    cand_file = linear_onnx(tmp_path / "cand.onnx", w + 0.05 * rng.standard_normal(w.shape))
    x = rng.standard_normal((16, *CHW)).astype(np.float32)
    ref, cand = (ort_session(f).run(None, {"pixels": x})[0] for f in (ref_file, cand_file))
    expected = compare_logits(ref, cand)

    diff = parity.check_output_parity(_Fixed(ref), _Fixed(cand), x, atol=1.0, artifact=cand_file,
                                      compared_to="ref", option="atol", fix="none")
    host = parity.measure_parity(ref_file, cand_file, x)
    assert len(calls) == 2 and calls[0] == calls[1] == expected
    assert diff == expected.max_abs_diff > 0
    assert (host.samples, host.max_abs_diff, host.min_cosine, host.top1_agreement) == (
        16, expected.max_abs_diff, expected.min_cosine, expected.agreement)


def test_export_check_deletes_an_artifact_over_the_limit(tmp_path: Path) -> None:
    from xpdeploy.export.parity import check_output_parity

    artifact = tmp_path / "m.onnx"
    artifact.write_bytes(b"x")
    with pytest.raises(ExportError, match=r"m.onnx differs from torch by 0.5 > opt 0.1; fix it"):
        check_output_parity(_Fixed(np.zeros((2, 3))), _Fixed(np.full((2, 3), 0.5)),
                            np.zeros((2, *(3, 2, 2))), atol=0.1, artifact=artifact,
                            compared_to="torch", option="opt", fix="fix it")
    assert not artifact.exists()
