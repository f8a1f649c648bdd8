"""Triton kernel of the decode-sized LRP forward (T ≤ 64 tokens): W and each used rank row read once for the batch.

ONE launch in two phases (:mod:`pclr.kernels.phases`), a 1-D grid of n_shrink + n_out_tiles programs::

    programs [0, n_shrink)                     shrink (producers): SG and USED of one (row chunk, d_in slice)
    programs [n_shrink, n_shrink + n_tiles)    expand (consumers): x·W[tile]ᵀ first (independent of the shrink),
                                               then wait for every shrink program, then + (Σ_split SG)·B_live[:, tile]

Rank rows are indexed j in [0, n + n_s): j < n is pool row j, j ≥ n is shared row j - n. A row is *live* when it is
shared or when some sample's route holds it (the usage bitmap); dead rows are never loaded.

* shrink — SG[split, t, j] = G[t, j] · Σ_{k in split} x[t, k]·A_j[k] for a chunk of rows and a slice of d_in, where
  G[t, j] = beta_m·Σ_{i: idx[b, i] = j} val[b, i] (b the sample of token t; 0 for rows the sample does not route
  to) and beta_s on shared rows. The slice-0 program of each chunk also writes the usage bitmap USED[j].
* expand — y[:, n-chunk] = x·W[n-chunk]ᵀ + (Σ_split SG[split])·B_live[:, n-chunk] + b, the splits summed in a fixed
  order (deterministic), over the live rows only. It needs S of every live row, hence the wait; the base product
  (the bulk of the work: the program's rows of W) runs before the wait, so the shrink's latency is hidden behind it.

Why one launch: at decode sizes a whole layer takes a few µs, so a launch is a real cost, and x (read by both
phases) is then one launch's working set, fetched from memory once. Why shrink programs take the lowest ids: see
:mod:`pclr.kernels.phases` (they are dispatched first and never wait, so a waiting expand program cannot starve
them).

Every token meets every live row in one dense tile, so no token is re-sorted by sample and no weight is streamed per
sample: the rows a sample does not use get a zero gate, which costs FLOPs on tiny tiles but no memory traffic.
"""
import triton
import triton.language as tl

from pclr.kernels.phases import phase_end, phase_publish, phase_wait


@triton.jit
def _row_kinds(offs_j, n, n_s):
    """(pool row?, shared row?) masks of row ids ``offs_j``."""
    is_m = offs_j < n
    is_s = (offs_j >= n) & (offs_j < n + n_s)
    return is_m, is_s


@triton.jit
def _shrink_chunk(
    X, AS, AM, IDX, VAL, SOT, SG, USED, pid_j, pid_s,
    T, K, n, n_s, r, BR, k_per_split,
    stride_x, stride_as, stride_am, stride_idx, stride_sg_split, stride_sg_t,
    beta_m, beta_s,
    BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_U: tl.constexpr,
    ACC: tl.constexpr,
):
    """Gated partial shrink of row chunk ``pid_j`` over d_in slice ``pid_s`` = [pid_s·k_per_split, +k_per_split).

    X [T, K]; AS [n_s, K]; AM [n, K]; IDX int32 [B, r] (contiguous: BR = B·r entries); VAL fp32 [B, r];
    SOT int32 [T]; SG ACC [SPLIT, T, n + n_s] (only live rows written); USED int8 [n + n_s] (slice 0 writes it).
    """
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    is_m, is_s = _row_kinds(offs_j, n, n_s)
    # usage bitmap of this chunk from the routes of every sample (no host sync, grid independent of the data)
    hits = tl.zeros([BLOCK_J], dtype=tl.int32)
    for u0 in range(0, BR, BLOCK_U):
        offs_u = u0 + tl.arange(0, BLOCK_U)
        rows = tl.load(IDX + offs_u, mask=offs_u < BR, other=-1)
        hits += tl.sum((rows[None, :] == offs_j[:, None]).to(tl.int32), axis=1)
    live_m = is_m & (hits > 0)
    live = live_m | is_s
    shared = tl.where(is_s, offs_j - n, 0)

    offs_t = tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([BLOCK_T, BLOCK_J], dtype=ACC)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        x = tl.load(X + offs_t[:, None] * stride_x + offs_k[None, :], mask=mask_t[:, None] & mask_k[None, :],
                    other=0.0)
        a = tl.load(AM + offs_j[None, :] * stride_am + offs_k[:, None], mask=live_m[None, :] & mask_k[:, None],
                    other=0.0)
        a += tl.load(AS + shared[None, :] * stride_as + offs_k[:, None], mask=is_s[None, :] & mask_k[:, None],
                     other=0.0)
        acc = tl.dot(x, a, acc=acc, input_precision="ieee")

    # gate of each (token, row): the sample's value for the rows it routes to (summed if a route repeats a row)
    b = tl.load(SOT + offs_t, mask=mask_t, other=0).to(tl.int64)
    g = tl.zeros([BLOCK_T, BLOCK_J], dtype=ACC)
    for i in range(r):
        row = tl.load(IDX + b * stride_idx + i, mask=mask_t, other=-1)
        v = tl.load(VAL + b * stride_idx + i, mask=mask_t, other=0.0).to(ACC)
        g += tl.where(row[:, None] == offs_j[None, :], v[:, None], 0.0)
    g = tl.where(is_s[None, :], beta_s, g * beta_m)
    sg = acc * g
    ptrs = SG + pid_s * stride_sg_split + offs_t[:, None] * stride_sg_t + offs_j[None, :]
    tl.store(ptrs, sg, mask=mask_t[:, None] & live[None, :])
    if pid_s == 0:
        tl.store(USED + offs_j, live.to(tl.int8), mask=offs_j < n + n_s)


