"""Executed work (``pclr bench --work``): what a call's kernels actually execute, counted through the Triton
interpreter, against the floor of the same call.

Under ``TRITON_INTERPRET=1`` every Triton kernel runs as Python over NumPy, one program at a time, through one
builder object. :class:`WorkCounter` wraps that builder's memory and dot operations and the grid executor for the
duration of a ``with`` block, and a torch dispatch mode records the torch ops the call runs between kernels:

* ``flops``: 2·M·N·K of every ``tl.dot`` at its block shape (padded lanes count: the MMA executes them), plus the
  FLOPs torch's flop counter assigns to matmul-class torch ops;
* ``bytes_read`` / ``bytes_written``: elements of every global load / store whose mask is true (masked lanes move
  nothing) times the element size, atomics as a read and a write; torch ops count their tensor inputs as read and
  their outputs as written;
* ``unique_bytes``: the same with each address counted once per launch: the compulsory traffic of a cache that
  holds one launch's working set (an x tile re-read by every output tile comes from L2 on a GPU); the decode byte
  floor is compared with this count as well as with the raw one;
* ``launches``: Triton grid launches plus torch ops that launch a kernel (views and allocations without a fill do
  not).

The counts are exact and repeatable: they depend on the code path and the shapes, not on the machine. The floor of
a call (:func:`work_floor`) is what no implementation can go below: the useful FLOPs of
:func:`pclr.bench.problems.ideal_cost`, and for decode the bytes of W once, each pool row the batch uses once, the
shared rows, x and y. Counts are taken at the interpreter's fp32 (it has no bf16 arithmetic), floors likewise.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import Tensor
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pclr.bench.problems import Problem, ideal_cost
from pclr.bench.provider import Built, Provider
from pclr.bench.results import Row, kernel_row
from pclr.bench.shapes import Preset, Shape, layer_dims

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
    unique_bytes_read: int = 0
    unique_bytes_written: int = 0
    by_kernel: Counter = dataclasses.field(default_factory=Counter)

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    @property
    def unique_bytes(self) -> int:
        """Compulsory traffic: each address a launch touches counted once per launch (a cache that holds a launch's
        working set; re-reads of x by every output tile, which come from L2 on a GPU, are not counted again)."""
        return self.unique_bytes_read + self.unique_bytes_written

    def as_dict(self) -> dict[str, Any]:
        return {"flops": self.flops, "bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
                "bytes": self.bytes, "unique_bytes": self.unique_bytes, "launches": self.launches,
                "by_kernel": dict(self.by_kernel)}


class _Touched:
    """The addresses one launch reads or writes, grouped by element size, deduplicated as they accumulate."""

    _COMPACT = 1 << 22  # addresses held before deduplicating (bounds memory on large launches)

    def __init__(self) -> None:
        self.parts: dict[int, list[np.ndarray]] = {}
        self.held = 0

    def add(self, addresses: np.ndarray, itemsize: int) -> None:
        self.parts.setdefault(itemsize, []).append(addresses.ravel())
        self.held += addresses.size
        if self.held > self._COMPACT:
            self.parts = {k: [np.unique(np.concatenate(v))] for k, v in self.parts.items()}
            self.held = sum(v[0].size for v in self.parts.values())

    def bytes(self) -> int:
        return sum(int(np.unique(np.concatenate(v)).size) * k for k, v in self.parts.items() if v)


def _itemsize(handle: Any) -> int:
    return int(np.dtype(handle.data.dtype).itemsize) if hasattr(handle, "data") else 0


def _flop_registry() -> dict:
    # imported on first use, not at module top: torch.utils.flop_counter imports triton, and TRITON_INTERPRET must be
    # set before triton is first imported (the CLI sets it only after parsing --work)
    from torch.utils.flop_counter import flop_registry

    return flop_registry


class _TorchOps(TorchDispatchMode):
    def __init__(self, counter: "WorkCounter") -> None:
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
            read = sum(t.numel() * t.element_size() for t in ins)
            work.bytes_read += read
            work.unique_bytes_read += read
        written = sum(t.numel() * t.element_size() for t in outs)
        work.bytes_written += written
        work.unique_bytes_written += written
        if name == "linear":  # composite on CPU: x [.., K] · W [N, K]ᵀ
            x, w = args[0], args[1]
            work.flops += 2 * (x.numel() // x.shape[-1]) * w.shape[0] * w.shape[1]
        elif name == "matmul":  # composite too (no flop-registry entry): each output element is a K-long dot
            work.flops += 2 * outs[0].numel() * args[0].shape[-1]
        elif func.overloadpacket in _flop_registry():
            shapes = lambda x: x.shape if isinstance(x, torch.Tensor) else x  # noqa: E731
            fl_args = [shapes(a) for a in args]
            fl_kwargs = {k: shapes(v) for k, v in kwargs.items()}
            work.flops += int(_flop_registry()[func.overloadpacket](*fl_args, **fl_kwargs, out_val=out))
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
        # imported here, not at module top: TRITON_INTERPRET must be set before triton is first imported, and the
        # CLI sets it only once it has parsed --work / --interpreter
        from triton.runtime import interpreter as interp

        def ptr_itemsize(ptrs: Any) -> int:
            return int(np.dtype(interp._get_np_dtype(ptrs.get_element_ty())).itemsize)

        builder = interp.interpreter_builder
        cls = type(builder)
        work = self.work
        counter = self

        touched = {"r": _Touched(), "w": _Touched()}

        def masked_load(ptrs, mask, other, cache_policy, is_volatile):
            size = ptr_itemsize(ptrs)
            work.bytes_read += int(np.count_nonzero(mask.data)) * size
            touched["r"].add(np.broadcast_to(ptrs.data, mask.data.shape)[mask.data], size)
            return cls.create_masked_load(builder, ptrs, mask, other, cache_policy, is_volatile)

        def masked_store(ptrs, value, mask, cache_policy):
            size = _itemsize(value)
            work.bytes_written += int(np.count_nonzero(mask.data)) * size
            touched["w"].add(np.broadcast_to(ptrs.data, mask.data.shape)[mask.data], size)
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
            for kind in ("r", "w"):
                touched[kind].add(np.broadcast_to(ptr.data, mask.data.shape)[mask.data], _itemsize(val))
            return cls.create_atomic_rmw(builder, rmwOp, ptr, val, mask, sem, scope)

        grid_call = interp.GridExecutor.__call__

        def launch(executor, *args, **kwargs):
            work.launches += 1
            work.by_kernel[getattr(executor.fn, "__name__", "triton")] += 1
            counter._in_kernel = True
            touched["r"], touched["w"] = _Touched(), _Touched()
            try:
                return grid_call(executor, *args, **kwargs)
            finally:
                counter._in_kernel = False
                work.unique_bytes_read += touched["r"].bytes()
                work.unique_bytes_written += touched["w"].bytes()

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

    def __enter__(self) -> "WorkCounter":
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self._patched())
        self._stack.enter_context(_TorchOps(self))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()




def used_pool_rows(idx: Tensor) -> int:
    """How many distinct pool rows the batch's routes use."""
    return int(torch.unique(idx).numel())


