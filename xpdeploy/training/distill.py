"""Knowledge distillation from the original (teacher) model into the pruned (student) one.

loss = (1 - weight) * CE(student, labels) + weight * KD, where KD is

- ``soft``: KL(softmax(teacher / T) || softmax(student / T)) * T^2 (Hinton et al.; the T^2 keeps
  the gradient scale independent of T);
- ``hard``: CE(student, argmax teacher) (DeiT's hard distillation);
- ``none``: 0 (and weight is ignored).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

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
