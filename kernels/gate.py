"""Triton kernels of the PCLR gate: weighted multi-part cosine scores, then the top-r experts per sample.

Two launches whose grids depend only on shapes (CUDA-graph safe, no host round trip):

* :func:`gate_scores_kernel` — score[b, j] (+)= w1·cos(q1[b], k1[j]) + w2·cos(q2[b], k2[j]), a small tiled GEMM over
  (B, n) that also accumulates the row norms of the tiles it reads, so nothing is normalised in a separate pass.
  Queries with more than two parts chain launches with ``ACCUMULATE``.
* :func:`gate_topr_kernel` — one program per sample (or a single program for the batch scope, which first sums the
  scores over the batch and keeps the experts that are candidates of every sample) selects the top-r by r rounds
  of (best tier, max, lowest index holding it); ties therefore go to the lower index exactly as the reference.

Ranking rule shared with the reference gate (:func:`pclr.backends.reference.gate`): experts are ordered by tier,
then by descending score, then by index. Tier 0 is a candidate with a number as score (±inf included), tier 1 a
candidate whose score is NaN (a NaN ranks below -inf), tier 2 a non-candidate. Whatever the scores, every chosen
index lies in [0, n) and a non-candidate is chosen only once the candidates run out.
"""
import triton
import triton.language as tl

# F.normalize's eps: a zero query part (e.g. a sample with no image) gets cosine 0, never NaN.
NORM_EPS = tl.constexpr(1e-12)


