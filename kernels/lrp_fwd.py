"""Triton kernels of the fused LRP forward (gathered rank rows, per-sample token tiles).

Notation (per sample s, R = n_s + r active ranks, shared rows first)::

    Down_eff[s] = [Down_s; Down_m[idx[s]]]  [R, K]      Up_eff[s] = [Up_s; Up_m[idx[s]]]  [R, N]
    scale[s]    = [beta_s]*n_s ++ val[s]*beta_m  [R]
    out[t]      = X[t]·Wᵀ + bias + (scale ⊙ X[t]·Down_effᵀ)·Up_eff          (t a token of sample s)

The forward is X = x, W = weight, Down = A, Up = B. The dX pass of the backward has exactly the same shape with
X = dY, W = weightᵀ (strides swapped), Down = B, Up = A, so :func:`lrp_expand_kernel` serves both.

Rank rows are gathered by the helpers of :mod:`pclr.kernels.rank_tiles` (one [R, ·] tile feeds one ``tl.dot``;
a pool idx outside [0, n) reads nothing and adds nothing). Each program owns a tile of tokens of ONE sample (the
launcher sorts tokens by sample, like punica's token→adapter mapping), so the R gathered rows are the same for
every token of the tile and the low-rank product is a dense GEMM on tensor cores.
"""
import triton
import triton.language as tl

from pclr.kernels.gate import sample_gate
from pclr.kernels.phases import phase_end, phase_publish, phase_wait
from pclr.kernels.rank_tiles import gather_rows, gather_rows_t, rank_rows, shrink_range, tile_of, token_cols


@triton.jit
def tile_is_empty(pid_m, TILE_START, TILE_END, DECODE: tl.constexpr):
    """Unused tile slots (the tile map is sized by shapes, not by data) have start == end."""
    if DECODE:
        return False
    else:
        return tl.load(TILE_START + pid_m) >= tl.load(TILE_END + pid_m)


@triton.jit
def tile_tokens(pid_m, TOK, TILE_SAMPLE, TILE_START, TILE_END, SOT, T,
                SORTED: tl.constexpr, DECODE: tl.constexpr, BLOCK_M: tl.constexpr):
    """The sample of this program's tile, its sorted positions, token rows (int64) and row mask.

    DECODE (T ≤ BLOCK_M, one launch, no tile map): program ``pid_m`` is sample ``pid_m`` and keeps the tokens whose
    ``SOT`` entry matches; otherwise the tile map (tile → sample, [start, end) in sorted order) says which tokens.
    """
    offs = tl.arange(0, BLOCK_M)
    if DECODE:
        s = pid_m
        pos = offs
        mask = tl.load(SOT + offs, mask=offs < T, other=-1) == s
        tok = offs.to(tl.int64)
    else:
        s, pos, tok, mask, _ = tile_of(pid_m, TOK, TILE_SAMPLE, TILE_START, TILE_END, SORTED, BLOCK_M)
    return s, pos, tok, mask


