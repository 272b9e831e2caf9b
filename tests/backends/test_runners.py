"""Runners: torch and onnxruntime behind one interface give the same logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_MODEL
from xpdeploy.artifacts import TorchModel
from xpdeploy.backends.ort_runner import OrtRunner
from xpdeploy.backends.runner import Runner, infer_all, iter_batches
from xpdeploy.backends.torch_runner import TorchRunner
from xpdeploy.errors import MissingDependencyError
from xpdeploy.export.onnx_export import export_onnx
from xpdeploy.models.arch import describe_arch, save_model
from xpdeploy.models.data_config import resolve_data_config
from xpdeploy.models.factory import create_model
from xpdeploy.spec import ModelConfig, PreprocessConfig


def test_torch_and_ort_runners_agree(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = create_model(ModelConfig(**TINY_MODEL))
    arch = describe_arch(net, TINY_MODEL["name"], TINY_MODEL["kwargs"])
    arch_path, weights = save_model(net, arch, tmp_path)
    artifact = TorchModel(
        label="original", arch_file=arch_path.name, weights_file=weights.name, arch=arch,
        data_config=resolve_data_config(net, PreprocessConfig(size=16)), gmacs=0.0, params_m=0.0,
    )
    export_onnx(net, tmp_path / "m.onnx", input_size=(3, 16, 16), opset=17, trace_batch=2,
                dynamic_batch=True)
    x = np.random.default_rng(0).standard_normal((7, 3, 16, 16)).astype(np.float32)
    with TorchRunner(artifact, tmp_path, threads=1) as t, OrtRunner(tmp_path / "m.onnx") as o:
        assert isinstance(t, Runner) and isinstance(o, Runner)
        assert t.name == "torch-cpu-fp32" and o.name == "ort-cpu-fp32"
        ref = infer_all(t, x, 3)
        np.testing.assert_allclose(infer_all(o, x, 3), ref, atol=1e-4)
        np.testing.assert_allclose(infer_all(o, x, 4, fixed_batch=True), ref, atol=1e-4)


def test_missing_provider_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MissingDependencyError, match="TensorrtExecutionProvider is not available"):
        OrtRunner(tmp_path / "m.onnx", provider="TensorrtExecutionProvider").__enter__()


@pytest.mark.gpu
def test_ort_cuda_provider_matches_cpu(tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime here is the CPU build (pip install onnxruntime-gpu)")
    net = create_model(ModelConfig(**TINY_MODEL))
    export_onnx(net, tmp_path / "m.onnx", input_size=(3, 16, 16), opset=17, trace_batch=2,
                dynamic_batch=True)
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    with OrtRunner(tmp_path / "m.onnx") as cpu, OrtRunner(
        tmp_path / "m.onnx", provider="CUDAExecutionProvider"
    ) as gpu:
        assert gpu.name == "ort-cuda-fp32"
        np.testing.assert_allclose(gpu.infer(x), cpu.infer(x), atol=1e-3)


def test_iter_batches() -> None:
    pixels = np.arange(7 * 3 * 2 * 2, dtype=np.float32).reshape(7, 3, 2, 2)
    batches = list(iter_batches(pixels, 3))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert all(b.flags.c_contiguous and b.dtype == np.float32 for b in batches)
    assert np.concatenate(batches).tobytes() == pixels.tobytes()
    assert batches[0].base is pixels or np.shares_memory(batches[0], pixels)  # no copy
    with pytest.raises(ValueError, match="positive"):
        next(iter_batches(pixels, 0))
