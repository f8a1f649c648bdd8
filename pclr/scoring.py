"""The gate's scoring maths, defined once: weighted multi-part cosine similarity between queries and keys.

Every backend's gate ranks experts by exactly this score (the kernels compute it fused); the torch definitions here
are what the reference gate ranks by, what soft gates differentiate through, and what the trainer and the modules
use when they need scores themselves.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def score_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 when any input is fp64, else fp32: scores are never computed in half precision."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def gate_scores(query: Sequence[Tensor], keys: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """score [B, n] = Σ_p w_p · cos(query_p[b], keys_p[j]); an all-zero query row contributes 0.

    query_p [B, d_p]; keys_p [n, d_p]; the result is fp32 (fp64 when any part is fp64).
    """
    dt = score_dtype(*query, *keys)
    score = None
    for q, k, w in zip(query, keys, weights):
        s = w * (F.normalize(q.to(dt), dim=-1) @ F.normalize(k.to(dt), dim=-1).T)
        score = s if score is None else score + s
    return score


def chosen_scores(query: Sequence[Tensor], keys: Sequence[Tensor], weights: Sequence[float], idx: Tensor) -> Tensor:
    """val [B, r] = Σ_p w_p · cos(query_p[b], keys_p[idx[b, k]]): the scores of the chosen experts only (B·r·d work).

    Differentiable w.r.t. query and keys; same dtype rule as :func:`gate_scores`. idx int [B, r].
    """
    i = idx.long()
    dt = score_dtype(*query, *keys)
    out = None
    for q, k, w in zip(query, keys, weights):
        qn = F.normalize(q.to(dt), dim=-1)  # [B, d]
        kn = F.normalize(k.to(dt)[i], dim=-1)  # [B, r, d]: only the chosen keys
        s = w * torch.einsum("bd,brd->br", qn, kn)
        out = s if out is None else out + s
    return out