@triton.jit
def _part_cos(
    Q, Kp, d, stride_q, stride_k, offs_b, mask_b, offs_n, mask_n,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """cos(q[offs_b], k[offs_n]) for one query part: [BLOCK_B, BLOCK_N] in ACC (fp32; fp64 for fp64 inputs)."""
    dot = tl.zeros([BLOCK_B, BLOCK_N], dtype=ACC)
    qsq = tl.zeros([BLOCK_B], dtype=ACC)
    ksq = tl.zeros([BLOCK_N], dtype=ACC)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < d
        # fp32 ieee dot: the gate ranks near-equal scores, tf32 would reorder them against the reference
        q = tl.load(Q + offs_b[:, None] * stride_q + offs_d[None, :], mask=mask_b[:, None] & mask_d[None, :],
                    other=0.0).to(ACC)
        k = tl.load(Kp + offs_n[None, :] * stride_k + offs_d[:, None], mask=mask_n[None, :] & mask_d[:, None],
                    other=0.0).to(ACC)
        dot = tl.dot(q, k, acc=dot, input_precision="ieee")
        qsq += tl.sum(q * q, axis=1)
        ksq += tl.sum(k * k, axis=0)
    qn = tl.maximum(tl.sqrt(qsq), NORM_EPS)
    kn = tl.maximum(tl.sqrt(ksq), NORM_EPS)
    return dot / qn[:, None] / kn[None, :]


@triton.jit
def gate_scores_kernel(
    S, Q1, K1, Q2, K2,
    B, n, d1, d2,
    stride_s, stride_q1, stride_k1, stride_q2, stride_k2,
    w1, w2,
    TWO_PARTS: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """S [B, n] (fp32, or fp64 for fp64 inputs) (+)= w1·cos(Q1 [B, d1], K1 [n, d1]) (+ w2·cos(Q2 [B, d2], K2 [n, d2])).

    Grid: (cdiv(n, BLOCK_N), cdiv(B, BLOCK_B)); keys are read once per block of samples.
    """
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_b = offs_b < B
    mask_n = offs_n < n
    score = w1 * _part_cos(Q1, K1, d1, stride_q1, stride_k1, offs_b, mask_b, offs_n, mask_n,
                           BLOCK_B, BLOCK_N, BLOCK_D, ACC)
    if TWO_PARTS:
        score += w2 * _part_cos(Q2, K2, d2, stride_q2, stride_k2, offs_b, mask_b, offs_n, mask_n,
                                BLOCK_B, BLOCK_N, BLOCK_D, ACC)
    ptrs = S + offs_b[:, None] * stride_s + offs_n[None, :]
    mask = mask_b[:, None] & mask_n[None, :]
    if ACCUMULATE:
        score += tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, score, mask=mask)


@triton.jit
def rank_tiers(score, ok):
    """(tier int32, clean score) of each expert: tier 0 candidate with a number, 1 candidate with NaN, 2 not a
    candidate (or out of range); clean is the score in tier 0 and -inf elsewhere, so no NaN reaches a max."""
    is_nan = score != score  # noqa: PLR0124 -- true exactly for NaN; works in the interpreter and compiled
    tier = tl.where(ok, tl.where(is_nan, 1, 0), 2)
    clean = tl.where(ok & (~is_nan), score, float("-inf"))
    return tier, clean


@triton.jit
def select_next(tier, clean, avail, offs, n, BLOCK_N: tl.constexpr):
    """The next expert among ``avail``: lowest tier, then highest clean score, then lowest index; in [0, n)."""
    t = tl.min(tl.where(avail, tier, 3), axis=0)
    pool = avail & (tier == t)
    best = tl.max(tl.where(pool, clean, float("-inf")), axis=0)
    j = tl.min(tl.where(pool & (clean == best), offs, BLOCK_N), axis=0)
    # r <= n keeps ``pool`` non-empty; the clamp makes an out-of-range index impossible even if it were not
    return tl.minimum(j, n - 1)


@triton.jit
def gate_topr_kernel(
    S, CAND, IDX, VAL,
    B, n, r,
    stride_s, stride_cand, stride_out,
    HAS_CAND: tl.constexpr, BATCH: tl.constexpr, SOFT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Top-r of the scores S [B, n] by the module's ranking rule → IDX int32 [B, r], VAL fp32 [B, r].

    Grid: (B,) for the sample scope; (1,) for the batch scope, whose single program ranks the batch-summed scores
    (candidates: those of every sample) and writes the same experts for every sample.
    CAND is int8 [B or 1, n] (stride_cand = 0 for a shared [n] mask). VAL = the sample's own unmasked score (SOFT) or 1.
    """
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    in_range = offs < n
    ok = in_range
    if BATCH:
        rank = tl.zeros([BLOCK_N], dtype=S.dtype.element_ty)
        for b in range(B):
            rank += tl.load(S + b * stride_s + offs, mask=in_range, other=0.0)
            if HAS_CAND:  # the batch ranks the intersection of the samples' candidates first
                ok = ok & (tl.load(CAND + b * stride_cand + offs, mask=in_range, other=0) != 0)
    else:
        rank = tl.load(S + pid * stride_s + offs, mask=in_range, other=0.0)
        if HAS_CAND:
            ok = ok & (tl.load(CAND + pid * stride_cand + offs, mask=in_range, other=0) != 0)
    offs_r = tl.arange(0, BLOCK_R)
    chosen = tl.zeros([BLOCK_R], dtype=tl.int32)
    tier, clean = rank_tiers(rank, ok)
    avail = in_range
    for i in range(r):
        j = select_next(tier, clean, avail, offs, n, BLOCK_N)
        chosen = tl.where(offs_r == i, j, chosen)
        avail = avail & (offs != j)
    mask_r = offs_r < r
    if BATCH:
        for b in range(B):
            _store_route(IDX, VAL, S, b, stride_out, stride_s, chosen, offs_r, mask_r, SOFT, BLOCK_R)
    else:
        _store_route(IDX, VAL, S, pid, stride_out, stride_s, chosen, offs_r, mask_r, SOFT, BLOCK_R)


@triton.jit
def _store_route(IDX, VAL, S, b, stride_out, stride_s, chosen, offs_r, mask_r, SOFT: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    """Write sample b's experts and values: VAL = its own unmasked score (SOFT) or 1."""
    tl.store(IDX + b * stride_out + offs_r, chosen, mask=mask_r)
    if SOFT:
        v = tl.load(S + b * stride_s + chosen, mask=mask_r, other=0.0)
    else:
        v = tl.full([BLOCK_R], 1.0, dtype=VAL.dtype.element_ty)
    tl.store(VAL + b * stride_out + offs_r, v, mask=mask_r)


# --- per-sample gate inside another kernel's prologue (the one-pass LRP linear) ---------------------------------


@triton.jit
def sample_part_cos(s, Q, Kp, n, d, stride_q, stride_k, BLOCK_NK: tl.constexpr, BLOCK_D: tl.constexpr):
    """cos(q[s], k[j]) for all n keys of one part: [BLOCK_NK] fp32 (keys are small: read by every program)."""
    offs_n = tl.arange(0, BLOCK_NK)
    mask_n = offs_n < n
    dot = tl.zeros([BLOCK_NK], dtype=tl.float32)
    ksq = tl.zeros([BLOCK_NK], dtype=tl.float32)
    qsq = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < d
        q = tl.load(Q + s * stride_q + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        k = tl.load(Kp + offs_n[:, None] * stride_k + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :],
                    other=0.0).to(tl.float32)
        dot += tl.sum(k * q[None, :], axis=1)
        ksq += tl.sum(k * k, axis=1)
        qsq += q * q
    qn = tl.maximum(tl.sqrt(tl.sum(qsq, axis=0)), NORM_EPS)
    kn = tl.maximum(tl.sqrt(ksq), NORM_EPS)
    return dot / qn / kn


@triton.jit
def sample_gate(
    s, Q1, K1, Q2, K2, CAND, n, d1, d2, stride_q1, stride_k1, stride_q2, stride_k2, stride_cand, w1, w2, n_s, r,
    TWO_PARTS: tl.constexpr, HAS_CAND: tl.constexpr, SOFT: tl.constexpr,
    BLOCK_NK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Sample s's top-r experts laid out on rank lanes n_s .. n_s + r - 1 (shared ranks first).

    Returns (row int32 [BLOCK_R], val fp32 [BLOCK_R]); same rule as :func:`gate_topr_kernel` (ties → lower index).
    """
    score = w1 * sample_part_cos(s, Q1, K1, n, d1, stride_q1, stride_k1, BLOCK_NK, BLOCK_D)
    if TWO_PARTS:
        score += w2 * sample_part_cos(s, Q2, K2, n, d2, stride_q2, stride_k2, BLOCK_NK, BLOCK_D)
    offs = tl.arange(0, BLOCK_NK)
    in_range = offs < n
    ok = in_range
    if HAS_CAND:
        ok = ok & (tl.load(CAND + s * stride_cand + offs, mask=in_range, other=0) != 0)
    tier, clean = rank_tiers(score, ok)
    offs_r = tl.arange(0, BLOCK_R)
    row = tl.zeros([BLOCK_R], dtype=tl.int32)
    val = tl.zeros([BLOCK_R], dtype=tl.float32)
    avail = in_range
    for i in range(r):
        j = select_next(tier, clean, avail, offs, n, BLOCK_NK)
        lane = offs_r == n_s + i
        row = tl.where(lane, j, row)
        if SOFT:
            val = tl.where(lane, tl.sum(tl.where(offs == j, score, 0.0), axis=0), val)
        else:
            val = tl.where(lane, 1.0, val)
        avail = avail & (offs != j)
    return row, val
