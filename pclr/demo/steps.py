"""Equal optimizer steps: what each method of a ``pclr run`` spent per task, read from its trainer's records.

Every trainer of ``pclr run`` counts its optimizer steps (:func:`pclr.demo.plan.count_step`); the comparison holds
only when every sequential method took the same number of learning steps on every task, and the joint reference as
many in total. PCLR's integration (QKLD) steps come on top and are reported apart.
"""
from __future__ import annotations

import math
from typing import Optional

from pclr.cil.config import CILConfig
from pclr.cil.records import RunRecords


def learn_steps(config: CILConfig, n_train: int) -> int:
    """Optimizer steps of one learning phase on ``n_train`` samples, by the trainer's rule: ``epochs`` passes of
    ceil(n_train / batch_size) steps, rounded up, at least one (the recorded counts are checked against it)."""
    return max(1, math.ceil(config.epochs * max(1, math.ceil(n_train / config.batch_size))))


def steps_of(records: RunRecords, n_tasks: int) -> dict[str, list[int]]:
    """{"learn": [steps per task], "integrate": [steps per task]} (0 where a phase did not run or took none)."""
    out = {}
    for phase in ("learn", "integrate"):
        per = records.steps_per_task(phase)
        out[phase] = [per.get(t, 0) for t in range(n_tasks)]
    return out


def check_equal_steps(steps: dict[str, dict[str, list[int]]], joint: Optional[int] = None,
                      expected: Optional[list[int]] = None) -> dict:
    """Check that the sequential methods took equal learning steps on every task and the joint reference their sum.

    steps: {method: steps_of(...)} of the sequential methods; joint: the joint reference's learning steps (None if
    it did not run); expected: the per-task count every method should take (compared when given). Returns what
    metrics.json records: {"learn_steps_per_task", "joint_learn_steps", "integration_steps": {method: total}}.
    Raises RuntimeError naming the methods whose counts differ."""
    learn = {m: s["learn"] for m, s in steps.items()}
    ref = expected if expected is not None else next(iter(learn.values()), None)
    bad = {m: v for m, v in learn.items() if v != ref}
    if bad:
        raise RuntimeError(f"unequal optimizer steps per task: expected {ref}, got {bad}")
    if joint is not None and ref is not None and joint != sum(ref):
        raise RuntimeError(f"the joint reference took {joint} optimizer steps, the sequential methods {sum(ref)}")
    return {"learn_steps_per_task": ref, "joint_learn_steps": joint,
            "integration_steps": {m: sum(s["integrate"]) for m, s in steps.items()}}
