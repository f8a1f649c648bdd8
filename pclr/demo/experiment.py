"""``pclr run`` / ``pclr eval``: LoRA, LoRA+LwF and PCLR on the bundled CoIN-mini benchmark, side by side.

    pclr run                                  # default preset: mini LLaVA (SmolLM2-135M), 8 tasks, 3 methods
    pclr run --preset quick                   # same shape, smaller: a few minutes on a laptop CPU
    pclr run --preset tiny --output runs/t    # random tiny model, 3 tasks: a smoke test
    pclr run --resume                         # continue an interrupted run (Ctrl-C leaves one)
    pclr eval runs/coin-mini-default          # re-evaluate a saved run on every task, rewrite its report

Every method sees the same data, seeds and trainable-parameter budget per task (LoRA rank = experts PCLR adds per
task). A run directory holds ``run.json`` (what was asked), one sub-directory per method (the trainer's checkpoints,
logs, results), and the comparison: ``report.md``, ``metrics.json``, ``accuracy_matrices.png``, ``forgetting.png``.

Exit codes: 0 done, 2 bad input (unknown task/method/preset, an output directory holding a different run, a corrupt
checkpoint: nothing is overwritten), 130 interrupted (resumable).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator

from pclr.cil.config import CILConfig, Task, TaskPlan
from pclr.cil.metrics import summarize
from pclr.cil.trainer import CILTrainer
from pclr.config import LRPConfig
from pclr.demo.data.coin_mini import TASK_ORDER, VERSION, generate
from pclr.demo.models.smol import build_mini_llava, inject_top_layers
from pclr.demo.report import atomic_write, jsonable, machine, table, write_report
from pclr.inject import lrp_layers, lrp_pools

METHOD_ALIASES = {"lora": "lora", "lora_lwf": "lora_lwf", "lora-lwf": "lora_lwf", "lwf": "lora_lwf",
                  "pclr": "pclr", "pclr_lwf": "pclr_lwf", "pclr-lwf": "pclr_lwf"}
METHOD_LABELS = {"lora": "LoRA", "lora_lwf": "LoRA+LwF", "pclr": "PCLR", "pclr_lwf": "PCLR-LwF"}
RUN_FORMAT = 1

class UsageError(Exception):
    """Bad input: reported as one clear line, exit code 2."""


@dataclass
class Preset:
    """Sizes of one experiment preset (see ``PRESETS``)."""
    model: str = "smol"  # pclr.demo.models.smol preset
    tasks: tuple[str, ...] = ()  # empty = all eight CoIN-mini tasks
    n_train: int = 80
    n_test: int = 60
    lrp_layers: int = 6
    r: int = 4  # experts chosen per sample
    budget: int = 32  # experts kept at most (PCLR); per-task new experts = budget // 4 = LoRA rank under "auto"
    n_shared: int = 8
    alpha: float = 16.0
    epochs: float = 2.0
    batch_size: int = 8
    lr: float = 5e-3
    integration_steps: Optional[int] = 6
    eval_batch_size: int = 32
    max_new_tokens: int = 24  # a grounding box "[0.12,0.34,0.56,0.78]" is ~22 SmolLM2 tokens
    # CILConfig.eval_mode: "forced" = one teacher-forced forward per batch instead of a generate loop (greedy
    # exact-match verdict; Grounding then counts exact boxes only, a lower bound of IoU >= 0.5)
    eval_mode: str = "forced"
    compression: str = "index"  # the reference rule (drop every k-th expert: each task loses evenly)
    integration_lr: Optional[float] = 1e-3  # QKLD at the learning rate of learning overshoots (the KL rises)
    key_init: str = "task_query"  # new experts' keys start at the task's mean query (few steps per task)
    schedule: str = "auto"
    methods: tuple[str, ...] = ("lora", "lora_lwf", "pclr")


PRESETS: dict[str, Preset] = {
    # 2-core CPU, <= 15 min for 3 methods x 8 tasks (see pclr/demo/models/smol.py for the plan and timings)
    "default": Preset(),
    # <= 3 min on 2 CPU cores (model cached): same 8 tasks and methods, fewer samples/steps
    "quick": Preset(n_train=24, n_test=16, lrp_layers=4, integration_steps=3),
    # a GPU: LRP in every layer, bigger sets, several epochs
    "full": Preset(n_train=1000, n_test=500, lrp_layers=30, r=16, budget=64, n_shared=16, alpha=32.0, epochs=3.0,
                   lr=5e-4, integration_steps=None, integration_lr=None, eval_batch_size=64, eval_mode="generate"),
    # tests: random tiny model, 3 tasks, a handful of steps
    "tiny": Preset(model="tiny", tasks=("ScienceQA", "TextVQA", "VQAv2"), n_train=16, n_test=8, lrp_layers=2,
                   r=4, budget=16, n_shared=4, alpha=8.0, lr=5e-3, integration_steps=2, eval_batch_size=16,
                   max_new_tokens=4),
}


# ------------------------------------------------------------------------------------------------------ parsing
def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``pclr run``."""
    parser.description = (
        "Continual instruction tuning on the bundled CoIN-mini benchmark (8 synthetic tasks shaped like CoIN's, "
        "generated locally): trains each method on the tasks in order, evaluates every seen task after each one, "
        "and writes a comparison report.")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS),
                        help="Experiment size: default (2-core CPU, ~15 min), quick (~3 min), full (GPU), "
                             "tiny (random tiny model, tests). Default: %(default)s.")
    parser.add_argument("--methods", default=None,
                        help="Comma-separated methods among lora, lora_lwf, pclr, pclr_lwf "
                             "(default: lora,lora_lwf,pclr).")
    parser.add_argument("--tasks", default=None,
                        help="Comma-separated CoIN-mini tasks in training order (default: all eight: ScienceQA,"
                             "TextVQA,ImageNet,GQA,VizWiz,Grounding,VQAv2,OCR-VQA).")
    parser.add_argument("--schedule", default=None,
                        help="PCLR pool schedule: 'auto' (derived from the budget), 'coin8' (the paper's), or "
                             "per-task 'n_new[:keep]' items, e.g. '8,8,8,8:0.75,8:0.75'. Default: preset's.")
    parser.add_argument("--output", default=None, help="Run directory (default: runs/coin-mini-<preset>).")
    parser.add_argument("--resume", action="store_true",
                        help="Continue the run in --output (same settings) from its last checkpoint.")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: the GPU (and fused kernels) when there is one. Default: %(default)s.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of data generation and training. Default: 0.")
    parser.add_argument("--data-dir", default=None, help="Where CoIN-mini is generated/cached "
                                                         "(default: $PCLR_CACHE or ~/.cache/pclr).")
    parser.add_argument("--cache-dir", default=None, help="Cache of the aligned model (default: as --data-dir).")
    parser.add_argument("--no-progress", action="store_true", help="No progress bars.")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``pclr eval``."""
    parser.description = "Re-evaluate every method of a saved run on every task and rewrite its report."
    parser.add_argument("run_dir", help="A directory written by `pclr run`.")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--report-only", action="store_true", help="Only print the saved table; evaluate nothing.")
    parser.add_argument("--no-progress", action="store_true")


def _split_list(s: Optional[str]) -> Optional[list[str]]:
    return None if s is None else [x.strip() for x in s.split(",") if x.strip()]


def parse_schedule(s: str):
    """'auto' | 'coin8' | 'n[:keep],...' → what CILConfig.schedule accepts."""
    if s in ("auto", "coin8"):
        return s
    plans = []
    try:
        for i, item in enumerate(_split_list(s) or []):
            n, _, keep = item.partition(":")
            plans.append(TaskPlan(int(n), float(keep) if keep else 1.0, add_shared=False))
    except ValueError as e:
        raise UsageError(f"--schedule {s!r}: expected 'auto', 'coin8' or items 'n_new[:keep]' ({e})") from None
    if not plans:
        raise UsageError("--schedule is empty")
    first = next((p for p in plans if p.keep < 1.0), None)
    if first is not None:
        first.add_shared = True  # shared ranks appear at the first compression, as in the reference
    return plans


def resolve(args: argparse.Namespace) -> dict:
    """The run's identity (everything that determines its results), validated; raises UsageError."""
    preset = PRESETS[args.preset]
    methods = _split_list(args.methods) or list(preset.methods)
    bad = [m for m in methods if m not in METHOD_ALIASES]
    if bad:
        raise UsageError(f"unknown method(s) {bad}; choose from lora, lora_lwf, pclr, pclr_lwf")
    methods = list(dict.fromkeys(METHOD_ALIASES[m] for m in methods))
    tasks = _split_list(args.tasks) or list(preset.tasks or TASK_ORDER)
    bad = [t for t in tasks if t not in TASK_ORDER]
    if bad:
        raise UsageError(f"unknown task(s) {bad}; CoIN-mini tasks: {', '.join(TASK_ORDER)}")
    if len(set(tasks)) != len(tasks):
        raise UsageError(f"--tasks lists a task twice: {tasks}")
    schedule = args.schedule or preset.schedule
    parse_schedule(schedule)
    ident = {"format": RUN_FORMAT, "preset": args.preset, "methods": methods, "tasks": tasks, "seed": args.seed,
             "schedule": schedule, "sizes": dataclasses.asdict(preset)}
    return jsonable(ident)  # the form run.json holds (tuples become lists), so comparisons are like for like