@triton.jit
def gated_tile(
    X, W, BIAS, OUT, DS, DM, US, UM, SBUF, pid_n, pos, tok, mask_m, offs_r, is_s, is_m, row, scale,
    K, N, stride_x, stride_wn, stride_wk, stride_out, stride_d, stride_u, stride_sbuf,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, S_FROM_BUF: tl.constexpr,
    K_LOOP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):
    """The body shared by the expand and the one-pass kernels, once the tile's tokens and rank rows are known."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    sa = tl.zeros([BLOCK_M, BLOCK_R], dtype=ACC)
    if K_LOOP:
        for k0 in range(0, K, BLOCK_K):
            x, offs_k, mask_k = token_cols(X, tok, mask_m, k0, K, stride_x, BLOCK_K)
            if HAS_BASE:
                w = tl.load(W + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                            mask=mask_n[None, :] & mask_k[:, None], other=0.0)
                acc = tl.dot(x, w, acc=acc, input_precision="ieee")
            if not S_FROM_BUF:
                d = gather_rows_t(DS, DM, offs_r, row, is_s, is_m, stride_d, offs_k, mask_k)
                sa = tl.dot(x, d, acc=sa, input_precision="ieee")
    if S_FROM_BUF:
        sa = tl.load(SBUF + pos[:, None] * stride_sbuf + offs_r[None, :], mask=mask_m[:, None], other=0.0)
    # fold gate value and beta into the small [tile, R] intermediate, never into the weights
    sa = sa * scale[None, :]
    up = gather_rows(US, UM, offs_r, row, is_s, is_m, stride_u, offs_n, mask_n)
    acc = tl.dot(sa.to(up.dtype), up, acc=acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
    out_ptrs = OUT + tok[:, None] * stride_out + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def lrp_expand_kernel(
    X, W, BIAS, OUT, DS, DM, US, UM, IDX, VAL, SBUF,
    TOK, TILE_SAMPLE, TILE_START, TILE_END, SOT,
    T, K, N, n, n_s, r,
    stride_x, stride_wn, stride_wk, stride_out, stride_d, stride_u, stride_idx, stride_sbuf,
    beta_m, beta_s,
    key_t, key_k, key_n,  # autotune keys: shape buckets only
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, S_FROM_BUF: tl.constexpr,
    K_LOOP: tl.constexpr, SORTED: tl.constexpr, DECODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """OUT[t, n-tile] (+)= X[t]·Wᵀ + bias + (scale ⊙ S)·Up_eff for one tile of tokens of one sample.

    X [T, K]; W viewed [N, K] through (stride_wn, stride_wk); OUT [T, N]; DS [n_s, K], DM [n, K]; US [n_s, N],
    UM [n, N]; IDX int32 [B, r], VAL fp32 [B, r]; SBUF fp32 [T, BLOCK_R] (unscaled S in sorted order) when
    S_FROM_BUF, else S = X·Down_effᵀ is computed in the same K loop as the base product (each X tile read once).
    Grid: (tiles, cdiv(N, BLOCK_N)); DECODE: (B, cdiv(N, BLOCK_N)).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if tile_is_empty(pid_m, TILE_START, TILE_END, DECODE):
        return
    s, pos, tok, mask_m = tile_tokens(pid_m, TOK, TILE_SAMPLE, TILE_START, TILE_END, SOT, T,
                                      SORTED, DECODE, BLOCK_M)
    offs_r, is_s, is_m, row, scale = rank_rows(s, IDX, VAL, stride_idx, n, n_s, r, beta_m, beta_s, BLOCK_R, ACC)
    gated_tile(X, W, BIAS, OUT, DS, DM, US, UM, SBUF, pid_n, pos, tok, mask_m, offs_r, is_s, is_m, row, scale,
               K, N, stride_x, stride_wn, stride_wk, stride_out, stride_d, stride_u, stride_sbuf,
               HAS_BASE, HAS_BIAS, ACCUMULATE, S_FROM_BUF, K_LOOP, BLOCK_M, BLOCK_R, BLOCK_N, BLOCK_K, ACC)


