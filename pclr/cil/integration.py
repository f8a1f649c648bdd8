"""Integration by QKLD: recover what compression removed, without old data.

* Fake query of task t, per key pool: task t's prototype (:mod:`pclr.cil.prototypes`), routed for every sample.
* Each step draws a task t with P(t) ∝ sqrt(KL_t) (running value per task, starts uniform at 1, floor 1e-4), feeds
  the CURRENT task's batch with the prototype of t as every sample's query, and minimises
  KL(teacher ‖ student) over the teacher's top-k vocabulary (k = 100) of the final logits, each restricted softmax
  tempered by a square root (p^½ / Σ p^½), averaged over answer positions.
* Teacher = the pool before compression (frozen snapshot); student = the pool after it: experts and shared ranks
  train, keys are frozen.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pclr.modules import FusedLRPLinear, KeyPool


class TaskSampler:
    """P(t) ∝ sqrt(max(KL_t, floor)) over the tasks seen so far; KL_t starts at 1 (uniform) and is replaced by the
    latest measured value each time t is drawn."""

    def __init__(self, tasks: Sequence[int], floor: float = 1e-4, values: Optional[dict] = None):
        self.tasks = list(tasks)
        self.floor = floor
        self.values = {t: 1.0 for t in self.tasks}
        if values:
            self.values.update({int(k): float(v) for k, v in values.items() if int(k) in self.values})

    def probs(self) -> Tensor:
        v = torch.tensor([max(self.values[t], self.floor) for t in self.tasks], dtype=torch.float64).sqrt()
        return v / v.sum()

    def sample(self, generator: torch.Generator) -> int:
        return self.tasks[int(torch.multinomial(self.probs(), 1, generator=generator))]

    def update(self, task: int, kl: float) -> None:
        self.values[task] = float(kl)


def topk_sqrt_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, k: int = 100,
                 normalizer: Optional[Tensor] = None) -> Tensor:
    """KL(teacher ‖ student) on the teacher's top-k vocabulary, softmaxes tempered by a square root.

    Args:
        student_logits, teacher_logits: [B, L, V] (teacher detached). mask: bool [B, L] positions to average over.
        normalizer: positions count to divide by (default mask.sum(); pass the global count under DDP).

    Returns: scalar, Σ_positions KL / normalizer. p^½/Σp^½ over the k entries equals softmax(logits/2) on them.
    """
    k = min(k, teacher_logits.shape[-1])
    t = teacher_logits[mask].float()
    s = student_logits[mask].float()
    top = t.topk(k, dim=-1).indices
    lt = t.gather(-1, top) / 2.0
    ls = s.gather(-1, top) / 2.0
    log_pt = F.log_softmax(lt, -1)
    kl = (log_pt.exp() * (log_pt - F.log_softmax(ls, -1))).sum(-1)
    den = mask.sum().clamp_min(1) if normalizer is None else normalizer.clamp_min(1)
    return kl.sum() / den


def open_for_integration(pools: Sequence[KeyPool], layers: Sequence[FusedLRPLinear]) -> list[nn.Parameter]:
    """Make every expert and shared rank trainable (keys stay frozen; no gate restriction); returns the parameters
    QKLD trains."""
    for pool in pools:
        pool.unfreeze()
        pool.set_candidates(None, None)
        for k in pool.keys:
            k.requires_grad_(False)
    params = [p for lay in layers if lay.n for p in (lay.A_m, lay.B_m)]
    for lay in layers:
        if lay.n_shared:
            lay.A_s.requires_grad_(True)
            lay.B_s.requires_grad_(True)
            params += [lay.A_s, lay.B_s]
    return params


def close_integration(pools: Sequence[KeyPool], layers: Sequence[FusedLRPLinear]) -> None:
    """Freeze what :func:`open_for_integration` opened."""
    for lay in layers:
        lay.A_s.requires_grad_(False)
        lay.B_s.requires_grad_(False)
    for pool in pools:
        pool.freeze()
