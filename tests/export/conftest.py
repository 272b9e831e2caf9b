"""Fixtures of the ONNX-to-ONNX precision transforms: a tiny exported ViT and real digits.

The model is the tiny DeiT of tests/conftest.py, randomly initialised (seed 0) and exported with
the production exporter. Parity runs on 256 real scikit-learn digits (upsampled to 16 px). Why an
untrained model is still a meaningful check: its logit margins are small (it has not learnt to
separate the classes), so top-1 agreement on it is *harder* to keep than on a trained model; the
thresholds sit well below the values measured with onnxruntime 1.32 on CPU (noted per assertion),
leaving room for other CPUs and onnxruntime versions while still catching a broken conversion (a
wrong cast or a wrong scale gives agreement near chance, 0.1, and cosine far below 0.9).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from tests.conftest import TINY_MODEL
from xpdeploy.export.onnx_export import export_onnx
from xpdeploy.models.factory import create_model
from xpdeploy.spec import ModelConfig

FLOAT, FLOAT16, INT8 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """All 1797 digits as float32 (N, 3, 16, 16), normalised with mean = std = 0.5."""
    from sklearn.datasets import load_digits

    images = load_digits().images / 16.0  # (N, 8, 8) in [0, 1]
    up = np.kron(images, np.ones((2, 2)))[:, None].repeat(3, axis=1)
    return ((up - 0.5) / 0.5).astype(np.float32)


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model(ModelConfig(**TINY_MODEL))
    path = tmp_path_factory.mktemp("hp") / "m.onnx"
    export_onnx(model, path, input_size=(3, 16, 16), opset=17, trace_batch=2, dynamic_batch=True)
    return path


@pytest.fixture(scope="module")
def eval_pixels(digits: np.ndarray) -> np.ndarray:
    return digits[-256:]  # disjoint from the calibration images (the first 512)


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    g = onnx.shape_inference.infer_shapes(model).graph
    types = {t.name: t.data_type for t in g.initializer}
    types.update({v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output,
                                                                  *g.value_info]})
    return types


def init_bytes(model: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
