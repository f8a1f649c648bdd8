"""The one place that decides which backend runs an op.

Every backend module exposes a ``BACKEND`` object with

* ``name``                                   "reference" | "triton" | "cuda"
* ``not_supported_reasons(op, inputs)``      list of human-readable reasons it cannot run ``op`` on ``inputs``
  (empty list = supported); ``op`` is ``"lrp_linear"`` or ``"lrp_gate"``
* ``lrp_linear(inputs: LinearInputs)``       -> y [T, d_out] (autograd-aware)
* ``lrp_gate(inputs: GateInputs)``           -> (idx int32 [B, r], val fp32 [B, r])

The first backend in priority order with no reasons wins (the xformers rule). ``backend=`` or the environment
variable ``PCLR_BACKEND`` forces one; a forced backend that cannot run raises :class:`BackendUnavailableError`
listing its reasons instead of silently falling back.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch

BACKEND_NAMES = ("reference", "triton", "cuda")
# Priority when nothing is forced: fused kernels first, the reference last (it runs everywhere). Triton leads for
# prefill/training and the gate; the CUDA kernels lead at decode, where a JIT-free single launch matters most
# (DECODE_MAX_TOKENS, the same bound as the decode paths of both fused backends).
_PRIORITY = ("triton", "cuda", "reference")
_DECODE_PRIORITY = ("cuda", "triton", "reference")
DECODE_MAX_TOKENS = 64
_MODULES = {name: f"pclr.backends.{name}" for name in BACKEND_NAMES}


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the requested op; the message lists why."""


@dataclass
class LinearInputs:
    """Normalised, validated inputs of ``lrp_linear`` (packed layout).

    x [T, d_in]; weight [d_out, d_in]; bias [d_out] | None; A_m [n, d_in]; B_m [n, d_out];
    idx int32 [B, r]; val fp32 [B, r]; A_s [n_s, d_in] | None; B_s [n_s, d_out] | None;
    sample_of_token int32 [T] (values in [0, B)); trainable bool [n] | None;
    padded_len: L when the caller passed x as [B, L, d_in] (tokens already grouped by sample, B*L == T), else None.
    """

    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    A_m: torch.Tensor
    B_m: torch.Tensor
    idx: torch.Tensor
    val: torch.Tensor
    A_s: Optional[torch.Tensor]
    B_s: Optional[torch.Tensor]
    beta_m: float
    beta_s: float
    sample_of_token: torch.Tensor
    trainable: Optional[torch.Tensor]
    padded_len: Optional[int] = None
    deterministic: bool = False

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype


@dataclass
class GateInputs:
    """Normalised inputs of ``lrp_gate``: tuples of parts, query_p [B, d_p], keys_p [n, d_p]."""

    query: tuple[torch.Tensor, ...]
    keys: tuple[torch.Tensor, ...]
    weights: tuple[float, ...]
    r: int
    candidates: Optional[torch.Tensor]  # bool [n] or [B, n]
    scope: str
    mode: str

    @property
    def device(self) -> torch.device:
        return self.keys[0].device


class Backend(Protocol):
    name: str

    def not_supported_reasons(self, op: str, inputs: Any) -> list[str]: ...

    def lrp_linear(self, inputs: LinearInputs) -> torch.Tensor: ...

    def lrp_gate(self, inputs: GateInputs) -> tuple[torch.Tensor, torch.Tensor]: ...


_loaded: dict[str, Any] = {}
_import_errors: dict[str, str] = {}


def get_backend(name: str) -> Optional[Backend]:
    """Import backend ``name`` lazily; ``None`` if its module cannot be imported (reason kept for ``reasons``)."""
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name not in _loaded and name not in _import_errors:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name]).BACKEND
        except Exception as exc:  # a broken optional dependency is a reason, never an import error of pclr
            _import_errors[name] = f"cannot import {_MODULES[name]}: {type(exc).__name__}: {exc}"
    return _loaded.get(name)


def reasons(name: str, op: str, inputs: Any) -> list[str]:
    """Why backend ``name`` cannot run ``op`` on ``inputs`` (empty list: it can)."""
    be = get_backend(name)
    if be is None:
        return [_import_errors[name]]
    return list(be.not_supported_reasons(op, inputs))


def forced_backend() -> Optional[str]:
    """The backend named by ``PCLR_BACKEND`` (None when unset or empty)."""
    env = os.environ.get("PCLR_BACKEND", "").strip().lower()
    if env and env not in BACKEND_NAMES:
        raise ValueError(f"PCLR_BACKEND must be one of {BACKEND_NAMES}, got {env!r}")
    return env or None


def select(op: str, inputs: Any, backend: Optional[str] = None) -> Backend:
    """Pick the backend that runs ``op``: the forced one (argument, then env) or the first supported."""
    name = backend or forced_backend()
    if name is not None:
        why = reasons(name, op, inputs)
        if why:
            raise BackendUnavailableError(
                f"pclr backend {name!r} cannot run {op}: " + "; ".join(why)
                + " (unset PCLR_BACKEND / backend= to let dispatch choose)"
            )
        return get_backend(name)
    for cand in priority(op, inputs):
        # Fused backends are picked automatically only for CUDA tensors: on CPU they could only run through the
        # Triton interpreter (a debugging tool, orders of magnitude slower than the reference).
        if cand != "reference" and inputs.device.type != "cuda":
            continue
        if not reasons(cand, op, inputs):
            return get_backend(cand)
    raise BackendUnavailableError(f"no pclr backend can run {op}")  # unreachable: the reference runs everywhere


def priority(op: str, inputs: Any) -> tuple[str, ...]:
    """Backends to try, in order, for ``op`` on ``inputs`` when none is forced."""
    if op == "lrp_linear" and inputs.x.shape[0] <= DECODE_MAX_TOKENS:
        return _DECODE_PRIORITY
    return _PRIORITY


def available_backends() -> dict[str, list[str]]:
    """Each backend with the reasons it cannot run on this machine in general (no inputs): empty = usable."""
    return {name: reasons(name, "info", None) for name in BACKEND_NAMES}
