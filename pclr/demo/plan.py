"""The trainer settings of each method of a ``pclr run``, and their check before any work.

Light to import (no transformers / accelerate): :mod:`pclr.demo.experiment` simulates every method's pool schedule
here while checking the arguments, so a schedule over the budget is a one-line error in the first second, not a
traceback after the baselines have trained.
"""
from __future__ import annotations

from typing import Any

from pclr.cil.config import CILConfig
from pclr.cil.schedule import pool_plan
from pclr.config import LRPConfig
from pclr.demo.settings import Preset, UsageError, parse_schedule


def count_step(trainer: Any, task: int, phase: str, step: int) -> None:
    """``CILConfig.on_step`` of every ``pclr run`` trainer: each optimizer step is counted into the trainer's
    records, which keep the count of every finished phase with the checkpoint (the equal-steps check reads them)."""
    trainer.records.count_step(task, phase)


def cil_config(ident: dict, method: str, progress: bool) -> tuple[CILConfig, Preset]:
    """The CILConfig of ``method`` in the run ``ident`` (run.json's content) and the preset's sizes.

    "joint" trains the LoRA baseline's adapter (same rank) on the union of the tasks: its config is LoRA's; its
    number of epochs is set by :func:`pclr.demo.joint.joint_config` from the data."""
    p = Preset(**{k: tuple(v) if isinstance(v, list) else v for k, v in ident["sizes"].items()})
    lrp = LRPConfig(r=p.r, alpha=p.alpha, n_shared=p.n_shared, budget=p.budget)
    per_task = p.budget // 4 if ident["schedule"] == "auto" else None
    return CILConfig(method="lora" if method == "joint" else method, lrp=lrp,
                     schedule=parse_schedule(ident["schedule"]), compression=p.compression,
                     integration_steps=p.integration_steps, integration_lr=p.integration_lr, epochs=p.epochs,
                     batch_size=p.batch_size, lr=p.lr,
                     eval_batch_size=p.eval_batch_size, max_new_tokens=p.max_new_tokens, eval_mode=p.eval_mode,
                     key_init=p.key_init,
                     seed=ident["seed"],
                     lora_rank=max(p.r, per_task or p.r), progress=progress, tensorboard=False,
                     on_step=count_step), p


def check_plans(ident: dict) -> None:
    """Build every method's settings and simulate its pool schedule over the run's tasks; UsageError naming the
    option (--schedule or the preset) when one would fail during training."""
    for method in ident["methods"]:
        try:
            cfg, _ = cil_config(ident, method, progress=False)
            pool_plan(cfg, len(ident["tasks"]))
        except UsageError:
            raise
        except ValueError as e:
            raise UsageError(f"--schedule {ident['schedule']!r} cannot run {method} on {len(ident['tasks'])} "
                             f"task(s) with budget {ident['sizes']['budget']} and r {ident['sizes']['r']}: {e}") \
                from None
