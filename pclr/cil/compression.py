"""Training-free compression of key pools (step 1 of a task): choose which experts survive, then prune them.

Rules are registered by name; each maps (pool, n_keep) to a bool keep-mask [n] with exactly ``n_keep`` True,
applied to every linear of the pool at once (keys and A/B rows stay aligned)::

    @register_compressor("mine")
    def keep_mine(pool: KeyPool, n_keep: int) -> Tensor: ...
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from pclr.modules import KeyPool

Compressor = Callable[[KeyPool, int], Tensor]
COMPRESSORS: dict[str, Compressor] = {}


def register_compressor(name: str) -> Callable[[Compressor], Compressor]:
    def deco(fn: Compressor) -> Compressor:
        COMPRESSORS[name] = fn
        return fn
    return deco


def _every_k(keep: float) -> int | None:
    """k when keep == 1 - 1/k for an integer k >= 2 (the reference's "drop every k-th"), else None."""
    if keep >= 1.0:
        return None
    k = 1.0 / (1.0 - keep)
    return int(round(k)) if abs(k - round(k)) < 1e-6 and round(k) >= 2 else None


def kept_count(n: int, keep: float) -> int:
    """Experts left after compressing ``n`` with keep fraction ``keep`` (the same count for every rule).

    keep = 1 - 1/k drops the experts at indices 0, k, 2k, ... (ceil(n/k) of them); other fractions keep
    round(n·keep)."""
    if keep >= 1.0 or n == 0:
        return n
    k = _every_k(keep)
    return n - math.ceil(n / k) if k else int(round(n * keep))


def _mask_from_keep_idx(n: int, idx: Tensor, device) -> Tensor:
    m = torch.zeros(n, dtype=torch.bool, device=device)
    m[idx] = True
    return m


@register_compressor("index")
def keep_by_index(pool: KeyPool, n_keep: int) -> Tensor:
    """Reference rule: drop every k-th expert by index; for other counts drop evenly spaced indices."""
    n, dev = pool.n, pool.trainable.device
    n_drop = n - n_keep
    if n_drop <= 0:
        return torch.ones(n, dtype=torch.bool, device=dev)
    # the smallest k with ceil(n / k) == n_drop reproduces "drop indices 0, k, 2k, ..." for keep = 1 - 1/k
    k = next((k for k in range(2, n + 1) if math.ceil(n / k) == n_drop), None)
    if k is not None:
        drop = torch.arange(0, n, k, device=dev)
    else:  # n_drop > n / 2: evenly spaced indices
        drop = torch.linspace(0, n - 1, n_drop, device=dev).round().long()
    mask = torch.ones(n, dtype=torch.bool, device=dev)
    mask[drop] = False
    return mask


@torch.no_grad()
def expert_importance(pool: KeyPool) -> Tensor:
    """importance[j] = Σ over the pool's linears of ‖A_m[j]‖·‖B_m[j]‖ / mean_j(‖A_m[j]‖·‖B_m[j]‖), fp32 [n]
    (each linear is normalised by its mean so wide layers do not dominate)."""
    score = torch.zeros(pool.n, device=pool.trainable.device)
    for layer in pool.layers:
        s = layer.A_m.float().norm(dim=1) * layer.B_m.float().norm(dim=1)
        score += s / s.mean().clamp_min(1e-12)
    return score


@register_compressor("importance")
def keep_by_importance(pool: KeyPool, n_keep: int) -> Tensor:
    """Keep the ``n_keep`` experts with the largest ‖a_j‖·‖b_j‖ (summed over the layer's linears)."""
    score = expert_importance(pool)
    idx = torch.sort(score, descending=True, stable=True).indices[:n_keep]
    return _mask_from_keep_idx(pool.n, idx, score.device)


@register_compressor("redundancy")
@torch.no_grad()
def keep_by_redundancy(pool: KeyPool, n_keep: int) -> Tensor:
    """Greedily drop the expert most explained by another one.

    Similarity of rank-1 updates a_i b_iᵀ and a_j b_jᵀ is |cos(a_i, a_j)|·|cos(b_i, b_j)| (their normalised
    Frobenius inner product), averaged over the pool's linears; an expert whose B row is zero (never trained) counts
    as fully redundant. Each round removes the expert with the highest similarity to any surviving one (ties: the
    less important), until ``n_keep`` remain.
    """
    n, dev = pool.n, pool.trainable.device
    if n_keep >= n:
        return torch.ones(n, dtype=torch.bool, device=dev)
    sim = torch.zeros(n, n, device=dev)
    for layer in pool.layers:
        a, b = layer.A_m.float(), layer.B_m.float()
        sa = (F.normalize(a, dim=1) @ F.normalize(a, dim=1).T).abs()
        sb = (F.normalize(b, dim=1) @ F.normalize(b, dim=1).T).abs()
        dead = b.norm(dim=1) == 0
        sb[dead, :] = 1.0
        sb[:, dead] = 1.0
        sim += sa * sb
    sim /= max(1, len(pool.layers))
    sim.fill_diagonal_(-1.0)
    imp = expert_importance(pool)
    alive = torch.ones(n, dtype=torch.bool, device=dev)
    for _ in range(n - n_keep):
        s = sim.masked_fill(~alive.unsqueeze(0), -1.0).max(1).values
        s = s.masked_fill(~alive, float("-inf"))
        best = s.max()
        cand = (s >= best - 1e-6) & alive
        victim = torch.where(cand, imp, torch.full_like(imp, float("inf"))).argmin()
        alive[victim] = False
    return alive


@torch.no_grad()
def compress_pool(pool: KeyPool, n_keep: int, rule: str = "index") -> Tensor:
    """Prune ``pool`` (and all its linears) to ``n_keep`` experts chosen by ``rule``; returns the keep mask [n]."""
    if rule not in COMPRESSORS:
        raise ValueError(f"unknown compression rule {rule!r}; known: {sorted(COMPRESSORS)}")
    if not 0 <= n_keep <= pool.n:
        raise ValueError(f"n_keep ({n_keep}) must lie in [0, n={pool.n}]")
    mask = COMPRESSORS[rule](pool, n_keep)
    if int(mask.sum()) != n_keep:
        raise RuntimeError(f"compression rule {rule!r} kept {int(mask.sum())} experts, asked for {n_keep}")
    pool.prune(mask)
    return mask
