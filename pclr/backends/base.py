"""What every backend shares: the op input types, the gradient record, the Backend protocol and its error.

The positional schema of the registered ops is derived from these dataclasses' fields (in
:mod:`pclr.backends.custom_op`), so adding an argument to ``lrp_linear`` is one new field here plus its use in the
backends that read it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol

import torch
from torch import Tensor

from pclr.options import BackendName, ForwardVariant, GateMode, GateScope


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the requested op; the message lists why."""


@dataclass
class LinearInputs:
    """Normalised, validated inputs of ``lrp_linear`` (packed layout).

    x [T, d_in]; weight [d_out, d_in]; bias [d_out] | None; A_m [n, d_in]; B_m [n, d_out];
    idx int32 [B, r]; val fp32 (fp64 kept) [B, r]; A_s [n_s, d_in] | None; B_s [n_s, d_out] | None;
    sample_of_token int32 [T] (values in [0, B)); trainable bool [n] | None;
    padded_len: L when the caller passed x as [B, L, d_in] (tokens already grouped by sample, B*L == T), else 0;
    deterministic: reduce pool gradients without atomics; variant: the triton forward variant (other backends have
    a single forward and ignore it).
    """

    x: Tensor
    weight: Tensor
    bias: Tensor | None
    A_m: Tensor
    B_m: Tensor
    idx: Tensor
    val: Tensor
    A_s: Tensor | None
    B_s: Tensor | None
    beta_m: float
    beta_s: float
    sample_of_token: Tensor
    trainable: Tensor | None
    padded_len: int = 0
    deterministic: bool = False
    variant: ForwardVariant = "auto"

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def n_s(self) -> int:
        """Shared ranks (0 without them)."""
        return 0 if self.A_s is None else self.A_s.shape[0]


LINEAR_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(LinearInputs))
"""The field names of :class:`LinearInputs`, in order (computed once: torch.compile cannot trace ``fields()``)."""


@dataclass
class LinearGrads:
    """Gradients of the differentiable ``lrp_linear`` inputs, by field name (None: not computed).

    Each has the shape and dtype of the :class:`LinearInputs` field of the same name; dA_m / dB_m are exactly zero
    on rows where ``trainable`` is False.
    """

    x: Tensor | None = None
    A_m: Tensor | None = None
    B_m: Tensor | None = None
    val: Tensor | None = None
    A_s: Tensor | None = None
    B_s: Tensor | None = None


GRAD_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(LinearGrads))
"""The differentiable fields of :class:`LinearInputs` (weight and bias are frozen: they never get a gradient)."""


@dataclass(frozen=True)
class LinearNeeds:
    """Which gradients autograd wants, one flag per field of :class:`LinearGrads`."""

    x: bool = False
    A_m: bool = False
    B_m: bool = False
    val: bool = False
    A_s: bool = False
    B_s: bool = False

    @property
    def pool(self) -> bool:
        """dA_m or dB_m: both come from the same per-sample reduction, so backends compute them together."""
        return self.A_m or self.B_m

    @property
    def shared(self) -> bool:
        return self.A_s or self.B_s


@dataclass
class GateInputs:
    """Normalised inputs of ``lrp_gate``: tuples of parts, query_p [B, d_p], keys_p [n, d_p].

    candidates: bool [n] or [B, n] | None; weights: one per part.
    """

    query: tuple[Tensor, ...]
    keys: tuple[Tensor, ...]
    weights: tuple[float, ...]
    r: int
    candidates: Tensor | None
    scope: GateScope
    mode: GateMode

    @property
    def device(self) -> torch.device:
        return self.keys[0].device


ROUTE_FIELDS: tuple[str, ...] = ("idx", "val")
"""The fields of :class:`LinearInputs` that ``lrp_gate_linear`` computes itself (the gate's output)."""


@dataclass
class GateLinearInputs:
    """Inputs of ``lrp_gate_linear``: the gate's and the linear's.

    ``linear.idx`` / ``linear.val`` carry only the shape of the route ([B, r], on the meta device): the gate computes
    them, so no backend reads their values. :meth:`routed` gives the linear inputs with the real route.
    """

    gate: GateInputs
    linear: LinearInputs

    @property
    def device(self) -> torch.device:
        return self.linear.device

    def routed(self, idx: Tensor, val: Tensor) -> LinearInputs:
        """The linear inputs with the route the gate chose: idx int32 [B, r], val [B, r]."""
        values = {name: getattr(self.linear, name) for name in LINEAR_FIELDS}
        values.update(idx=idx, val=val)
        return LinearInputs(**values)


class Backend(Protocol):
    """What dispatch needs of a backend (each backend module exposes one as ``BACKEND``)."""

    name: BackendName

    def not_supported_reasons(self, op: str, inputs: object) -> list[str]:
        """Why ``op`` ("lrp_linear" | "lrp_gate" | "info" with ``inputs`` None) cannot run (empty: it can)."""
        ...

    def lrp_linear(self, inputs: LinearInputs) -> Tensor:
        """y [T, d_out], autograd-aware (through the backend's registered custom op)."""
        ...

    def lrp_gate(self, inputs: GateInputs) -> tuple[Tensor, Tensor]:
        """idx int32 [B, r], val [B, r]; val carries no autograd (functional.lrp_gate attaches it for soft gates)."""
        ...

    def lrp_gate_linear(self, inputs: GateLinearInputs) -> tuple[Tensor, Tensor, Tensor] | None:
        """(y [T, d_out], idx, val) in one launch, or None when the backend has no such path for ``inputs`` (the
        caller then runs ``lrp_gate`` and ``lrp_linear`` on it)."""
        ...


class LinearKernels(Protocol):
    """A backend's implementation of ``lrp_linear``, which :func:`pclr.backends.custom_op.make_lrp_linear_op` turns
    into a registered custom op with autograd."""

    def forward(self, inputs: LinearInputs) -> tuple[Tensor, list[Tensor]]:
        """(y [T, d_out], saved): ``saved`` are tensors of the backend's own that its backward reads (may be [])."""
        ...

    def saved_like(self, inputs: LinearInputs) -> list[Tensor]:
        """Empty tensors shaped like ``forward``'s saved list (the op's fake implementation for tracing)."""
        ...

    def backward(self, grad_y: Tensor, inputs: LinearInputs, saved: list[Tensor], needs: LinearNeeds) -> LinearGrads:
        """The gradients named in ``needs`` (others may be None). ``saved`` is empty when the forward that produced
        ``y`` was not this backend's (e.g. the one-launch gate + linear); the backward then recomputes."""
        ...


class RecomputingKernels:
    """:class:`LinearKernels` for a backend whose backward recomputes what it needs (its forward saves nothing).

    A subclass provides ``linear_forward(inputs) -> y`` and ``linear_backward(grad_y, inputs, needs) -> LinearGrads``.
    """

    def linear_forward(self, inputs: LinearInputs) -> Tensor:
        raise NotImplementedError

    def linear_backward(self, grad_y: Tensor, inputs: LinearInputs, needs: LinearNeeds) -> LinearGrads:
        raise NotImplementedError

    def forward(self, inputs: LinearInputs) -> tuple[Tensor, list[Tensor]]:
        return self.linear_forward(inputs), []

    def saved_like(self, inputs: LinearInputs) -> list[Tensor]:
        return []

    def backward(self, grad_y: Tensor, inputs: LinearInputs, saved: list[Tensor], needs: LinearNeeds) -> LinearGrads:
        return self.linear_backward(grad_y, inputs, needs)
