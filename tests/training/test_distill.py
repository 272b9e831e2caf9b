"""Distillation loss and training with a teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.training.test_loop import _setup
from xpdeploy.spec import FinetuneConfig
from xpdeploy.training.distill import Distiller, distillation_loss
from xpdeploy.training.loop import train_model


def test_soft_kd_is_zero_for_equal_logits_and_positive_otherwise() -> None:
    a = torch.randn(4, 10)
    assert float(distillation_loss(a, a, "soft", 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(a, torch.randn(4, 10), "soft", 2.0)) > 0
    assert float(distillation_loss(a, torch.randn(4, 10), "none", 2.0)) == 0.0


def test_soft_kd_scales_with_temperature_squared_and_hard_uses_teacher_argmax() -> None:
    s, t = torch.randn(8, 5), torch.randn(8, 5)
    expected = F.kl_div(F.log_softmax(s / 3, 1), F.softmax(t / 3, 1), reduction="batchmean") * 9
    assert float(distillation_loss(s, t, "soft", 3.0)) == pytest.approx(float(expected), rel=1e-5)
    assert float(distillation_loss(s, t, "hard", 1.0)) == pytest.approx(
        float(F.cross_entropy(s, t.argmax(1))))


def _weights(m: torch.nn.Module) -> list[torch.Tensor]:
    return [v.clone() for v in m.state_dict().values()]


def test_teacher_is_frozen_and_weight_zero_equals_plain_training(tmp_path: Path) -> None:
    student, train = _setup()
    init = {k: v.clone() for k, v in student.state_dict().items()}
    teacher, _ = _setup()
    teacher_before = _weights(teacher)
    plain = FinetuneConfig(epochs=1, batch_size=128, warmup_epochs=0, max_images=256,
                           distill="none")
    train_model(student, train, None, plain, checkpoint_dir=tmp_path / "a", fingerprint="a",
                seed=0, eval_batch_size=64)
    expected = _weights(student)

    student.load_state_dict(init)
    zero = plain.model_copy(update={"distill": "soft", "distill_weight": 0.0})
    train_model(student, train, None, zero, checkpoint_dir=tmp_path / "b", fingerprint="b",
                seed=0, eval_batch_size=64, distiller=Distiller.from_config(teacher, zero))
    assert all(torch.equal(a, b) for a, b in zip(_weights(student), expected, strict=True))

    student.load_state_dict(init)
    soft = plain.model_copy(update={"distill": "soft", "distill_weight": 0.7})
    train_model(student, train, None, soft, checkpoint_dir=tmp_path / "c", fingerprint="c",
                seed=0, eval_batch_size=64, distiller=Distiller.from_config(teacher, soft))
    assert not all(torch.equal(a, b) for a, b in zip(_weights(student), expected, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(_weights(teacher), teacher_before, strict=True))