# ------------------------------------------------------------------------------------------------- construction
def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible")
    return name


def _cil_config(ident: dict, method: str, progress: bool):
    p = Preset(**{k: tuple(v) if isinstance(v, list) else v for k, v in ident["sizes"].items()})
    lrp = LRPConfig(r=p.r, alpha=p.alpha, n_shared=p.n_shared, budget=p.budget)
    per_task = p.budget // 4 if ident["schedule"] == "auto" else None
    return CILConfig(method=method, lrp=lrp, schedule=parse_schedule(ident["schedule"]), compression=p.compression,
                     integration_steps=p.integration_steps, integration_lr=p.integration_lr, epochs=p.epochs,
                     batch_size=p.batch_size, lr=p.lr,
                     eval_batch_size=p.eval_batch_size, max_new_tokens=p.max_new_tokens, eval_mode=p.eval_mode,
                     key_init=p.key_init,
                     seed=ident["seed"],
                     lora_rank=max(p.r, per_task or p.r), progress=progress, tensorboard=False), p


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


def _trainable_per_task(trainer) -> int:
    """LRP parameters that train while learning the current task (rows of trainable experts + their keys)."""
    total = 0
    for pool in lrp_pools(trainer.model).values():
        rows = int(pool.trainable.sum())
        if trainer.lora:
            rows = pool.n
        per_row = sum(lay.A_m.shape[1] + lay.B_m.shape[1] for lay in pool.layers)
        total += rows * per_row + (0 if trainer.lora else rows * sum(pool.query_dims))
    return total