@triton.jit
def _expand_tile(
    Y, X, W, BIAS, BS, BM, SG, USED, FLAG, pid_n, producers,
    T, K, N, n, n_s, split,
    stride_y, stride_x, stride_w, stride_bs, stride_bm, stride_sg_split, stride_sg_t,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):
    """Y[:, n-chunk] = X·W[n-chunk]ᵀ + (Σ_split SG[split])·B_live[:, n-chunk] + BIAS[n-chunk], Y written once.

    Y [T, N]; X [T, K]; W [N, K]; BIAS [N]; BS [n_s, N]; BM [n, N]; SG ACC [split, T, n + n_s];
    USED int8 [n + n_s]. The program streams its BLOCK_N rows of W once for all T tokens (one token tile), so W is
    read once for the batch. Without HAS_BASE, Y already holds x·Wᵀ + b (X, W, BIAS are not read) and the low-rank
    term is added in place. SG and USED come from the shrink programs: read after the wait, bypassing L1.
    """
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_t = tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=ACC)
    if HAS_BASE:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(X + offs_t[:, None] * stride_x + offs_k[None, :], mask=mask_t[:, None] & mask_k[None, :],
                        other=0.0)
            w = tl.load(W + offs_n[None, :] * stride_w + offs_k[:, None], mask=mask_n[None, :] & mask_k[:, None],
                        other=0.0)
            acc = tl.dot(x, w, acc=acc, input_precision="ieee")
    phase_wait(FLAG, producers, INTERPRET)
    # the low-rank term in the same accumulator: each live rank row of B is read once by this program
    for j0 in range(0, n + n_s, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        is_m, is_s = _row_kinds(offs_j, n, n_s)
        live = tl.load(USED + offs_j, mask=offs_j < n + n_s, other=0, cache_modifier=".cg") != 0
        live_m = is_m & live
        sg = tl.zeros([BLOCK_T, BLOCK_J], dtype=ACC)
        for s in range(split):  # fixed order: the result does not depend on the launch
            sg += tl.load(SG + s * stride_sg_split + offs_t[:, None] * stride_sg_t + offs_j[None, :],
                          mask=mask_t[:, None] & live[None, :], other=0.0, cache_modifier=".cg")
        up = tl.load(BM + offs_j[:, None] * stride_bm + offs_n[None, :], mask=live_m[:, None] & mask_n[None, :],
                     other=0.0)
        shared = tl.where(is_s, offs_j - n, 0)
        up += tl.load(BS + shared[:, None] * stride_bs + offs_n[None, :], mask=is_s[:, None] & mask_n[None, :],
                      other=0.0)
        acc = tl.dot(sg.to(up.dtype), up, acc=acc, input_precision="ieee")
    ptrs = Y + offs_t[:, None] * stride_y + offs_n[None, :]
    mask = mask_t[:, None] & mask_n[None, :]
    if HAS_BASE:
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
    else:
        acc += tl.load(ptrs, mask=mask, other=0.0).to(ACC)
    tl.store(ptrs, acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def decode_kernel(
    Y, X, W, BIAS, AS, AM, BS, BM, IDX, VAL, SOT, SG, USED, COUNTERS,
    T, K, N, n, n_s, r, BR, k_per_split, split,
    stride_y, stride_x, stride_w, stride_as, stride_am, stride_bs, stride_bm, stride_idx,
    stride_sg_split, stride_sg_t,
    beta_m, beta_s,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_U: tl.constexpr,
    EXPAND_BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr, EXPAND_BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):
    """The whole decode forward in one launch: shrink programs, then expand programs (module docstring).

    Y [T, N]; X [T, K]; W [N, K]; BIAS [N]; AS [n_s, K], AM [n, K]; BS [n_s, N], BM [n, N]; IDX int32 [B, r]
    (contiguous, BR = B·r); VAL fp32 [B, r]; SOT int32 [T]; SG ACC [split, T, n + n_s]; USED int8 [n + n_s];
    COUNTERS int32 [2] (FLAG, DONE), zero at launch and left zero. Grid: (n_shrink + cdiv(N, BLOCK_N),) with
    n_shrink = n_chunks · split, n_chunks = cdiv(n + n_s, BLOCK_J); shrink program p covers row chunk
    p % n_chunks and d_in slice p // n_chunks.
    """
    pid = tl.program_id(0)
    n_chunks = tl.cdiv(n + n_s, BLOCK_J)
    n_shrink = n_chunks * split
    FLAG = COUNTERS
    DONE = COUNTERS + 1
    if pid < n_shrink:
        _shrink_chunk(X, AS, AM, IDX, VAL, SOT, SG, USED, pid % n_chunks, pid // n_chunks,
                      T, K, n, n_s, r, BR, k_per_split,
                      stride_x, stride_as, stride_am, stride_idx, stride_sg_split, stride_sg_t,
                      beta_m, beta_s, BLOCK_T, BLOCK_J, BLOCK_K, BLOCK_U, ACC)
        phase_publish(FLAG)
    else:
        _expand_tile(Y, X, W, BIAS, BS, BM, SG, USED, FLAG, pid - n_shrink, n_shrink,
                     T, K, N, n, n_s, split,
                     stride_y, stride_x, stride_w, stride_bs, stride_bm, stride_sg_split, stride_sg_t,
                     HAS_BASE, HAS_BIAS, INTERPRET, BLOCK_T, EXPAND_BLOCK_J, BLOCK_N, EXPAND_BLOCK_K, ACC)
    phase_end(FLAG, DONE)
