"""The one place that decides which backend runs an op.

Every backend module exposes a ``BACKEND`` object following :class:`pclr.backends.base.Backend`. The first backend
in priority order with no reasons wins (the xformers rule). ``backend=`` or the environment variable
``PCLR_BACKEND`` forces one; a forced backend that cannot run raises :class:`BackendUnavailableError` listing its
reasons instead of silently falling back.

Ops: ``"lrp_linear"`` (:class:`LinearInputs`), ``"lrp_gate"`` (:class:`GateInputs`), ``"lrp_gate_linear"``
(:class:`GateLinearInputs`: a backend can run it when it can run both the gate and the linear) and ``"info"``
(no inputs: can the backend run on this machine at all).
"""
from __future__ import annotations

import os
from collections.abc import Callable

from pclr.backends.base import (
    Backend,
    BackendUnavailableError,
    GateInputs,
    GateLinearInputs,
    LinearInputs,
)
from pclr.options import BACKEND_NAMES, DECODE_MAX_TOKENS, BackendName, check_choice

OpInputs = LinearInputs | GateInputs | GateLinearInputs | None


# Lazy loaders: a backend is imported the first time dispatch asks for it, because importing the triton backend
# (triton itself and the kernel decorations) took ~3 s on a 2-core CPU, which `import pclr` should not pay before
# a triton op is dispatched. Plain functions rather than module names, so "go to definition" reaches each backend.
def _load_reference() -> Backend:
    from pclr.backends.reference import BACKEND

    return BACKEND


def _load_triton() -> Backend:
    from pclr.backends.triton import BACKEND

    return BACKEND


def _load_cuda() -> Backend:
    from pclr.backends.cuda import BACKEND

    return BACKEND


LOADERS: dict[str, Callable[[], Backend]] = {"reference": _load_reference, "triton": _load_triton, "cuda": _load_cuda}

# Priority when nothing is forced: fused kernels first, the reference last (it runs everywhere). Triton leads for
# prefill/training, the gate and the one-launch gate + linear; the CUDA kernels lead at decode, where a JIT-free
# single launch matters most (DECODE_MAX_TOKENS, the same bound as the decode paths of both fused backends).
_PRIORITY: tuple[BackendName, ...] = ("triton", "cuda", "reference")
_DECODE_PRIORITY: tuple[BackendName, ...] = ("cuda", "triton", "reference")

_loaded: dict[str, Backend] = {}
_import_errors: dict[str, str] = {}


def get_backend(name: str) -> Backend | None:
    """Import backend ``name`` lazily; ``None`` if it cannot be imported (the reason is kept for :func:`reasons`)."""
    check_choice("backend", name, BACKEND_NAMES)
    if name not in _loaded and name not in _import_errors:
        try:
            _loaded[name] = LOADERS[name]()
        except Exception as exc:  # noqa: BLE001  a broken optional dependency is a reason, never an import error of pclr
            _import_errors[name] = f"cannot import the {name} backend: {type(exc).__name__}: {exc}"
    return _loaded.get(name)


def reasons(name: str, op: str, inputs: OpInputs) -> list[str]:
    """Why backend ``name`` cannot run ``op`` on ``inputs`` (empty list: it can)."""
    be = get_backend(name)
    if be is None:
        return [_import_errors[name]]
    if op == "lrp_gate_linear":  # it runs the pair: one launch, or the gate then the linear
        return list(be.not_supported_reasons("lrp_gate", inputs.gate)) + list(
            be.not_supported_reasons("lrp_linear", inputs.linear))
    return list(be.not_supported_reasons(op, inputs))


def forced_backend() -> str | None:
    """The backend named by ``PCLR_BACKEND`` (None when unset or empty)."""
    env = os.environ.get("PCLR_BACKEND", "").strip().lower()
    if env:
        check_choice("PCLR_BACKEND", env, BACKEND_NAMES)
    return env or None


def select(op: str, inputs: OpInputs, backend: str | None = None) -> Backend:
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


def priority(op: str, inputs: OpInputs) -> tuple[BackendName, ...]:
    """Backends to try, in order, for ``op`` on ``inputs`` when none is forced."""
    if op == "lrp_linear" and inputs.x.shape[0] <= DECODE_MAX_TOKENS:
        return _DECODE_PRIORITY
    return _PRIORITY


def available_backends() -> dict[str, list[str]]:
    """Each backend with the reasons it cannot run on this machine in general (no inputs): empty = usable."""
    return {name: reasons(name, "info", None) for name in BACKEND_NAMES}
