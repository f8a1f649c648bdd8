"""The one place that turns the named op inputs into ``torch.library`` custom ops with positional schemas.

Each op's argument list is derived from the fields of its input dataclass (:class:`LinearInputs`,
:class:`GateInputs`, :class:`GateLinearInputs`), and gradients are mapped to argument slots by field name, so a new
field reaches every backend without editing a signature. Every op gets a fake (meta) implementation, which lets
``torch.compile(fullgraph=True)`` trace a model through any backend without a graph break.

* :func:`make_lrp_linear_op`  ``pclr::{prefix}_lrp_linear`` (+ ``_backward``) from a :class:`LinearKernels`;
* :func:`make_gate_op`        ``pclr::{prefix}_lrp_gate`` from a launcher (no autograd: val is attached later);
* :func:`make_gate_linear_op` ``pclr::{prefix}_lrp_gate_linear`` from a one-launch kernel, whose backward is the
  backward of the :class:`LinearOp` it is given.
"""
from __future__ import annotations

import types
import typing
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor

from pclr.backends.base import (
    GRAD_FIELDS,
    LINEAR_FIELDS,
    ROUTE_FIELDS,
    GateInputs,
    GateLinearInputs,
    LinearGrads,
    LinearInputs,
    LinearKernels,
    LinearNeeds,
)
from pclr.scoring import chosen_scores

_EMPTY_SHAPE = (0,)


def _schema_type(hint: Any) -> str:
    """The torch schema spelling of a dataclass field's type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Tensor:
        return "Tensor"
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return _schema_type(inner[0]) + "?"
    if origin is tuple and args and args[-1] is Ellipsis:
        return _schema_type(args[0]) + "[]"
    if origin is typing.Literal:
        return "str"
    if hint in (float, int, bool, str):
        return hint.__name__
    raise TypeError(f"no schema type for the op argument type {hint!r}")


def _field_schema(cls: type, skip: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """[(name, schema type)] of ``cls``'s fields in declaration order, ``skip`` left out."""
    hints = typing.get_type_hints(cls)
    return [(f.name, _schema_type(hints[f.name])) for f in fields(cls) if f.name not in skip]


LINEAR_SCHEMA: list[tuple[str, str]] = _field_schema(LinearInputs)
"""The op arguments of ``lrp_linear``: one per :class:`LinearInputs` field, same names, same order."""
assert tuple(name for name, _ in LINEAR_SCHEMA) == LINEAR_FIELDS
GATE_SCHEMA: list[tuple[str, str]] = _field_schema(GateInputs)
GATE_FIELDS: tuple[str, ...] = tuple(name for name, _ in GATE_SCHEMA)
# the one-launch op takes the linear's arguments minus the route it computes, then the gate's
GATE_LINEAR_SCHEMA: list[tuple[str, str]] = _field_schema(LinearInputs, skip=ROUTE_FIELDS) + GATE_SCHEMA
_NEED_SCHEMA: list[tuple[str, str]] = [(f"need_{name}", "bool") for name in GRAD_FIELDS]


def _args(schema: list[tuple[str, str]]) -> str:
    return ", ".join(f"{t} {name}" for name, t in schema)


