"""``pclr bench`` / ``python -m benchmarks.run`` / ``python -m pclr.bench``: one command, the same flags and outputs."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from typing import Optional, Sequence

import torch

from pclr.bench.harness import SweepConfig, run_sweep
from pclr.bench.meta import collect_meta, device_slug, row_label
from pclr.bench.provider import RunOptions
from pclr.bench.providers import PROVIDERS
from pclr.bench.report import (
    CHARTS_UNAVAILABLE,
    TABLE_COLUMNS,
    WORK_TABLE_COLUMNS,
    format_table,
    write_charts,
    write_csv,
    write_json,
    write_markdown,
)
from pclr.bench.results import status_counts
from pclr.bench.shapes import CPU_LABEL, DTYPES, MODES, PRESETS, WORK_LABEL, Preset
from pclr.writable import unwritable_reason

DESCRIPTION = ("Benchmark the LRP kernels against base Linear, the paper's formulation, dense and PEFT LoRA: every "
               "provider on identical inputs, one row per provider and point.")
EPILOG = """\
examples:
  pclr bench --preset smoke                 CPU, seconds: every code path, measures nothing
  pclr bench                                GPU: the default sweep, a few minutes
  pclr bench --preset gpu-check             GPU: only the target point, decode B=1,8,64
  pclr bench --work --json                  CPU: executed FLOPs/bytes/launches of each path vs its floor
  pclr bench --preset full --modes fwd,decode --providers base,pclr-triton-fused,pclr-cuda,paper

presets:
{presets}

providers:
{providers}

outputs (in --out, default benchmarks/results/<device>/): bench.csv, bench.json (rows + run metadata), bench.md,
<mode>.png. On CPU every row is labelled "{cpu}".
"""


def _csv_list(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def _epilog() -> str:
    width = max(len(n) for n in [*PRESETS, *PROVIDERS]) + 2
    presets = "\n".join(f"  {name:<{width}}{p.summary}" for name, p in PRESETS.items())
    providers = "\n".join(f"  {name:<{width}}{p.summary}" for name, p in PROVIDERS.items())
    return EPILOG.format(presets=presets, providers=providers, cpu=CPU_LABEL)


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``pclr bench`` / ``python -m benchmarks.run`` (also sets the parser's description and examples)."""
    parser.description = DESCRIPTION
    parser.epilog = _epilog()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sweep = parser.add_argument_group("what to run")
    sweep.add_argument("--preset", choices=list(PRESETS), default=None,
                       help="sweep size: smoke (seconds, CPU), gpu-check (the target point), default (minutes, "
                            "GPU), full (the whole grid); default: 'default' on a GPU, 'smoke' on CPU")
    sweep.add_argument("--modes", type=_csv_list, default=None,
                       help=f"comma list of {','.join(MODES)} (default: the preset's modes)")
    sweep.add_argument("--providers", type=_csv_list, default=None,
                       help=f"comma list of {','.join(PROVIDERS)} (default: all)")
    sweep.add_argument("--work", action="store_true",
                       help="count executed work instead of timing: each path runs once through the Triton "
                            "interpreter (CPU) and its tl.dot FLOPs, unmasked load/store bytes and launches are "
                            "compared with the floor of the same call (default preset: work)")
    sweep.add_argument("--dtypes", type=_csv_list, default=None,
                       help="comma list of fp32,bf16,fp16 (default: the preset's on GPU, fp32 on CPU)")
    where = parser.add_argument_group("where and how")
    where.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    where.add_argument("--interpreter", action="store_true",
                       help="CPU: also run the triton backend through TRITON_INTERPRET=1 (slow, a correctness smoke "
                            "only)")
    where.add_argument("--warmup", type=int, default=None, help="GPU: warm-up ms per point; CPU: calls")
    where.add_argument("--rep", type=int, default=None, help="GPU: measured ms per point; CPU: calls")
    out = parser.add_argument_group("output")
    out.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>)")
    out.add_argument("--no-plots", action="store_true", help="skip the PNG charts")
    out.add_argument("--strict", action="store_true", help="exit 1 when any provider errors (skips are fine)")
    out.add_argument("--json", action="store_true", help="also print the rows as JSON on stdout (after the table)")
    return parser


def _fail(msg: str) -> int:
    print(f"pclr bench: {msg}", file=sys.stderr)
    return 2


