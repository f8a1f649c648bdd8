"""The PCLR authors' formulation, written as their code writes it, so the benchmark can time it side by side.

A is stored [d_in, n] (column j = expert j) and B [n, d_out]; the gate is the cosine of every sample's query with every
key (the vision part weighted :data:`~pclr.bench.shapes.VISION_WEIGHT`; :func:`pclr.scoring.gate_scores`), recomputed
inside every linear and summed over the batch, so the whole batch takes one route:
``torch.matmul((x @ A[:, idx]) * mask, B[idx])``. The rest is its own code on purpose: it is the formulation being
compared against, not pclr's gate and linear.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pclr.bench.shapes import ALPHA, GATE_WEIGHTS
from pclr.routing import current_routing
from pclr.scoring import gate_scores


def cosine_scores(query: Sequence[Tensor], keys: Sequence[Tensor]) -> Tensor:
    """score [B, n] = Σ_p w_p · cos(query_p[b], keys_p[j]) with the benchmark's part weights (text 1, vision
    VISION_WEIGHT); query parts [B, d_p], keys parts [n, d_p]; fp32."""
    return gate_scores(query, keys, GATE_WEIGHTS[:len(query)])


def paper_gate(query: Sequence[Tensor], keys: Sequence[Tensor], r: int) -> tuple[Tensor, Tensor]:
    """The authors' gate: cosine scores summed over the batch, top-r, a hard mask.

    Returns one route for the whole batch: idx int64 [r], mask fp32 [r] (all ones).
    """
    idx = cosine_scores(query, keys).sum(0).topk(r).indices
    mask = torch.ones(r, device=idx.device)
    return idx, mask


def paper_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, A_s: Optional[Tensor],
                 B_s: Optional[Tensor], query: Sequence[Tensor], keys: Sequence[Tensor], r: int, beta_m: float,
                 beta_s: float) -> Tensor:
    """The authors' LRP linear; the gate scores are recomputed here, in every linear.

    Args:
        x: [..., d_in]; weight [d_out, d_in]; bias [d_out] | None; A [d_in, n]; B [n, d_out];
        A_s [d_in, n_s] | None; B_s [n_s, d_out] | None; query / keys: parts as :func:`cosine_scores`.
    Returns:
        [..., d_out].
    """
    idx, mask = paper_gate(query, keys, r)
    result = F.linear(x, weight, bias)
    result = result + torch.matmul((x @ A[:, idx]) * mask.to(x.dtype), B[idx]) * beta_m
    if A_s is not None:
        result = result + (x @ A_s) @ B_s * beta_s
    return result


class PaperLRPLinear(nn.Module):
    """The authors' LRP linear inside a model: A [d_in, n], B [n, d_out], the layer's keys shared by reference, and the
    gate recomputed from the current routing query (``pclr.routing``) in every forward (see :func:`paper_linear`)."""

    def __init__(self, base: nn.Linear, keys: list[Tensor], n: int, r: int, n_s: int, alpha: float = ALPHA) -> None:
        super().__init__()
        w = base.weight
        self.base, self.keys, self.r = base, keys, r
        self.A = nn.Parameter(torch.randn(base.in_features, n, device=w.device, dtype=w.dtype) / base.in_features**.5)
        self.B = nn.Parameter(torch.zeros(n, base.out_features, device=w.device, dtype=w.dtype))
        self.register_buffer("A_s", torch.randn(base.in_features, n_s, device=w.device, dtype=w.dtype) / 64)
        self.register_buffer("B_s", torch.zeros(n_s, base.out_features, device=w.device, dtype=w.dtype))
        self.beta_m, self.beta_s = alpha / r, (alpha / n_s if n_s else 0.0)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., d_in] -> [..., d_out], routed by the query of the enclosing ``pclr.routing`` block."""
        state = current_routing()
        if state is None:
            raise RuntimeError("PaperLRPLinear needs a routing query: call the model inside `with pclr.routing(q):`")
        return paper_linear(x, self.base.weight, self.base.bias, self.A, self.B,
                            self.A_s if self.A_s.numel() else None, self.B_s, state.query, self.keys, self.r,
                            self.beta_m, self.beta_s)