def _flat(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def linear_args(inputs: LinearInputs) -> list[Any]:
    """The positional op arguments of ``inputs`` (tuples as lists, as the schema wants)."""
    return [_flat(getattr(inputs, name)) for name in LINEAR_FIELDS]


def linear_inputs(args: tuple[Any, ...] | list[Any]) -> LinearInputs:
    """The inverse of :func:`linear_args`."""
    return LinearInputs(**dict(zip(LINEAR_FIELDS, args)))


def gate_args(inputs: GateInputs) -> list[Any]:
    return [_flat(getattr(inputs, name)) for name in GATE_FIELDS]


def gate_inputs(args: tuple[Any, ...] | list[Any]) -> GateInputs:
    values = dict(zip(GATE_FIELDS, args))
    for name in ("query", "keys", "weights"):
        values[name] = tuple(values[name])
    return GateInputs(**values)


def _save(ctx: Any, values: list[Any]) -> None:
    """Save ``values`` (tensors, lists of tensors, scalars, None) on ``ctx``: tensors through save_for_backward, so
    autograd checks them for in-place changes and torch.compile traces them, the rest as they are."""
    tensors: list[Tensor] = []
    layout: list[Any] = []
    for v in values:
        if isinstance(v, Tensor):
            layout.append(("t", len(tensors)))
            tensors.append(v)
        elif isinstance(v, (list, tuple)) and v and all(isinstance(t, Tensor) for t in v):
            layout.append(("l", len(tensors), len(v)))
            tensors.extend(v)
        else:
            layout.append(("v", v))
    ctx.save_for_backward(*tensors)
    ctx.layout = layout


def _load(ctx: Any) -> list[Any]:
    """The values given to :func:`_save`."""
    tensors = ctx.saved_tensors
    out: list[Any] = []
    for entry in ctx.layout:
        if entry[0] == "t":
            out.append(tensors[entry[1]])
        elif entry[0] == "l":
            out.append(list(tensors[entry[1]:entry[1] + entry[2]]))
        else:
            out.append(entry[1])
    return out


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    # custom ops cannot return None: a gradient that was not computed travels as an empty tensor
    return like.new_empty(_EMPTY_SHAPE) if t is None else t


def _grad_like(inputs: LinearInputs, name: str) -> Tensor:
    """The tensor a gradient slot is shaped after (x when the field is None, e.g. absent shared ranks)."""
    t = getattr(inputs, name)
    return inputs.x if t is None else t


class LinearOp:
    """The registered ``lrp_linear`` op of one backend: call it with :class:`LinearInputs` for y (autograd-aware);
    :meth:`backward` runs the registered backward op (for other ops whose backward is this one's)."""

    def __init__(self, prefix: str, kernels: LinearKernels) -> None:
        self.name = f"pclr::{prefix}_lrp_linear"
        self._kernels = kernels
        self._forward_op = torch.library.custom_op(
            self.name, self._forward_impl, mutates_args=(),
            schema=f"({_args(LINEAR_SCHEMA)}) -> (Tensor, Tensor[])")
        self._forward_op.register_fake(self._forward_fake)
        outs = ", ".join("Tensor" for _ in GRAD_FIELDS)
        self._backward_op = torch.library.custom_op(
            f"{self.name}_backward", self._backward_impl, mutates_args=(),
            schema=f"(Tensor grad_y, {_args(LINEAR_SCHEMA)}, Tensor[] saved, {_args(_NEED_SCHEMA)}) -> ({outs})")
        self._backward_op.register_fake(self._backward_fake)
        self._forward_op.register_autograd(self._autograd_backward, setup_context=self._setup_context)

    # -- implementations: positional arguments in, named fields to the backend ----------------------------------
    def _forward_impl(self, *args: Any) -> tuple[Tensor, list[Tensor]]:
        y, saved = self._kernels.forward(linear_inputs(args))
        return y, list(saved)

    def _forward_fake(self, *args: Any) -> tuple[Tensor, list[Tensor]]:
        inputs = linear_inputs(args)
        return inputs.x.new_empty((inputs.x.shape[0], inputs.weight.shape[0])), self._kernels.saved_like(inputs)

    def _split_backward_args(self, args: tuple[Any, ...]) -> tuple[Tensor, LinearInputs, list[Tensor], LinearNeeds]:
        k = len(LINEAR_FIELDS)
        grad_y, rest = args[0], args[1:]
        needs = LinearNeeds(**dict(zip(GRAD_FIELDS, rest[k + 1:])))
        return grad_y, linear_inputs(rest[:k]), list(rest[k]), needs

    def _backward_impl(self, *args: Any) -> tuple[Tensor, ...]:
        grad_y, inputs, saved, needs = self._split_backward_args(args)
        grads = self._kernels.backward(grad_y, inputs, saved, needs)
        return tuple(_or_empty(getattr(grads, name) if getattr(needs, name) else None, _grad_like(inputs, name))
                     for name in GRAD_FIELDS)

    def _backward_fake(self, *args: Any) -> tuple[Tensor, ...]:
        _, inputs, _, needs = self._split_backward_args(args)
        out = []
        for name in GRAD_FIELDS:
            like = _grad_like(inputs, name)
            wanted = getattr(needs, name) and getattr(inputs, name) is not None
            out.append(like.new_empty(like.shape if wanted else _EMPTY_SHAPE))
        return tuple(out)

    # -- autograd ------------------------------------------------------------------------------------------------
    def _setup_context(self, ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, list[Tensor]]) -> None:
        _save(ctx, [*inputs, list(output[1])])
        # the saved tensors are for the backward only: without these two lines autograd would fill a zero gradient
        # for each of them (a memset of [T, R] per call) that the backward never reads
        ctx.mark_non_differentiable(*output[1])
        ctx.set_materialize_grads(False)
        ng = dict(zip(LINEAR_FIELDS, ctx.needs_input_grad))
        ctx.needs = LinearNeeds(**{name: bool(ng[name]) and inputs[LINEAR_FIELDS.index(name)] is not None
                                   for name in GRAD_FIELDS})

    def _autograd_backward(self, ctx: Any, grad_y: Tensor | None, _grad_saved: Any) -> tuple[Tensor | None, ...]:
        if grad_y is None:  # grads are not materialised: no gradient reached y, so none flows to any input
            return tuple(None for _ in LINEAR_FIELDS)
        *values, saved = _load(ctx)
        grads = self.backward(grad_y, linear_inputs(values), saved if isinstance(saved, list) else [], ctx.needs)
        return tuple(getattr(grads, name) if name in GRAD_FIELDS else None for name in LINEAR_FIELDS)

    # -- public --------------------------------------------------------------------------------------------------
    def __call__(self, inputs: LinearInputs) -> Tensor:
        """y [T, d_out] for ``inputs``."""
        y, _ = self._forward_op(*linear_args(inputs))
        return y

    def backward(self, grad_y: Tensor, inputs: LinearInputs, saved: list[Tensor], needs: LinearNeeds) -> LinearGrads:
        """The registered backward op, its slots unpacked by name (None where ``needs`` says not wanted)."""
        outs = self._backward_op(grad_y.contiguous(), *linear_args(inputs), list(saved),
                                 *(getattr(needs, name) for name in GRAD_FIELDS))
        return LinearGrads(**{name: (t if getattr(needs, name) else None) for name, t in zip(GRAD_FIELDS, outs)})


