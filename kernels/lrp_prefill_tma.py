"""The K-extended GEMM of the prefill / training path with tensor descriptors (TMA) and a persistent tile schedule.

Same product as :func:`pclr.kernels.lrp_prefill.kext_gemm_kernel`, per tile of BLOCK_M tokens of one sample s::

    out[t] = [X[t] | scale ⊙ U[t]]·[W | Up_eff[s]]ᵀ + bias

What differs is how the tiles are fed and walked:

* W tiles come through a tensor descriptor (on sm_90 a TMA bulk copy into shared memory, zero-filled past the
  matrix edge, so no K or N masks), in either of its two layouts: [N, K] for y = x·Wᵀ, [K, N] for dX = dY·W.
* X tiles come through a tensor descriptor when the tile's token rows are one contiguous run of X, which is every
  tile of a padded batch and every tile of a packed batch whose tokens are already grouped by sample (the sorted
  position → token row map is the identity on the tile; it is strictly increasing inside a sample, so first and
  last row decide it). Rows of the box past the tile's end belong to other tokens: they only feed accumulator rows
  that are never stored. Other tiles gather their rows with plain loads (TMA cannot gather rows on sm_90).
* The K extension (ceil(R / RC) more steps of the same accumulator) gathers rank rows of Up_eff by pool index with
  plain loads, exactly as the cp.async kernel: the rows of a sample are scattered over the pool.
* A persistent grid: min(#SMs, #tiles) programs, each walking tiles pid, pid + #programs, ... in the grouped order of
  the cp.async kernel (GROUP_M token tiles per group, so programs running together share X and W tiles in L2). One
  resident program per SM: no launch tail of partial waves, and the per-program prologue is paid once per SM.
  Two options of Triton's persistent matmul are not used. ``tl.range(..., flatten=True)`` fuses a tile loop with a
  single inner K loop into one pipelined loop; here the tile body holds a data-dependent branch (empty slot, row
  run or gather) and two inner loops (the K blocks, then the rank chunks), and the sm_90 build with the flag is the
  build without it. ``warp_specialize`` is documented by Triton 3.6 and 3.9 as Blackwell-only.

Accumulation is ACC (fp32; fp64 for fp64 inputs under the interpreter), in the cp.async kernel's order: the K blocks
of the base product, then the rank chunks.
"""
import triton
import triton.language as tl

from pclr.kernels.rank_tiles import gather_rows, rank_chunk, tile_of


@triton.jit
def grouped_tile(t, num_tiles, num_n, GROUP_M: tl.constexpr):
    """(token tile, N tile) of linear tile index t in the grouped walk (GROUP_M token tiles per group)."""
    in_group = GROUP_M * num_n
    first_m = (t // in_group) * GROUP_M
    group = tl.minimum(num_tiles - first_m, GROUP_M)
    pid_m = first_m + (t % in_group) % group
    pid_n = (t % in_group) // group
    return pid_m, pid_n


@triton.jit
def kext_gemm_tma_kernel(
    X, X_DESC, W_DESC, BIAS, OUT, U, US, UM, IDX, VAL, TOK, TILE_SAMPLE, TILE_START, TILE_END,
    num_tiles, K, N, R, n, n_s, r,
    stride_x, stride_out, stride_u, stride_up, stride_idx,
    beta_m, beta_s,
    HAS_BIAS: tl.constexpr, SORTED: tl.constexpr, W_KN: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, RC: tl.constexpr, ACC: tl.constexpr,
):
    """OUT[tok, n-tile] = [X | scale ⊙ U]·[W | Up_eff]ᵀ + bias for every (token tile, N tile), persistent.

    X [T, K] (plain loads for gathered tiles); X_DESC: descriptor of X, block [BLOCK_M, BLOCK_K]; W_DESC: descriptor
    of W stored [N, K] (block [BLOCK_N, BLOCK_K]) or, with W_KN, stored [K, N] (block [BLOCK_K, BLOCK_N]); OUT [T, N]
    (token order); U ACC [T, R] (sorted order, unscaled); US [n_s, N], UM [n, N] (row stride ``stride_up``);
    IDX int32 [B, r]; VAL [B, r]. Grid: (P,), P ≤ num_tiles · cdiv(N, BLOCK_N); program p walks tiles p, p + P, …
    """
    num_n = tl.cdiv(N, BLOCK_N)
    # LICM off for the tile loop: values hoisted out of it stay live across every tile and cost registers
    for t in tl.range(tl.program_id(0), num_tiles * num_n, tl.num_programs(0), disable_licm=True):
        pid_m, pid_n = grouped_tile(t, num_tiles, num_n, GROUP_M)
        s = tl.load(TILE_SAMPLE + pid_m)
        start = tl.load(TILE_START + pid_m)
        end = tl.load(TILE_END + pid_m)
        if start < end:
            n0 = pid_n * BLOCK_N
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            if SORTED:
                # a sample's sorted positions map to increasing X rows: first and last row decide contiguity
                row0 = tl.load(TOK + start)
                run = tl.load(TOK + end - 1) - row0 == end - 1 - start
            else:
                row0 = start
                run = True
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
            if run:
                for k0 in range(0, K, BLOCK_K):
                    x = X_DESC.load([row0, k0])
                    if W_KN:
                        w = W_DESC.load([k0, n0])
                    else:
                        w = W_DESC.load([n0, k0]).T
                    acc = tl.dot(x, w, acc=acc, input_precision="ieee")
            else:
                _, _, tok, mask_m, _ = tile_of(pid_m, TOK, TILE_SAMPLE, TILE_START, TILE_END, SORTED, BLOCK_M)
                for k0 in range(0, K, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    x = tl.load(X + tok[:, None] * stride_x + offs_k[None, :],
                                mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
                    if W_KN:
                        w = W_DESC.load([k0, n0])
                    else:
                        w = W_DESC.load([n0, k0]).T
                    acc = tl.dot(x, w, acc=acc, input_precision="ieee")
            pos = start + tl.arange(0, BLOCK_M)
            mask_m = pos < end
            for r0 in range(0, R, RC):
                lanes, is_s, is_m, row, scale = rank_chunk(s, r0, IDX, VAL, stride_idx, n, n_s, r, beta_m, beta_s, RC,
                                                           ACC)
                u = tl.load(U + pos[:, None].to(tl.int64) * stride_u + lanes[None, :],
                            mask=mask_m[:, None] & (lanes < R)[None, :], other=0.0)
                up = gather_rows(US, UM, lanes, row, is_s, is_m, stride_up, offs_n, mask_n)
                # gate value and beta fold into the small [tile, R] operand, never into the weights
                acc = tl.dot((u * scale[None, :]).to(up.dtype), up, acc=acc, input_precision="ieee")
            if HAS_BIAS:
                acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
            # the token rows again (not kept from the gather branch: a short live range across the K loops)
            _, _, tok, mask_m, _ = tile_of(pid_m, TOK, TILE_SAMPLE, TILE_START, TILE_END, SORTED, BLOCK_M)
            tl.store(OUT + tok[:, None] * stride_out + offs_n[None, :], acc.to(OUT.dtype.element_ty),
                     mask=mask_m[:, None] & mask_n[None, :])