def _preset(args: argparse.Namespace, device: torch.device) -> Preset:
    """The preset with --warmup / --rep applied (a CPU smoke run keeps its few calls)."""
    preset = PRESETS[args.preset]
    if args.warmup is not None:
        preset = replace(preset, warmup=args.warmup)
    if args.rep is not None:
        preset = replace(preset, rep=args.rep)
    if device.type == "cpu" and args.preset == "smoke" and args.warmup is None:
        preset = replace(preset, warmup=min(preset.warmup, 1), rep=min(preset.rep, 3))
    return preset


def bench_main(args: argparse.Namespace, argv: Optional[Sequence[str]] = None) -> int:
    """Run the sweep of ``args``; print the table; write bench.csv, bench.json, bench.md and <mode>.png.
    Returns an exit code (2: bad arguments; 1 with --strict: a provider errored)."""
    if args.work:
        if args.device == "cuda":
            return _fail("--work counts through the Triton interpreter, which runs on the CPU: drop --device cuda")
        args.device, args.interpreter = "cpu", True
        args.preset = args.preset or "work"
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda but CUDA is not available")
    if args.interpreter and device.type == "cpu":
        # must be set before pclr's triton kernels are first imported (dispatch imports a backend on first use)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    args.preset = args.preset or ("default" if device.type == "cuda" else "smoke")
    preset = _preset(args, device)
    args.modes = list(preset.modes) if args.modes is None else args.modes
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        return _fail(f"unknown modes {bad}; choose from {MODES}")
    no_model = [m for m in args.modes if m in ("train", "serve") and preset.model_config(m) is None]
    if no_model:
        return _fail(f"--modes {','.join(no_model)}: preset {args.preset!r} has no model for them")
    args.providers = list(PROVIDERS) if args.providers is None else args.providers
    bad = [p for p in args.providers if p not in PROVIDERS]
    if bad:
        return _fail(f"unknown providers {bad}; choose from {list(PROVIDERS)}")
    dtypes = args.dtypes or (list(preset.dtypes) if device.type == "cuda" else ["fp32"])
    if any(d not in DTYPES for d in dtypes):
        return _fail(f"--dtypes must be among {list(DTYPES)}, got {dtypes}")
    out_dir = args.out or os.path.join("benchmarks", "results", device_slug(device))
    problem = unwritable_reason(out_dir)
    if problem:
        return _fail(f"--out: {problem}")
    os.makedirs(out_dir, exist_ok=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    meta = collect_meta(device, args.preset, args.modes, args.providers, argv)
    print(f"pclr bench: {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | CUDA {meta['cuda']} | "
          f"preset {args.preset}" + (f" | {CPU_LABEL}" if device.type != "cuda" else ""))

    cfg = SweepConfig(device=device, preset=preset, modes=args.modes, dtypes=dtypes,
                      label=WORK_LABEL if args.work else row_label(device),
                      peaks=meta["peaks"], opts=RunOptions(interpreter=args.interpreter),
                      measure="work" if args.work else "time")
    rows = run_sweep([PROVIDERS[p] for p in args.providers], cfg,
                     progress=lambda msg: print(f"pclr bench: {msg}", file=sys.stderr, flush=True))

    columns = WORK_TABLE_COLUMNS if args.work else TABLE_COLUMNS
    print(format_table(rows, columns))
    write_csv(rows, os.path.join(out_dir, "bench.csv"))
    write_json(rows, meta, os.path.join(out_dir, "bench.json"))
    write_markdown(rows, meta, os.path.join(out_dir, "bench.md"), columns)
    charts = [] if args.no_plots or args.work else write_charts(rows, out_dir, meta["label"])
    if not args.no_plots and CHARTS_UNAVAILABLE:
        print(f"pclr bench: no charts ({CHARTS_UNAVAILABLE})", file=sys.stderr)
    counts = status_counts(rows)
    written = "bench.csv, bench.json, bench.md" + (f", {len(charts)} charts" if charts else "")
    print(f"pclr bench: {counts} rows -> {out_dir} ({written})")
    if device.type != "cuda" and not args.work:
        print(f"pclr bench: every row above is {CPU_LABEL}.")
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, default=str))
    return 1 if args.strict and (counts["error"] or counts["oom"]) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m pclr.bench`` / ``python -m benchmarks.run``."""
    parser = add_bench_arguments(argparse.ArgumentParser(prog="pclr bench"))
    argv = list(sys.argv[1:] if argv is None else argv)
    return bench_main(parser.parse_args(argv), argv)
