"""Training loop: schedule shape and exact resume from a checkpoint."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

import xpdeploy.training.loop as loop
from tests.conftest import TINY_MODEL
from xpdeploy.data.sources import open_split
from xpdeploy.models.data_config import resolve_data_config
from xpdeploy.models.factory import create_model
from xpdeploy.spec import DataConfigSection, ModelConfig, PreprocessConfig, TrainConfig
from xpdeploy.training import checkpoint


def test_lr_factor_warms_up_then_decays_to_floor() -> None:
    f = [loop.lr_factor(s, warmup_steps=10, total_steps=100, floor=0.01) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(f[10:]))
    assert loop.lr_factor(100, warmup_steps=10, total_steps=100, floor=0.01) == pytest.approx(0.01)


def _setup():
    torch.manual_seed(0)
    model = create_model(ModelConfig(**TINY_MODEL))
    section = DataConfigSection(source="digits", preprocess=PreprocessConfig(size=16, crop_pct=1))
    data_config = resolve_data_config(model, section.preprocess)
    train = open_split(section, data_config, "train", num_classes=10, seed=0)
    return model, train


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [v.clone() for v in model.state_dict().values()]


def test_resume_after_interruption_gives_the_same_weights(tmp_path: Path, monkeypatch) -> None:
    cfg = TrainConfig(epochs=2, batch_size=128, warmup_epochs=0.5)
    model, train = _setup()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    loop.train_model(model, train, None, cfg, checkpoint_dir=tmp_path / "a", fingerprint="f",
                     seed=0, eval_batch_size=64)
    expected = _weights(model)

    real_save = checkpoint.save

    def save_then_die(path, state):
        real_save(path, state)
        raise KeyboardInterrupt

    interrupted, _ = _setup()
    interrupted.load_state_dict(init)
    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        loop.train_model(interrupted, train, None, cfg, checkpoint_dir=tmp_path / "b",
                         fingerprint="f", seed=0, eval_batch_size=64)
    monkeypatch.setattr(checkpoint, "save", real_save)

    resumed, _ = _setup()
    resumed.load_state_dict(init)
    result = loop.train_model(resumed, train, None, cfg, checkpoint_dir=tmp_path / "b",
                              fingerprint="f", seed=0, eval_batch_size=64)
    assert result.resumed_from_epoch == 1 and len(result.history) == 2
    for a, b in zip(_weights(resumed), expected, strict=True):
        assert torch.equal(a, b)

    other = checkpoint.load(tmp_path / "b" / loop.CHECKPOINT_NAME, "another-fingerprint")
    assert other is None
