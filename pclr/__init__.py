"""pclr: Progressively Compressed LoRA (PCLR) for multimodal continual instruction tuning.

Public API::

    pclr.lrp_gate(query, keys, r, ...)                 -> idx int32 [B, r], val fp32 [B, r]
    pclr.lrp_linear(x, W, b, A_m, B_m, idx, val, ...)  -> y
    pclr.lrp_gate_linear(x, W, b, A_m, B_m, query, keys, r, ...) -> (y, idx, val)   (gate and linear together)
    pclr.FusedLRPLinear, pclr.KeyPool, pclr.routing, pclr.LRPConfig
    pclr.inject_lrp(model, config), pclr.QueryExtractor(model)      (model integration)
    pclr.CILTrainer, pclr.CILConfig, pclr.Task, pclr.TaskPlan       (the continual-learning trainer)
    pclr.available_backends()                          -> {name: [reasons it cannot run here]}
    pclr.set_forward_variant(v)                        the triton forward variant lrp_linear uses by default

Model integration and the trainer are imported on first use (they pull in transformers and accelerate), so
``import pclr`` stays light for users of the layer and the kernels only. The PEFT route is ``pclr.peft``.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

from pclr.backends.base import BackendUnavailableError
from pclr.config import LRPConfig
from pclr.dispatch import available_backends
from pclr.functional import lrp_gate, lrp_gate_linear, lrp_linear, set_forward_variant
from pclr.modules import FusedLRPLinear, KeyPool
from pclr.routing import routing
from pclr.validation import set_validation

_LAZY = {
    "inject_lrp": "pclr.inject", "lrp_pools": "pclr.inject", "lrp_layers": "pclr.inject",
    "QueryExtractor": "pclr.query",
    "CILTrainer": "pclr.cil", "CILConfig": "pclr.cil", "CILResults": "pclr.cil", "Task": "pclr.cil",
    "TaskPlan": "pclr.cil",
}

# the lazily imported names are strings too (the keys of _LAZY), which the linter cannot see through the star
__all__ = [  # noqa: PLE0604
    "__version__", "LRPConfig", "BackendUnavailableError", "available_backends", "lrp_gate", "lrp_linear",
    "lrp_gate_linear", "set_forward_variant",
    "FusedLRPLinear", "KeyPool", "routing", "set_validation", *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # cache: later lookups skip this hook
        return value
    raise AttributeError(f"module 'pclr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
