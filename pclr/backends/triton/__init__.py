"""The ``triton`` backend: the fused gate, the fused gathered LRP forward/backward and the one-launch gate + linear
(kernels in :mod:`pclr.kernels`).

One concern per module: ``configs`` (tile sizes, autotuning), ``segments`` (tokens grouped by sample), ``linear``
(``lrp_linear``: picks the forward path, launchers of the fused / split / epilogue paths and their backward),
``prefill`` (the extended path: S once, one K-extended GEMM, the backward from the saved S), ``decode`` (at most
DECODE_MAX_TOKENS tokens: each used pool row read once for the batch), ``gate`` (``lrp_gate``), ``one_pass``
(``lrp_gate_linear`` in one launch), ``phases`` (the counters and grid of a launch whose programs wait for the
launch's own producer programs: decode, one-pass). This module holds the backend object dispatch uses. An absent
or broken triton makes the backend report why it cannot run; it never makes ``import pclr`` fail.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pclr.backends.base import (
    GateInputs,
    GateLinearInputs,
    LinearGrads,
    LinearInputs,
    LinearNeeds,
)
from pclr.backends.custom_op import (
    GateLinearOp,
    make_gate_linear_op,
    make_gate_op,
    make_lrp_linear_op,
)
from pclr.options import BackendName

try:
    from pclr.backends.triton import configs, gate, linear, one_pass

    IMPORT_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001  an absent or broken triton is a reason, never an import error of pclr
    configs = gate = linear = one_pass = None  # type: ignore[assignment]
    IMPORT_ERROR = f"triton is not importable: {type(exc).__name__}: {exc}"


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # + float64 under the CPU interpreter


def interpreting() -> bool:
    """Whether the kernels run through the Triton CPU interpreter (fixed when they were decorated, at import)."""
    return configs is not None and configs.INTERPRET


def device_reasons(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return []
    if device.type == "cpu":
        if interpreting():
            return []
        return ["triton needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"]
    return [f"triton cannot run on {device.type} tensors"]


def dtype_reasons(name: str, dtype: torch.dtype, device: torch.device) -> list[str]:
    if dtype == torch.float64 and device.type == "cpu":
        return []  # numpy runs the interpreter's fp64 (accumulation in fp64 too); GPU kernels do not take fp64
    if dtype not in SUPPORTED_DTYPES:
        return [f"{name} has dtype {str(dtype).replace('torch.', '')}; triton supports float16, bfloat16, float32"]
    if device.type == "cpu" and dtype != torch.float32:
        return [f"{name} is {str(dtype).replace('torch.', '')}: the Triton CPU interpreter computes only float32"]
    return []


class TritonBackend:
    """The fused-kernel backend (see the module docstring)."""

    name: BackendName = "triton"

    def __init__(self) -> None:
        # the ops are registered even without triton, so op names and fake impls exist everywhere; they never run
        # then, because the backend reports IMPORT_ERROR as its reason
        self.op = make_lrp_linear_op(self.name, self)
        self._gate_op = make_gate_op(self.name, self._launch_gate)
        self._gate_linear_op: GateLinearOp = make_gate_linear_op(self.name, self._launch_one_pass, self.op)

    def not_supported_reasons(self, op: str, inputs: object) -> list[str]:
        if IMPORT_ERROR is not None:
            return [IMPORT_ERROR]
        if op == "info":
            if not torch.cuda.is_available() and not interpreting():
                return ["triton needs a CUDA GPU (or TRITON_INTERPRET=1 for the CPU interpreter)"]
            return []
        if op == "lrp_gate":
            g: GateInputs = inputs  # type: ignore[assignment]
            why = device_reasons(g.device)
            for p, (q, k) in enumerate(zip(g.query, g.keys)):
                why += dtype_reasons(f"query[{p}]", q.dtype, q.device) + dtype_reasons(f"keys[{p}]", k.dtype, k.device)
            n = g.keys[0].shape[0]
            if n > configs.MAX_GATE_N:
                why.append(f"n = {n} experts exceeds the triton gate's limit of {configs.MAX_GATE_N}")
            return why
        if op == "lrp_linear":
            i: LinearInputs = inputs  # type: ignore[assignment]
            why = device_reasons(i.device) + dtype_reasons("x", i.x.dtype, i.device)
            R = i.n_s + i.idx.shape[1]
            if configs.block_r(R) > configs.MAX_BLOCK_R:
                why.append(f"n_s + r = {R} active ranks exceed the triton kernels' limit of {configs.MAX_BLOCK_R}")
            return why
        return [f"unknown op {op!r}"]

    # -- lrp_linear: the kernels behind the registered op --------------------------------------------------------
    def forward(self, inputs: LinearInputs) -> tuple[Tensor, list[Tensor]]:
        return linear.linear_forward(inputs)

    def saved_like(self, inputs: LinearInputs) -> list[Tensor]:
        return linear.linear_saved_like(inputs)

    def backward(self, grad_y: Tensor, inputs: LinearInputs, saved: list[Tensor], needs: LinearNeeds) -> LinearGrads:
        return linear.linear_backward(grad_y, inputs, saved, needs)

    # -- the ops dispatch calls -----------------------------------------------------------------------------------
    def lrp_linear(self, inputs: LinearInputs) -> Tensor:
        return self.op(inputs)

    def lrp_gate(self, inputs: GateInputs) -> tuple[Tensor, Tensor]:
        return self._gate_op(inputs)

    def lrp_gate_linear(self, inputs: GateLinearInputs) -> tuple[Tensor, Tensor, Tensor] | None:
        if one_pass.one_pass_reasons(inputs):
            return None  # lrp_gate, then lrp_linear, both on this backend
        return self._gate_linear_op(inputs)

    @staticmethod
    def _launch_gate(inputs: GateInputs) -> tuple[Tensor, Tensor]:
        return gate.launch_gate(inputs)

    @staticmethod
    def _launch_one_pass(inputs: GateLinearInputs) -> tuple[Tensor, Tensor, Tensor]:
        return one_pass.launch_one_pass(inputs)


BACKEND = TritonBackend()
