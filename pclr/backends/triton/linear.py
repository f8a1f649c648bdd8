"""The triton ``lrp_linear``: launchers of the shrink / expand / pool-gradient kernels and the forward and backward
built from them. :mod:`pclr.backends.reference` defines every result; the kernels only change how many passes over
memory they take.

* Forward, by :class:`pclr.backends.base.LinearInputs`'s ``variant``:

  - ``fused``    one kernel: x·Wᵀ + b and the LRP term in the same K loop (each x tile read once); for
                 T ≤ DECODE_MAX_TOKENS a single launch with no token sort at all (decode).
  - ``extended`` / ``extended-tma``  S = x·A_effᵀ once per token, then one K-extended GEMM
                 [x | S]·[W | B_eff]ᵀ (:mod:`pclr.backends.triton.prefill`); the -tma form runs that GEMM with
                 tensor descriptors and a persistent schedule (:mod:`pclr.backends.triton.prefill_tma`, sm_90).
  - ``epilogue`` cuBLAS x·Wᵀ + b, then the LRP term added in place (shrink kernel S = x·A_effᵀ, then expand).
  - ``split``    shrink kernel, then one GEMM kernel with S·B_eff in its epilogue (no second pass over y).
  - ``auto``     by shape: see :func:`forward_variant`.
* Backward: shrink kernels for u = x·A_effᵀ and dS = dY·B_effᵀ (dY read once for dS; dB reads it per sample
  segment), dX = dY·W + dS·A_eff in one kernel (or cuBLAS + in-place LRP add, following the forward variant),
  per-sample segment reductions for dA/dB/dval, atomics or (deterministic) an ordered row reduction across samples.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from pclr.backends.base import LinearGrads, LinearInputs, LinearNeeds
from pclr.backends.triton import decode, prefill, prefill_tma
from pclr.backends.triton.configs import (
    INTERPRET,
    acc_types,
    block_r,
    expand_kernel,
    next_pow2,
    pool_grad_kernel,
    shrink_kernel,
)
from pclr.backends.triton.segments import (
    Tiles,
    decode_block_m,
    partial_row_targets,
    segment_tokens,
    tile_block_m,
)
from pclr.kernels import lrp_bwd as bwd_kernels
from pclr.options import (
    DECODE_MAX_TOKENS,
    FORWARD_VARIANTS,
    ForwardVariant,
    check_choice,
)

DVAL_TOKENS = 32  # tokens per step of segment_dval_kernel: two [32, BLOCK_R ≤ 128] fp32 tiles fit without spills


def forward_variant(T: int, d_out: int, requested: ForwardVariant) -> str:
    """The forward path that runs: ``requested`` unless it is "auto", which picks by shape.

    auto: at most DECODE_MAX_TOKENS tokens take the decode kernels ("decode": cuBLAS x·Wᵀ reads W once for the whole
    batch, then each pool row the batch uses is read once); more tokens take "extended" (S once per token, then one
    K-extended GEMM: executed FLOPs at the floor, and S kept for the backward).
    """
    check_choice("variant", requested, FORWARD_VARIANTS)
    if requested != "auto":
        return requested
    return "decode" if T <= DECODE_MAX_TOKENS else "extended"


def rows_or(s: Tensor | None, m: Tensor) -> Tensor:
    # the shared-row pointer is never dereferenced when n_s == 0 (all its lanes are masked)
    return m if s is None else s


def launch_shrink(X: Tensor, Ds: Tensor | None, Dm: Tensor, idx: Tensor, tiles: Tiles, R: int) -> Tensor:
    """S = X·Down_effᵀ per sample, unscaled: fp32 [T, BLOCK_R] in sorted token order.

    X [T, K]; Ds [n_s, K] | None; Dm [n, K]; idx int32 [B, r].
    """
    T, K = X.shape
    n_s = 0 if Ds is None else Ds.shape[0]
    assert Dm.shape[1] == K and (Ds is None or Ds.shape[1] == K)
    br = block_r(R)
    acc_t, acc = acc_types(X.dtype)
    sbuf = torch.empty((T, br), dtype=acc_t, device=X.device)
    if tiles.num_tiles == 0:
        return sbuf
    tok = tiles.tok if tiles.tok is not None else tiles.tile_start
    shrink_kernel[(tiles.num_tiles,)](
        X, rows_or(Ds, Dm), Dm, idx, sbuf, tok, tiles.tile_sample, tiles.tile_start, tiles.tile_end,
        T, K, Dm.shape[0], n_s, idx.shape[1], X.stride(0), Dm.stride(0), idx.stride(0), sbuf.stride(0),
        next_pow2(T), K,
        SORTED=tiles.tok is not None, BLOCK_M=tiles.block_m, BLOCK_R=br, ACC=acc,
    )
    return sbuf


def launch_expand(out: Tensor, X: Tensor, W: Tensor | None, w_strides: tuple[int, int], bias: Tensor | None,
                  Ds: Tensor | None, Dm: Tensor, Us: Tensor | None, Um: Tensor, idx: Tensor, val: Tensor,
                  beta_m: float, beta_s: float, *, tiles: Tiles | None, sot: Tensor, decode_bm: int = 0,
                  sbuf: Tensor | None = None, accumulate: bool = False) -> None:
    """out (+)= X·Wᵀ + bias + (scale ⊙ X·Down_effᵀ)·Up_eff, per sample.

    out [T, N]; X [T, K]; W viewed [N, K] with strides ``w_strides`` (None: no base product); bias [N] | None;
    Ds [n_s, K], Dm [n, K], Us [n_s, N], Um [n, N]; idx int32 [B, r]; val fp32 [B, r];
    sbuf: precomputed unscaled S (fp32 [T, BLOCK_R], sorted order) or None to compute it inline;
    decode_bm > 0: single-launch decode path (no tiles; programs = samples).
    """
    T, K = X.shape
    N = out.shape[1]
    B, r = idx.shape
    n_s = 0 if Us is None else Us.shape[0]
    assert out.shape[0] == T and Um.shape[1] == N and Dm.shape[1] == K
    br = block_r(n_s + r)
    has_base = W is not None
    decode = decode_bm > 0
    if decode:
        assert sbuf is None and T <= decode_bm
        n_prog, bm = B, decode_bm
        tok = t_sample = t_start = t_end = sot
        sorted_ = False
    else:
        n_prog, bm = tiles.num_tiles, tiles.block_m
        t_sample, t_start, t_end = tiles.tile_sample, tiles.tile_start, tiles.tile_end
        tok = tiles.tok if tiles.tok is not None else t_start
        sorted_ = tiles.tok is not None
    if n_prog == 0:
        return
    grid = lambda meta: (n_prog, triton.cdiv(N, meta["BLOCK_N"]))
    dummy = out
    expand_kernel[grid](
        X, W if has_base else dummy, bias if bias is not None else dummy, out,
        rows_or(Ds, Dm), Dm, rows_or(Us, Um), Um, idx, val, sbuf if sbuf is not None else dummy,
        tok, t_sample, t_start, t_end, sot,
        T, K, N, Dm.shape[0], n_s, r,
        X.stride(0), w_strides[0], w_strides[1], out.stride(0), Dm.stride(0), Um.stride(0), idx.stride(0),
        sbuf.stride(0) if sbuf is not None else 0,
        float(beta_m), float(beta_s),
        next_pow2(T), K, N,
        HAS_BASE=has_base, HAS_BIAS=bias is not None, ACCUMULATE=accumulate, S_FROM_BUF=sbuf is not None,
        K_LOOP=has_base or sbuf is None, SORTED=sorted_, DECODE=decode, BLOCK_M=bm, BLOCK_R=br,
        ACC=acc_types(X.dtype)[1],
    )


def launch_pool_grads(G: Tensor, X: Tensor, idx: Tensor, val: Tensor, trainable: Tensor | None, n: int,
                      n_s: int, beta_m: float, beta_s: float, tiles: Tiles, *, need_pool: bool, need_shared: bool,
                      deterministic: bool) -> Tensor:
    """Rank-row gradients Σ_samples (scale ⊙ G)ᵀ·X routed to rows: fp32 [n + n_s, D] (pool rows, then shared).

    G fp32 [T, BLOCK_R] (sorted order: dS for dA, u for dB); X [T, D] (x for dA, dY for dB).
    """
    T, D = X.shape
    B, r = idx.shape
    br = G.shape[1]
    train = None if trainable is None else trainable.to(torch.int8)
    tok = tiles.tok if tiles.tok is not None else tiles.seg_start
    atomic = not deterministic
    acc_t, acc = acc_types(X.dtype)
    if atomic:
        out = torch.zeros((n + n_s, D), dtype=acc_t, device=X.device)
    else:
        out = torch.empty((B * br, D), dtype=acc_t, device=X.device)
    grid = lambda meta: (B, triton.cdiv(D, meta["BLOCK_N"]))
    pool_grad_kernel[grid](
        G, X, out, idx, val, train if train is not None else idx, tok, tiles.seg_start, tiles.seg_count,
        D, n, n_s, r, G.stride(0), X.stride(0), out.stride(0), idx.stride(0), float(beta_m), float(beta_s),
        next_pow2(T), D,
        SORTED=tiles.tok is not None, ATOMIC=atomic, HAS_TRAIN=train is not None, NEED_POOL=need_pool,
        NEED_SHARED=need_shared, BLOCK_M=tiles.block_m, BLOCK_R=br, ACC=acc,
    )
    if atomic:
        return out
    # deterministic: group the partial rows by output row (stable sort), then sum each group in a fixed order
    tgt = partial_row_targets(idx, trainable, n, n_s, br, need_pool, need_shared)
    order = torch.argsort(tgt, stable=True).to(torch.int32)
    counts = torch.zeros(n + n_s + 1, dtype=torch.int64, device=X.device).scatter_add_(0, tgt, torch.ones_like(tgt))
    starts = (counts.cumsum(0) - counts).to(torch.int32)
    rows = torch.empty((n + n_s, D), dtype=acc_t, device=X.device)
    if n + n_s:
        bn = 64 if INTERPRET else 256
        bwd_kernels.segment_reduce_kernel[(n + n_s, triton.cdiv(D, bn))](
            out, rows, order, starts, counts.to(torch.int32), D, out.stride(0), rows.stride(0), BLOCK_N=bn, ACC=acc,
        )
    return rows


def launch_dval(dS: Tensor, u: Tensor, tiles: Tiles, B: int, n_s: int, r: int, beta_m: float) -> Tensor:
    """dval fp32 [B, r] = beta_m · Σ_{t in s} dS ⊙ u over the pool lanes (segment sum, deterministic)."""
    acc_t, acc = acc_types(dS.dtype)
    dval = torch.empty((B, r), dtype=acc_t, device=dS.device)
    if B:
        bwd_kernels.segment_dval_kernel[(B,)](
            dS, u, dval, tiles.seg_start, tiles.seg_count, n_s, r, dS.stride(0), dval.stride(0), float(beta_m),
            BLOCK_T=DVAL_TOKENS, BLOCK_R=dS.shape[1], ACC=acc,
        )
    return dval


def base_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight, bias)


def _empty(i: LinearInputs) -> bool:
    return i.x.shape[0] == 0 or i.idx.shape[0] == 0 or i.n_s + i.idx.shape[1] == 0


# The extended path's K-extended GEMM launcher by variant: the cp.async kernel, or the TMA + persistent one (sm_90;
# raises with its reasons where it cannot run). auto keeps the cp.async kernel until a GPU measurement says otherwise.
_EXTENDED = {"extended": prefill.launch_kext_gemm, "extended-tma": prefill_tma.kext_gemm_tma}


def _keeps_s(i: LinearInputs) -> bool:
    """Whether the forward of ``i`` runs the extended path, which returns S for the backward."""
    return not _empty(i) and forward_variant(i.x.shape[0], i.weight.shape[0], i.variant) in _EXTENDED


def linear_saved_like(i: LinearInputs) -> list[Tensor]:
    """Empty tensors shaped like what :func:`linear_forward` saves for ``i`` (for fake/meta tracing)."""
    return prefill.linear_saved_like(i) if _keeps_s(i) else []


def linear_forward(i: LinearInputs) -> tuple[Tensor, list[Tensor]]:
    """(y [T, d_out] = x·Wᵀ + b + LRP term, tensors saved for the backward), by the forward path of ``i.variant``
    (see the module docstring and :func:`forward_variant`)."""
    x, weight = i.x, i.weight
    T, d_out = x.shape[0], weight.shape[0]
    bias = None if i.bias is None else i.bias.contiguous()
    if _empty(i):
        return base_linear(x, weight, bias), []
    variant = forward_variant(T, d_out, i.variant)
    if variant in _EXTENDED:
        return prefill.linear_forward(i, _EXTENDED[variant])
    if variant == "decode":
        return decode.decode_forward(x, weight, bias, i.A_m, i.B_m, i.idx, i.val, i.A_s, i.B_s, i.beta_m, i.beta_s,
                                     i.sample_of_token), []
    return _variant_forward(i, variant, bias), []


def _variant_forward(i: LinearInputs, variant: str, bias: Tensor | None) -> Tensor:
    """The forward of the "fused", "split" and "epilogue" paths."""
    x, weight = i.x, i.weight
    T, d_out = x.shape[0], weight.shape[0]
    B, r = i.idx.shape
    R = i.n_s + r
    dec_bm = decode_block_m(T, B) if variant in ("fused", "epilogue") else 0
    tiles = None if dec_bm else segment_tokens(i.sample_of_token, B, i.padded_len, tile_block_m(T, B))
    rows = (i.A_s, i.A_m, i.B_s, i.B_m, i.idx, i.val, i.beta_m, i.beta_s)
    w_strides = (weight.stride(0), weight.stride(1))
    sot = i.sample_of_token
    if variant == "fused":
        y = torch.empty((T, d_out), dtype=x.dtype, device=x.device)
        launch_expand(y, x, weight, w_strides, bias, *rows, tiles=tiles, sot=sot, decode_bm=dec_bm)
        return y
    if variant == "split":
        y = torch.empty((T, d_out), dtype=x.dtype, device=x.device)
        sbuf = launch_shrink(x, i.A_s, i.A_m, i.idx, tiles, R)
        launch_expand(y, x, weight, w_strides, bias, *rows, tiles=tiles, sot=sot, sbuf=sbuf)
        return y
    y = base_linear(x, weight, bias)  # epilogue: cuBLAS base, LRP term added in place
    sbuf = None if dec_bm else launch_shrink(x, i.A_s, i.A_m, i.idx, tiles, R)
    launch_expand(y, x, None, (0, 0), None, *rows, tiles=tiles, sot=sot, decode_bm=dec_bm, sbuf=sbuf,
                  accumulate=True)
    return y


def linear_backward(grad: Tensor, i: LinearInputs, saved: list[Tensor], needs: LinearNeeds) -> LinearGrads:
    """The gradients named in ``needs`` (dA_m with dB_m, dA_s with dB_s); grad [T, d_out]. The extended path's
    backward starts from the S its forward saved (recomputed once when ``saved`` is empty, e.g. after the one-pass
    forward); the other paths recompute what they need."""
    if _keeps_s(i):
        return prefill.linear_backward(grad, i, saved, needs,
                                       _EXTENDED[forward_variant(i.x.shape[0], i.weight.shape[0], i.variant)])
    x, weight, A_m, B_m, A_s, B_s, idx, val = i.x, i.weight, i.A_m, i.B_m, i.A_s, i.B_s, i.idx, i.val
    T, d_out = x.shape[0], weight.shape[0]
    B, r = idx.shape
    n, n_s = A_m.shape[0], i.n_s
    need_pool, need_val, need_shared = needs.pool, needs.val, needs.shared and n_s > 0
    R = n_s + r
    out = LinearGrads()
    if T == 0 or B == 0 or R == 0:  # no token reaches a rank row: only the base gradient
        if needs.x:
            out.x = grad @ weight
        if need_pool:
            out.A_m, out.B_m = torch.zeros_like(A_m), torch.zeros_like(B_m)
        if need_val:
            out.val = torch.zeros(val.shape, dtype=val.dtype, device=val.device)
        if need_shared:
            out.A_s, out.B_s = torch.zeros_like(A_s), torch.zeros_like(B_s)
        return out
    sot = i.sample_of_token
    tiles = segment_tokens(sot, B, i.padded_len, tile_block_m(T, B))
    dS = launch_shrink(grad, B_s, B_m, idx, tiles, R)  # dY·B_effᵀ
    u = launch_shrink(x, A_s, A_m, idx, tiles, R) if (need_pool or need_shared or need_val) else None
    common = (idx, val, i.trainable, n, n_s, i.beta_m, i.beta_s, tiles)
    if needs.x:
        # dX = dY·W + (scale ⊙ dS)·A_eff: X := dY [T, d_out], W viewed [d_in, d_out] (strides swapped)
        wt = (weight.stride(1), weight.stride(0))
        if forward_variant(T, d_out, i.variant) == "epilogue":
            out.x = grad @ weight
            launch_expand(out.x, grad, None, (0, 0), None, B_s, B_m, A_s, A_m, idx, val, i.beta_m, i.beta_s,
                          tiles=tiles, sot=sot, sbuf=dS, accumulate=True)
        else:
            out.x = torch.empty_like(x)
            launch_expand(out.x, grad, weight, wt, None, B_s, B_m, A_s, A_m, idx, val, i.beta_m, i.beta_s,
                          tiles=tiles, sot=sot, sbuf=dS)
    if need_pool or need_shared:
        kw = {"need_pool": need_pool, "need_shared": need_shared, "deterministic": i.deterministic}
        gA = launch_pool_grads(dS, x, *common, **kw)
        gB = launch_pool_grads(u, grad, *common, **kw)
        if need_pool:
            out.A_m, out.B_m = gA[:n].to(A_m.dtype, copy=True), gB[:n].to(B_m.dtype, copy=True)
        if need_shared:
            out.A_s, out.B_s = gA[n:].to(A_s.dtype, copy=True), gB[n:].to(B_s.dtype, copy=True)
    if need_val:
        out.val = launch_dval(dS, u, tiles, B, n_s, r, i.beta_m).to(val.dtype)
    return out
