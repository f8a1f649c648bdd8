"""Continual instruction tuning with PCLR: Compression → Integration → Learning per task (SPEC §3).

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
* ``CILTrainer.evaluate(task_ids) -> {task_id: accuracy}``, ``CILTrainer.model`` (the injected model),
  ``CILTrainer.accelerator``. Callbacks: ``CILConfig.on_step(trainer, task, phase, step)`` (e.g. early stop / tests).
* Distributed: ``accelerate launch`` (DDP); ``batch_size`` is the global batch, split across processes.
"""
from pclr.cil.config import CILConfig, Task, TaskPlan
from pclr.cil.metrics import CILResults, summarize
from pclr.cil.trainer import CILTrainer

__all__ = ["CILConfig", "CILResults", "CILTrainer", "Task", "TaskPlan", "summarize"]