def work_floor(shape: Shape, p: Problem, provider: Provider, itemsize: int) -> tuple[float, float]:
    """(FLOPs, bytes) no implementation of this call can go below, at ``itemsize`` bytes per element.

    FLOPs: the useful work of :func:`pclr.bench.problems.ideal_cost`. Bytes: every operand once (W, x, y, and the pool
    rows this batch uses, each once); the forward and backward also read and write their gradients once.
    """
    flops, _ = ideal_cost(shape, provider.cost)
    rows = 0 if provider.cost == "base" else shape.n_s + (used_pool_rows(p.idx) if provider.cost == "lrp" else shape.r)
    bytes_ = 0.0
    for d_in, d_out in layer_dims(shape):
        once = shape.T * (d_in + d_out) + d_in * d_out + rows * (d_in + d_out)
        bytes_ += itemsize * (once if shape.mode != "fwdbwd" else 2 * once + shape.T * (d_in + d_out))
    return flops, bytes_


def measure_work(shape: Shape, provider: Provider, built: Built, device: torch.device, preset: Preset, label: str,
                 peaks: Optional[dict[str, Any]], problem: Optional[Problem] = None) -> Row:
    """One call of ``built`` under a :class:`WorkCounter`: executed FLOPs, bytes and launches, and their ratios to
    the floor of the same call."""
    for t in built.grads:
        t.grad = None
    with WorkCounter() as wc:
        built.fn()
    w = wc.work
    row = kernel_row(shape, provider, "ok", label)
    floor_f, floor_b = work_floor(shape, problem, provider, torch.finfo(shape.torch_dtype).bits // 8)
    row.update(work_flops=w.flops, work_bytes=w.bytes, work_launches=w.launches, unique_bytes=w.unique_bytes,
               flops_vs_floor=w.flops / floor_f if floor_f else "", bytes_vs_floor=w.bytes / floor_b if floor_b else "",
               unique_vs_floor=w.unique_bytes / floor_b if floor_b else "",
               note=" ".join(f"{k}x{v}" for k, v in sorted(w.by_kernel.items())))
    return row
