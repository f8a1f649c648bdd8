"""Triton kernels of the prefill / training LRP linear at the work floor (gathered rank rows, per-sample tiles).

Notation (per sample s, R = n_s + r active ranks, shared rows first)::

    Down_eff[s] = [Down_s; Down_m[idx[s]]]  [R, K]      Up_eff[s] = [Up_s; Up_m[idx[s]]]  [R, N]
    scale[s]    = [beta_s]*n_s ++ val[s]*beta_m  [R]
    U[t]        = X[t]·Down_eff[s]ᵀ   [R], unscaled, fp32 (fp64 for fp64 inputs), sorted token order
    out[t]      = X[t]·Wᵀ + bias + (scale ⊙ U[t])·Up_eff[s]          (t a token of sample s)

Forward: U = x·A_effᵀ once per token (:func:`shrink_kernel`, split over rank chunks and, when that leaves the machine
half idle, over K with a fixed-order reduction by :func:`split_sum_kernel`), then one K-extended GEMM per (token
tile, N tile) (:func:`kext_gemm_kernel`): the base product and the low-rank term accumulate in the same registers,
so y is written once. Backward with u = U kept from the forward::

    dS      = dY·B_effᵀ                                    (shrink_kernel, X = dY, Down = B)
    dX      = dY·W + (scale ⊙ dS)·A_eff                    (kext_gemm_kernel, X = dY, W strides swapped, U = dS)
    dA_eff  = (scale ⊙ dS)ᵀ·x,  dB_eff = (scale ⊙ u)ᵀ·dY    (rank_grad_kernel, one launch for both; each x / dY
                                                            tile feeds up to 4 rank chunks)
    dval    = beta_m · Σ_t dS ⊙ u  over the pool lanes      (rank_grad_kernel, programs of the first column block)

dY is read twice (the dS shrink, the dB pass): folding dS into the dB pass would need a partial dS per column
block of dY (fp32 [d_out / BLOCK_N, T, R], 50 MB at d_out = T = 4096, R = 96), more traffic than a second read of
dY (32 MB in bf16), and the dS shrink's grid fills the machine on its own.

dA_eff / dB_eff are per-sample partial rows; :func:`rows_reduce_kernel` sums them into pool and shared rows in a
fixed order (bit-identical across runs) and writes the final dtype directly, zeros on rows nobody trained.

Ranks are processed in chunks of RC lanes (16 or 32, whichever wastes fewer lanes on R): lane k of chunk c is rank
c·RC + k; rank k < n_s is shared row k, rank n_s + i is pool row idx[s, i], ranks ≥ R and pool ranks whose idx
lies outside [0, n) are masked (scale 0, no row read). The token tiles, rank chunks and row gathers are the helpers
of :mod:`pclr.kernels.rank_tiles`, shared with the comparison kernels.
"""
import triton
import triton.language as tl

from pclr.kernels.rank_tiles import (
    gather_rows,
    rank_chunk,
    scaled_cols,
    segment_step,
    shrink_range,
    tile_of,
    token_cols,
)


