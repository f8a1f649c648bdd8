"""Learning without Forgetting (Li & Hoiem): distil the model from before the task on the current task's data.

Used by the "lora_lwf" baseline (LoRA + LwF) and by "pclr_lwf" (tasks grouped: LwF inside a group, CIL between
groups). The teacher is an :class:`pclr.cil.teacher.LRPSnapshot` taken before the task's learning phase.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor


def lwf_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 2.0,
             normalizer: Optional[Tensor] = None) -> Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), summed over ``mask`` positions / normalizer.

    student_logits, teacher_logits: [B, L, V]; mask: bool [B, L] (answer positions)."""
    T = float(temperature)
    s = F.log_softmax(student_logits[mask].float() / T, -1)
    t = F.log_softmax(teacher_logits[mask].float() / T, -1)
    kl = (t.exp() * (t - s)).sum(-1)
    den = mask.sum().clamp_min(1) if normalizer is None else normalizer.clamp_min(1)
    return kl.sum() * (T * T) / den


def group_of(task: int, group_size: int) -> int:
    """pclr_lwf: the group a task belongs to (consecutive tasks, ``group_size`` per group)."""
    return task // group_size


def is_group_start(task: int, group_size: int) -> bool:
    return task % group_size == 0
