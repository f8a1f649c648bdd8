"""The trainer's checkpoint: one safetensors file holding the LRP tensors, the QKLD teacher and the task prototypes,
with the run state (finished phases, accuracy matrix, running KL values) as JSON metadata.

Writes are atomic (temp file + rename): a crash leaves either the previous or the new checkpoint, never a mix.
A readable copy of the run state sits beside it as ``state.json``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from pclr.cil.prototypes import Prototype
from pclr.cil.teacher import LRPSnapshot
from pclr.inject import load_lrp_state_dict, lrp_state_dict

CKPT_NAME = "checkpoint.safetensors"
STATE_KEY = "pclr_state"


def checkpoint_path(output_dir: str) -> str:
    return os.path.join(output_dir, "ckpt", CKPT_NAME)


@dataclass
class RunState:
    """Everything of a run besides the model that a resume needs.

    done: finished (task, phase) pairs. matrix: accuracy [T][T] (NaN = not measured). kl_values: running QKLD KL per
    expert-task id. prototypes: expert-task id -> one prototype (or None) per key pool. teacher: the pool before the
    current task's compression (only between a compression and its integration).
    """

    done: list[tuple[int, str]]
    matrix: list[list[float]]
    kl_values: dict[int, float] = field(default_factory=dict)
    prototypes: dict[int, list[Optional[Prototype]]] = field(default_factory=dict)
    teacher: Optional[LRPSnapshot] = None


def save_checkpoint(path: str, model: nn.Module, state: RunState, n_pools: int, task_names: list[str],
                    config: dict) -> None:
    """Write ``model``'s LRP tensors and ``state`` to ``path`` atomically (plus ``state.json`` beside it)."""
    tensors = {f"lrp.{k}": v.detach().cpu().contiguous() for k, v in lrp_state_dict(model).items()}
    if state.teacher is not None:
        tensors.update({f"teacher.{k}": v.detach().cpu().contiguous() for k, v in state.teacher.state.items()})
    for tid, protos in state.prototypes.items():
        for i, proto in enumerate(protos):
            if proto is not None:
                for p, v in enumerate(proto):
                    tensors[f"proto.{tid}.{i}.{p}"] = v.detach().cpu().float().contiguous()
    meta = {"done": state.done, "matrix": [[None if math.isnan(x) else x for x in r] for r in state.matrix],
            "kl_values": {str(k): v for k, v in state.kl_values.items()},
            "prototype_tasks": sorted(state.prototypes), "n_pools": n_pools, "tasks": list(task_names),
            "config": jsonable(config)}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={STATE_KEY: json.dumps(meta)})
    os.replace(tmp, path)
    info = os.path.join(os.path.dirname(path), "state.json")
    with open(info + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(info + ".tmp", info)


def load_checkpoint(path: str, model: nn.Module, task_names: list[str],
                    device: torch.device | str = "cpu") -> RunState:
    """Load the LRP tensors of ``path`` into ``model`` and return the run state.

    Raises ValueError when the checkpoint was written for another task sequence."""
    with safe_open(path, framework="pt", device="cpu") as f:
        meta = json.loads(f.metadata()[STATE_KEY])
        tensors: dict[str, Tensor] = {k: f.get_tensor(k) for k in f.keys()}
    if meta["tasks"] != list(task_names):
        raise ValueError(f"checkpoint {path} was written for tasks {meta['tasks']}, not this run's tasks")
    lrp = {k[4:]: v for k, v in tensors.items() if k.startswith("lrp.")}
    load_lrp_state_dict(model, {k: v.to(device) for k, v in lrp.items()})
    teacher = {k[8:]: v for k, v in tensors.items() if k.startswith("teacher.")}
    prototypes: dict[int, list[Optional[Prototype]]] = {}
    for tid in meta["prototype_tasks"]:
        protos: list[Optional[Prototype]] = []
        for i in range(meta["n_pools"]):
            parts, p = [], 0
            while f"proto.{tid}.{i}.{p}" in tensors:
                parts.append(tensors[f"proto.{tid}.{i}.{p}"].to(device))
                p += 1
            protos.append(tuple(parts) if parts else None)
        prototypes[int(tid)] = protos
    return RunState(done=[tuple(x) for x in meta["done"]],
                    matrix=[[float("nan") if x is None else x for x in r] for r in meta["matrix"]],
                    kl_values={int(k): v for k, v in meta["kl_values"].items()},
                    prototypes=prototypes, teacher=LRPSnapshot(teacher) if teacher else None)


def jsonable(x: Any) -> Any:
    """``x`` with everything JSON cannot hold replaced by its repr (dicts and sequences walked)."""
    try:
        json.dumps(x)
        return x
    except TypeError:
        if isinstance(x, dict):
            return {k: jsonable(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [jsonable(v) for v in x]
        return repr(x)