@triton.jit
def shrink_kernel(
    X, DS, DM, IDX, U, TOK, TILE_SAMPLE, TILE_START, TILE_END,
    K, R, n, n_s, r, k_per_split,
    stride_x, stride_d, stride_idx, stride_split, stride_u,
    SORTED: tl.constexpr, BLOCK_M: tl.constexpr, RC: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):
    """U[split, pos, chunk] = X[tok, k-range]·Down_eff[chunk, k-range]ᵀ, unscaled ACC.

    X [T, K]; DS [n_s, K], DM [n, K] (row stride ``stride_d``); IDX int32 [B, r]; U ACC [splits, T, R] (split
    stride ``stride_split``; one split writes the final U directly). Grid: (tile slots, cdiv(R, RC), splits); split
    j covers K columns [j·k_per_split, (j + 1)·k_per_split), a multiple of BLOCK_K.
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    s, pos, tok, mask_m, live = tile_of(pid_m, TOK, TILE_SAMPLE, TILE_START, TILE_END, SORTED, BLOCK_M)
    if live:
        lanes, is_s, is_m, row, _ = rank_chunk(s, pid_r * RC, IDX, IDX, stride_idx, n, n_s, r, 1.0, 1.0, RC, ACC)
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(K, k_lo + k_per_split)
        acc = shrink_range(tl.zeros([BLOCK_M, RC], dtype=ACC), X, DS, DM, tok, mask_m, lanes, row, is_s, is_m,
                           k_lo, k_hi, stride_x, stride_d, BLOCK_K)
        ptrs = U + pid_k.to(tl.int64) * stride_split + pos[:, None].to(tl.int64) * stride_u + lanes[None, :]
        tl.store(ptrs, acc, mask=mask_m[:, None] & (lanes < R)[None, :])


@triton.jit
def split_sum_kernel(P, U, numel, splits, stride_split, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """U[i] = Σ_j P[j, i] for j = 0 .. splits - 1 in that order (deterministic split-K reduction).

    P ACC [splits, numel] (split stride ``stride_split``), U ACC [numel]. Grid: (cdiv(numel, BLOCK),).
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros([BLOCK], dtype=ACC)
    ptrs = P + offs
    for _ in range(0, splits):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += stride_split  # 64-bit pointer steps: splits · stride_split may exceed int32
    tl.store(U + offs, acc, mask=mask)


