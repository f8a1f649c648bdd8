"""Progressive schedules: how many experts each task adds and how much compression frees before it.

    resolve_schedule("coin8", n_tasks=8, lrp=LRPConfig())      # the paper's CoIN schedule
    resolve_schedule("auto", n_tasks=5, lrp=LRPConfig(r=8, budget=32))
    resolve_schedule([TaskPlan(8), TaskPlan(8, keep=0.5)], ...)

Every schedule is simulated before training: the pool never exceeds the budget after a task's experts are added.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

from pclr.cil.compression import kept_count
from pclr.cil.config import CILConfig, TaskPlan
from pclr.cil.lwf import is_group_start
from pclr.config import LRPConfig

# CoIN, 8 tasks, budget 256, r 64 (reference): t1..t3 +64; t4 +64 after keeping 3/4 (shared ranks created);
# t5 +64 keep 3/4; t6 +64 keep 7/8; t7 +32 keep 7/8; t8 +32 keep 7/8. No compression after the last task.
COIN8 = (
    TaskPlan(64), TaskPlan(64), TaskPlan(64), TaskPlan(64, 0.75, add_shared=True), TaskPlan(64, 0.75),
    TaskPlan(64, 0.875), TaskPlan(32, 0.875), TaskPlan(32, 0.875),
)
PRESETS = {"coin8": COIN8}


def auto_schedule(budget: int, n_tasks: int, r: int) -> list[TaskPlan]:
    """Derive a schedule from the budget and the task count.

    Each task adds n_new = max(r, budget // 4) experts (capped at the budget); while the pool has room nothing is
    compressed, afterwards compression frees exactly the capacity the task adds (keep = (budget - n_new) / n), so
    memory stays at the budget. Shared ranks are created at the first compression (as the reference does).
    """
    if budget < r:
        raise ValueError(f"budget ({budget}) must be >= r ({r})")
    n_new = min(budget, max(r, budget // 4))
    plans, n, shared = [], 0, False
    for _ in range(n_tasks):
        keep = 1.0
        if n + n_new > budget:
            keep = (budget - n_new) / n
            n = kept_count(n, keep)
        plans.append(TaskPlan(n_new, keep, add_shared=keep < 1.0 and not shared))
        shared = shared or keep < 1.0
        n += n_new
    return plans


def simulate(plans: Sequence[TaskPlan]) -> list[tuple[int, int, int]]:
    """[(n before compression, n after compression, n after adding)] per task."""
    out, n = [], 0
    for p in plans:
        kept = kept_count(n, p.keep)
        out.append((n, kept, kept + p.n_new))
        n = kept + p.n_new
    return out


def validate_schedule(plans: Sequence[TaskPlan], lrp: LRPConfig, compression: Optional[str] = "index") -> None:
    """Raise ValueError if the pool would exceed the budget or a task could not route r experts."""
    if not plans:
        raise ValueError("the schedule is empty")
    for t, (before, kept, after) in enumerate(simulate(plans)):
        if plans[t].keep < 1.0 and compression is None:
            raise ValueError(f"task {t}: the schedule compresses (keep={plans[t].keep}) but compression is disabled")
        if compression is not None and after > lrp.budget:
            raise ValueError(f"schedule exceeds the budget at task {t}: {before} experts, {kept} after compression, "
                             f"{after} after adding {plans[t].n_new} > budget {lrp.budget}")
        if after < min(lrp.r, after) or after == 0:
            raise ValueError(f"task {t}: the pool would be empty")
    if plans[0].n_new < 1:
        raise ValueError("the first task must add experts")


def resolve_schedule(schedule: Union[str, Sequence[TaskPlan], None], n_tasks: int, lrp: LRPConfig,
                     compression: Optional[str] = "index") -> list[TaskPlan]:
    """The per-task plans for ``n_tasks`` tasks (validated). ``compression=None`` (growing pool ablation) turns
    every compression off and lets the pool grow past the budget."""
    if schedule is None or schedule == "auto":
        plans = auto_schedule(lrp.budget, n_tasks, lrp.r)
    elif isinstance(schedule, str):
        if schedule not in PRESETS:
            raise ValueError(f"unknown schedule preset {schedule!r}; known: {sorted(PRESETS)}, 'auto' or a list")
        plans = list(PRESETS[schedule])
    else:
        plans = [p if isinstance(p, TaskPlan) else TaskPlan(**p) for p in schedule]
    if len(plans) < n_tasks:
        raise ValueError(f"the schedule has {len(plans)} entries for {n_tasks} tasks")
    plans = plans[:n_tasks]
    if compression is None:
        plans = [TaskPlan(p.n_new, 1.0, False) for p in plans]
    validate_schedule(plans, lrp, compression)
    return plans


def pool_plan(config: CILConfig, n_tasks: int) -> tuple[LRPConfig, list[Optional[TaskPlan]]]:
    """The pool settings and the per-task plans of a run (validated).

    LoRA baselines: one pool of ``lora_rank`` (default r) experts, no plans. PCLR: the resolved schedule, one plan
    per task (pclr_lwf: per group, on the group's first task; None on the others)."""
    plans: list[Optional[TaskPlan]] = [None] * n_tasks
    if not config.uses_pool:
        rank = config.lora_rank or config.lrp.r
        return dataclasses.replace(config.lrp, r=rank, budget=max(rank, config.lrp.budget)), plans
    starts = [t for t in range(n_tasks)
              if config.method != "pclr_lwf" or is_group_start(t, config.lwf_group_size)]
    for t, p in zip(starts, resolve_schedule(config.schedule, len(starts), config.lrp, config.compression)):
        plans[t] = p
    return config.lrp, plans
