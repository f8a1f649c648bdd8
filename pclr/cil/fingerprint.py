"""The identity of a run: what determines its results (settings, data, model), as short comparable fields.

A checkpoint stores the fingerprint of the run that wrote it; ``CILTrainer.run(resume=True)`` refuses to continue a
run whose fingerprint differs (it would mix two experiments in one accuracy matrix) and names the fields that do.

    fp = run_fingerprint(config, tasks, train_data, test_data, model)   # {"config.lr": 0.0002, "data.color": "…"}
    diff = fingerprint_diff(stored, fp)                                 # ["config.lr: 0.0002 -> 0.001", ...]
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from pclr.cil.config import CILConfig, Task
from pclr.inject import is_lrp_key

# settings that change how a run is shown or logged, never what it computes
_PRESENTATION = ("on_step", "progress", "tensorboard", "log_every")
# leading values of each model tensor hashed beside all names/shapes/dtypes: a different model or checkpoint differs
# there, and hashing every weight of a 100M+ parameter model would add seconds to each start
_MODEL_SAMPLE = 4096


def _flat(prefix: str, x: Any, out: dict[str, Any]) -> None:
    if isinstance(x, dict):
        for k in sorted(x, key=str):
            _flat(f"{prefix}.{k}", x[k], out)
    else:
        out[prefix] = x


def _feed(h: "hashlib._Hash", x: Any) -> None:
    """Hash ``x`` by content: JSON values, tensors / arrays / PIL images by bytes (their repr holds addresses)."""
    if isinstance(x, dict):
        h.update(b"{")
        for k in sorted(x, key=str):
            h.update(json.dumps(str(k)).encode())
            _feed(h, x[k])
        h.update(b"}")
    elif isinstance(x, (list, tuple)):
        h.update(b"[")
        for v in x:
            _feed(h, v)
        h.update(b"]")
    elif isinstance(x, torch.Tensor):
        h.update(f"T{x.dtype}{tuple(x.shape)}".encode())
        h.update(x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(x, np.ndarray):
        h.update(f"A{x.dtype}{x.shape}".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    elif hasattr(x, "tobytes") and hasattr(x, "mode") and hasattr(x, "size"):  # a PIL image
        h.update(f"I{x.mode}{x.size}".encode())
        h.update(x.tobytes())
    else:
        try:
            h.update(json.dumps(x).encode())
        except TypeError:
            h.update(repr(x).encode())


def digest(x: Any) -> str:
    """Short sha256 of ``x``'s content (see :func:`_feed`)."""
    h = hashlib.sha256()
    _feed(h, x)
    return h.hexdigest()[:16]


def model_digest(model: nn.Module) -> str:
    """Digest of the model's class and of its base (non-LRP) tensors: every name / shape / dtype and the leading
    values of each. Names are taken as before injection, so an injected and a bare copy of a model agree."""
    h = hashlib.sha256(type(model).__name__.encode())
    base = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if not is_lrp_key(k)}
    for name, t in sorted(base.items()):
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        flat = t.detach().reshape(-1)[:_MODEL_SAMPLE].cpu().contiguous()
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def run_fingerprint(config: CILConfig, tasks: Sequence[Task], train_data: Sequence[list],
                    test_data: Sequence[list], model_id: str) -> dict[str, Any]:
    """Flat {field: value or digest}: every result-relevant setting of ``config``, the task names, scorers and
    image roots, a digest of each task's train and test samples, and ``model_id`` (:func:`model_digest`)."""
    out: dict[str, Any] = {}
    settings = {k: v for k, v in config.to_dict().items() if k not in _PRESENTATION}
    _flat("config", json.loads(json.dumps(settings, default=repr)), out)
    out["tasks"] = [t.name for t in tasks]
    for t, tr, te in zip(tasks, train_data, test_data):
        out[f"data.{t.name}"] = digest({"train": tr, "test": te, "image_root": t.image_root,
                                        "scorer": t.scorer if isinstance(t.scorer, str) else
                                        getattr(t.scorer, "__qualname__", repr(t.scorer))})
    out["model"] = model_id
    return out


def fingerprint_diff(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``["field: stored -> current", ...]`` for every field that differs (sorted; missing = <absent>)."""
    absent = "<absent>"
    return [f"{k}: {stored.get(k, absent)!r} -> {current.get(k, absent)!r}"
            for k in sorted(set(stored) | set(current)) if stored.get(k, absent) != current.get(k, absent)]