def make_lrp_linear_op(prefix: str, kernels: LinearKernels) -> LinearOp:
    """Register ``pclr::{prefix}_lrp_linear`` and its backward op for ``kernels``; return the handle."""
    return LinearOp(prefix, kernels)


def _gate_fake(inputs: GateInputs) -> tuple[Tensor, Tensor]:
    B = inputs.query[0].shape[0]
    f64 = inputs.mode == "soft" and any(t.dtype == torch.float64 for t in (*inputs.query, *inputs.keys))
    like = inputs.keys[0]
    return (like.new_empty((B, inputs.r), dtype=torch.int32),
            like.new_empty((B, inputs.r), dtype=torch.float64 if f64 else torch.float32))


def make_gate_op(prefix: str, launch: Callable[[GateInputs], tuple[Tensor, Tensor]]) -> Callable[[GateInputs],
                                                                                                tuple[Tensor, Tensor]]:
    """Register ``pclr::{prefix}_lrp_gate`` running ``launch``; return a function of :class:`GateInputs`.

    The op's outputs carry no autograd: hard gates are constants, and soft values get theirs in
    ``functional.lrp_gate``. Inputs are detached before the call.
    """
    op = torch.library.custom_op(f"pclr::{prefix}_lrp_gate", lambda *args: launch(gate_inputs(args)),
                                 mutates_args=(), schema=f"({_args(GATE_SCHEMA)}) -> (Tensor, Tensor)")
    op.register_fake(lambda *args: _gate_fake(gate_inputs(args)))

    def call(inputs: GateInputs) -> tuple[Tensor, Tensor]:
        args = gate_args(inputs)
        for name in ("query", "keys"):
            slot = GATE_FIELDS.index(name)
            args[slot] = [t.detach() for t in args[slot]]
        return op(*args)

    return call


