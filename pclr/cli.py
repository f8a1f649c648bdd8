"""The ``pclr`` command line: ``pclr info | run | eval | bench | tune``.

Subcommands live in their own modules and are imported only when used, so ``pclr --help`` and ``pclr info`` stay
fast and never fail because an optional piece (a GPU, the CUDA extension) is missing.
"""
from __future__ import annotations

import argparse
import importlib
import platform
import sys
from typing import Callable, Optional, Sequence

from pclr.options import BACKEND_NAMES

# subcommand -> (module, add-arguments function, main function, one-line help)
_SUBCOMMANDS: dict[str, tuple[str, str, str, str]] = {
    "run": ("pclr.demo.experiment", "add_run_arguments", "run_main",
            "Run a continual-learning experiment (default: CoIN-mini, LoRA vs LoRA+LwF vs PCLR)."),
    "eval": ("pclr.demo.experiment", "add_eval_arguments", "eval_main",
             "Evaluate a saved run on every task and rewrite its report."),
    "bench": ("pclr.bench.cli", "add_bench_arguments", "bench_main",
              "Benchmark the LRP kernels against base Linear, the paper's formulation, dense and PEFT LoRA."),
    "tune": ("pclr.tune", "add_tune_arguments", "tune_main",
             "Regenerate the pinned launch configs of the prefill / training kernels (GPU, or --compile-only)."),
}


def _version(mod: str) -> str:
    try:
        return importlib.import_module(mod).__version__
    except Exception as exc:  # noqa: BLE001 - report, never crash
        return f"not available ({type(exc).__name__})"


def info_main(args: argparse.Namespace) -> int:
    """Print versions, the device, and each backend with the reasons it cannot run (like python -m xformers.info)."""
    import os

    import torch

    import pclr

    rows = [
        ("pclr", pclr.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("torch CUDA", str(torch.version.cuda)),
        ("triton", _version("triton")),
        ("transformers", _version("transformers")),
        ("accelerate", _version("accelerate")),
        ("peft", _version("peft")),
        ("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"),
        ("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "")),
        ("PCLR_BACKEND", os.environ.get("PCLR_BACKEND", "")),
    ]
    width = max(len(k) for k, _ in rows + [(f"backend.{b}", "") for b in BACKEND_NAMES])
    for k, v in rows:
        print(f"{k:<{width}}: {v}")
    for name, why in pclr.available_backends().items():
        print(f"{'backend.' + name:<{width}}: {'available' if not why else 'unavailable: ' + '; '.join(why)}")
    return 0


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; only the module of ``command`` (if any) is imported to fill in its options."""
    import pclr

    parser = argparse.ArgumentParser(
        prog="pclr",
        description="PCLR: Progressively Compressed LoRA for multimodal continual instruction tuning.",
        epilog="Run `pclr <command> --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"pclr {pclr.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    p = sub.add_parser("info", help="Show versions, the device and which backends can run here.",
                       description="Show versions, the device and which backends can run here.")
    p.set_defaults(func=info_main)
    for name, (mod, add_fn, main_fn, help_text) in _SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name != command:
            continue
        try:
            module = importlib.import_module(mod)
            add, run = getattr(module, add_fn), getattr(module, main_fn)
        except (ImportError, AttributeError) as exc:
            hint = " (the demo's dependencies come with: pip install 'pclr[demo]')" if mod.startswith("pclr.demo") \
                else ""
            msg = f"`pclr {name}` is unavailable in this installation: {exc}{hint}"
            p.set_defaults(func=lambda args, msg=msg: (print(msg, file=sys.stderr), 2)[1])
            continue
        add(p)
        p.set_defaults(func=run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    func: Optional[Callable] = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    return int(func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
