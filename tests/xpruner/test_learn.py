"""Mask learning: only the masks train, the loss falls, projection, convergence fields, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import xpdeploy.xpruner.learn as learn
from tests.conftest import TINY_MODEL
from xpdeploy.data.sources import open_split
from xpdeploy.errors import DataError, ModelError
from xpdeploy.models.data_config import resolve_data_config
from xpdeploy.models.factory import create_model
from xpdeploy.spec import DataConfigSection, LearnMasksConfig, ModelConfig, PreprocessConfig
from xpdeploy.training import checkpoint
from xpdeploy.xpruner.masks import ClassMasks

NUM_CLASSES = 10
HISTORY_KEYS = {"epoch", "loss", "ce", "sparsity", "smoothness", "moved_heads", "moved_neurons",
                "score_spread_heads", "score_spread_neurons", "mask_abs_mean_heads",
                "mask_abs_mean_neurons", "lr", "steps"}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(ModelConfig(**TINY_MODEL))


@pytest.fixture(scope="module")
def digits() -> torch.utils.data.Dataset:
    section = DataConfigSection(source="digits", preprocess=PreprocessConfig(size=16, crop_pct=1))
    data_config = resolve_data_config(_model(), section.preprocess)
    return open_split(section, data_config, "train", num_classes=NUM_CLASSES, seed=0)


def _noise(n: int = 48) -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((3, 16, 16)).astype(np.float32), i % NUM_CLASSES)
            for i in range(n)]


def test_only_the_masks_train_and_the_model_is_restored(capsys) -> None:
    model = _model()
    model.pos_embed.requires_grad_(False)  # a caller's own flag must survive
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = LearnMasksConfig(epochs=1, batch_size=16, lr=0.05)
    result = learn.learn_masks(model, _noise(), cfg, num_classes=NUM_CLASSES, seed=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training
    assert result.steps == 3 and result.seconds > 0
    assert any(not torch.equal(t, torch.ones_like(t)) for t in result.masks.tables())
    assert all(p.grad is None for p in model.parameters())


def test_loss_decreases_on_digits(digits) -> None:
    cfg = LearnMasksConfig(epochs=3, max_images=192, batch_size=64, lr=0.05, target="label")
    result = learn.learn_masks(_model(), digits, cfg, num_classes=NUM_CLASSES, seed=0)
    first, last = result.history[0], result.history[-1]
    assert last["loss"] < first["loss"] and last["ce"] < first["ce"]
    assert result.steps == 9 and [h["steps"] for h in result.history] == [3, 6, 9]


def test_bf16_autocast_learns_fp32_masks(digits) -> None:
    cfg = LearnMasksConfig(epochs=2, max_images=128, batch_size=64, lr=0.05, amp="bf16")
    result = learn.learn_masks(_model(), digits, cfg, num_classes=NUM_CLASSES, seed=0)
    assert all(t.dtype == torch.float32 for t in result.masks.tables())
    assert result.history[-1]["ce"] < result.history[0]["ce"] + 0.05
    assert np.isfinite(result.history[-1]["loss"])


def test_projection_keeps_masks_in_unit_interval() -> None:
    cfg = LearnMasksConfig(epochs=2, batch_size=16, lr=0.5, project=True, lambda_sparse=0.1)
    result = learn.learn_masks(_model(), _noise(), cfg, num_classes=NUM_CLASSES, seed=0)
    values = torch.cat([t.detach().flatten() for t in result.masks.tables()])
    assert float(values.min()) >= 0.0 and float(values.max()) <= 1.0
    assert float(values.min()) < 1.0  # it did move


def test_history_reports_convergence(capsys) -> None:
    cfg = LearnMasksConfig(epochs=2, batch_size=16, lr=0.05)
    result = learn.learn_masks(_model(), _noise(), cfg, num_classes=NUM_CLASSES, seed=0)
    assert len(result.history) == 2
    for h in result.history:
        assert set(h) >= HISTORY_KEYS
        assert 0.0 <= h["moved_heads"] <= 1.0 and 0.0 <= h["moved_neurons"] <= 1.0
        assert h["score_spread_heads"] >= 0.0 and h["score_spread_neurons"] >= 0.0
    assert result.history[-1]["lr"] == pytest.approx(0.0)  # cosine to min_lr
    # a few steps at lr 0.05 move every mask: not converged, and the log says what to change
    assert result.converged is False
    out = capsys.readouterr().out
    assert "not converged" in out and "learn_masks.lr" in out

    still = LearnMasksConfig(epochs=1, batch_size=16, lr=1e-6)
    quiet = learn.learn_masks(_model(), _noise(), still, num_classes=NUM_CLASSES, seed=0)
    assert quiet.converged is True
    assert quiet.history[-1]["moved_heads"] == 0.0


def test_sgd_and_constant_schedule_options() -> None:
    """SGD moves each mask by its (momentum-averaged) gradient, Adam by about lr whatever the
    gradient: at the same lr and steps, SGD moves masks far less. A constant schedule keeps lr."""
    common = {"epochs": 2, "batch_size": 16, "lr": 0.05}
    adam = learn.learn_masks(_model(), _noise(), LearnMasksConfig(**common, schedule="constant"),
                             num_classes=NUM_CLASSES, seed=0)
    sgd = learn.learn_masks(_model(), _noise(), LearnMasksConfig(**common, optimizer="sgd"),
                            num_classes=NUM_CLASSES, seed=0)
    assert [h["lr"] for h in adam.history] == [0.05, 0.05]
    assert sgd.history[-1]["lr"] == pytest.approx(0.0)  # cosine by default

    def travelled(result) -> float:
        return float(sum((t.detach() - 1).abs().sum() for t in result.masks.tables()))

    assert 0.0 < travelled(sgd) < travelled(adam) / 10
    with pytest.raises(ValueError, match="momentum"):
        LearnMasksConfig(optimizer="sgd", momentum=1.0)


def test_teacher_target_never_reads_the_label() -> None:
    """``target: teacher`` takes its rows and its fit from the unmasked model: the same images with
    other labels learn the very same masks (with ``label`` they do not), and without penalties
    all-ones masks fit the teacher exactly, so the KL stays ~0 while the label CE does not."""
    cfg = LearnMasksConfig(epochs=2, batch_size=16, lr=0.05, target="teacher")
    data = _noise()
    relabelled = [(x, (y + 3) % NUM_CLASSES) for x, y in data]
    a = learn.learn_masks(_model(), data, cfg, num_classes=NUM_CLASSES, seed=0)
    b = learn.learn_masks(_model(), relabelled, cfg, num_classes=NUM_CLASSES, seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a.masks.tables(), b.masks.tables(), strict=True))
    by_label = [learn.learn_masks(_model(), d, cfg.model_copy(update={"target": "label"}),
                                  num_classes=NUM_CLASSES, seed=0) for d in (data, relabelled)]
    assert not all(torch.equal(x, y) for x, y in zip(
        by_label[0].masks.tables(), by_label[1].masks.tables(), strict=True))

    free = LearnMasksConfig(epochs=1, batch_size=16, lr=1e-3, target="teacher",
                            lambda_sparse=0.0, lambda_smooth=0.0)
    fit = learn.learn_masks(_model(), data, free, num_classes=NUM_CLASSES, seed=0)
    assert 0.0 <= fit.history[0]["ce"] < 1e-3
    assert by_label[0].history[0]["ce"] > 1.0  # noise images: the label CE is large


def test_max_images_is_one_seeded_subset() -> None:
    a = learn.epoch_subset(100, 10, seed=3)
    assert len(a) == 10 and len(set(a.tolist())) == 10
    np.testing.assert_array_equal(a, learn.epoch_subset(100, 10, seed=3))
    assert not np.array_equal(a, learn.epoch_subset(100, 10, seed=4))
    np.testing.assert_array_equal(learn.epoch_subset(5, 10, seed=0), np.arange(5))
    np.testing.assert_array_equal(learn.epoch_subset(5, None, seed=0), np.arange(5))


def test_resume_gives_the_same_masks(tmp_path: Path, monkeypatch) -> None:
    cfg = LearnMasksConfig(epochs=2, batch_size=16, max_images=32, lr=0.05)
    data = _noise()
    expected = learn.learn_masks(_model(), data, cfg, num_classes=NUM_CLASSES, seed=0,
                                 checkpoint_dir=tmp_path / "a", fingerprint="f")

    real_save = checkpoint.save

    def save_then_die(path, state):
        real_save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        learn.learn_masks(_model(), data, cfg, num_classes=NUM_CLASSES, seed=0,
                          checkpoint_dir=tmp_path / "b", fingerprint="f")
    monkeypatch.setattr(checkpoint, "save", real_save)
    resumed = learn.learn_masks(_model(), data, cfg, num_classes=NUM_CLASSES, seed=0,
                                checkpoint_dir=tmp_path / "b", fingerprint="f")
    assert resumed.resumed_from_epoch == 1 and len(resumed.history) == 2
    for a, b in zip(resumed.masks.tables(), expected.masks.tables(), strict=True):
        assert torch.equal(a, b)
    assert resumed.history == expected.history

    # another fingerprint starts over (and so gives the uninterrupted result too)
    other = learn.learn_masks(_model(), data, cfg, num_classes=NUM_CLASSES, seed=0,
                              checkpoint_dir=tmp_path / "b", fingerprint="g")
    assert other.resumed_from_epoch == 0
    for a, b in zip(other.masks.tables(), expected.masks.tables(), strict=True):
        assert torch.equal(a, b)
    # so does the same fingerprint under another config (the caller forgot to fold it in)
    changed = cfg.model_copy(update={"lr": 0.01})
    again = learn.learn_masks(_model(), data, changed, num_classes=NUM_CLASSES, seed=0,
                              checkpoint_dir=tmp_path / "b", fingerprint="g")
    assert again.resumed_from_epoch == 0


def test_resume_restores_the_rng_state(tmp_path: Path, monkeypatch) -> None:
    """The mask checkpoint is a training checkpoint: a resumed run draws from the RNG state the
    interrupted one saved, whatever the resuming process's RNG was."""
    cfg = LearnMasksConfig(epochs=2, batch_size=16, max_images=32, lr=0.05)
    data = _noise()
    at_epoch_start: list[torch.Tensor] = []
    real_epoch, real_save = learn._train_epoch, checkpoint.save

    def recording_epoch(*args, **kwargs):
        at_epoch_start.append(torch.get_rng_state())
        return real_epoch(*args, **kwargs)

    def save_then_die(path, state):
        real_save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(learn, "_train_epoch", recording_epoch)
    monkeypatch.setattr(checkpoint, "save", save_then_die)
    torch.manual_seed(1)
    with pytest.raises(KeyboardInterrupt):
        learn.learn_masks(_model(), data, cfg, num_classes=NUM_CLASSES, seed=0,
                          checkpoint_dir=tmp_path, fingerprint="f")
    saved = torch.get_rng_state()  # nothing draws between the save and the interrupt
    assert "rng" in torch.load(tmp_path / learn.CHECKPOINT_NAME, weights_only=True)
    monkeypatch.setattr(checkpoint, "save", real_save)
    model = _model()
    torch.manual_seed(2)  # a fresh process starts from another state
    at_epoch_start.clear()
    resumed = learn.learn_masks(model, data, cfg, num_classes=NUM_CLASSES, seed=0,
                                checkpoint_dir=tmp_path, fingerprint="f")
    assert resumed.resumed_from_epoch == 1 and len(at_epoch_start) == 1
    assert torch.equal(at_epoch_start[0], saved)


