"""ort_session: the one place onnxruntime sessions are made, for OrtRunner and the host parity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from xpdeploy.backends import ort_runner
from xpdeploy.backends.ort_runner import OrtRunner, ort_session
from xpdeploy.export import parity

CHW = (3, 2, 2)


def linear_onnx(path: Path, weight: np.ndarray) -> Path:
    """An ONNX file ``pixels (N, 3, 2, 2) -> Flatten -> MatMul weight (12, C) -> logits``."""
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["pixels"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "linear",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", *CHW])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", weight.shape[1]])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime we support
    onnx.save(model, str(path))
    return path


def test_runner_and_host_parity_open_sessions_through_the_factory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert parity.OrtRunner is OrtRunner  # the host fp16/int8 check runs OrtRunner (the factory)
    made: list[Any] = []
    real = ort.InferenceSession

    def recording(path: str, sess_options: Any = None, providers: Any = None) -> Any:
        made.append((sess_options, providers))
        return real(path, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    rng = np.random.default_rng(0)
    model = linear_onnx(tmp_path / "m.onnx", rng.standard_normal((12, 5)))
    x = rng.standard_normal((4, *CHW)).astype(np.float32)
    with OrtRunner(model, threads=2) as runner:
        runner.infer(x)
    parity.measure_parity(model, model, x)
    assert len(made) == 3  # the runner's, then the parity check's two
    for options, providers in made:  # what the factory sets for every session
        assert providers == ["CPUExecutionProvider"]
        assert options.inter_op_num_threads == 1 and options.log_severity_level == 3
    assert made[0][0].intra_op_num_threads == 2
    fused, *unfused = (o.graph_optimization_level for o, _ in made)
    assert fused == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert unfused == [ort.GraphOptimizationLevel.ORT_DISABLE_ALL] * 2


def test_missing_onnxruntime_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ort_runner.MissingDependencyError, match="pip install onnxruntime"):
        ort_session(Path("m.onnx"))
