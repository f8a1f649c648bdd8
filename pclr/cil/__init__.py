"""Continual instruction tuning with PCLR: Compression → Integration → Learning per task.

API::

    from pclr.cil import CILTrainer, CILConfig, Task

    tasks = [Task("ScienceQA", train="sqa/train.json", test="sqa/test.json", image_root="images/", scorer="choice"),
             Task("RefCOCO", train=..., test=..., image_root=..., scorer="grounding"), ...]
    cfg = CILConfig(method="pclr",            # "lora" | "lora_lwf" | "pclr" | "pclr_lwf"
                    lrp=LRPConfig(r=64, budget=256),
                    schedule="coin8",          # "coin8" | "auto" | [TaskPlan(n_new=64, keep=1.0), ...]
                    compression="index",       # "index" | "importance" | "redundancy" (registry: compression.py)
                    epochs=1, batch_size=8, lr=2e-4, lambda_qk=0.2, integration_steps=None)
    trainer = CILTrainer(bundle, cfg, tasks, output_dir="runs/pclr")   # bundle: pclr.models.ModelBundle
    results = trainer.run(resume=False)        # -> CILResults
    results.matrix        # float [T, T] list of lists, a[i][j] = accuracy (0-100) on task j after task i (NaN: j > i)
    results.summary       # {"new_acc", "avg_acc", "forgetting", "bwt"}
    # files in output_dir: results.json, accuracy.png (heatmap), results.md, log.jsonl, ckpt/ (safetensors + state)

* ``Task(name, train, test, image_root=None, scorer="exact")``: ``train``/``test`` are CoIN-format JSON paths or the
  already-loaded list of samples; ``scorer`` is "exact" | "choice" | "grounding" or a callable (pred, answer) -> float.
* ``CILConfig``: every field documented in :mod:`pclr.cil.config`; ablations are fields (``integration=False``,
  ``compression=None`` = growing pool, ``lrp.gate_scope``, ``lrp.gate_mode``); LwF fields for the LwF methods.
* ``CILTrainer.run(resume=True)`` continues after a crash at the right task and phase from ``output_dir/ckpt``.
* ``CILTrainer(..., collator=...)``: how samples become batches (default :class:`pclr.cil.data.CoINCollator`,
  CoIN / LLaVA conversations; anything called as ``collator(bundle, mode="train" | "generate", max_length=None)``).
* ``CILTrainer.evaluate(task_ids) -> {task_id: accuracy}``, ``CILTrainer.model`` (the injected model),
  ``CILTrainer.accelerator``. Callbacks: ``CILConfig.on_step(trainer, task, phase, step)`` (e.g. early stop / tests).
* Methods: "pclr" (CIL), "pclr_lwf" (LwF inside groups of ``lwf_group_size`` tasks, CIL between groups), "lora"
  (sequential fine-tuning of one LoRA: a pool of r experts, all always chosen) and "lora_lwf" (LoRA + LwF).
* Schedules (:mod:`pclr.cil.schedule`): "coin8" = the paper's 8-task schedule (budget 256, r 64), "auto" = derived
  from budget and task count (n_new = max(r, budget // 4), compression frees exactly what a task adds), or a list of
  ``TaskPlan(n_new, keep, add_shared)``; every schedule is simulated against the budget before training.
* Other models: ``pclr.inject_lrp(model, LRPConfig(...))`` + ``pclr.query.QueryExtractor(model)`` give the routed
  model without the trainer; ``pclr.peft.PCLRConfig`` is the PEFT route.

Distributed training::

    accelerate launch --num_processes 8 train.py     # train.py builds a CILTrainer and calls run()
    # CPU test setup: 2 processes, gloo (tests/test_cil_ddp.py)

``batch_size`` is the global batch; each process takes every N-th sample of it. Only LRP tensors train (a few
million parameters for a 7B model), so the trainer keeps a full replica of the frozen base model per process and sums
the LRP gradients with one flat all-reduce per step; losses are normalised by global token/sample counts, so N
processes compute the same update as one (up to float summation order). The model is not wrapped in DDP/FSDP
because the pools change shape between phases (grow, compress). For a 7B base in bf16 (~14 GB) one replica per
80 GB GPU fits; the paper's DeepSpeed ZeRO-2 setup shards optimizer state and gradients, which here are the small
LRP tensors only, so it would save little; FSDP/ZeRO-3 sharding of the frozen base is not supported.
"""
from __future__ import annotations

import importlib
from typing import Any

from pclr.cil.config import CILConfig, Task, TaskPlan
from pclr.cil.metrics import CILResults, summarize

# The trainer pulls in transformers and accelerate (seconds to import): loaded on first use, so the settings,
# metrics and data modules of this package stay light to import.
_LAZY = {"CILTrainer": "pclr.cil.trainer"}

__all__ = ["CILConfig", "CILResults", "CILTrainer", "Task", "TaskPlan", "summarize"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pclr.cil' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
