"""One factory that turns a backend's forward/backward implementations into ``torch.library`` custom ops.

Every backend registers the same two ops, ``pclr::<name>_lrp_linear`` and ``pclr::<name>_lrp_linear_backward``,
with fake (meta) implementations and ``register_autograd``. That gives all backends the same autograd semantics
and lets ``torch.compile(fullgraph=True)`` trace a model through any of them without a graph break.

Implementation signatures (all tensors in the packed layout of :class:`pclr.dispatch.LinearInputs`)::

    forward_impl(x, weight, bias, A_m, B_m, idx, val, A_s, B_s, sample_of_token, trainable,
                 beta_m, beta_s, padded_len, deterministic) -> y [T, d_out]
    backward_impl(grad_y, x, weight, A_m, B_m, idx, val, A_s, B_s, sample_of_token, trainable,
                  beta_m, beta_s, padded_len, deterministic, needs) -> (dx, dA_m, dB_m, dval, dA_s, dB_s)

``needs`` = (x, pool, val, shared): which gradients are wanted; an implementation returns ``None`` for the others.
``padded_len`` is L when tokens are laid out as [B, L] (grouped by sample), 0 for arbitrary packed order.
dA_m / dB_m must be exactly zero on rows where ``trainable`` is False.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

_EMPTY_SHAPE = (0,)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    # custom ops cannot return None: a not-needed gradient travels as an empty tensor.
    return like.new_empty(_EMPTY_SHAPE) if t is None else t


def make_lrp_linear_op(prefix: str, forward_impl: Callable, backward_impl: Callable):
    """Register ``pclr::{prefix}_lrp_linear`` (+ backward op) and return the forward op."""
    fwd_name, bwd_name = f"pclr::{prefix}_lrp_linear", f"pclr::{prefix}_lrp_linear_backward"

    @torch.library.custom_op(fwd_name, mutates_args=())
    def lrp_linear_op(
        x: Tensor, weight: Tensor, bias: Optional[Tensor], A_m: Tensor, B_m: Tensor, idx: Tensor, val: Tensor,
        A_s: Optional[Tensor], B_s: Optional[Tensor], sample_of_token: Tensor, trainable: Optional[Tensor],
        beta_m: float, beta_s: float, padded_len: int, deterministic: bool,
    ) -> Tensor:
        return forward_impl(x, weight, bias, A_m, B_m, idx, val, A_s, B_s, sample_of_token, trainable,
                            beta_m, beta_s, padded_len, deterministic)

    @lrp_linear_op.register_fake
    def _(x, weight, bias, A_m, B_m, idx, val, A_s, B_s, sample_of_token, trainable, beta_m, beta_s,
          padded_len, deterministic):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.custom_op(bwd_name, mutates_args=())
    def lrp_linear_backward_op(
        grad: Tensor, x: Tensor, weight: Tensor, A_m: Tensor, B_m: Tensor, idx: Tensor, val: Tensor,
        A_s: Optional[Tensor], B_s: Optional[Tensor], sample_of_token: Tensor, trainable: Optional[Tensor],
        beta_m: float, beta_s: float, padded_len: int, deterministic: bool,
        need_x: bool, need_pool: bool, need_val: bool, need_shared: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        needs = (need_x, need_pool, need_val, need_shared)
        dx, dA, dB, dval, dAs, dBs = backward_impl(grad, x, weight, A_m, B_m, idx, val, A_s, B_s, sample_of_token,
                                                   trainable, beta_m, beta_s, padded_len, deterministic, needs)
        return (_or_empty(dx, x), _or_empty(dA, A_m), _or_empty(dB, B_m), _or_empty(dval, val),
                _or_empty(dAs, A_m), _or_empty(dBs, B_m))

    @lrp_linear_backward_op.register_fake
    def _(grad, x, weight, A_m, B_m, idx, val, A_s, B_s, sample_of_token, trainable, beta_m, beta_s, padded_len,
          deterministic, need_x, need_pool, need_val, need_shared):
        shared = need_shared and A_s is not None
        return (
            x.new_empty(x.shape if need_x else _EMPTY_SHAPE),
            A_m.new_empty(A_m.shape if need_pool else _EMPTY_SHAPE),
            B_m.new_empty(B_m.shape if need_pool else _EMPTY_SHAPE),
            val.new_empty(val.shape if need_val else _EMPTY_SHAPE),
            A_m.new_empty(A_s.shape if shared else _EMPTY_SHAPE),
            B_m.new_empty(B_s.shape if shared else _EMPTY_SHAPE),
        )

    def setup_context(ctx, inputs, output):
        (x, weight, bias, A_m, B_m, idx, val, A_s, B_s, sot, trainable, beta_m, beta_s, padded_len, det) = inputs
        ctx.save_for_backward(x, weight, A_m, B_m, idx, val, A_s, B_s, sot, trainable)
        ctx.scalars = (beta_m, beta_s, padded_len, det)

    def backward(ctx, grad):
        x, weight, A_m, B_m, idx, val, A_s, B_s, sot, trainable = ctx.saved_tensors
        ng = ctx.needs_input_grad
        need_x, need_pool, need_val = ng[0], ng[3] or ng[4], ng[6]
        need_shared = A_s is not None and (ng[7] or ng[8])
        dx, dA, dB, dval, dAs, dBs = lrp_linear_backward_op(
            grad.contiguous(), x, weight, A_m, B_m, idx, val, A_s, B_s, sot, trainable, *ctx.scalars,
            need_x, need_pool, need_val, need_shared)
        return (dx if need_x else None, None, None, dA if ng[3] else None, dB if ng[4] else None, None,
                dval if need_val else None, dAs if need_shared and ng[7] else None,
                dBs if need_shared and ng[8] else None, None, None, None, None, None, None)

    lrp_linear_op.register_autograd(backward, setup_context=setup_context)
    return lrp_linear_op


def call_linear_op(op, inputs) -> Tensor:
    """Call a registered op with a :class:`pclr.dispatch.LinearInputs`."""
    i = inputs
    return op(i.x, i.weight, i.bias, i.A_m, i.B_m, i.idx, i.val, i.A_s, i.B_s, i.sample_of_token, i.trainable,
              float(i.beta_m), float(i.beta_s), int(i.padded_len or 0), bool(i.deterministic))
