"""Knowledge distillation from the dense starting model (Hinton et al., "Distilling the Knowledge in a
Neural Network", 2015) while the pruned student fine-tunes.

    loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The teacher is a frozen copy of the model as the run started (its checkpoint): eval mode, no
gradients, run on the same (augmented) batch as the student, inside the same autocast.  A resumed
run rebuilds it from the same start checkpoint, so it is never stored in the run's checkpoint.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, *, alpha: float,
                      temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """``(1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T)`` (mean over the batch); the
    ``T^2`` keeps the soft term's gradient scale independent of ``T``."""
    ce = F.cross_entropy(student, labels, label_smoothing=label_smoothing)
    if alpha == 0:
        return ce
    t = float(temperature)
    kl = F.kl_div(F.log_softmax(student.float() / t, dim=1), F.log_softmax(teacher.float() / t, dim=1),
                  reduction="batchmean", log_target=True)
    return (1.0 - alpha) * ce + alpha * t * t * kl


class Teacher:
    """A frozen copy of ``model`` (taken now): eval mode, ``requires_grad=False``; calling it runs a
    forward pass without autograd.  Not an ``nn.Module`` attribute of anything, so ``.train()`` on
    the student never reaches it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.model.eval()  # (in case a caller switched it)
        with torch.no_grad():
            return self.model(x)
