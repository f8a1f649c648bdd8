"""Integration by QKLD (SPEC §2): recover what compression removed, without old data.

* Fake query of task t, per key pool: the normalised mean of the keys learned in task t (one prototype per part).
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
from torch import Tensor

from pclr.modules import KeyPool
from pclr.routing import RoutingState

Prototype = tuple[Tensor, ...]  # one L2-normalised [d_p] vector per query part


@torch.no_grad()
def task_prototype(pool: KeyPool, task: int) -> Optional[Prototype]:
    """Normalised mean of the keys created for ``task`` (None if the pool has none)."""
    rows = pool.task_of_expert == task
    if not bool(rows.any()):
        return None
    return tuple(F.normalize(k.detach()[rows].float().mean(0), dim=-1) for k in pool.keys)


def prefill_prototype_routes(state: RoutingState, pools: Sequence[KeyPool],
                             prototypes: Sequence[Optional[Prototype]]) -> None:
    """Fill the routing cache so every pool routes all samples by its own prototype ([1, r] routes expand to any
    batch, including the projector's per-image batch)."""
    for pool, proto in zip(pools, prototypes):
        if proto is None or pool.n == 0:
            continue
        q = tuple(p.to(pool.keys[i].dtype).unsqueeze(0) for i, p in enumerate(proto))
        state.cache[id(pool)] = pool.gate(q)


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
