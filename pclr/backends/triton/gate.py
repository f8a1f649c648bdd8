"""The triton ``lrp_gate``: a tiled score kernel (two query parts per launch, more parts accumulate) and a top-r
kernel, grids sized by shapes, no host sync. Scores are :func:`pclr.scoring.gate_scores`, computed fused.
"""
from __future__ import annotations

import torch
import triton
from torch import Tensor

from pclr.backends.base import GateInputs
from pclr.backends.triton.configs import INTERPRET, acc_types, next_pow2
from pclr.kernels import gate as gate_kernels


def launch_gate(inputs: GateInputs) -> tuple[Tensor, Tensor]:
    """idx int32 [B, r], val fp32 [B, r] (fp64 soft values when a part is fp64, as the reference).

    query_p [B, d_p], keys_p [n, d_p]; candidates bool [n] | [B, n].
    """
    query, keys, weights, r = inputs.query, inputs.keys, inputs.weights, inputs.r
    candidates, scope, mode = inputs.candidates, inputs.scope, inputs.mode
    B, n = query[0].shape[0], keys[0].shape[0]
    dev = keys[0].device
    # the reference scores in fp64 when any part is fp64 (and returns soft val in fp64 then)
    f64 = any(t.dtype == torch.float64 for t in (*query, *keys))
    acc_t, acc = acc_types(torch.float64 if f64 else torch.float32)
    idx = torch.empty((B, r), dtype=torch.int32, device=dev)
    val = torch.empty((B, r), dtype=acc_t if mode == "soft" else torch.float32, device=dev)
    if B == 0 or r == 0:
        return idx, val
    scores = torch.empty((B, n), dtype=acc_t, device=dev)
    bb, bnk, bd = 16, (32 if INTERPRET else 64), 64
    q = [t.contiguous() for t in query]
    k = [t.contiguous() for t in keys]
    for p in range(0, len(q), 2):  # two parts per launch; more parts accumulate
        two = p + 1 < len(q)
        q2, k2 = (q[p + 1], k[p + 1]) if two else (q[p], k[p])
        gate_kernels.gate_scores_kernel[(triton.cdiv(n, bnk), triton.cdiv(B, bb))](
            scores, q[p], k[p], q2, k2, B, n, k[p].shape[1], k2.shape[1],
            scores.stride(0), q[p].stride(0), k[p].stride(0), q2.stride(0), k2.stride(0),
            float(weights[p]), float(weights[p + 1]) if two else 0.0,
            TWO_PARTS=two, ACCUMULATE=p > 0, BLOCK_B=bb, BLOCK_N=bnk, BLOCK_D=bd, ACC=acc,
        )
    cand = None
    if candidates is not None:
        cand = candidates.to(torch.int8).contiguous()
    batch = scope == "batch"
    block_n = next_pow2(n)
    gate_kernels.gate_topr_kernel[(1 if batch else B,)](
        scores, cand if cand is not None else idx, idx, val, B, n, r,
        scores.stride(0), (cand.stride(0) if cand is not None and cand.dim() == 2 else 0), idx.stride(0),
        HAS_CAND=cand is not None, BATCH=batch, SOFT=mode == "soft",
        BLOCK_N=block_n, BLOCK_R=next_pow2(r), num_warps=4 if block_n <= 1024 else 8,
    )
    return idx, val
