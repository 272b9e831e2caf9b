"""Shared fixtures: a tiny DeiT-shaped ViT on digits, small enough for a run in seconds on a CPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "2")

TINY_MODEL = {
    "name": "deit_tiny_patch16_224",
    "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2,
               "num_classes": 10},
}

#: A tiny timm Swin (v1): 16 px, 2x2 patches -> 8x8 tokens in four 4x4 windows (the second block
#: shifted by 2), patch merging, then 4x4 tokens in one window; head_dim 8 in both stages.
TINY_SWIN = {
    "name": "swin_tiny_patch4_window7_224",
    "kwargs": {"img_size": 16, "patch_size": 2, "window_size": 4, "embed_dim": 16,
               "depths": [2, 2], "num_heads": [2, 4], "num_classes": 10},
}


def _has_tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` / ``trt`` tests, with the reason, where there is no GPU or no TensorRT."""
    gpu = any("gpu" in item.keywords for item in items) and _has_cuda()
    trt = any("trt" in item.keywords for item in items) and _has_tensorrt()
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda is not "
                                                    "available on this machine)"))
        if "trt" in item.keywords and not trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT's Python package (pip install "
                                                    "'xpdeploy[tensorrt]' on a device machine)"))


def tiny_pipeline_dict(**sections: Any) -> dict[str, Any]:
    """A complete, fast pipeline (digits, 1 epoch); keyword arguments replace whole sections."""
    spec: dict[str, Any] = {
        "name": "tiny",
        "seed": 0,
        "stages": ["load", "train", "export_onnx", "simplify", "verify", "report"],
        "model": TINY_MODEL,
        "data": {
            "source": "digits",
            "verify_samples": 64,
            "batch_size": 64,
            "preprocess": {"size": 16, "crop_pct": 1.0, "mean": [0.5, 0.5, 0.5],
                           "std": [0.5, 0.5, 0.5]},
        },
        "train": {"epochs": 1, "batch_size": 64, "lr": 2e-3, "warmup_epochs": 0},
        "verify": {"batch_sizes": [1, 4], "warmup": 1, "iters": 3},
        "report": {"plots": False},
    }
    spec.update(sections)
    return spec


def torchrun_pipeline_dict() -> dict[str, Any]:
    """The pipeline of tests/test_torchrun.py's multi-process runs (train, prune, finetune; 2 + 2
    epochs), also run by bench/torchrun_exit.py and bench/gpu_check.sh's NCCL part, which import
    it from here because the test module imports torch and half of xpdeploy."""
    d = tiny_pipeline_dict(
        stages=["load", "train", "prune", "finetune", "export_onnx", "verify", "report"],
        prune={"criterion": "magnitude", "target_ratio": 0.6, "ranking": "global"},
        finetune={"epochs": 2, "batch_size": 32, "lr": 1e-3, "warmup_epochs": 0,
                  "distill": "soft", "threads": 1},
        verify={"batch_sizes": [1], "warmup": 1, "iters": 3,
                "pruned_gates": {"max_top1_drop": None, "min_agreement": None,
                                 "max_abs_diff": None, "min_cosine": None}},
    )
    d["train"].update({"epochs": 2, "batch_size": 32, "threads": 1})
    return d


def write_pipeline(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture
def tiny_pipeline(tmp_path: Path) -> Path:
    """Path of a tiny pipeline file in a temporary folder."""
    return write_pipeline(tmp_path / "tiny.yaml", tiny_pipeline_dict())


def kill_at_mid_epoch_checkpoint(proc: Any, checkpoint: Path, kill: Any,
                                 timeout_s: float = 300) -> dict[str, Any]:
    """Poll ``checkpoint`` while ``proc`` (a Popen) runs; call ``kill()`` as soon as it holds a
    mid-epoch position (``step_in_epoch > 0``), wait for ``proc`` and return that checkpoint's
    state ({} when the run ended or timed out first)."""
    import time

    import torch

    deadline = time.monotonic() + timeout_s
    state: dict[str, Any] = {}
    while proc.poll() is None and time.monotonic() < deadline:
        if checkpoint.exists():
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            if state["step_in_epoch"] > 0:
                kill()
                break
        time.sleep(0.02)
    proc.wait()
    return state if state.get("step_in_epoch", 0) > 0 else {}


@pytest.fixture(autouse=True, scope="session")
def _private_latency_cache(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Latency tables measured by tests go to a folder of this session, never ~/.cache (and a
    table a developer cached is never read by a test)."""
    import os

    old = os.environ.get("XPDEPLOY_CACHE")
    os.environ["XPDEPLOY_CACHE"] = str(tmp_path_factory.mktemp("xpdeploy-cache"))
    yield
    if old is None:
        os.environ.pop("XPDEPLOY_CACHE", None)
    else:
        os.environ["XPDEPLOY_CACHE"] = old
