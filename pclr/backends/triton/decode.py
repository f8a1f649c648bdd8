"""Decode-sized LRP forward (T ≤ 64 tokens): one launch, a shrink phase over the used rank rows, then a fused base +
expand phase.

:func:`pclr.kernels.lrp_decode.decode_kernel` runs both phases in one grid (the phase barrier of
:mod:`pclr.kernels.phases`). The shrink programs (lowest ids) read each used pool row of A (and the shared rows)
once for all tokens and fold the gate into S. The expand programs are a GEMV-class kernel over output tiles: each
holds every token in one tile, streams its rows of W once (so W is read once for the whole batch, never once per
sample) and accumulates x·W[tile]ᵀ while the shrink runs, then waits for it and adds (S ⊙ G)·B_used[:, tile] in the
same accumulator, adds the bias and writes y once. Which rows are used comes from ``idx`` on the device (no host
sync), and routes that point outside [0, n) contribute nothing instead of reading outside the pool. One launch
instead of two: x is fetched from memory once, and at decode sizes the launch itself is a real share of the layer.

``fuse_base=False`` keeps the base as one cuBLAS GEMM; the same launch then adds the low-rank term into y in place
(its expand programs have no independent work and wait at once; y read and written once more). It stays selectable
as the comparison point until a GPU measurement settles which is faster: every output tile of the fused kernel
reads all of x from L2, T/block_n times the bytes of W it streams (2 × at T = 64 with the 32-column tiles of
d_out = 4096).

Reference semantics: :func:`pclr.backends.reference._forward`. The backward at decode sizes is the general Triton
backward (the forward's S is not kept).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from pclr.backends.triton.configs import INTERPRET, acc_types, next_pow2
from pclr.backends.triton.phases import phase_counters, phase_grid
from pclr.kernels import lrp_decode

DECODE_MAX_T = 64  # all tokens of the batch live in one BLOCK_T tile


def _prev_pow2(v: int) -> int:
    return 1 << max(0, int(v).bit_length() - 1)


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the decode launch (the same on every device: the grid depends on shapes only).

    block_t: token tile (all tokens); block_j: rank rows per shrink program; expand_block_j: rank rows per expand
    step; split: d_in slices of the shrink (fixed-order sum in the expand); k_per_split: d_in elements per slice;
    block_k: shrink K step; block_n: output columns per expand program; expand_block_k: the expand's K step over
    x·Wᵀ; block_u: route entries per usage-bitmap step; num_warps: of every program (both phases share the launch).
    """

    block_t: int
    block_j: int
    expand_block_j: int
    split: int
    k_per_split: int
    block_k: int
    block_n: int
    expand_block_k: int
    block_u: int
    num_warps: int

    def grid(self, rows: int, d_out: int) -> tuple[int]:
        """(shrink programs: row chunks × d_in slices, lowest ids) + (expand programs: output tiles)."""
        return phase_grid(triton.cdiv(rows, self.block_j) * self.split, triton.cdiv(d_out, self.block_n))


