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
from pclr.cil.data import load_coin_json
from pclr.cil.metrics import summarize
from pclr.cil.records import stored_lrp_params
from pclr.cil.trainer import CILTrainer
from pclr.demo import parallel
from pclr.demo.data.coin_mini import VERSION, generate, task_baselines
from pclr.demo.joint import joint_config, union_task
from pclr.demo.models.smol import build_mini_llava, inject_top_layers
from pclr.demo.plan import cil_config
from pclr.demo.report import atomic_write, jsonable, machine, table, task_table, write_report
from pclr.demo.rundir import finished, n_seeds, prepare_dir, seed_runs
from pclr.demo.settings import METHOD_LABELS, ORACLE_LABEL, ORACLE_ROW, Preset, UsageError
from pclr.demo.steps import check_equal_steps, learn_steps, steps_of
from pclr.demo.summary import summary_table, write_summary


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
    """The trainer of ``method`` in ``out / method``; "joint" learns the union of ``tasks`` as one task."""
    cfg, preset = cil_config(ident, method, progress)
    if method == "joint":
        # its trainer's own end-of-task score (on the union's test set) is not reported, the per-task evaluation
        # of _joint_accuracies is: one test sample keeps it from costing a second full evaluation pass
        cfg = dataclasses.replace(joint_config(cfg, tasks), max_eval_samples=1)
        tasks = [union_task(tasks)]
    mb = _method_model(bundle, cfg, preset)
    acc = Accelerator(cpu=device == "cpu")
    return CILTrainer(mb, cfg, tasks, output_dir=str(out / method), accelerator=acc)


def _joint_accuracies(trainer: CILTrainer, tasks, device: str) -> list[float]:
    """The joint reference's accuracy on each of ``tasks`` (its own trainer knows only their union): a second
    trainer over ``tasks`` around the same trained model evaluates it, with the same scoring as every method."""
    trainer.query.remove()  # the evaluating trainer hooks the model itself; one set of hooks is enough
    judge = CILTrainer(trainer.bundle, dataclasses.replace(trainer.config, max_eval_samples=None), tasks,
                       output_dir=trainer.output_dir, accelerator=Accelerator(cpu=device == "cpu"))
    acc = judge.evaluate(list(range(len(tasks))))
    judge.query.remove()
    return [acc[j] for j in range(len(tasks))]


def _stored_params(trainer: CILTrainer) -> int:
    """What must be kept to serve every task: the pool and its keys (PCLR), or the one adapter (LoRA, joint: its
    ranks are always all on, its keys never read)."""
    return stored_lrp_params(trainer.model, keys=trainer.config.uses_pool)


def _check_checkpoint(trainer, out: Path, method: str) -> None:
    path = trainer.checkpoint_path
    if not os.path.exists(path):
        return
    try:
        trainer.load_checkpoint()
    except Exception as e:  # noqa: BLE001 - any failure to read it means the checkpoint cannot be trusted
        raise UsageError(f"the checkpoint of {method} ({path}) is corrupt or incompatible: "
                         f"{type(e).__name__}: {e}") from None


def single_task_unit(bundle, ident: dict, out: Path, progress: bool, task, device: str, resume: bool = False,
                     overwrite: bool = False) -> dict:
    """``task`` learnt alone by a fresh LoRA (the same rank, steps and data as in the sequence): the accuracy a model
    reaches on the task, and its share of the per-task-adapter reference with an oracle task id (isolation: every
    task served by its own adapter). A resumed run takes a task already learnt from its checkpoint.

    Returns {"task", "accuracy", "trainable", "stored" (params of its adapter), "learn_steps", "wall_seconds"}."""
    trainer = _make_trainer(bundle, ident, "lora", out / "single-task" / task.name, progress, [task], device)
    a = trainer.run(resume=resume, overwrite=overwrite).matrix[0][0]
    return {"task": task.name, "accuracy": a, "trainable": max(trainer.records.trainable_per_task().values()),
            "stored": _stored_params(trainer), "learn_steps": steps_of(trainer.records, 1)["learn"][0],
            "wall_seconds": trainer.records.wall_seconds}


