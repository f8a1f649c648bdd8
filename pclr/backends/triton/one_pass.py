"""The triton one-launch ``lrp_gate_linear``: a gate phase, then the fused LRP linear, in one launch
(:func:`pclr.kernels.lrp_fwd.lrp_one_pass_kernel`, phase barrier of :mod:`pclr.kernels.phases`). Same result as
``lrp_gate`` (scope "sample") followed by ``lrp_linear`` with the fused variant.

The gate phase is B programs, one per sample (the lowest program ids): each scores all n keys once, selects the
top-r and writes idx/val; the LRP programs wait for them and read their sample's rows from idx/val. Each sample's
gate is computed once per launch, not once per LRP program. A gate program holds one sample's score row and a
[n, BLOCK_D] key tile in registers, hence the bound on n (:data:`MAX_ONE_PASS_N`).
"""
from __future__ import annotations

import torch
import triton
from torch import Tensor

from pclr.backends.base import GateLinearInputs
from pclr.backends.triton.configs import INTERPRET, block_r, next_pow2, one_pass_kernel
from pclr.backends.triton.linear import base_linear, rows_or
from pclr.backends.triton.phases import phase_counters, phase_grid
from pclr.backends.triton.segments import decode_block_m, segment_tokens, tile_block_m

MAX_PARTS = 2  # a gate program scores at most two query parts (text, vision)
# A gate program holds its sample's n scores and a [n, BLOCK_D] key tile in registers; up to 1024 experts that stays
# within the registers the LRP phase needs (tests/test_compile_targets.py), beyond it the gate's own kernels
# (lrp_gate, then lrp_linear) run instead.
MAX_ONE_PASS_N = 1024
KEY_TILE = 16384  # key elements per step of the gate's score loop: 64 fp32 registers per thread at 8 warps


def gate_block_d(n: int) -> int:
    """Key columns per step of a gate program's score loop: the [next_pow2(n), BLOCK_D] key tile ≤ KEY_TILE."""
    return max(1, min(64, KEY_TILE // max(16, next_pow2(n))))


def one_pass_reasons(inputs: GateLinearInputs) -> list[str]:
    """Why the one-launch kernel cannot run ``inputs`` (the backend's gate + linear still may: dispatch checks that)."""
    g, i = inputs.gate, inputs.linear
    why = []
    if len(g.query) > MAX_PARTS:
        why.append(f"the one-pass kernel scores at most {MAX_PARTS} query parts, got {len(g.query)}")
    if g.scope != "sample":
        why.append(f"the one-pass kernel gates per sample, got scope {g.scope!r}")
    n = g.keys[0].shape[0]
    if n > MAX_ONE_PASS_N:
        why.append(f"the one-pass kernel's gate holds at most {MAX_ONE_PASS_N} expert scores per program, got n = {n}")
    if any(t.dtype == torch.float64 for t in (i.x, *g.query, *g.keys)):
        why.append("the one-pass kernel computes in float32 (float16/bfloat16/float32 inputs); got float64")
    return why


def launch_one_pass(inputs: GateLinearInputs) -> tuple[Tensor, Tensor, Tensor]:
    """(y [T, d_out], idx int32 [B, r], val fp32 [B, r]); x [T, d_in], query_p [B, d_p], keys_p [n, d_p] (≤ 2 parts)."""
    g, i = inputs.gate, inputs.linear
    x, weight, bias, A_m, B_m, A_s, B_s = i.x, i.weight, i.bias, i.A_m, i.B_m, i.A_s, i.B_s
    query, keys, weights, r, candidates = g.query, g.keys, g.weights, g.r, g.candidates
    soft, sot, beta_m, beta_s, padded_len = g.mode == "soft", i.sample_of_token, i.beta_m, i.beta_s, i.padded_len
    T, d_in = x.shape
    d_out, n = weight.shape[0], A_m.shape[0]
    B = query[0].shape[0]
    n_s = 0 if A_s is None else A_s.shape[0]
    assert len(query) == len(keys) <= MAX_PARTS and 1 <= r <= n and keys[0].shape[0] == n
    dev = x.device
    y = torch.empty((T, d_out), dtype=x.dtype, device=dev)
    idx = torch.empty((B, r), dtype=torch.int32, device=dev)
    val = torch.empty((B, r), dtype=torch.float32, device=dev)
    if B == 0:
        return base_linear(x, weight, bias), idx, val
    dec_bm = decode_block_m(T, B)
    tiles = None if dec_bm or T == 0 else segment_tokens(sot, B, padded_len, tile_block_m(T, B))
    n_lrp = B if dec_bm else (tiles.num_tiles if tiles is not None else 0)
    if tiles is None:
        tok = t_sample = t_start = t_end = sot if T else idx
    else:
        t_sample, t_start, t_end = tiles.tile_sample, tiles.tile_start, tiles.tile_end
        tok = tiles.tok if tiles.tok is not None else t_start
    q = [t.contiguous() for t in query]
    k = [t.contiguous() for t in keys]
    two = len(q) == 2
    q2, k2 = (q[1], k[1]) if two else (q[0], k[0])
    cand = None if candidates is None else candidates.to(torch.int8).contiguous()
    bias = None if bias is None else bias.contiguous()
    n_out = lambda meta: triton.cdiv(d_out, meta["BLOCK_N"])  # noqa: E731
    grid = lambda meta: phase_grid(B, n_lrp * n_out(meta))  # noqa: E731 -- gate programs first, then LRP tiles
    one_pass_kernel[grid](
        x, weight, bias if bias is not None else y, y, rows_or(A_s, A_m), A_m, rows_or(B_s, B_m), B_m,
        q[0], k[0], q2, k2, cand if cand is not None else idx, idx, val, phase_counters(dev),
        tok, t_sample, t_start, t_end, sot if T else idx,
        T, d_in, d_out, n, n_s, r, k[0].shape[1], k2.shape[1], B, n_lrp,
        x.stride(0), weight.stride(0), y.stride(0), A_m.stride(0), B_m.stride(0),
        q[0].stride(0), k[0].stride(0), q2.stride(0), k2.stride(0),
        (cand.stride(0) if cand is not None and cand.dim() == 2 else 0), idx.stride(0),
        float(weights[0]), float(weights[1]) if two else 0.0, float(beta_m), float(beta_s),
        next_pow2(T), d_in, d_out,
        HAS_BIAS=bias is not None, TWO_PARTS=two, HAS_CAND=cand is not None, SOFT=soft,
        SORTED=tiles is not None and tiles.tok is not None, DECODE=tiles is None, INTERPRET=INTERPRET,
        BLOCK_M=dec_bm or (tiles.block_m if tiles is not None else 16), BLOCK_R=block_r(n_s + r),
        BLOCK_NK=max(16, next_pow2(n)), BLOCK_D=gate_block_d(n),
    )
    return y, idx, val
