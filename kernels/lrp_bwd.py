"""Triton kernels of the fused LRP backward.

With u = x·A_effᵀ and dS = dY·B_effᵀ (both unscaled, fp32 [T, BLOCK_R] in sorted token order, from
:func:`pclr.kernels.lrp_fwd.lrp_shrink_kernel`) the backward of one sample s is::

    dX      = dY·W + (scale ⊙ dS)·A_eff            (lrp_fwd.lrp_expand_kernel with X = dY, W = Wᵀ)
    dA_eff  = (scale ⊙ dS)ᵀ·x    [R, d_in]          (pool_grad_kernel)
    dB_eff  = (scale ⊙ u)ᵀ·dY    [R, d_out]         (pool_grad_kernel)
    dval    = beta_m · Σ_t dS ⊙ u                   (segment_dval_kernel)

dA_eff / dB_eff rows go to the pool rows idx[s] (trainable rows only) and the shared rows. Two reductions over
samples: atomics into an fp32 buffer (fast) or, in deterministic mode, per-sample partials reduced row by row in a
fixed order by :func:`segment_reduce_kernel` (bit-identical across runs).
"""
import triton
import triton.language as tl

from pclr.kernels.rank_tiles import rank_rows, scaled_cols, segment_step, token_cols


@triton.jit
def pool_grad_kernel(
    G, X, OUT, IDX, VAL, TRAIN, TOK, SEG_START, SEG_COUNT,
    D, n, n_s, r,
    stride_g, stride_x, stride_out, stride_idx,
    beta_m, beta_s,
    key_t, key_d,  # autotune keys: shape buckets only
    SORTED: tl.constexpr, ATOMIC: tl.constexpr, HAS_TRAIN: tl.constexpr,
    NEED_POOL: tl.constexpr, NEED_SHARED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """Per-sample rank-row gradient (scale ⊙ G)ᵀ·X over the sample's tokens, for one column block of X.

    G fp32 [T, BLOCK_R] (sorted order); X [T, D] (token order, TOK maps sorted position → token when SORTED);
    ATOMIC: OUT fp32 [n + n_s, D] (pool rows, then shared rows), rows added atomically, frozen rows untouched;
    else OUT fp32 [B * BLOCK_R, D], this sample's partial rows, for :func:`segment_reduce_kernel`.
    Grid: (B, cdiv(D, BLOCK_N)). The token loop is the segment reduction over the sample: no atomics inside it.
    """
    s = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_r, is_s, is_m, row, scale = rank_rows(s, IDX, VAL, stride_idx, n, n_s, r, beta_m, beta_s, BLOCK_R, ACC)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D
    start = tl.load(SEG_START + s)
    count = tl.load(SEG_COUNT + s)
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=ACC)
    for m0 in range(0, count, BLOCK_M):
        pos, tok, mask_m = segment_step(m0, start, count, TOK, SORTED, BLOCK_M)
        x, _, _ = token_cols(X, tok, mask_m, pid_n * BLOCK_N, D, stride_x, BLOCK_N)
        g = scaled_cols(G, pos, mask_m, offs_r, scale, BLOCK_R, stride_g).to(x.dtype)
        acc = tl.dot(tl.trans(g), x, acc=acc, input_precision="ieee")
    if ATOMIC:
        if NEED_POOL:
            keep = is_m
            if HAS_TRAIN:
                keep = keep & (tl.load(TRAIN + row, mask=is_m, other=0) != 0)
        else:
            keep = offs_r < 0
        if NEED_SHARED:
            keep = keep | is_s
        tgt = tl.where(is_s, n + offs_r, row)
        tl.atomic_add(OUT + tgt[:, None] * stride_out + offs_n[None, :], acc,
                      mask=keep[:, None] & mask_n[None, :])
    else:
        prow = (s * BLOCK_R + offs_r).to(tl.int64)
        tl.store(OUT + prow[:, None] * stride_out + offs_n[None, :], acc, mask=mask_n[None, :])


@triton.jit
def segment_reduce_kernel(
    P, OUT, SRC, STARTS, COUNTS,
    D, stride_p, stride_out,
    BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """OUT[j, :] = Σ_c P[SRC[STARTS[j] + c], :] for c < COUNTS[j], summed in a fixed order (deterministic).

    P fp32 [B * BLOCK_R, D] per-sample partial rows; OUT fp32 [rows, D]; frozen rows have COUNTS = 0 (no work,
    exact zero). Grid: (rows, cdiv(D, BLOCK_N)).
    """
    j = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D
    start = tl.load(STARTS + j)
    count = tl.load(COUNTS + j)
    acc = tl.zeros([BLOCK_N], dtype=ACC)
    for c in range(count):
        src = tl.load(SRC + start + c).to(tl.int64)
        acc += tl.load(P + src * stride_p + offs_n, mask=mask_n, other=0.0)
    tl.store(OUT + j.to(tl.int64) * stride_out + offs_n, acc, mask=mask_n)


@triton.jit
def segment_dval_kernel(
    G, H, DVAL, SEG_START, SEG_COUNT,
    n_s, r, stride_g, stride_dval, beta_m,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr,
):
    """DVAL[s, i] = beta_m · Σ_{t in sample s} G[t, n_s + i]·H[t, n_s + i]  (G = dS, H = u, sorted order).

    BLOCK_T tokens per step: the two [BLOCK_T, BLOCK_R] tiles live in registers together, so a token step as wide
    as a GEMM tile (128 × 128 fp32, twice) would not fit and spill. Grid: (B,).
    """
    s = tl.program_id(0)
    offs_r = tl.arange(0, BLOCK_R)
    start = tl.load(SEG_START + s)
    count = tl.load(SEG_COUNT + s)
    acc = tl.zeros([BLOCK_R], dtype=ACC)
    for m0 in range(0, count, BLOCK_T):
        pos, _tok, mask_m = segment_step(m0, start, count, SEG_START, False, BLOCK_T)  # positions only
        mask = mask_m[:, None]
        g = tl.load(G + pos[:, None] * stride_g + offs_r[None, :], mask=mask, other=0.0)
        h = tl.load(H + pos[:, None] * stride_g + offs_r[None, :], mask=mask, other=0.0)
        acc += tl.sum(g * h, axis=0)
    is_m = (offs_r >= n_s) & (offs_r < n_s + r)
    tl.store(DVAL + s * stride_dval + offs_r - n_s, acc * beta_m, mask=is_m)
