"""The work behind ``pclr run`` / ``pclr eval``: data, model, one trainer per method, the report.

:mod:`pclr.demo.experiment` (the command line) imports this module only once the arguments are checked.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator

from pclr.cil.config import Task
from pclr.cil.metrics import summarize
from pclr.cil.records import stored_lrp_params
from pclr.cil.trainer import CILTrainer
from pclr.demo.data.coin_mini import VERSION, generate, task_baselines
from pclr.demo.models.smol import build_mini_llava, inject_top_layers
from pclr.demo.plan import cil_config
from pclr.demo.report import atomic_write, jsonable, machine, table, task_table, write_report
from pclr.demo.settings import METHOD_LABELS, Preset, UsageError


def _tasks(ident: dict, data_root: Path):
    p = ident["sizes"]
    data = generate(data_root, seed=ident["seed"], n_train=p["n_train"], n_test=p["n_test"],
                    tasks=ident["tasks"])
    return [Task(n, train=str(f.train_json), test=str(f.test_json), image_root=str(f.root), scorer=f.scorer)
            for n, f in data.tasks.items()], data


def _data_root(args, ident: dict) -> Path:
    base = Path(args.data_dir).expanduser() if args.data_dir else None
    if base is None:
        base = Path(os.environ.get("PCLR_CACHE", Path.home() / ".cache" / "pclr"))
    p = ident["sizes"]
    tag = "-".join(t.replace("-", "") for t in ident["tasks"]) if len(ident["tasks"]) < 8 else "all"
    return base / "coin-mini" / f"v{VERSION}-seed{ident['seed']}-{p['n_train']}x{p['n_test']}-{tag}"


def _method_model(base_bundle, method_cfg, preset: Preset):
    """A private copy of the base model with LRP in its top layers; the prefix cache is shared between copies (the
    frozen bottom is identical in all of them)."""

    base = base_bundle.model
    shared_cache = getattr(base.model.language_model, "_prefix_cache", None)
    model = copy.deepcopy(base)
    if shared_cache is not None:
        model.model.language_model._prefix_cache = shared_cache
    lrp = method_cfg.lrp
    if not method_cfg.uses_pool:  # the trainer's LoRA baseline: one pool of lora_rank experts
        rank = method_cfg.lora_rank or lrp.r
        lrp = dataclasses.replace(lrp, r=rank, budget=max(rank, lrp.budget))
    inject_top_layers(model, lrp, preset.lrp_layers)
    return dataclasses.replace(base_bundle, model=model)


def _peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB; process-wide peak
    return kb / 1024 if sys.platform != "darwin" else kb / 2 ** 20


def _build(ident: dict, args, device: str):
    p = ident["sizes"]
    cache = args.cache_dir or args.data_dir
    return build_mini_llava(p["model"], cache_dir=cache, lrp_layers=p["lrp_layers"],
                            prefix_cache=device == "cpu", progress=not args.no_progress)


def _make_trainer(bundle, ident, method, out: Path, progress: bool, tasks, device: str):
    cfg, preset = cil_config(ident, method, progress)
    mb = _method_model(bundle, cfg, preset)
    acc = Accelerator(cpu=device == "cpu")
    return CILTrainer(mb, cfg, tasks, output_dir=str(out / method), accelerator=acc)


def _check_checkpoint(trainer, out: Path, method: str) -> None:
    path = trainer.checkpoint_path
    if not os.path.exists(path):
        return
    try:
        trainer.load_checkpoint()
    except Exception as e:  # noqa: BLE001 - any failure to read it means the checkpoint cannot be trusted
        raise UsageError(f"the checkpoint of {method} ({path}) is corrupt or incompatible: "
                         f"{type(e).__name__}: {e}") from None


def single_task_lora(bundle, ident: dict, out: Path, progress: bool, tasks, device: str, resume: bool = False,
                     overwrite: bool = False) -> dict[str, float]:
    """Each task learnt alone by a fresh LoRA (the same rank, steps and data as in the sequence): the accuracy a
    model reaches on the task, and the per-task-adapter reference with an oracle task id. A resumed run takes the
    tasks already learnt from their checkpoints."""
    acc = {}
    for task in tasks:
        trainer = _make_trainer(bundle, ident, "lora", out / "single-task" / task.name, progress, [task], device)
        acc[task.name] = trainer.run(resume=resume, overwrite=overwrite).matrix[0][0]
        print(f"   single-task LoRA {task.name}: {acc[task.name]:.1f}", flush=True)
        del trainer
    return acc


def run(args: argparse.Namespace, ident: dict, out: Path, device: str) -> int:
    """``pclr run`` after its checks: build the data and the model, train every method, write the report.

    Every figure of the report comes from the trainers' checkpointed records, so a resumed run reports the
    trainable counts of phases finished before the interruption, and its wall times are summed over every
    session (total = this session's time + the finished phases of earlier sessions)."""
    t_start = time.perf_counter()
    progress = not args.no_progress
    torch.manual_seed(ident["seed"])
    tasks, data = _tasks(ident, _data_root(args, ident))
    print(f"CoIN-mini: {len(tasks)} tasks, {ident['sizes']['n_train']} train / {ident['sizes']['n_test']} test "
          f"each ({'generated' if data.generated else 'cached'} at {data.root})", flush=True)
    bundle = _build(ident, args, device)
    al = bundle.info.get("alignment", {})
    print(f"model: {bundle.info['name']} ({bundle.info['language_model']}); vision alignment "
          f"{'ran now' if al.get('ran_now') else 'loaded from cache'} ({al.get('steps')} steps, "
          f"loss {al.get('loss_first')} -> {al.get('loss_last')}); build {bundle.info['build_seconds']} s", flush=True)
    metrics: dict = {"methods": {}, "per_task": {}}
    earlier_sessions = 0.0  # finished phases of earlier sessions of this run
    per_task = metrics["per_task"]
    for name, f in data.tasks.items():
        per_task[name] = dict(task_baselines(f))
    if ident["sizes"].get("single_task"):
        print("== single-task LoRA (each task alone) ==", flush=True)
        for name, a in single_task_lora(bundle, ident, out, progress, tasks, device, resume=args.resume,
                                        overwrite=getattr(args, "overwrite", False)).items():
            per_task[name]["single_task_lora"] = a
    for method in ident["methods"]:
        trainer = _make_trainer(bundle, ident, method, out, progress, tasks, device)
        if args.resume:
            _check_checkpoint(trainer, out, method)
            earlier_sessions += trainer.records.wall_seconds
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        print(f"== {METHOD_LABELS[method]} ==", flush=True)
        res = trainer.run(resume=args.resume, overwrite=getattr(args, "overwrite", False))
        wall = trainer.records.wall_seconds
        trainable = trainer.records.trainable_per_task()
        summary = summarize(res.matrix)
        metrics["methods"][method] = {
            "label": METHOD_LABELS[method], "matrix": res.matrix, **summary,
            "trainable_params_per_task": max(trainable.values()) if trainable else None,
            "stored_lrp_params": stored_lrp_params(trainer.model),
            "peak_memory_mb": round(_peak_memory_mb(device), 1),
            "wall_seconds": round(wall, 1), "experts": res.extra.get("experts") if res.extra else None,
        }
        print(f"   New.ACC {summary['new_acc']:.2f}  Avg.ACC {summary['avg_acc']:.2f}  "
              f"Forgetting {summary['forgetting']:.2f}  BWT {summary['bwt']:.2f}  ({wall:.0f} s)", flush=True)
        del trainer
    metrics.update({"run": ident, "tasks": ident["tasks"], "model": jsonable(bundle.info),
                    "machine": machine(device),
                    "total_wall_seconds": round(time.perf_counter() - t_start + earlier_sessions, 1)})
    written = write_report(out, metrics)
    print()
    print(table(metrics))
    if metrics.get("per_task"):
        print()
        print(task_table(metrics))
    print(f"\nwrote {out}/{', '.join(written)} ({metrics['total_wall_seconds']:.0f} s)")
    return 0


def evaluate_run(out: Path, ident: dict, metrics: Optional[dict], device: str, progress: bool = True) -> None:
    """``pclr eval``: every method's final checkpoint on every task; the accuracies go into metrics.json."""
    ns = argparse.Namespace(data_dir=None, cache_dir=None, no_progress=not progress)
    tasks, _ = _tasks(ident, _data_root(ns, ident))
    bundle = _build(ident, ns, device)
    metrics = metrics or {"methods": {}, "run": ident, "tasks": ident["tasks"]}
    for method in ident["methods"]:
        trainer = _make_trainer(bundle, ident, method, out, progress, tasks, device)
        if not os.path.exists(trainer.checkpoint_path):
            raise UsageError(f"{method} has no checkpoint in {out / method}")
        _check_checkpoint(trainer, out, method)
        acc = trainer.evaluate(list(range(len(tasks))))
        m = metrics["methods"].setdefault(method, {"label": METHOD_LABELS[method]})
        m["final_eval"] = {ident["tasks"][j]: a for j, a in acc.items()}
        print(f"{METHOD_LABELS[method]}: " + ", ".join(f"{ident['tasks'][j]} {a:.1f}" for j, a in acc.items()))
    atomic_write(out / "metrics.json", json.dumps(jsonable(metrics), indent=1))