def decode_config(T: int, d_in: int, d_out: int, rows: int, routes: int) -> DecodeConfig:
    """Config for T tokens, d_in → d_out, ``rows`` = n + n_s rank rows, ``routes`` = B·r route entries.

    A shrink program covers a chunk of 32 rows: both phases share the launch's register allocation, and a
    128-row chunk (its [T, 128] gated tile) took 248 registers per thread at T = 64 where the expand takes 70,
    which would cap the occupancy of the W-streaming phase; the chunks re-read x from L2 (the launch fetches it
    from memory once). d_in is split in slices of ≥ 1024 elements (at most 8) to give the shrink more programs at
    large d_in without multiplying the partial S the expand sums.
    The expand streams W, so its grid over output tiles must fill the machine: about 128 programs (one wave on
    132 SMs) from d_out = 2048 on, 16-column tiles (the MMA minimum) below. Every expand program also reads all
    of x [T, d_in] and the gated S [T, rows]: narrower tiles would add that traffic without adding parallelism.
    """
    if not 1 <= T <= DECODE_MAX_T:
        raise ValueError(f"decode takes 1..{DECODE_MAX_T} tokens, got T = {T}")
    block_t = max(16, next_pow2(T))
    block_j = min(32, max(16, next_pow2(rows)))
    block_k = 32  # with 8 warps: no spills on sm_80/sm_90 up to T = 64 (tests/test_compile_targets.py)
    split = max(1, min(8, d_in // 1024))
    k_per_split = triton.cdiv(triton.cdiv(d_in, split), block_k) * block_k  # a multiple of block_k
    split = triton.cdiv(d_in, k_per_split)
    block_n = min(128, max(16, _prev_pow2(d_out // 128)))
    expand_block_k = 128 if block_t <= 16 else 64  # x tile [block_t, K step] + W tile: no spills up to T = 64
    block_u = 16  # the usage test holds a [block_j, block_u] tile
    expand_block_j = min(64, block_j)  # the expand loops over rows: a smaller step keeps its tiles in registers
    num_warps = 8 if block_t >= 32 else 4  # sm_90, T = 64: the expand phase takes 155 registers at 8 warps, 254 at 4
    return DecodeConfig(block_t, block_j, expand_block_j, split, k_per_split, block_k, block_n, expand_block_k,
                        block_u, num_warps)


def decode_forward(x: Tensor, weight: Tensor, bias: Tensor | None, A_m: Tensor, B_m: Tensor, idx: Tensor,
                   val: Tensor, A_s: Tensor | None, B_s: Tensor | None, beta_m: float, beta_s: float,
                   sot: Tensor, fuse_base: bool = True) -> Tensor:
    """y [T, d_out] = x·Wᵀ + b + Σ over each token's sample's routed rows of scale·(x·A_jᵀ)·B_j.

    x [T, d_in] with T ≤ 64; weight [d_out, d_in]; bias [d_out] | None; A_m [n, d_in]; B_m [n, d_out];
    idx int [B, r]; val [B, r]; A_s [n_s, d_in] | None; B_s [n_s, d_out] | None; sot int [T] (sample of token).
    Scale: beta_m·val[b, i] for pool row idx[b, i], beta_s for shared rows. ``fuse_base``: the base in the expand
    kernel (one launch, y written once) or as a cuBLAS GEMM before it (two launches).
    """
    T, d_in = x.shape
    d_out = weight.shape[0]
    B, r = idx.shape
    n = A_m.shape[0]
    n_s = 0 if A_s is None else A_s.shape[0]
    if T > DECODE_MAX_T:
        raise ValueError(f"x has T = {T} tokens; decode_forward takes at most {DECODE_MAX_T}")
    if A_m.shape[1] != d_in or B_m.shape != (n, d_out) or weight.shape[1] != d_in:
        raise ValueError(f"A_m {tuple(A_m.shape)}, B_m {tuple(B_m.shape)}, weight {tuple(weight.shape)} do not "
                         f"match x [T, {d_in}]")
    if bias is not None and bias.shape != (d_out,):
        raise ValueError(f"bias must be [d_out = {d_out}], got {tuple(bias.shape)}")
    if sot.shape != (T,):
        raise ValueError(f"sot must be [T = {T}], got {tuple(sot.shape)}")
    rows = n + n_s
    if T == 0 or rows == 0 or (B * r == 0 and n_s == 0) or d_in == 0:
        return F.linear(x, weight, bias)  # no low-rank term to add (or nothing to stream)
    cfg = decode_config(T, d_in, d_out, rows, B * r)
    acc_t, acc = acc_types(x.dtype)
    x = x.contiguous()
    weight = weight.contiguous()
    idx = idx.to(torch.int32).contiguous()
    val = val.contiguous()  # the shrink converts each gate value to the accumulation dtype as it loads it
    sot = sot.to(torch.int32).contiguous()
    A_m, B_m = A_m.contiguous(), B_m.contiguous()
    A_s = A_m if A_s is None else A_s.contiguous()  # never dereferenced when n_s == 0 (all its lanes are masked)
    B_s = B_m if B_s is None else B_s.contiguous()
    if fuse_base:
        y = torch.empty((T, d_out), dtype=x.dtype, device=x.device)
        bias_arg = weight if bias is None else bias.contiguous()  # never dereferenced without HAS_BIAS
    else:
        y = F.linear(x, weight, bias)  # cuBLAS: W read once for every token of the batch
        bias_arg = weight
    sg = torch.empty((cfg.split, T, rows), dtype=acc_t, device=x.device)
    used = torch.empty((rows,), dtype=torch.int8, device=x.device)
    lrp_decode.decode_kernel[cfg.grid(rows, d_out)](
        y, x, weight, bias_arg, A_s, A_m, B_s, B_m, idx, val, sot, sg, used, phase_counters(x.device),
        T, d_in, d_out, n, n_s, r, B * r, cfg.k_per_split, cfg.split,
        y.stride(0), x.stride(0), weight.stride(0), A_s.stride(0), A_m.stride(0), B_s.stride(0), B_m.stride(0),
        idx.stride(0), sg.stride(0), sg.stride(1),
        float(beta_m), float(beta_s),
        HAS_BASE=fuse_base, HAS_BIAS=fuse_base and bias is not None, INTERPRET=INTERPRET,
        BLOCK_T=cfg.block_t, BLOCK_J=cfg.block_j, BLOCK_K=cfg.block_k, BLOCK_U=cfg.block_u,
        EXPAND_BLOCK_J=cfg.expand_block_j, BLOCK_N=cfg.block_n, EXPAND_BLOCK_K=cfg.expand_block_k, ACC=acc,
        num_warps=cfg.num_warps,
    )
    return y