class GateLinearOp:
    """The registered one-launch gate + linear op of one backend; call it with :class:`GateLinearInputs`.

    Its backward is ``linear_op``'s (with the route the forward chose); for soft gates the value gradient then
    reaches query and keys through :func:`pclr.scoring.chosen_scores`.
    """

    _LINEAR_PART = tuple(name for name in LINEAR_FIELDS if name not in ROUTE_FIELDS)

    def __init__(self, prefix: str, launch: Callable[[GateLinearInputs], tuple[Tensor, Tensor, Tensor]],
                 linear_op: LinearOp) -> None:
        self._launch, self._linear_op = launch, linear_op
        self._names = tuple(name for name, _ in GATE_LINEAR_SCHEMA)
        self._op = torch.library.custom_op(
            f"pclr::{prefix}_lrp_gate_linear", lambda *args: self._launch(self._inputs(args)), mutates_args=(),
            schema=f"({_args(GATE_LINEAR_SCHEMA)}) -> (Tensor, Tensor, Tensor)")
        self._op.register_fake(self._fake)
        self._op.register_autograd(self._autograd_backward, setup_context=self._setup_context)

    def _inputs(self, args: tuple[Any, ...]) -> GateLinearInputs:
        values = dict(zip(self._names, args))
        gate = gate_inputs([values[name] for name in GATE_FIELDS])
        B, r = gate.query[0].shape[0], gate.r
        route = {"idx": torch.empty((B, r), dtype=torch.int32, device="meta"),
                 "val": torch.empty((B, r), dtype=torch.float32, device="meta")}
        linear = LinearInputs(**{name: values[name] for name in self._LINEAR_PART}, **route)
        return GateLinearInputs(gate=gate, linear=linear)

    def _fake(self, *args: Any) -> tuple[Tensor, Tensor, Tensor]:
        inputs = self._inputs(args)
        x, B, r = inputs.linear.x, inputs.gate.query[0].shape[0], inputs.gate.r
        return (x.new_empty((x.shape[0], inputs.linear.weight.shape[0])), x.new_empty((B, r), dtype=torch.int32),
                x.new_empty((B, r), dtype=torch.float32))

    def _setup_context(self, ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
        named = self._inputs(inputs)
        _, idx, val = output
        _save(ctx, [*inputs, idx, val])
        ng = dict(zip(self._names, ctx.needs_input_grad))
        ctx.qk_grad = named.gate.mode == "soft" and (ng["query"] or ng["keys"])
        ctx.needs = LinearNeeds(val=ctx.qk_grad, **{name: bool(ng[name]) and getattr(named.linear, name) is not None
                                                    for name in GRAD_FIELDS if name != "val"})

    def _autograd_backward(self, ctx: Any, grad_y: Tensor, _grad_idx: Any, grad_val: Tensor | None) -> tuple:
        *args, idx, val = _load(ctx)
        inputs = self._inputs(tuple(args))
        gate, linear = inputs.gate, inputs.routed(idx, val)
        grads = self._linear_op.backward(grad_y, linear, [], ctx.needs)
        n_parts = len(gate.query)
        dq: list[Tensor | None] = [None] * n_parts  # list inputs take a list of gradients
        dk: list[Tensor | None] = [None] * n_parts
        if ctx.qk_grad:
            total = grads.val if grad_val is None else grads.val + grad_val
            with torch.enable_grad():  # soft gate: route dval through the chosen scores (B·r·d) to query and keys
                qs = [t.detach().requires_grad_(True) for t in gate.query]
                ks = [t.detach().requires_grad_(True) for t in gate.keys]
                v = chosen_scores(qs, ks, gate.weights, idx)
                g = torch.autograd.grad(v, qs + ks, total, allow_unused=True)
            dq, dk = list(g[:n_parts]), list(g[n_parts:])
        by_name = {"query": dq, "keys": dk}
        by_name.update({name: getattr(grads, name) for name in GRAD_FIELDS if name != "val"})
        return tuple(by_name.get(name) for name in self._names)

    def __call__(self, inputs: GateLinearInputs) -> tuple[Tensor, Tensor, Tensor]:
        """(y [T, d_out], idx int32 [B, r], val fp32 [B, r])."""
        linear = [_flat(getattr(inputs.linear, name)) for name in self._LINEAR_PART]
        return self._op(*linear, *gate_args(inputs.gate))


def make_gate_linear_op(prefix: str, launch: Callable[[GateLinearInputs], tuple[Tensor, Tensor, Tensor]],
                        linear_op: LinearOp) -> GateLinearOp:
    """Register ``pclr::{prefix}_lrp_gate_linear`` running ``launch``; its backward is ``linear_op``'s."""
    return GateLinearOp(prefix, launch, linear_op)