def method_unit(bundle, ident: dict, method: str, out: Path, progress: bool, tasks, device: str,
                resume: bool = False, overwrite: bool = False) -> dict:
    """Train ``method`` on ``tasks`` (in order, or "joint": their union) and evaluate it.

    Returns {"method", "row" (its line of the comparison), "steps" (the sequential trainers' optimizer steps per
    phase, None for joint), "joint_steps" (joint's, else None), "earlier_seconds" (wall time of phases finished in
    earlier sessions of a resumed run)}."""
    trainer = _make_trainer(bundle, ident, method, out, progress, tasks, device)
    earlier = 0.0
    if resume:
        _check_checkpoint(trainer, out, method)
        earlier = trainer.records.wall_seconds
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    res = trainer.run(resume=resume, overwrite=overwrite)
    wall = trainer.records.wall_seconds
    trainable = trainer.records.trainable_per_task()
    row = {"label": METHOD_LABELS[method]}
    steps = joint_steps = None
    if method == "joint":
        final = _joint_accuracies(trainer, tasks, device)
        joint_steps = steps_of(trainer.records, 1)["learn"][0]
        # no sequence: nothing to forget, no accuracy right after each task
        row.update({"final": final, "matrix": None, "new_acc": None, "avg_acc": sum(final) / len(final),
                    "forgetting": None, "bwt": None, "learn_steps": joint_steps})
    else:
        steps = steps_of(trainer.records, len(tasks))
        row.update({"matrix": res.matrix, **summarize(res.matrix), "learn_steps_per_task": steps["learn"],
                    "integration_steps": sum(steps["integrate"])})
    row.update({"trainable_params_per_task": max(trainable.values()) if trainable else None,
                "stored_lrp_params": _stored_params(trainer),
                "peak_memory_mb": round(_peak_memory_mb(device), 1),
                "wall_seconds": round(wall, 1), "experts": res.extra.get("experts") if res.extra else None})
    return {"method": method, "row": row, "steps": steps, "joint_steps": joint_steps, "earlier_seconds": earlier}


def single_task_lora(units: list[dict]) -> dict:
    """The single-task units of a run gathered: {"accuracy", "trainable", "stored", "learn_steps": {task: ...},
    "wall_seconds": total}."""
    out_: dict = {"accuracy": {}, "trainable": {}, "stored": {}, "learn_steps": {}, "wall_seconds": 0.0}
    for u in units:
        for k in ("accuracy", "trainable", "stored", "learn_steps"):
            out_[k][u["task"]] = u[k]
        out_["wall_seconds"] += u["wall_seconds"]
    return out_


def _print_method(u: dict, header: bool = True) -> None:
    row = u["row"]
    f = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    if header:
        print(f"== {row['label']} ==", flush=True)
    print(f"   New.ACC {f(row['new_acc'])}  Avg.ACC {f(row['avg_acc'])}  "
          f"Forgetting {f(row['forgetting'])}  BWT {f(row['bwt'])}  ({row['wall_seconds']:.0f} s)", flush=True)


def _run_units(args, ident: dict, out: Path, device: str, resume: bool, bundle, tasks) -> tuple[list, list]:
    """Every single-task unit, then every method: in this process, or in ``--jobs`` worker processes."""
    progress, overwrite = not args.no_progress, getattr(args, "overwrite", False)
    single_units = list(range(len(tasks))) if ident["sizes"].get("single_task") else []
    jobs = parallel.resolve_jobs(getattr(args, "jobs", None), device)
    if jobs > 1:
        return parallel.run_units(args, ident, out, device, resume, bundle, tasks, single_units,
                                  list(ident["methods"]), jobs, on_single=_print_single, on_method=_print_method)
    singles, methods = [], []
    if single_units:
        print("== single-task LoRA (each task alone) ==", flush=True)
    for k in single_units:
        singles.append(single_task_unit(bundle, ident, out, progress, tasks[k], device, resume, overwrite))
        _print_single(singles[-1])
    for method in ident["methods"]:
        print(f"== {METHOD_LABELS[method]} ==", flush=True)
        methods.append(method_unit(bundle, ident, method, out, progress, tasks, device, resume, overwrite))
        _print_method(methods[-1], header=False)
    return singles, methods


def _print_single(u: dict) -> None:
    print(f"   single-task LoRA {u['task']}: {u['accuracy']:.1f}", flush=True)


def _oracle_row(single: dict, task_names: list[str]) -> dict:
    """The per-task LoRA references as a row of the comparison: each task evaluated with its own adapter (oracle
    task id) right after learning it, so New.ACC = Avg.ACC and nothing is forgotten (0 by construction); serving
    every task keeps every adapter."""
    final = [single["accuracy"][n] for n in task_names]
    avg = sum(final) / len(final)
    return {"label": ORACLE_LABEL, "final": final, "matrix": None, "new_acc": avg, "avg_acc": avg,
            "forgetting": 0.0, "bwt": 0.0, "peak_memory_mb": None,
            "trainable_params_per_task": max(single["trainable"].values()),
            "stored_lrp_params": sum(single["stored"].values()),
            "learn_steps_per_task": [single["learn_steps"][n] for n in task_names],
            "wall_seconds": round(single["wall_seconds"], 1), "experts": None}


