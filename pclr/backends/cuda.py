"""The ``cuda`` backend: the compiled kernels of ``pclr._C`` (csrc/), no JIT at run time.

The extension registers ``torch.ops.pclr.cuda_gate``, ``torch.ops.pclr.cuda_lrp_forward`` and
``torch.ops.pclr.cuda_lrp_backward`` (C++ ops with meta implementations). Here they are wrapped in the same
custom-op autograd as every other backend (:func:`pclr.backends.custom_op.make_lrp_linear_op`), so
``pclr::cuda_lrp_linear`` has the reference's gradient semantics and traces under ``torch.compile``.

The extension is optional: when it is not built, this module still imports and the backend reports why it cannot
run (``pclr info``, :class:`pclr.dispatch.BackendUnavailableError`), never an import error.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pclr.backends.custom_op import call_linear_op, make_lrp_linear_op
from pclr.dispatch import GateInputs, LinearInputs

NAME = "cuda"
BUILD_HINT = ("build it with `PCLR_FORCE_CUDA_BUILD=1 pip install --no-build-isolation -e .` "
              "(needs nvcc and a CUDA-enabled torch)")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_CAPABILITY = (8, 0)  # bf16 tensor-core MMA
GATE_MAX_EXPERTS = 4096  # the gate sorts a sample's n scores in shared memory (kGateMaxExperts in csrc/pclr_ops.h)
_INT32_MAX = 2**31 - 1


@functools.lru_cache(maxsize=1)
def extension_reason() -> Optional[str]:
    """Why ``pclr._C`` cannot be used (None when it is loaded and its ops are registered)."""
    try:
        import pclr._C  # noqa: F401  (loading the library registers torch.ops.pclr.cuda_*)
    except Exception as exc:  # ImportError when not built; OSError / undefined symbols when built for another torch
        return f"the CUDA extension pclr._C is not available ({type(exc).__name__}: {exc}); {BUILD_HINT}"
    for op in ("cuda_gate", "cuda_lrp_forward", "cuda_lrp_backward"):
        if not hasattr(torch.ops.pclr, op):
            return f"pclr._C loaded but does not register torch.ops.pclr.{op}; rebuild it: {BUILD_HINT}"
    return None


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _device_reasons(device: Optional[torch.device]) -> list[str]:
    if device is not None and device.type != "cuda":
        return [f"the inputs are on {device}; the cuda backend runs CUDA tensors only"]
    if torch.version.cuda is None:
        return ["the installed torch has no CUDA support (CPU-only build)"]
    if not torch.cuda.is_available():
        return ["no CUDA device is visible (torch.cuda.is_available() is False)"]
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cap = _capability(device.index if device.index is not None else torch.cuda.current_device())
    if cap < MIN_CAPABILITY:
        return [f"{device} has compute capability {cap[0]}.{cap[1]}; the cuda backend needs >= "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (sm_80+)"]
    return []


def _dtype_reason(name: str, t: Tensor) -> list[str]:
    if t.dtype not in DTYPES:
        return [f"{name} has dtype {str(t.dtype).replace('torch.', '')}; the cuda backend supports float16, "
                "bfloat16 and float32 (use the reference backend for float64)"]
    return []


# ---- lrp_linear ---------------------------------------------------------------------------------------------------
def _opt(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _forward(x, weight, bias, A_m, B_m, idx, val, A_s, B_s, sot, trainable, beta_m, beta_s, padded_len, det):
    # det is moot: every reduction in the cuda kernels is already ordered (no atomics), hence bit-reproducible.
    return torch.ops.pclr.cuda_lrp_forward(x, weight, _opt(bias), A_m, B_m, idx, val, _opt(A_s), _opt(B_s),
                                           sot.contiguous(), float(beta_m), float(beta_s), int(padded_len))


def _backward(grad, x, weight, A_m, B_m, idx, val, A_s, B_s, sot, trainable, beta_m, beta_s, padded_len, det, needs):
    need_x, need_pool, need_val, need_shared = needs
    need_shared = bool(need_shared and A_s is not None)
    dx, dA, dB, dval, dAs, dBs = torch.ops.pclr.cuda_lrp_backward(
        grad, x, weight, A_m, B_m, idx, val, _opt(A_s), _opt(B_s), sot.contiguous(), _opt(trainable),
        float(beta_m), float(beta_s), int(padded_len), bool(need_x), bool(need_pool), bool(need_val), need_shared)
    keep = lambda t, flag: t if flag else None  # noqa: E731
    return (keep(dx, need_x), keep(dA, need_pool), keep(dB, need_pool), keep(dval, need_val),
            keep(dAs, need_shared), keep(dBs, need_shared))


lrp_linear_op = make_lrp_linear_op(NAME, _forward, _backward)


# ---- gate ---------------------------------------------------------------------------------------------------------
def _soft_values(inputs: GateInputs, idx: Tensor) -> Tensor:
    """The chosen scores recomputed with torch ops so that soft gates carry gradients to the query and keys."""
    i = idx.long()
    val = None
    for q, k, w in zip(inputs.query, inputs.keys, inputs.weights):
        qn = F.normalize(q.float(), dim=-1)  # [B, d]
        kn = F.normalize(k.float()[i], dim=-1)  # [B, r, d]: only the chosen keys
        s = w * torch.einsum("brd,bd->br", kn, qn)
        val = s if val is None else val + s
    return val


def gate(inputs: GateInputs) -> tuple[Tensor, Tensor]:
    qs, ks = [], []
    for q, k in zip(inputs.query, inputs.keys):
        dt = torch.promote_types(q.dtype, k.dtype)  # the kernel reads one dtype per part; promotion is exact
        qs.append(q.detach().to(dt).contiguous())
        ks.append(k.detach().to(dt).contiguous())
    cand = None if inputs.candidates is None else inputs.candidates.contiguous()
    idx, val = torch.ops.pclr.cuda_gate(qs, ks, [float(w) for w in inputs.weights], int(inputs.r), cand,
                                        inputs.scope == "batch", inputs.mode == "soft")
    if inputs.mode == "soft" and torch.is_grad_enabled() and any(
            t.requires_grad for t in (*inputs.query, *inputs.keys)):
        val = _soft_values(inputs, idx)
    return idx, val


class CudaBackend:
    name = NAME

    def not_supported_reasons(self, op: str, inputs) -> list[str]:
        why = []
        ext = extension_reason()
        if ext is not None:
            why.append(ext)
        if op == "info" or inputs is None:
            return why + _device_reasons(None)
        why += _device_reasons(inputs.device)
        if op == "lrp_linear":
            i: LinearInputs = inputs
            why += _dtype_reason("x", i.x)
            if i.val.dtype != torch.float32:
                why.append(f"val has dtype {str(i.val.dtype).replace('torch.', '')}; the cuda backend needs float32")
            if i.x.shape[0] > _INT32_MAX or i.A_m.shape[0] > _INT32_MAX:
                why.append("T and n must be < 2^31 for the cuda kernels' int32 indices")
        elif op == "lrp_gate":
            g: GateInputs = inputs
            for p, (q, k) in enumerate(zip(g.query, g.keys)):
                why += _dtype_reason(f"query[{p}]", q) + _dtype_reason(f"keys[{p}]", k)
            n = g.keys[0].shape[0]
            if n > GATE_MAX_EXPERTS:
                why.append(f"the cuda gate supports n <= {GATE_MAX_EXPERTS} experts, got n = {n}")
        else:
            why.append(f"the cuda backend has no op {op!r}")
        return why

    def lrp_linear(self, inputs: LinearInputs) -> Tensor:
        return call_linear_op(lrp_linear_op, inputs)

    def lrp_gate(self, inputs: GateInputs) -> tuple[Tensor, Tensor]:
        return gate(inputs)


BACKEND = CudaBackend()
