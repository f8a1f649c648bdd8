"""The ``cuda`` backend: the compiled kernels of ``pclr._C`` (csrc/), no JIT at run time.

The extension registers ``torch.ops.pclr.cuda_gate``, ``torch.ops.pclr.cuda_lrp_forward`` and
``torch.ops.pclr.cuda_lrp_backward`` (C++ ops with meta implementations). Here they are wrapped in the same
custom-op autograd as every other backend (:func:`pclr.backends.custom_op.make_lrp_linear_op`), so
``pclr::cuda_lrp_linear`` has the reference's gradient semantics and traces under ``torch.compile``.

The extension is optional: when it is not built, this module still imports and the backend reports why it cannot
run (``pclr info``, :class:`pclr.backends.base.BackendUnavailableError`), never an import error.

Memory: the decode kernel stages rank rows in passes of 1024 (any R, at most 12 KB of shared memory per block), and
the backward holds its per-sample fp32 gradient partials in a workspace bounded by :data:`GRAD_WORKSPACE_CAP_BYTES`
whatever B is; :func:`grad_workspace_plan` is the C++ plan (csrc/pclr_ops.h) in Python.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from pclr.backends.base import (
    GateInputs,
    GateLinearInputs,
    LinearGrads,
    LinearInputs,
    LinearNeeds,
    RecomputingKernels,
)
from pclr.backends.custom_op import make_lrp_linear_op
from pclr.options import BackendName

BUILD_HINT = ("build it with `PCLR_FORCE_CUDA_BUILD=1 pip install --no-build-isolation -e .` "
              "(needs nvcc and a CUDA-enabled torch)")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_CAPABILITY = (8, 0)  # bf16 tensor-core MMA
GATE_MAX_EXPERTS = 4096  # the gate sorts a sample's n scores in shared memory (kGateMaxExperts in csrc/pclr_ops.h)
_INT32_MAX = 2**31 - 1
# The backward's per-sample fp32 partials held at once (kGradWorkspaceCapBytes in csrc/pclr_ops.h, which says why).
GRAD_WORKSPACE_CAP_BYTES = 64 * 2**20
TILE_N = 64  # output columns of a tiled-kernel tile (kTileN): the workspace splits rows at multiples of it


@dataclass(frozen=True)
class GradWorkspacePlan:
    """How the cuda backward walks its per-sample gradient partials (GradWorkspacePlan in csrc/pclr_ops.h)."""

    samples_per_chunk: int  # samples whose partials [R, cols] are held at once
    num_chunks: int  # ceil(B / samples_per_chunk)
    cols_per_chunk: int  # max(d_in, d_out) without a column split, else a multiple of TILE_N
    bytes: int  # workspace bytes: samples_per_chunk * R * cols_per_chunk * 4

    def slices(self, B: int, N: int) -> list[tuple[int, int, int, int]]:
        """(s0, num_samples, c0, cols) of each slice of one side with rows of length N, in launch order: sample
        chunks in increasing order, each over its column slices (the loop of reduce_row_grads in csrc/ops.cpp)."""
        out = []
        for c in range(self.num_chunks):
            s0 = c * self.samples_per_chunk
            ns = min(self.samples_per_chunk, B - s0)
            out += [(s0, ns, c0, min(self.cols_per_chunk, N - c0)) for c0 in range(0, N, self.cols_per_chunk)]
        return out


def grad_workspace_plan(B: int, R: int, d_in: int, d_out: int,
                        cap: int = GRAD_WORKSPACE_CAP_BYTES) -> GradWorkspacePlan:
    """The chunking of the cuda backward for B samples of R active rows (grad_workspace_plan in csrc/pclr_ops.h).

    A pure function of the shapes (never of the data, so the backward stays CUDA-graph capturable):
    ``bytes <= max(cap, R * TILE_N * 4)`` and every sample lands in exactly one chunk, chunks in sample order.
    """
    if cap < 1:
        raise ValueError(f"cap must be >= 1 byte, got {cap}")
    d = max(d_in, d_out)
    if B <= 0 or R <= 0 or d <= 0:
        return GradWorkspacePlan(0, 0, 0, 0)
    col_bytes = R * 4  # one column of one sample's fp32 partial
    samples, cols = 1, d
    if col_bytes * d <= cap:
        samples = min(B, cap // (col_bytes * d))
    else:
        cols = min(d, max(TILE_N, cap // col_bytes // TILE_N * TILE_N))
    return GradWorkspacePlan(samples, -(-B // samples), cols, samples * R * cols * 4)


@functools.lru_cache(maxsize=1)
def extension_reason() -> str | None:
    """Why ``pclr._C`` cannot be used (None when it is loaded and its ops are registered)."""
    try:
        import pclr._C  # noqa: F401  (loading the library registers torch.ops.pclr.cuda_*)
    except Exception as exc:  # noqa: BLE001  ImportError when not built; OSError / undefined symbols when built for another torch
        return f"the CUDA extension pclr._C is not available ({type(exc).__name__}: {exc}); {BUILD_HINT}"
    for op in ("cuda_gate", "cuda_lrp_forward", "cuda_lrp_backward"):
        if not hasattr(torch.ops.pclr, op):
            return f"pclr._C loaded but does not register torch.ops.pclr.{op}; rebuild it: {BUILD_HINT}"
    return None


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _device_reasons(device: torch.device | None) -> list[str]:
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
        return [(f"{device} has compute capability {cap[0]}.{cap[1]}; the cuda backend needs >= "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (sm_80+)")]
    return []


def _dtype_reason(name: str, t: Tensor) -> list[str]:
    if t.dtype not in DTYPES:
        return [(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; the cuda backend supports float16, "
                "bfloat16 and float32 (use the reference backend for float64)")]
    return []


# ---- lrp_linear ---------------------------------------------------------------------------------------------------
def _opt(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def linear_forward(i: LinearInputs) -> Tensor:
    """y [T, d_out] through ``pclr._C``; ``deterministic`` and ``variant`` are moot here: every reduction in the cuda
    kernels is already ordered (no atomics), and there is one forward."""
    return torch.ops.pclr.cuda_lrp_forward(i.x, i.weight, _opt(i.bias), i.A_m, i.B_m, i.idx, i.val, _opt(i.A_s),
                                           _opt(i.B_s), i.sample_of_token.contiguous(), float(i.beta_m),
                                           float(i.beta_s), int(i.padded_len))


def linear_backward(grad: Tensor, i: LinearInputs, needs: LinearNeeds) -> LinearGrads:
    """The gradients named in ``needs`` through ``pclr._C`` (dA_m and dB_m together, dA_s and dB_s together)."""
    need_shared = bool(needs.shared and i.A_s is not None)
    dx, dA, dB, dval, dAs, dBs = torch.ops.pclr.cuda_lrp_backward(
        grad, i.x, i.weight, i.A_m, i.B_m, i.idx, i.val, _opt(i.A_s), _opt(i.B_s), i.sample_of_token.contiguous(),
        _opt(i.trainable), float(i.beta_m), float(i.beta_s), int(i.padded_len), bool(needs.x), bool(needs.pool),
        bool(needs.val), need_shared)

    def keep(t: Tensor, flag: bool) -> Tensor | None:
        return t if flag else None

    return LinearGrads(x=keep(dx, needs.x), A_m=keep(dA, needs.pool), B_m=keep(dB, needs.pool),
                       val=keep(dval, needs.val), A_s=keep(dAs, need_shared), B_s=keep(dBs, need_shared))


# ---- gate ---------------------------------------------------------------------------------------------------------
def gate(inputs: GateInputs) -> tuple[Tensor, Tensor]:
    """idx int32 [B, r], val fp32 [B, r] through ``pclr._C`` (no autograd)."""
    qs, ks = [], []
    for q, k in zip(inputs.query, inputs.keys):
        dt = torch.promote_types(q.dtype, k.dtype)  # the kernel reads one dtype per part; promotion is exact
        qs.append(q.detach().to(dt).contiguous())
        ks.append(k.detach().to(dt).contiguous())
    cand = None if inputs.candidates is None else inputs.candidates.contiguous()
    return torch.ops.pclr.cuda_gate(qs, ks, [float(w) for w in inputs.weights], int(inputs.r), cand,
                                    inputs.scope == "batch", inputs.mode == "soft")


class CudaBackend(RecomputingKernels):
    """The compiled-kernel backend (see the module docstring)."""

    name: BackendName = "cuda"

    def __init__(self) -> None:
        self.op = make_lrp_linear_op(self.name, self)

    def not_supported_reasons(self, op: str, inputs: object) -> list[str]:
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

    linear_forward = staticmethod(linear_forward)
    linear_backward = staticmethod(linear_backward)

    def lrp_linear(self, inputs: LinearInputs) -> Tensor:
        return self.op(inputs)

    def lrp_gate(self, inputs: GateInputs) -> tuple[Tensor, Tensor]:
        return gate(inputs)

    def lrp_gate_linear(self, inputs: GateLinearInputs) -> None:
        return None  # no fused path: lrp_gate, then lrp_linear


BACKEND = CudaBackend()
