"""pclr: Progressively Compressed LoRA (PCLR) for multimodal continual instruction tuning.

Public API::

    pclr.lrp_gate(query, keys, r, ...)           -> idx int32 [B, r], val fp32 [B, r]
    pclr.lrp_linear(x, W, b, A_m, B_m, idx, val, ...) -> y
    pclr.FusedLRPLinear, pclr.KeyPool, pclr.routing, pclr.LRPConfig
    pclr.backends()                              -> {name: [reasons it cannot run here]}
"""
from __future__ import annotations

__version__ = "0.1.0"

from pclr.config import LRPConfig
from pclr import backends
from pclr.dispatch import BackendUnavailableError
from pclr.functional import lrp_gate, lrp_linear
from pclr.modules import FusedLRPLinear, KeyPool
from pclr.routing import routing
from pclr.validation import set_validation

__all__ = [
    "__version__", "LRPConfig", "BackendUnavailableError", "backends", "lrp_gate", "lrp_linear",
    "FusedLRPLinear", "KeyPool", "routing", "set_validation",
]
