"""Run metadata: the device and its datasheet peaks, versions, git commit, the command line and time, so a result
file can be reproduced and judged on its own."""
from __future__ import annotations

import datetime as _dt
import importlib
import os
import platform
import re
import subprocess
import sys
from typing import Any, Optional, Sequence

import torch

import pclr
from pclr import available_backends
from pclr.bench.shapes import CPU_LABEL

# Dense (no sparsity) vendor datasheet peaks: TFLOP/s per dtype and HBM GB/s. Matched by substring of the device
# name, most specific first. fp32 is the non-tensor-core rate (torch keeps TF32 off for matmul by default).
DEVICE_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9, "gbps": 4800.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0, "gbps": 3900.0}),
    ("H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "fp32": 51.2, "gbps": 2000.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9, "gbps": 3350.0}),
    ("A100 80GB PCIe", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5, "gbps": 1935.0}),
    ("A100-SXM4-80GB", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5, "gbps": 2039.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5, "gbps": 1555.0}),
)
ENV_RECORDED: tuple[str, ...] = ("PCLR_BACKEND", "PCLR_TRITON_FWD", "TRITON_INTERPRET")
# How each entry point shows up in sys.argv[0], for the command line recorded in bench.json.
_PROGRAMS: dict[str, str] = {"run.py": "python -m benchmarks.run", "__main__.py": "python -m pclr.bench"}


def device_peaks(name: str) -> Optional[dict[str, Any]]:
    """Datasheet peaks for a device name (``torch.cuda.get_device_name``), or None when unknown (and on CPU)."""
    for key, peaks in DEVICE_PEAKS:
        if key.lower() in name.lower():
            return dict(peaks, matched=key)
    return None


def device_name(device: torch.device) -> str:
    """The GPU's name, or ``CPU (<processor>, <cores> cores)``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    """Folder name for results: e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu``."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def row_label(device: torch.device) -> str:
    """The ``label`` column: the CPU label on every CPU row, empty on GPU rows (the device is in the metadata)."""
    return CPU_LABEL if device.type != "cuda" else ""


def _version(module: str) -> Optional[str]:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # absent or broken: recorded as None, never a failed run
        return None


def git_commit() -> Optional[str]:
    """The commit of the checkout pclr runs from (None when it is not a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def program() -> str:
    """How this run was started, for the record: ``pclr``, ``python -m benchmarks.run`` or ``python -m pclr.bench``."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return _PROGRAMS.get(prog, prog or "pclr bench")


def collect_meta(device: torch.device, preset: str, modes: Sequence[str], providers: Sequence[str],
                 argv: Sequence[str]) -> dict[str, Any]:
    """Everything needed to reproduce and judge a run: device, versions, command line, time, each backend's reasons."""
    name = device_name(device)
    return {
        "device": name,
        "device_type": device.type,
        "label": CPU_LABEL if device.type != "cuda" else f"GPU: {name}",
        "peaks": device_peaks(name) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "pclr": pclr.__version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "command": " ".join([program(), *argv]),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "preset": preset,
        "modes": list(modes),
        "providers": list(providers),
        "backends": available_backends(),
        "env": {k: os.environ[k] for k in ENV_RECORDED if k in os.environ},
    }
