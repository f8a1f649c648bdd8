"""The pool side of the learning phase: which experts train and may be chosen, how new keys start, and the
query-key loss that pulls the new keys towards the task's queries."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pclr.config import LRPConfig
from pclr.modules import KeyPool
from pclr.scoring import gate_scores


def prepare_lora(pools: Sequence[KeyPool], r: int) -> None:
    """The LoRA baselines: one pool of ``r`` experts per layer (created once), all trainable, all always chosen;
    keys are unused and stay frozen."""
    for pool in pools:
        if pool.n == 0:
            pool.grow(r, task=0)
        pool.unfreeze()
        pool.set_candidates(None, always=torch.arange(pool.n, device=pool.trainable.device))
        for k in pool.keys:
            k.requires_grad_(False)


def route_among_new(pools: Sequence[KeyPool], r: int) -> None:
    """Restrict each pool's gate while learning: the trainable (new) experts are the candidates; when there are
    fewer of them than ``r``, all of them are always chosen and the remaining slots go to the best old ones."""
    for pool in pools:
        new = pool.trainable.clone()
        n_new = int(new.sum())
        if r <= n_new or n_new == pool.n:
            pool.set_candidates(new, None)
        else:
            pool.set_candidates(~new, always=new.nonzero().flatten())


def task_query_keys(mean_query: Sequence[Tensor], n_new: int, generator: torch.Generator) -> list[Tensor]:
    """Keys of ``n_new`` new experts around the task's normalised mean query (one [n_new, d_p] tensor per part); a
    little noise keeps the task's experts distinguishable when r < n_new."""
    return [F.normalize(p[None].cpu() + 0.1 * F.normalize(torch.randn(n_new, p.numel(), generator=generator), dim=-1),
                        dim=-1) for p in mean_query]


@torch.no_grad()
def nearest_experts(pools: Sequence[KeyPool], mean_query: Sequence[Tensor], n_new: int,
                    weights: Sequence[float]) -> Optional[list[Tensor]]:
    """Per pool, the ``n_new`` old experts whose keys score highest against the task's mean query (ties: lower
    index), or None when a pool has fewer than ``n_new`` experts."""
    q = tuple(p.unsqueeze(0) for p in mean_query)
    out = []
    for pool in pools:
        if pool.n < n_new:
            return None
        score = gate_scores(q, tuple(pool.keys), tuple(weights[: len(q)]))[0]
        out.append(torch.sort(score, descending=True, stable=True).indices[:n_new])
    return out


def qk_loss(query: Sequence[Tensor], has_image: Tensor, pools: Sequence[KeyPool], kind: str, lrp: LRPConfig,
            all_sum: Callable[[Tensor], Tensor]) -> Tensor:
    """L_qk averaged over the key pools that have new (trainable) keys.

    'cos': mean over samples b and new keys j of (1 - cos(q_p[b], K_p[j])), summed over parts (the vision part
    only over samples with an image). 'paper': ||1_r - top_r(score)||_1 / r over new keys (weighted parts).
    Sample counts are global (``all_sum``), so N processes compute the loss of one.
    """
    B = query[0].shape[0]
    device = query[0].device
    counts = [all_sum(torch.tensor(float(B), device=device))]
    if len(query) > 1:
        counts.append(all_sum(has_image.sum().to(torch.float32)))
    total, n_pools = query[0].new_zeros(()), 0
    for pool in pools:
        new = pool.trainable
        if not bool(new.any()):
            continue
        n_pools += 1
        if kind == "cos":
            for p, (q, k) in enumerate(zip(query, pool.keys)):
                cos = F.normalize(q.float(), dim=-1) @ F.normalize(k[new].float(), dim=-1).T  # [B, n_new]
                per_sample = (1.0 - cos).mean(1)
                valid = torch.ones_like(per_sample, dtype=torch.bool) if p == 0 else has_image
                total = total + per_sample[valid].sum() / counts[min(p, len(counts) - 1)].clamp_min(1)
        else:
            score = gate_scores(tuple(q.float() for q in query), tuple(k[new].float() for k in pool.keys),
                                lrp.query_weights[: len(query)])
            r = min(lrp.r, int(new.sum()))
            top = score.topk(r, dim=-1).values
            total = total + (1.0 - top).abs().sum(1).div(r).sum() / counts[0].clamp_min(1)
    return total / max(n_pools, 1)


def open_task_experts(pools: Sequence[KeyPool], plan: Any, tid: int, lrp_config: LRPConfig,
                      mean_query: Callable[[], tuple[Tensor, ...]], nearest: bool, key_init: str, seed: int) -> None:
    """Freeze every pool and open task ``tid``'s experts for learning: on a growth event (``plan`` not None) add
    ``plan.n_new`` experts, copied from the experts nearest to the task's mean query when ``nearest``, else with keys
    at the task query when ``key_init == "task_query"``; inside a pclr_lwf group (no plan) reopen the group's
    experts. Then route among the new experts only."""
    for pool in pools:
        pool.freeze()
    if plan is not None:
        copy_from = keys = None
        if nearest:
            copy_from = nearest_experts(pools, mean_query(), plan.n_new, lrp_config.query_weights)
        if key_init == "task_query" and copy_from is None:
            keys = task_query_keys(mean_query(), plan.n_new, torch.Generator().manual_seed(seed))
        for i, pool in enumerate(pools):
            pool.grow(plan.n_new, task=tid, copy_from=None if copy_from is None else copy_from[i], keys=keys)
    else:
        for pool in pools:
            pool.unfreeze(pool.task_of_expert == tid)
    route_among_new(pools, lrp_config.r)


def set_inference_candidates(pools: Sequence[KeyPool], lora: bool) -> None:
    """Inference routing: every expert may be chosen (PCLR), or every rank is always on (the LoRA baselines)."""
    for pool in pools:
        if lora:
            pool.set_candidates(None, always=torch.arange(pool.n, device=pool.trainable.device))
        else:
            pool.set_candidates(None, None)
