"""Task prototypes and routing by them.

A task's prototype, per key pool, is the normalised mean of the keys learned in that task (one vector per query
part). Routing by prototypes has one mechanism: the route of each pool is computed from a prototype instead of the
sample's query and written into the routing context's cache before the forward, so every linear of the pool (and
``generate``'s later tokens) reuse it. Two callers use it:

* QKLD integration routes every sample by ONE task's prototype (:func:`prefill_prototype_routes`);
* ``inference_routing="prototype"`` routes each sample by its NEAREST task prototype, by the pool's own gate score
  (:func:`prefill_nearest_prototype_routes`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pclr.hf_anatomy import POOL_ATTR
from pclr.modules import KeyPool
from pclr.query import QueryExtractor
from pclr.routing import RoutingState
from pclr.scoring import gate_scores

Prototype = tuple[Tensor, ...]  # one L2-normalised [d_p] vector per query part


@torch.no_grad()
def task_prototype(pool: KeyPool, task: int) -> Optional[Prototype]:
    """Normalised mean of the keys created for ``task`` (None if the pool has none)."""
    rows = pool.task_of_expert == task
    if not bool(rows.any()):
        return None
    return tuple(F.normalize(k.detach()[rows].float().mean(0), dim=-1) for k in pool.keys)


@torch.no_grad()
def batch_query(extractor: QueryExtractor, model_in: dict, rest: dict) -> tuple[Tensor, ...]:
    """The query parts of a collated batch ([B, d_p] each) before its forward: the text part from the instruction
    tokens, the vision part from running the vision tower alone (zero rows for samples without an image)."""
    q_text = extractor.text_query(model_in["input_ids"], model_in["attention_mask"], rest["instruction_mask"])
    if len(extractor.query_dims) == 1:
        return (q_text,)
    extractor._features = []
    if "pixel_values" in model_in and extractor.tower is not None:
        extractor.tower(model_in["pixel_values"], output_hidden_states=False)
    has = rest["has_image"].to(q_text.device)
    return q_text, extractor.vision_query(q_text.shape[0], has, q_text.device)


def _route_by(pool: KeyPool, query: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    return pool.gate(tuple(q.to(k.dtype) for q, k in zip(query, pool.keys)))


def prefill_prototype_routes(state: RoutingState, pools: Sequence[KeyPool],
                             prototypes: Sequence[Optional[Prototype]]) -> None:
    """Route every sample of ``state`` by one task's prototype, per pool (``prototypes[i]`` for ``pools[i]``).

    The routes are [1, r] rows, which expand to any batch, including the projector's per-image batch. Pools
    without a prototype (or without experts) keep routing by the query."""
    for pool, proto in zip(pools, prototypes):
        if proto is None or pool.n == 0:
            continue
        state.cache[id(pool)] = _route_by(pool, tuple(p.unsqueeze(0) for p in proto))


@torch.no_grad()
def prefill_nearest_prototype_routes(state: RoutingState, pools: Sequence[KeyPool],
                                     prototypes: dict[int, Sequence[Optional[Prototype]]], query: Sequence[Tensor],
                                     image_rows: Optional[dict[int, Tensor]] = None) -> None:
    """Route each sample by the prototype nearest to its query, per pool.

    Args:
        state: the routing context of the batch (its cache is filled).
        pools: the key pools; ``prototypes[t][i]`` is task t's prototype of ``pools[i]``.
        query: the batch's query parts, [B, d_p] each.
        image_rows: ``{id(pool): rows}`` for pools that see one row per image instead of one per sample (the
            projector's): their route keeps only those sample rows (long [N_img]).

    A pool with no prototype at all routes by the query itself (top-r over its experts).
    """
    tids = sorted(prototypes)
    for i, pool in enumerate(pools):
        if pool.n == 0:
            continue
        protos = [prototypes[t][i] for t in tids]
        valid = [p for p in protos if p is not None]
        if not valid:
            idx, val = _route_by(pool, query)
        else:
            parts = [torch.stack([p[k] for p in valid]).to(query[k].dtype) for k in range(len(query))]
            score = gate_scores(tuple(query), tuple(parts), pool.config.query_weights[: len(query)])  # [B, n_tasks]
            best = score.argmax(1)
            idx, val = _route_by(pool, tuple(p[best] for p in parts))
        rows = None if image_rows is None else image_rows.get(id(pool))
        if rows is not None:
            idx, val = idx[rows].contiguous(), val[rows].contiguous()
        state.cache[id(pool)] = (idx, val)


@contextmanager
def prototype_route(ctx: Any, extractor: Any, pools: Sequence[Any], prototypes: Any, model_in: dict, rest: dict,
                    device: Any) -> Iterator[Any]:
    """The routing context ``ctx`` of a batch with each sample routed, per pool, by its nearest task prototype (the
    projector's pool sees one row per image, not per sample)."""
    query = batch_query(extractor, model_in, rest)
    proj_pool = getattr(extractor.projector, POOL_ATTR, None)
    image_rows = {} if proj_pool is None else {id(proj_pool): rest["has_image"].to(device).nonzero()[:, 0]}
    with ctx as state:
        prefill_nearest_prototype_routes(state, pools, prototypes, query, image_rows)
        yield state
