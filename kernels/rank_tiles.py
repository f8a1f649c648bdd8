"""@triton.jit helpers shared by the gathered-rank LRP kernels (:mod:`pclr.kernels.lrp_prefill`,
:mod:`pclr.kernels.lrp_fwd`, :mod:`pclr.kernels.lrp_bwd`): which tokens a program owns, which rank rows a sample
uses, and the gathers of those rows.

Tokens are grouped by sample (the launcher's segment map): sample s owns the sorted positions
[start, start + count), and TOK maps a sorted position to its token row when the batch was re-sorted (SORTED);
otherwise positions are token rows. A tile of BLOCK_M positions belongs to one sample.

Ranks of sample s (R = n_s + r): rank k < n_s is shared row k, rank n_s + i is pool row idx[s, i]. A pool rank whose
idx lies outside [0, n) is unused, like a rank past R: it is masked in every gather (no row outside the pool is
read or written) and its scale is 0, so it adds nothing to any output and gets nothing back. Rows are gathered from
base pointers + row indices (never arrays of pointers); shared and pool rows come from two masked loads added
together, so one [ranks, ·] tile feeds one ``tl.dot``.
"""
import triton
import triton.language as tl


@triton.jit
def segment_step(m0, start, count, TOK, SORTED: tl.constexpr, BLOCK_M: tl.constexpr):
    """Positions m0 .. m0 + BLOCK_M of the segment [start, start + count): (sorted positions int32, token rows
    int64, mask).

    Positions stay int32 (T < 2^31) so the tile's position vector costs one register per element; whoever scales
    them by a row stride widens them first.
    """
    offs = m0 + tl.arange(0, BLOCK_M)
    mask = offs < count
    pos = start + offs
    return pos, token_rows(TOK, pos, mask, SORTED), mask


@triton.jit
def token_rows(TOK, pos, mask, SORTED: tl.constexpr):
    """Token rows (int64) of sorted positions ``pos``: TOK[pos] when the batch was re-sorted, else pos itself."""
    if SORTED:
        return tl.load(TOK + pos, mask=mask, other=0).to(tl.int64)
    else:
        return pos.to(tl.int64)


@triton.jit
def tile_of(pid_m, TOK, TILE_SAMPLE, TILE_START, TILE_END, SORTED: tl.constexpr, BLOCK_M: tl.constexpr):
    """Tile ``pid_m`` of the tile map: (sample, sorted positions int32, token rows int64, row mask, non-empty).

    Unused tile slots (the map is sized by shapes, not by data) have start == end.
    """
    s = tl.load(TILE_SAMPLE + pid_m)
    start = tl.load(TILE_START + pid_m)
    end = tl.load(TILE_END + pid_m)
    pos = start + tl.arange(0, BLOCK_M)
    mask = pos < end
    return s, pos, token_rows(TOK, pos, mask, SORTED), mask, start < end


@triton.jit
def rank_chunk(s, r0, IDX, VAL, stride_idx, n, n_s, r, beta_m, beta_s, RC: tl.constexpr, ACC: tl.constexpr):
    """Ranks r0 .. r0 + RC of sample s: (lanes, is_shared, is_pool, pool row int64 (0 unused), scale ACC (0 unused)).

    scale is beta_s on shared lanes and val[s, i]·beta_m on pool lanes. is_pool is false on a lane whose idx lies
    outside [0, n), so such a lane reads no row and, with scale 0, contributes nothing.
    """
    lanes = r0 + tl.arange(0, RC)
    is_s = lanes < n_s
    is_m = (lanes >= n_s) & (lanes < n_s + r)
    i = lanes - n_s
    row = tl.load(IDX + s * stride_idx + i, mask=is_m, other=0).to(tl.int64)
    is_m = is_m & (row >= 0) & (row < n)
    row = tl.where(is_m, row, 0)
    v = tl.load(VAL + s * stride_idx + i, mask=is_m, other=0.0).to(ACC)
    scale = tl.where(is_s, beta_s, v * beta_m).to(ACC)
    return lanes, is_s, is_m, row, scale


@triton.jit
def rank_rows(s, IDX, VAL, stride_idx, n, n_s, r, beta_m, beta_s, BLOCK_R: tl.constexpr, ACC: tl.constexpr):
    """All of sample s's ranks in one block of BLOCK_R ≥ R lanes: :func:`rank_chunk` from rank 0."""
    return rank_chunk(s, 0, IDX, VAL, stride_idx, n, n_s, r, beta_m, beta_s, BLOCK_R, ACC)


@triton.jit
def gather_rows(RS, RM, lanes, row, is_s, is_m, stride, offs_c, mask_c):
    """Rank rows: [len(lanes), len(offs_c)] = Rows_eff[lanes, offs_c] (0 on unused lanes)."""
    a = tl.load(RS + lanes[:, None] * stride + offs_c[None, :], mask=is_s[:, None] & mask_c[None, :], other=0.0)
    b = tl.load(RM + row[:, None] * stride + offs_c[None, :], mask=is_m[:, None] & mask_c[None, :], other=0.0)
    return a + b


@triton.jit
def gather_rows_t(RS, RM, lanes, row, is_s, is_m, stride, offs_c, mask_c):
    """Rank rows, transposed: [len(offs_c), len(lanes)] = (Rows_eff[lanes, offs_c])ᵀ (0 on unused lanes)."""
    a = tl.load(RS + lanes[None, :] * stride + offs_c[:, None], mask=is_s[None, :] & mask_c[:, None], other=0.0)
    b = tl.load(RM + row[None, :] * stride + offs_c[:, None], mask=is_m[None, :] & mask_c[:, None], other=0.0)
    return a + b


@triton.jit
def scaled_cols(G, pos, mask_m, lanes, scale, R, stride_g):
    """(scale ⊙ G)[pos, lanes]: [len(pos), len(lanes)] in G's dtype (0 on rows outside mask_m and lanes ≥ R)."""
    g = tl.load(G + pos[:, None].to(tl.int64) * stride_g + lanes[None, :],
                mask=mask_m[:, None] & (lanes < R)[None, :], other=0.0)
    return g * scale[None, :]


@triton.jit
def token_cols(X, tok, mask_m, c0, c_end, stride_x, BLOCK_C: tl.constexpr):
    """Columns c0 .. c0 + BLOCK_C of the tile's token rows: (X[tok, cols] [len(tok), BLOCK_C] (0 outside mask_m and
    past c_end), cols, column mask)."""
    cols = c0 + tl.arange(0, BLOCK_C)
    mask_c = cols < c_end
    x = tl.load(X + tok[:, None] * stride_x + cols[None, :], mask=mask_m[:, None] & mask_c[None, :], other=0.0)
    return x, cols, mask_c


@triton.jit
def shrink_range(acc, X, DS, DM, tok, mask_m, lanes, row, is_s, is_m, k_lo, k_hi, stride_x, stride_d,
                 BLOCK_K: tl.constexpr):
    """acc [len(tok), len(lanes)] + X[tok, k_lo:k_hi]·Down_eff[lanes, k_lo:k_hi]ᵀ, BLOCK_K columns per step."""
    for k0 in range(k_lo, k_hi, BLOCK_K):
        x, offs_k, mask_k = token_cols(X, tok, mask_m, k0, k_hi, stride_x, BLOCK_K)
        d = gather_rows_t(DS, DM, lanes, row, is_s, is_m, stride_d, offs_k, mask_k)
        acc = tl.dot(x, d, acc=acc, input_precision="ieee")
    return acc