def run(args: argparse.Namespace, ident: dict, out: Path, device: str) -> int:
    """``pclr run`` after its checks: every seed's run (in ``out`` itself for one seed, else in ``out/seed-<s>``),
    then the summary over seeds. Resuming a multi-seed run skips the seeds whose report is written."""
    per_seed = []
    runs = seed_runs(ident, out)
    for k, (seed_ident, seed_out) in enumerate(runs):
        resume = args.resume
        if len(runs) > 1:
            if args.resume and finished(seed_out):
                print(f"== seed {seed_ident['seed']} ({k + 1}/{len(runs)}): finished, reading {seed_out} ==",
                      flush=True)
                per_seed.append(json.loads((seed_out / "metrics.json").read_text()))
                continue
            resume = args.resume and (seed_out / "run.json").is_file()
            prepare_dir(seed_out, seed_ident, resume, getattr(args, "overwrite", False))
            print(f"== seed {seed_ident['seed']} ({k + 1}/{len(runs)}) in {seed_out} ==", flush=True)
        per_seed.append(run_seed(args, seed_ident, seed_out, device, resume))
    written = write_summary(out, ident, per_seed)
    if n_seeds(ident) > 1:
        print()
        print(summary_table(json.loads((out / "summary.json").read_text())))
        print(f"\nwrote {out}/{', '.join(written)}")
    return 0


def run_seed(args: argparse.Namespace, ident: dict, out: Path, device: str, resume: bool) -> dict:
    """One seed's run: build the data and the model, train every method, write the report; returns its metrics.

    Every figure of the report comes from the trainers' checkpointed records, so a resumed run reports the
    trainable counts and optimizer steps of phases finished before the interruption, and its wall times are summed
    over every session (total = this session's time + the finished phases of earlier sessions)."""
    t_start = time.perf_counter()
    torch.manual_seed(ident["seed"])
    tasks, data = _tasks(ident, _data_root(args, ident))
    sizes = ", ".join(f"{n} {f.n_train}" for n, f in data.tasks.items())
    print(f"CoIN-mini: {len(tasks)} tasks, {ident['sizes']['n_test']} test samples each, train samples: {sizes} "
          f"({'generated' if data.generated else 'cached'} at {data.root})", flush=True)
    bundle = _build(ident, args, device)
    al = bundle.info.get("alignment", {})
    print(f"model: {bundle.info['name']} ({bundle.info['language_model']}); vision alignment "
          f"{'ran now' if al.get('ran_now') else 'loaded from cache'} ({al.get('steps')} steps, "
          f"loss {al.get('loss_first')} -> {al.get('loss_last')}); build {bundle.info['build_seconds']} s", flush=True)
    metrics: dict = {"methods": {}, "references": {}, "per_task": {}}
    earlier_sessions = 0.0  # finished phases of earlier sessions of this run
    per_task = metrics["per_task"]
    for name, f in data.tasks.items():
        per_task[name] = dict(task_baselines(f))
    steps: dict[str, dict[str, list[int]]] = {}  # the sequential trainers' optimizer steps
    singles, units = _run_units(args, ident, out, device, resume, bundle, tasks)
    if singles:
        single = single_task_lora(singles)
        for name, a in single["accuracy"].items():
            per_task[name]["single_task_lora"] = a
        metrics["references"][ORACLE_ROW] = _oracle_row(single, ident["tasks"])
        steps[ORACLE_ROW] = {"learn": metrics["references"][ORACLE_ROW]["learn_steps_per_task"],
                             "integrate": [0] * len(tasks)}
    joint_steps = None
    for u in units:
        metrics["methods"][u["method"]] = u["row"]
        earlier_sessions += u["earlier_seconds"]
        if u["steps"] is not None:
            steps[u["method"]] = u["steps"]
        if u["joint_steps"] is not None:
            joint_steps = u["joint_steps"]
    cfg, _ = cil_config(ident, "lora", progress=False)
    expected = [learn_steps(cfg, len(load_coin_json(t.train))) for t in tasks]
    metrics["optimizer_steps"] = check_equal_steps(steps, joint_steps, expected)
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
    return jsonable(metrics)


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
        if method == "joint":
            acc = dict(enumerate(_joint_accuracies(trainer, tasks, device)))
        else:
            acc = trainer.evaluate(list(range(len(tasks))))
        m = metrics["methods"].setdefault(method, {"label": METHOD_LABELS[method]})
        m["final_eval"] = {ident["tasks"][j]: a for j, a in acc.items()}
        print(f"{METHOD_LABELS[method]}: " + ", ".join(f"{ident['tasks'][j]} {a:.1f}" for j, a in acc.items()))
    atomic_write(out / "metrics.json", json.dumps(jsonable(metrics), indent=1))
