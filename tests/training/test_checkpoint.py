"""The one checkpoint module: atomic save with RNG states, fingerprint check, resume.

Used by the training loop and by learn_masks; their exact-resume tests live with them
(tests/training/test_loop.py, tests/xpruner/test_learn.py).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from xpdeploy.training import checkpoint, loop
from xpdeploy.xpruner import learn


def _draws() -> tuple[float, float, float]:
    return float(torch.rand(())), float(np.random.rand()), random.random()


def test_load_restores_rng_states_of_its_own_fingerprint_only(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    torch.manual_seed(0)
    checkpoint.save(path, {"fingerprint": "f", "step": 3})
    expected = _draws()
    state = checkpoint.load(path, "f")
    assert state is not None and state["step"] == 3 and state["world_size"] == 1
    assert _draws() == expected  # the draws after the save, again
    assert checkpoint.load(path, "g") is None
    assert checkpoint.load(tmp_path / "absent.pt", "f") is None
    path.write_bytes(b"not a checkpoint")
    assert checkpoint.load(path, "f") is None


def test_train_and_learn_masks_checkpoint_through_this_module(tmp_path: Path, monkeypatch) -> None:
    from tests.xpruner.test_learn import NUM_CLASSES, _model, _noise
    from xpdeploy.spec import LearnMasksConfig

    assert loop.checkpoint is checkpoint and learn.checkpoint is checkpoint
    saved: list[dict] = []
    real_save = checkpoint.save

    def spy(path: Path, state: dict) -> None:
        saved.append(state)
        real_save(path, state)

    monkeypatch.setattr(checkpoint, "save", spy)
    cfg = LearnMasksConfig(epochs=1, batch_size=16, max_images=16)
    learn.learn_masks(_model(), _noise(), cfg, num_classes=NUM_CLASSES, seed=0,
                      checkpoint_dir=tmp_path, fingerprint="f")
    assert [s["epoch"] for s in saved] == [1]
    on_disk = torch.load(tmp_path / learn.CHECKPOINT_NAME, weights_only=True)
    assert on_disk["fingerprint"] == saved[0]["fingerprint"] and len(on_disk["rng"]) == 1
