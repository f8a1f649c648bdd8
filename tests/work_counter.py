"""Executed-work counting (a test helper): what a call's kernels actually execute, counted through the Triton interpreter.

Under ``TRITON_INTERPRET=1`` every Triton kernel runs as Python over NumPy, one program at a time, through one
builder object. :class:`WorkCounter` wraps that builder's memory and dot operations and the grid executor for the
duration of a ``with`` block, and a torch dispatch mode records the torch ops the call runs between kernels:

* ``flops``: 2·M·N·K of every ``tl.dot`` at its block shape (padded lanes count: the MMA executes them), plus the
  FLOPs torch's flop counter assigns to matmul-class torch ops;
* ``bytes_read`` / ``bytes_written``: elements of every global load / store whose mask is true (masked lanes move
  nothing) times the element size, atomics as a read and a write; torch ops count their tensor inputs as read and
  their outputs as written;
* ``launches``: Triton grid launches plus torch ops that launch a kernel (views and allocations without a fill do
  not).

The counts are exact and repeatable: they depend on the code path and the shapes, not on the machine.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry
from typing_extensions import Self

# Torch ops that launch nothing: metadata-only views and uninitialised allocations.
_NO_LAUNCH = {
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "as_strided", "detach", "alias",
    "squeeze", "unsqueeze", "slice", "select", "split", "split_with_sizes", "unbind", "empty", "empty_like",
    "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "_reshape_alias", "unfold", "diagonal",
    "narrow", "movedim", "view_as", "_to_copy_noop", "sym_size", "sym_stride", "sym_numel", "is_same_size",
    "_local_scalar_dense", "set_", "resolve_conj", "resolve_neg", "_conj", "conj", "contiguous_noop",
}


@dataclasses.dataclass
class Work:
    """Counted work of one region (all integers)."""

    flops: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    launches: int = 0
    by_kernel: Counter = dataclasses.field(default_factory=Counter)

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    def as_dict(self) -> dict[str, Any]:
        return {"flops": self.flops, "bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
                "bytes": self.bytes, "launches": self.launches, "by_kernel": dict(self.by_kernel)}


def _itemsize(handle: Any) -> int:
    return int(np.dtype(handle.data.dtype).itemsize) if hasattr(handle, "data") else 0


class _TorchOps(TorchDispatchMode):
    def __init__(self, counter: WorkCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        opdef = OPDEFS.get(func._name) if func.namespace == "pclr" else None
        if opdef is not None:
            # pclr's own custom ops wrap kernels and torch ops: count what runs inside them, not the wrapper
            with self:
                return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        if self.counter._in_kernel:
            return out  # the interpreter's own host copies around a launch are not the call's work
        name = func.overloadpacket.__name__
        if name in _NO_LAUNCH:
            return out
        work = self.counter.work
        ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        fill_only = name in ("zeros", "zeros_like", "fill", "fill_", "zero_", "full", "full_like", "ones", "ones_like")
        if not fill_only:
            work.bytes_read += sum(t.numel() * t.element_size() for t in ins)
        work.bytes_written += sum(t.numel() * t.element_size() for t in outs)
        if func.overloadpacket in flop_registry:
            shapes = lambda x: x.shape if isinstance(x, torch.Tensor) else x
            fl_args = [shapes(a) for a in args]
            fl_kwargs = {k: shapes(v) for k, v in kwargs.items()}
            work.flops += int(flop_registry[func.overloadpacket](*fl_args, **fl_kwargs, out_val=out))
        work.launches += 1
        work.by_kernel[f"torch.{name}"] += 1
        return out


class WorkCounter:
    """Count the executed work of Triton kernels (interpreter) and torch ops inside ``with WorkCounter() as wc:``."""

    def __init__(self) -> None:
        self.work = Work()
        self._in_kernel = False

    @contextlib.contextmanager
    def _patched(self) -> Iterator[None]:
        from triton.runtime import interpreter as interp

        builder = interp.interpreter_builder
        cls = type(builder)
        work = self.work
        counter = self

        def masked_load(ptrs, mask, other, cache_policy, is_volatile):
            work.bytes_read += int(np.count_nonzero(mask.data)) * _itemsize_of_ptr(ptrs)
            return cls.create_masked_load(builder, ptrs, mask, other, cache_policy, is_volatile)

        def masked_store(ptrs, value, mask, cache_policy):
            work.bytes_written += int(np.count_nonzero(mask.data)) * _itemsize(value)
            return cls.create_masked_store(builder, ptrs, value, mask, cache_policy)

        def dot(a, b, d, input_precision, max_num_imprecise_acc):
            m, k = a.data.shape[-2:]
            n = b.data.shape[-1]
            batch = int(np.prod(a.data.shape[:-2])) if a.data.ndim > 2 else 1
            work.flops += 2 * batch * m * n * k
            return cls.create_dot(builder, a, b, d, input_precision, max_num_imprecise_acc)

        def atomic_rmw(rmwOp, ptr, val, mask, sem, scope):
            live = int(np.count_nonzero(mask.data)) * _itemsize(val)
            work.bytes_read += live
            work.bytes_written += live
            return cls.create_atomic_rmw(builder, rmwOp, ptr, val, mask, sem, scope)

        grid_call = interp.GridExecutor.__call__

        def launch(executor, *args, **kwargs):
            work.launches += 1
            work.by_kernel[getattr(executor.fn, "__name__", "triton")] += 1
            counter._in_kernel = True
            try:
                return grid_call(executor, *args, **kwargs)
            finally:
                counter._in_kernel = False

        patches = {"create_masked_load": masked_load, "create_masked_store": masked_store, "create_dot": dot,
                   "create_atomic_rmw": atomic_rmw}
        for name, fn in patches.items():
            setattr(builder, name, fn)
        interp.GridExecutor.__call__ = launch
        try:
            yield
        finally:
            for name in patches:
                delattr(builder, name)
            interp.GridExecutor.__call__ = grid_call

    def __enter__(self) -> Self:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self._patched())
        self._stack.enter_context(_TorchOps(self))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def _itemsize_of_ptr(ptrs: Any) -> int:
    from triton.runtime.interpreter import _get_np_dtype

    return int(np.dtype(_get_np_dtype(ptrs.get_element_ty())).itemsize)