@triton.jit
def kext_gemm_kernel(
    X, W, BIAS, OUT, U, US, UM, IDX, VAL, TOK, TILE_SAMPLE, TILE_START, TILE_END,
    num_tiles, K, N, R, n, n_s, r,
    stride_x, stride_wn, stride_wk, stride_out, stride_u, stride_up, stride_idx,
    beta_m, beta_s,
    HAS_BIAS: tl.constexpr, SORTED: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, RC: tl.constexpr, ACC: tl.constexpr,
):
    """OUT[tok, n-tile] = [X | scale ⊙ U]·[W | Up_eff]ᵀ + bias for one tile of tokens of one sample.

    X [T, K]; W viewed [N, K] through (stride_wn, stride_wk); OUT [T, N] (token order); U ACC [T, R] (sorted
    order, unscaled); US [n_s, N], UM [n, N] (row stride ``stride_up``); IDX int32 [B, r]; VAL [B, r].
    The low-rank term is ceil(R / RC) more K iterations of the same accumulator (K extended by R).
    Grid: (num_tiles · cdiv(N, BLOCK_N),), walked in groups of GROUP_M token tiles so that programs running
    together share their X tiles and W tiles in L2.
    """
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group = tl.minimum(num_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group
    pid_n = (pid % in_group) // group
    s, pos, tok, mask_m, live = tile_of(pid_m, TOK, TILE_SAMPLE, TILE_START, TILE_END, SORTED, BLOCK_M)
    if live:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            x, offs_k, mask_k = token_cols(X, tok, mask_m, k0, K, stride_x, BLOCK_K)
            w = tl.load(W + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                        mask=mask_n[None, :] & mask_k[:, None], other=0.0)
            acc = tl.dot(x, w, acc=acc, input_precision="ieee")
        for r0 in range(0, R, RC):
            lanes, is_s, is_m, row, scale = rank_chunk(s, r0, IDX, VAL, stride_idx, n, n_s, r, beta_m, beta_s, RC,
                                                       ACC)
            # gate value and beta fold into the small [tile, R] operand, never into the weights
            su = scaled_cols(U, pos, mask_m, lanes, scale, R, stride_u)
            up = gather_rows(US, UM, lanes, row, is_s, is_m, stride_up, offs_n, mask_n)
            acc = tl.dot(su.to(up.dtype), up, acc=acc, input_precision="ieee")
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
        tl.store(OUT + tok[:, None] * stride_out + offs_n[None, :], acc.to(OUT.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def chunk_grad(acc, xt, G, pos, mask_m, s, r0, IDX, VAL, stride_idx, n, n_s, r, beta_m, beta_s, R, stride_g,
               RC: tl.constexpr, ACC: tl.constexpr):
    """acc [BLOCK_N, RC] + Xᵀ·(scale ⊙ G)[pos, r0 .. r0 + RC]: one rank chunk's share of a token step (xt = Xᵀ)."""
    lanes, _, _, _, scale = rank_chunk(s, r0, IDX, VAL, stride_idx, n, n_s, r, beta_m, beta_s, RC, ACC)
    g = scaled_cols(G, pos, mask_m, lanes, scale, R, stride_g)
    return tl.dot(xt, g.to(xt.dtype), acc=acc, input_precision="ieee")


@triton.jit
def store_partial(P, acc, s, lanes, R, offs_n, mask_n, stride_p):
    prow = (s * R + lanes).to(tl.int64)
    tl.store(P + prow[None, :] * stride_p + offs_n[:, None], acc, mask=(lanes < R)[None, :] & mask_n[:, None])


@triton.jit
def rank_grad_block(
    G, X, P, s, pid_n, r0, start, count, TOK, IDX, VAL, stride_idx, n, n_s, r, beta_m, beta_s, D, R,
    stride_g, stride_x, stride_p,
    SORTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RC: tl.constexpr,
    NUM_RC: tl.constexpr, ACC: tl.constexpr,
):
    """P[s·R + k, n-block] = Σ_{t in sample s} (scale ⊙ G)[t, k]·X[t, n-block] for the NUM_RC rank chunks from r0.

    Each X tile is loaded once and feeds NUM_RC MMAs (one accumulator per chunk: R = 96 is three chunks of 32,
    never a padded 128). Accumulated transposed, [BLOCK_N, RC], so the MMA's M dimension is the wide column
    block, not the few ranks.
    """
    acc0 = tl.zeros([BLOCK_N, RC], dtype=ACC)
    acc1 = tl.zeros([BLOCK_N, RC], dtype=ACC)
    acc2 = tl.zeros([BLOCK_N, RC], dtype=ACC)
    acc3 = tl.zeros([BLOCK_N, RC], dtype=ACC)
    for m0 in range(0, count, BLOCK_M):
        pos, tok, mask_m = segment_step(m0, start, count, TOK, SORTED, BLOCK_M)
        x, _, _ = token_cols(X, tok, mask_m, pid_n * BLOCK_N, D, stride_x, BLOCK_N)
        xt = tl.trans(x)
        acc0 = chunk_grad(acc0, xt, G, pos, mask_m, s, r0, IDX, VAL, stride_idx, n, n_s, r, beta_m, beta_s, R,
                          stride_g, RC, ACC)
        if NUM_RC > 1:
            acc1 = chunk_grad(acc1, xt, G, pos, mask_m, s, r0 + RC, IDX, VAL, stride_idx, n, n_s, r, beta_m, beta_s,
                              R, stride_g, RC, ACC)
        if NUM_RC > 2:
            acc2 = chunk_grad(acc2, xt, G, pos, mask_m, s, r0 + 2 * RC, IDX, VAL, stride_idx, n, n_s, r, beta_m,
                              beta_s, R, stride_g, RC, ACC)
        if NUM_RC > 3:
            acc3 = chunk_grad(acc3, xt, G, pos, mask_m, s, r0 + 3 * RC, IDX, VAL, stride_idx, n, n_s, r, beta_m,
                              beta_s, R, stride_g, RC, ACC)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D
    store_partial(P, acc0, s, r0 + tl.arange(0, RC), R, offs_n, mask_n, stride_p)
    if NUM_RC > 1:
        store_partial(P, acc1, s, r0 + RC + tl.arange(0, RC), R, offs_n, mask_n, stride_p)
    if NUM_RC > 2:
        store_partial(P, acc2, s, r0 + 2 * RC + tl.arange(0, RC), R, offs_n, mask_n, stride_p)
    if NUM_RC > 3:
        store_partial(P, acc3, s, r0 + 3 * RC + tl.arange(0, RC), R, offs_n, mask_n, stride_p)


@triton.jit
def chunk_keeps(s, r0, IDX, TRAIN, stride_idx, n, n_s, r, NEED_POOL: tl.constexpr, NEED_SHARED: tl.constexpr,
                HAS_TRAIN: tl.constexpr, RC: tl.constexpr):
    """Number of lanes of ranks r0 .. r0 + RC whose gradient is wanted (trainable pool rows, wanted shared rows)."""
    lanes, is_s, is_m, row, _ = rank_chunk(s, r0, IDX, IDX, stride_idx, n, n_s, r, 1.0, 1.0, RC, tl.float32)
    keep = lanes < 0
    if NEED_POOL:
        if HAS_TRAIN:
            keep = is_m & (tl.load(TRAIN + row, mask=is_m, other=0) != 0)
        else:
            keep = is_m
    if NEED_SHARED:
        keep = keep | is_s
    return tl.sum(keep.to(tl.int32), axis=0)


@triton.jit
def rank_grad_kernel(
    DS, U, XA, XB, PA, PB, DVAL, IDX, VAL, TRAIN, TOK, SEG_START, SEG_COUNT,
    DA, DB, R, n, n_s, r, nblk_a,
    stride_g, stride_xa, stride_xb, stride_pa, stride_pb, stride_dval, stride_idx,
    beta_m, beta_s,
    NEED_POOL: tl.constexpr, NEED_SHARED: tl.constexpr, HAS_TRAIN: tl.constexpr,
    NEED_GRAD: tl.constexpr, NEED_VAL: tl.constexpr, SORTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RC: tl.constexpr, NUM_RC: tl.constexpr, ACC: tl.constexpr,
):
    """Per-sample rank-row gradients and dval of the backward, one launch.

    DS, U ACC [T, R] (sorted order; dS = dY·B_effᵀ and u = x·A_effᵀ, both unscaled); XA = x [T, DA], XB = dY
    [T, DB] (token order); PA ACC [B·R, DA] ← (scale ⊙ dS)ᵀ·x, PB ACC [B·R, DB] ← (scale ⊙ u)ᵀ·dY (per-sample
    partial rows); DVAL [B, r] ← beta_m · Σ_t dS ⊙ u (pool lanes, by the programs of column block 0).
    TRAIN bool [n] (HAS_TRAIN): a group of rank chunks whose lanes are all frozen or unwanted pool rows (and no
    wanted shared row) does no gradient work: its partial rows are never read by the reduction.
    Grid: (cdiv(R, NUM_RC·RC), cdiv(DA, BLOCK_N) + cdiv(DB, BLOCK_N), B) or, without NEED_GRAD,
    (cdiv(R, NUM_RC·RC), 1, B).
    """
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    s = tl.program_id(2)
    r0 = pid_r * (NUM_RC * RC)
    start = tl.load(SEG_START + s)
    count = tl.load(SEG_COUNT + s)
    if NEED_VAL:
        if pid_n == 0:
            for c in tl.static_range(NUM_RC):
                lanes, _, is_m, _, _ = rank_chunk(s, r0 + c * RC, IDX, VAL, stride_idx, n, n_s, r, beta_m, beta_s,
                                                  RC, ACC)
                dv = tl.zeros([RC], dtype=ACC)
                for m0 in range(0, count, BLOCK_M):
                    pos, _tok, mask_m = segment_step(m0, start, count, TOK, False, BLOCK_M)
                    rows = pos[:, None].to(tl.int64) * stride_g + lanes[None, :]
                    mask = mask_m[:, None] & is_m[None, :]
                    g = tl.load(DS + rows, mask=mask, other=0.0)
                    h = tl.load(U + rows, mask=mask, other=0.0)
                    dv += tl.sum(g * h, axis=0)
                # every pool lane is stored: one outside the pool (is_m false) read nothing and stores its 0
                in_r = (lanes >= n_s) & (lanes < n_s + r)
                tl.store(DVAL + s * stride_dval + lanes - n_s, (dv * beta_m).to(DVAL.dtype.element_ty), mask=in_r)
    if NEED_GRAD:
        keeps = 0
        for c in tl.static_range(NUM_RC):
            keeps += chunk_keeps(s, r0 + c * RC, IDX, TRAIN, stride_idx, n, n_s, r, NEED_POOL, NEED_SHARED, HAS_TRAIN,
                                 RC)
        if keeps > 0:
            if pid_n < nblk_a:
                rank_grad_block(DS, XA, PA, s, pid_n, r0, start, count, TOK, IDX, VAL, stride_idx, n, n_s, r,
                                beta_m, beta_s, DA, R, stride_g, stride_xa, stride_pa,
                                SORTED, BLOCK_M, BLOCK_N, RC, NUM_RC, ACC)
            else:
                rank_grad_block(U, XB, PB, s, pid_n - nblk_a, r0, start, count, TOK, IDX, VAL, stride_idx, n, n_s, r,
                                beta_m, beta_s, DB, R, stride_g, stride_xb, stride_pb,
                                SORTED, BLOCK_M, BLOCK_N, RC, NUM_RC, ACC)


@triton.jit
def sum_rows(P, SRC, start, count, offs_n, mask_n, stride_p, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    acc = tl.zeros([BLOCK_N], dtype=ACC)
    for c in range(0, count):
        src = tl.load(SRC + start + c).to(tl.int64)
        acc += tl.load(P + src * stride_p + offs_n, mask=mask_n, other=0.0)
    return acc


@triton.jit
def rows_reduce_kernel(
    PA, PB, AM, BM, AS, BS, SRC, STARTS, COUNTS,
    row0, n, nblk_a, DA, DB,
    stride_pa, stride_pb, stride_am, stride_bm, stride_as, stride_bs,
    BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """Output row j = row0 + program_id(0) (pool row j < n, shared row j - n otherwise) of dA and dB:
    Σ_c P[SRC[STARTS[j] + c]] for c < COUNTS[j], summed in a fixed order and stored in the output dtype.

    PA ACC [B·R, DA], PB ACC [B·R, DB] per-sample partial rows; AM [n, DA], BM [n, DB], AS [n_s, DA],
    BS [n_s, DB] the final gradients; SRC int32: partial rows grouped by output row; rows nobody trained (frozen,
    unchosen) have COUNTS = 0 and get exact zeros. Grid: (rows, cdiv(DA, BLOCK_N) + cdiv(DB, BLOCK_N)).
    """
    j = row0 + tl.program_id(0)
    pid_n = tl.program_id(1)
    start = tl.load(STARTS + j)
    count = tl.load(COUNTS + j)
    if pid_n < nblk_a:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < DA
        acc = sum_rows(PA, SRC, start, count, offs_n, mask_n, stride_pa, BLOCK_N, ACC)
        if j < n:
            tl.store(AM + j.to(tl.int64) * stride_am + offs_n, acc.to(AM.dtype.element_ty), mask=mask_n)
        else:
            tl.store(AS + (j - n).to(tl.int64) * stride_as + offs_n, acc.to(AS.dtype.element_ty), mask=mask_n)
    else:
        offs_n = (pid_n - nblk_a) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < DB
        acc = sum_rows(PB, SRC, start, count, offs_n, mask_n, stride_pb, BLOCK_N, ACC)
        if j < n:
            tl.store(BM + j.to(tl.int64) * stride_bm + offs_n, acc.to(BM.dtype.element_ty), mask=mask_n)
        else:
            tl.store(BS + (j - n).to(tl.int64) * stride_bs + offs_n, acc.to(BS.dtype.element_ty), mask=mask_n)
