"""What a run measures about itself, phase by phase, saved with every checkpoint.

The records survive any resume: a report written after one shows the trainable-parameter counts of phases finished
before the interruption and the wall time summed over every session's finished phases (the part of a phase that
was interrupted is redone, and counted once, when it finishes).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from torch import nn

from pclr.inject import lrp_layers, lrp_pools
from pclr.key_pool import KeyPool


def trainable_lrp_params(pools: Iterable[KeyPool], lora: bool) -> int:
    """LRP parameters that train while learning a task: the trainable pool rows of every layer (A_m and B_m rows)
    plus, for PCLR, their keys; LoRA baselines train every row and no key."""
    total = 0
    for pool in pools:
        rows = pool.n if lora else int(pool.trainable.sum())
        per_row = sum(lay.A_m.shape[1] + lay.B_m.shape[1] for lay in pool.layers)
        total += rows * per_row + (0 if lora else rows * sum(pool.query_dims))
    return total


def stored_lrp_params(model: nn.Module, keys: bool = True) -> int:
    """Elements of every LRP tensor the model holds (pool rows, shared ranks and, with ``keys``, the keys).

    ``keys=False`` counts what a LoRA adapter needs to serve: its ranks are always all on, so its keys are never
    read."""
    n = sum(t.numel() for lay in lrp_layers(model).values() for t in (lay.A_m, lay.B_m, lay.A_s, lay.B_s)
            if t is not None)
    return n + (sum(k.numel() for p in lrp_pools(model).values() for k in p.keys) if keys else 0)


@dataclass
class RunRecords:
    """One entry per finished phase: {"task", "phase", "wall_seconds"} (+ "trainable_params" for "learn", +
    "optimizer_steps" when the steps were counted: see :meth:`count_step`)."""

    phases: list[dict[str, Any]] = field(default_factory=list)
    # steps counted in the phases still running, keyed (task, phase); not saved: an interrupted phase is redone
    _open_steps: dict[tuple[int, str], int] = field(default_factory=dict, repr=False, compare=False)

    def count_step(self, task: int, phase: str) -> None:
        """Count one optimizer step of ``phase`` of ``task`` (call it from ``CILConfig.on_step``); the count goes
        into the phase's entry when the phase finishes."""
        self._open_steps[(task, phase)] = self._open_steps.get((task, phase), 0) + 1

    def add(self, task: int, phase: str, wall_seconds: float, trainable_params: Optional[int] = None) -> None:
        rec: dict[str, Any] = {"task": task, "phase": phase, "wall_seconds": float(wall_seconds)}
        if trainable_params is not None:
            rec["trainable_params"] = int(trainable_params)
        steps = self._open_steps.pop((task, phase), None)
        if steps is not None:
            rec["optimizer_steps"] = steps
        self.phases.append(rec)

    @property
    def wall_seconds(self) -> float:
        """Wall time of all finished phases, over every session of the run."""
        return sum(p["wall_seconds"] for p in self.phases)

    def trainable_per_task(self) -> dict[int, int]:
        """{task: parameters trained while learning it}."""
        return {p["task"]: p["trainable_params"] for p in self.phases if "trainable_params" in p}

    def steps_per_task(self, phase: str) -> dict[int, int]:
        """{task: optimizer steps counted in its ``phase``} (tasks whose phase took no counted step are absent)."""
        return {p["task"]: p["optimizer_steps"] for p in self.phases if p["phase"] == phase and "optimizer_steps" in p}

    def to_list(self) -> list[dict[str, Any]]:
        return [dict(p) for p in self.phases]

    @classmethod
    def from_list(cls, phases: Optional[list]) -> "RunRecords":
        return cls([dict(p) for p in phases or []])