def _stored_params(trainer) -> int:
    n = sum(t.numel() for lay in lrp_layers(trainer.model).values()
            for t in (lay.A_m, lay.B_m, lay.A_s, lay.B_s)
            if t is not None)
    return n + sum(k.numel() for p in lrp_pools(trainer.model).values() for k in p.keys)


def _peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB; process-wide peak
    return kb / 1024 if sys.platform != "darwin" else kb / 2 ** 20


# --------------------------------------------------------------------------------------------------------- run
def _prepare_dir(out: Path, ident: dict, resume: bool) -> None:
    rj = out / "run.json"
    if rj.is_file():
        try:
            old = json.loads(rj.read_text())
        except (OSError, ValueError):
            raise UsageError(f"{rj} is unreadable; not touching {out}") from None
        if old != ident:
            diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
            raise UsageError(f"{out} holds a different run (differs in: {', '.join(diff)}); choose another "
                             "--output or repeat the original settings with --resume")
        if not resume:
            raise UsageError(f"{out} already holds this run; add --resume to continue it or choose another --output")
    elif out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not a pclr run directory; choose another --output")
    elif resume:
        raise UsageError(f"--resume: {out} holds no run to resume")
    out.mkdir(parents=True, exist_ok=True)
    if not rj.is_file():
        rj.write_text(json.dumps(ident, indent=1))


def run_main(args: argparse.Namespace) -> int:
    """``pclr run``: returns the exit code."""
    try:
        ident = resolve(args)
        out = Path(args.output or f"runs/coin-mini-{args.preset}")
        device = _device(args.device)
        _prepare_dir(out, ident, args.resume)
    except UsageError as e:
        print(f"pclr run: error: {e}", file=sys.stderr)
        return 2
    try:
        return _run(args, ident, out, device)
    except UsageError as e:
        print(f"pclr run: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; the run is saved after its last finished phase. Continue with:\n"
              f"  pclr run --preset {args.preset} --output {out} --resume"
              + (f" --methods {','.join(ident['methods'])}" if args.methods else "")
              + (f" --tasks {','.join(ident['tasks'])}" if args.tasks else "")
              + (f" --seed {args.seed}" if args.seed else "")
              + (f" --schedule {args.schedule}" if args.schedule else ""), file=sys.stderr)
        return 130


