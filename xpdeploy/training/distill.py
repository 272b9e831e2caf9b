"""Knowledge distillation from the original (teacher) model into the pruned (student) one.

loss = (1 - weight) * CE(student, labels) + weight * KD, where KD is

- ``soft``: KL(softmax(teacher / T) || softmax(student / T)) * T^2 (Hinton et al.; the T^2 keeps
  the gradient scale independent of T);
- ``hard``: CE(student, argmax teacher) (DeiT's hard distillation);
- ``none``: 0 (and weight is ignored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch
    from torch import nn

    from xpdeploy.spec import FinetuneConfig

DistillMode = Literal["none", "soft", "hard"]


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, mode: DistillMode, temperature: float
) -> torch.Tensor:
    """The KD term alone (scalar), for logits of shape (batch, classes)."""
    import torch.nn.functional as F

    if mode == "soft":
        t = temperature
        return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                        reduction="batchmean", log_target=True) * (t * t)
    if mode == "hard":
        return F.cross_entropy(student, teacher.argmax(dim=1))
    return student.new_zeros(())


@dataclass(frozen=True)
class Distiller:
    """A frozen teacher and how its logits enter the student's loss."""

    teacher: nn.Module
    mode: DistillMode
    weight: float
    temperature: float

    @classmethod
    def from_config(cls, teacher: nn.Module, cfg: FinetuneConfig) -> Distiller:
        teacher.eval().requires_grad_(False)
        return cls(teacher, cfg.distill, cfg.distill_weight, cfg.temperature)

    def loss(self, ce: torch.Tensor, student: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """``(1 - weight) * ce + weight * KD`` with the teacher's logits on the same ``pixels``."""
        import torch

        with torch.no_grad():
            teacher_logits = self.teacher(pixels)
        kd = distillation_loss(student, teacher_logits, self.mode, self.temperature)
        return (1 - self.weight) * ce + self.weight * kd
