"""The trainer's checkpoint: one safetensors file holding the LRP tensors, the QKLD teacher and the task prototypes,
with the run state (finished phases, accuracy matrix, running KL values, the run's fingerprint and its records) as
JSON metadata.

Writes are atomic (temp file + rename): a crash leaves either the previous or the new checkpoint, never a mix.
Beside it: ``checkpoint.safetensors.sha256`` (the sha256 of the file, written atomically too) and a readable copy
of the run state, ``state.json``. Loading verifies the checksum first and refuses NaN / Inf in any stored tensor,
so a damaged file is an error naming it, never a silently different model.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from pclr.cil.fingerprint import fingerprint_diff
from pclr.cil.prototypes import Prototype
from pclr.cil.teacher import LRPSnapshot
from pclr.inject import load_lrp_state_dict, lrp_state_dict

CKPT_NAME = "checkpoint.safetensors"
STATE_KEY = "pclr_state"
SHA_SUFFIX = ".sha256"


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: checksum mismatch, unreadable, non-finite tensors, another run's."""


RUN_FILES = ("ckpt", "log.jsonl", "tb", "results.json", "results.md", "accuracy.png")
"""What a trainer run writes in its output_dir (removed by ``overwrite``)."""


def claim_output_dir(output_dir: str, overwrite: bool, is_main: bool = True) -> None:
    """Refuse a non-empty ``output_dir`` (a second run would mix with the first: log.jsonl appended, checkpoint
    replaced), or with ``overwrite`` remove what a run writes there (on the main process)."""
    existing = sorted(os.listdir(output_dir))
    if not existing:
        return
    if not overwrite:
        raise FileExistsError(f"output_dir {output_dir!r} is not empty (holds {', '.join(existing[:5])}"
                              f"{', ...' if len(existing) > 5 else ''}); pass resume=True to continue its run "
                              "or overwrite=True to start over")
    if is_main:
        for name in RUN_FILES:
            p = os.path.join(output_dir, name)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)


def check_fingerprint(stored: dict, current: dict, path: str) -> None:
    """CheckpointError naming the fields in which the run that wrote checkpoint ``path`` differs from this one."""
    diff = fingerprint_diff(stored, current)
    if diff:
        raise CheckpointError(f"checkpoint {path} was written by a different run; it differs in {len(diff)} "
                              "field(s): " + "; ".join(diff[:8]) + ("; ..." if len(diff) > 8 else "")
                              + ". Use another output_dir, or repeat the original settings")


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
    fingerprint: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)


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
            "config": jsonable(config), "fingerprint": jsonable(state.fingerprint),
            "records": jsonable(state.records)}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={STATE_KEY: json.dumps(meta)})
    sha, sha_tmp = path + SHA_SUFFIX, path + SHA_SUFFIX + ".tmp"
    with open(sha_tmp, "w") as f:
        f.write(f"{file_sha256(tmp)}  {os.path.basename(path)}\n")
    # checkpoint first, then its checksum; a crash between the two renames leaves the new checksum in sha_tmp,
    # which verify_checkpoint accepts (and installs) when it matches the file
    os.replace(tmp, path)
    os.replace(sha_tmp, sha)
    info = os.path.join(os.path.dirname(path), "state.json")
    with open(info + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(info + ".tmp", info)


def load_checkpoint(path: str, model: nn.Module, task_names: list[str], device: torch.device | str = "cpu",
                    check: Optional[Callable[[dict], None]] = None) -> RunState:
    """Load the LRP tensors of ``path`` into ``model`` and return the run state. ``check(fingerprint)`` runs
    before anything is loaded (it raises to refuse the checkpoint).

    Raises CheckpointError (a ValueError naming the file) when the checksum does not match, the file cannot be
    read, a stored tensor holds NaN / Inf, or the checkpoint was written for another task sequence."""
    meta, tensors = read_checkpoint(path)
    if meta["tasks"] != list(task_names):
        raise CheckpointError(f"checkpoint {path} was written for tasks {meta['tasks']}, not this run's tasks")
    if check is not None:
        check(dict(meta.get("fingerprint") or {}))
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
                    prototypes=prototypes, teacher=LRPSnapshot(teacher) if teacher else None,
                    fingerprint=dict(meta.get("fingerprint") or {}), records=list(meta.get("records") or []))


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checkpoint(path: str) -> None:
    """Raise CheckpointError naming ``path`` unless its sha256 matches the checksum file beside it."""
    sha, pending = path + SHA_SUFFIX, path + SHA_SUFFIX + ".tmp"
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    actual = file_sha256(path)
    if os.path.isfile(pending) and _stored_sha(pending) == actual:
        os.replace(pending, sha)  # the write was interrupted between its two renames: finish it
    if not os.path.isfile(sha):
        raise CheckpointError(f"checkpoint {path} has no checksum file {os.path.basename(sha)}; it cannot be "
                              "verified")
    if _stored_sha(sha) != actual:
        raise CheckpointError(f"checkpoint {path} is corrupt: its sha256 does not match {os.path.basename(sha)}")


def _stored_sha(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().split()[0]
    except (OSError, IndexError):
        return ""


def read_checkpoint(path: str) -> tuple[dict, dict[str, Tensor]]:
    """(metadata, tensors) of a verified checkpoint; every floating tensor must be finite."""
    verify_checkpoint(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = json.loads(f.metadata()[STATE_KEY])
            tensors: dict[str, Tensor] = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any failure to parse means the file cannot be used
        raise CheckpointError(f"checkpoint {path} is unreadable: {type(e).__name__}: {e}") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"checkpoint {path} holds NaN or Inf in {', '.join(bad[:5])}"
                              + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    return meta, tensors


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