def _build(ident: dict, args, device: str):
    p = ident["sizes"]
    cache = args.cache_dir or args.data_dir
    return build_mini_llava(p["model"], cache_dir=cache, lrp_layers=p["lrp_layers"],
                            prefix_cache=device == "cpu", progress=not args.no_progress)


def _make_trainer(bundle, ident, method, out: Path, progress: bool, tasks, device: str):


    cfg, preset = _cil_config(ident, method, progress)
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


def _run(args, ident: dict, out: Path, device: str) -> int:


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
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics.setdefault("methods", {})
    for method in ident["methods"]:
        trainer = _make_trainer(bundle, ident, method, out, progress, tasks, device)
        if args.resume:
            _check_checkpoint(trainer, out, method)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainable = {}

        def on_step(tr, t, phase, step, _acc=trainable):
            if step == 0 and phase == "learn":
                _acc[t] = _trainable_per_task(tr)

        trainer.config.on_step = on_step
        prev = metrics["methods"].get(method, {})
        t0 = time.perf_counter()
        print(f"== {METHOD_LABELS[method]} ==", flush=True)
        res = trainer.run(resume=args.resume)
        wall = time.perf_counter() - t0 + (prev.get("wall_seconds", 0.0) if args.resume else 0.0)
        summary = summarize(res.matrix)
        metrics["methods"][method] = {
            "label": METHOD_LABELS[method], "matrix": res.matrix, **summary,
            "trainable_params_per_task": max(trainable.values()) if trainable else prev.get(
                "trainable_params_per_task"),
            "stored_lrp_params": _stored_params(trainer), "peak_memory_mb": round(_peak_memory_mb(device), 1),
            "wall_seconds": round(wall, 1), "experts": res.extra.get("experts") if res.extra else None,
        }
        print(f"   New.ACC {summary['new_acc']:.2f}  Avg.ACC {summary['avg_acc']:.2f}  "
              f"Forgetting {summary['forgetting']:.2f}  BWT {summary['bwt']:.2f}  ({wall:.0f} s)", flush=True)
        del trainer
    metrics.update({"run": ident, "tasks": ident["tasks"], "model": jsonable(bundle.info),
                    "machine": machine(device), "total_wall_seconds": round(time.perf_counter() - t_start, 1)})
    written = write_report(out, metrics)
    print()
    print(table(metrics))
    print(f"\nwrote {out}/{', '.join(written)} ({metrics['total_wall_seconds']:.0f} s)")
    return 0


# -------------------------------------------------------------------------------------------------------- eval
def eval_main(args: argparse.Namespace) -> int:
    """``pclr eval RUN_DIR``: re-evaluate each method's final checkpoint on every task; rewrite the report."""
    out = Path(args.run_dir)
    try:
        ident = json.loads((out / "run.json").read_text())
        metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else None
    except (OSError, ValueError):
        print(f"pclr eval: error: {out} is not a readable pclr run directory (run.json missing or corrupt)",
              file=sys.stderr)
        return 2
    if args.report_only:
        if metrics is None:
            print(f"pclr eval: error: {out} has no metrics.json yet (unfinished run?)", file=sys.stderr)
            return 2
        print(table(metrics))
        return 0
    try:
        device = _device(args.device)
        ns = argparse.Namespace(data_dir=None, cache_dir=None, no_progress=args.no_progress)
        tasks, _ = _tasks(ident, _data_root(ns, ident))
        bundle = _build(ident, ns, device)
        metrics = metrics or {"methods": {}, "run": ident, "tasks": ident["tasks"]}
        for method in ident["methods"]:
            trainer = _make_trainer(bundle, ident, method, out, not args.no_progress, tasks, device)
            if not os.path.exists(trainer.checkpoint_path):
                raise UsageError(f"{method} has no checkpoint in {out / method}")
            _check_checkpoint(trainer, out, method)
            acc = trainer.evaluate(list(range(len(tasks))))
            m = metrics["methods"].setdefault(method, {"label": METHOD_LABELS[method]})
            m["final_eval"] = {ident["tasks"][j]: a for j, a in acc.items()}
            print(f"{METHOD_LABELS[method]}: " + ", ".join(f"{ident['tasks'][j]} {a:.1f}" for j, a in acc.items()))
        atomic_write(out / "metrics.json", json.dumps(jsonable(metrics), indent=1))
    except UsageError as e:
        print(f"pclr eval: error: {e}", file=sys.stderr)
        return 2
    return 0