def test_mismatched_classes_and_labels_are_one_line_errors() -> None:
    cfg = LearnMasksConfig(epochs=1, batch_size=16)
    with pytest.raises(ModelError, match="predicts 10 classes"):
        learn.learn_masks(_model(), _noise(), cfg, num_classes=5, seed=0)
    bad = [(x, y + 10) for x, y in _noise(8)]
    with pytest.raises(DataError, match=r"outside 0\.\.9"):
        learn.learn_masks(_model(), bad, cfg, num_classes=NUM_CLASSES, seed=0)


def test_save_and_load_masks(tmp_path: Path) -> None:
    model = _model()
    masks = ClassMasks.for_model(model, NUM_CLASSES)
    with torch.no_grad():
        for i, t in enumerate(masks.tables()):
            t.mul_(0.5 + i)
    path = tmp_path / "masks" / "masks.safetensors"
    learn.save_masks(path, masks)
    assert [p.name for p in path.parent.iterdir()] == ["masks.safetensors"]
    loaded = learn.load_masks(path, model, NUM_CLASSES)
    for a, b in zip(loaded.tables(), masks.tables(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ModelError, match="does not fit"):
        learn.load_masks(path, model, NUM_CLASSES + 1)
    with pytest.raises(ModelError, match="does not exist"):
        learn.load_masks(tmp_path / "nope.safetensors", model, NUM_CLASSES)
