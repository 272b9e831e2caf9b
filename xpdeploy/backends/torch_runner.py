"""PyTorch on the CPU: the reference every other backend is compared with."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import nn

    from xpdeploy.artifacts import TorchModel


class TorchRunner:
    """Runs a :class:`TorchModel` artifact (rebuilt from arch.json + safetensors) in fp32."""

    def __init__(self, model: TorchModel, run_dir: Path, *, threads: int | None = None) -> None:
        self.name = "torch-cpu-fp32"
        self._artifact = model
        self._run_dir = run_dir
        self._threads = threads
        self._model: nn.Module | None = None

    def __enter__(self) -> TorchRunner:
        import torch

        from xpdeploy.models.arch import rebuild_model

        if self._threads:
            torch.set_num_threads(self._threads)
        self._model = rebuild_model(
            self._artifact.arch, self._run_dir / self._artifact.weights_file
        )
        return self

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        """Logits for a float32 NCHW batch."""
        import torch

        assert self._model is not None, "use TorchRunner as a context manager"
        with torch.inference_mode():
            return self._model(torch.from_numpy(np.ascontiguousarray(pixels))).numpy()

    def __exit__(self, *exc: object) -> None:
        self._model = None
