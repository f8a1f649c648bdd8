"""Per-forward routing context: carries the per-sample query to every LRP layer without touching HF signatures.

    with pclr.routing((q_text, q_vis)):
        out = model(**batch)           # each KeyPool gates once; its linears reuse the result

The gate result of each key pool is cached in the context, so a decoder layer's 7 linears share one gate, and
``model.generate`` inside the context reuses the prompt's route for every new token.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from torch import Tensor

_local = threading.local()


class RoutingState:
    """The query of the current forward and the gate results computed from it (one per key pool).

    ``query`` may be given lazily as a callable returning the parts: it is resolved (once) when the first key pool
    gates, which lets a hook complete it mid-forward (the vision CLS is known only after the vision tower ran).
    """

    def __init__(self, query: tuple[Tensor, ...] | Callable[[], Sequence[Tensor]]):
        self._query = query
        self.cache: dict[int, tuple[Tensor, Tensor]] = {}

    @property
    def query(self) -> tuple[Tensor, ...]:
        if callable(self._query):
            self._query = tuple(p.detach() for p in _check_parts(self._query()))
        return self._query

    @query.setter
    def query(self, value) -> None:
        self._query = value

    @property
    def batch_size(self) -> int:
        return self.query[0].shape[0]


def _stack() -> list:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def _check_parts(query) -> tuple[Tensor, ...]:
    parts = (query,) if isinstance(query, Tensor) else tuple(query)
    if not parts or not all(isinstance(p, Tensor) and p.dim() == 2 for p in parts):
        raise TypeError("routing(query): query must be a [B, d_q] tensor or a tuple of [B, d_p] tensors")
    if any(p.shape[0] != parts[0].shape[0] for p in parts):
        raise ValueError(f"routing(query): all parts need the same batch size, got {[p.shape[0] for p in parts]}")
    return parts


@contextmanager
def routing(query: Tensor | Sequence[Tensor] | Callable[[], Sequence[Tensor]]) -> Iterator[RoutingState]:
    """Route every key pool used inside the block by ``query``: [B, d_q] or a tuple of parts [B, d_p], or a
    callable returning them, resolved when the first key pool gates."""
    if callable(query) and not isinstance(query, Tensor):
        state = RoutingState(query)
    else:
        state = RoutingState(tuple(p.detach() for p in _check_parts(query)))  # the query comes from frozen features
    _stack().append(state)
    try:
        yield state
    finally:
        _stack().pop()


def current_routing() -> RoutingState | None:
    """The innermost active routing context, or None."""
    stack = _stack()
    return stack[-1] if stack else None


def expand_route(idx: Tensor, val: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """Repeat a per-sample route for an expanded batch (beam search / num_return_sequences: B*k rows)."""
    b = idx.shape[0]
    if batch == b:
        return idx, val
    if b == 0 or batch % b:
        raise ValueError(f"the input batch ({batch}) is not a multiple of the routed batch ({b})")
    k = batch // b
    return idx.repeat_interleave(k, 0), val.repeat_interleave(k, 0)