@triton.jit
def lrp_shrink_kernel(
    X, DS, DM, IDX, SBUF,
    TOK, TILE_SAMPLE, TILE_START, TILE_END,
    T, K, n, n_s, r,
    stride_x, stride_d, stride_idx, stride_sbuf,
    key_t, key_k,  # autotune keys: shape buckets only
    SORTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """SBUF[pos, :] = X[tok]·Down_effᵀ, unscaled ACC (fp32; fp64 for fp64 inputs) [T, BLOCK_R] in sorted token
    order (lanes ≥ R are 0).

    Used for the cuBLAS-epilogue forward and, in the backward, for both u = x·A_effᵀ and dS = dY·B_effᵀ.
    Grid: (tiles,).
    """
    pid_m = tl.program_id(0)
    if tile_is_empty(pid_m, TILE_START, TILE_END, False):
        return
    s, pos, tok, mask_m = tile_tokens(pid_m, TOK, TILE_SAMPLE, TILE_START, TILE_END, TILE_START, T,
                                      SORTED, False, BLOCK_M)
    offs_r, is_s, is_m, row, _scale = rank_rows(s, IDX, IDX, stride_idx, n, n_s, r, 1.0, 1.0, BLOCK_R, ACC)
    sa = shrink_range(tl.zeros([BLOCK_M, BLOCK_R], dtype=ACC), X, DS, DM, tok, mask_m, offs_r, row, is_s, is_m, 0, K,
                      stride_x, stride_d, BLOCK_K)
    tl.store(SBUF + pos[:, None] * stride_sbuf + offs_r[None, :], sa, mask=mask_m[:, None])


@triton.jit
def lrp_one_pass_kernel(
    X, W, BIAS, OUT, AS, AM, BS, BM, Q1, K1, Q2, K2, CAND, IDX, VAL, COUNTERS,
    TOK, TILE_SAMPLE, TILE_START, TILE_END, SOT,
    T, K, N, n, n_s, r, d1, d2, B, n_lrp,
    stride_x, stride_w, stride_out, stride_a, stride_b, stride_q1, stride_k1, stride_q2, stride_k2, stride_cand,
    stride_idx, w1, w2, beta_m, beta_s,
    key_t, key_k, key_n,  # autotune keys: shape buckets only
    HAS_BIAS: tl.constexpr, TWO_PARTS: tl.constexpr, HAS_CAND: tl.constexpr, SOFT: tl.constexpr,
    SORTED: tl.constexpr, DECODE: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_NK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Gate and gated LRP linear in one launch, two phases (:mod:`pclr.kernels.phases`): y = x·Wᵀ + b +
    (scale ⊙ x·A_effᵀ)·B_eff with A_eff/B_eff chosen by the per-sample top-r of Σ_p w_p·cos(q_p[s], K_p).

    Grid (1-D): B + n_lrp · cdiv(N, BLOCK_N) programs.

    * programs [0, B), the gate phase (producers): program s scores all keys for sample s once, selects its top-r
      and writes IDX int32 [B, r] / VAL fp32 [B, r] (also what the backward reads), then publishes. They take the
      lowest ids so that they are dispatched first and never wait behind an LRP program.
    * programs [B, B + n_lrp · cdiv(N, BLOCK_N)), the LRP phase (consumers): program B + l is token tile
      l % n_lrp and output tile l // n_lrp (consecutive programs share W's tile, as in a 2-D grid's dispatch
      order); it waits for the gate phase, reads its sample's rank lanes from IDX/VAL (as :func:`rank_rows`, the
      loads bypassing L1), then runs the fused tile (:func:`lrp_expand_kernel`'s fused variant). It waits before
      its K loop because that loop computes S with the gated rows of A; the gate's latency then delays the first
      wave of tiles only.

    COUNTERS int32 [2] (FLAG, DONE): zero at launch and left zero. Each sample's gate is computed once, not once per
    LRP program: the keys are read B times per launch, the top-r rounds run B times.
    """
    pid = tl.program_id(0)
    FLAG = COUNTERS
    DONE = COUNTERS + 1
    offs_r = tl.arange(0, BLOCK_R)
    if pid < B:
        row_g, val_g = sample_gate(pid, Q1, K1, Q2, K2, CAND, n, d1, d2, stride_q1, stride_k1, stride_q2,
                                   stride_k2, stride_cand, w1, w2, n_s, r, TWO_PARTS, HAS_CAND, SOFT,
                                   BLOCK_NK, BLOCK_D, BLOCK_R)
        pool = (offs_r >= n_s) & (offs_r < n_s + r)
        tl.store(IDX + pid * stride_idx + offs_r - n_s, row_g, mask=pool)
        tl.store(VAL + pid * stride_idx + offs_r - n_s, val_g, mask=pool)
        phase_publish(FLAG)
    else:
        lrp = pid - B
        pid_m = lrp % n_lrp
        pid_n = lrp // n_lrp
        if not tile_is_empty(pid_m, TILE_START, TILE_END, DECODE):
            s, pos, tok, mask_m = tile_tokens(pid_m, TOK, TILE_SAMPLE, TILE_START, TILE_END, SOT, T,
                                              SORTED, DECODE, BLOCK_M)
            phase_wait(FLAG, B, INTERPRET)
            # sample s's rank lanes as rank_rows lays them out, read from what the gate phase wrote
            is_s = offs_r < n_s
            is_m = (offs_r >= n_s) & (offs_r < n_s + r)
            i = offs_r - n_s
            row = tl.load(IDX + s * stride_idx + i, mask=is_m, other=0, cache_modifier=".cg").to(tl.int64)
            v = tl.load(VAL + s * stride_idx + i, mask=is_m, other=0.0, cache_modifier=".cg")
            scale = tl.where(is_s, beta_s, v * beta_m)
            gated_tile(X, W, BIAS, OUT, AS, AM, BS, BM, OUT, pid_n, pos, tok, mask_m, offs_r, is_s, is_m,
                       row, scale, K, N, stride_x, stride_w, 1, stride_out, stride_a, stride_b, 0,
                       True, HAS_BIAS, False, False, True, BLOCK_M, BLOCK_R, BLOCK_N, BLOCK_K, tl.float32)
    phase_end(FLAG, DONE)
