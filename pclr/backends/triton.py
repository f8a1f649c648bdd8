"""Triton backend: the fused gate and the fused gathered LRP forward/backward (kernels in :mod:`pclr.kernels`).

Order of this file: reference semantics → configs → token segmentation → launchers → registered ops → backend.

Reference semantics: :mod:`pclr.backends.reference` (``_forward``, ``_backward``, ``gate``) defines every result
here; the kernels only change how many passes over memory they take.

* Gate: :func:`pclr.kernels.gate.gate_scores_kernel` + :func:`pclr.kernels.gate.gate_topr_kernel`, grids sized by
  shapes, no host sync. Soft gates recompute the chosen scores in torch (B·r·d) so autograd reaches query and keys.
* Forward, selected by ``PCLR_TRITON_FWD``:

  - ``fused``    one kernel: x·Wᵀ + b and the LRP term in the same K loop (each x tile read once); for T ≤ 64 a
                 single launch with no token sort at all (decode).
  - ``epilogue`` cuBLAS x·Wᵀ + b, then the LRP term added in place (shrink kernel S = x·A_effᵀ, then expand).
  - ``split``    shrink kernel, then one GEMM kernel with S·B_eff in its epilogue (no second pass over y).
  - ``auto``     (default) by shape: see :func:`forward_variant`.
* Backward: shrink kernels for u = x·A_effᵀ and dS = dY·B_effᵀ (dY read once for dS; dB reads it per sample
  segment), dX = dY·W + dS·A_eff in one kernel (or cuBLAS + in-place LRP add, following the forward variant),
  per-sample segment reductions for dA/dB/dval, atomics or (deterministic) an ordered row reduction across samples.
* One pass: :func:`lrp_linear_one_pass` computes the gate and the gated LRP linear in one launch (see below).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pclr.backends.custom_op import call_linear_op, make_lrp_linear_op
from pclr.dispatch import GateInputs, LinearInputs

NAME = "triton"

try:
    import triton

    from pclr.kernels import gate as gate_kernels
    from pclr.kernels import lrp_bwd as bwd_kernels
    from pclr.kernels import lrp_fwd as fwd_kernels

    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # an absent or broken triton is a reason, never an import error of pclr
    triton = None
    _IMPORT_ERROR = f"triton is not importable: {type(exc).__name__}: {exc}"

# The interpreter is chosen when the kernels are decorated (import time), so that is the value that counts.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no")

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # + float64 under the CPU interpreter
DECODE_MAX_T = 64  # the single-launch decode path holds all tokens in one BLOCK_M tile
MAX_BLOCK_R = 512  # n_s + r active ranks held as one register tile
MAX_GATE_N = 16384  # top-r holds one score row in registers
FWD_VARIANTS = ("fused", "epilogue", "split", "auto")


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _block_r(R: int) -> int:
    return max(16, _next_pow2(R))  # tl.dot needs every dim ≥ 16


def _acc(dtype: torch.dtype) -> tuple[torch.dtype, object]:
    """Accumulation dtype (torch, triton): fp32, or fp64 for fp64 inputs (the CPU interpreter only)."""
    if dtype == torch.float64:
        return torch.float64, triton.language.float64
    return torch.float32, triton.language.float32


# ---------------------------------------------------------------------------------------------------------------
# Configs. Autotuning keys only on shape buckets (key_t = next_pow2(T), model dims) so serving shapes do not re-tune
# every call. Configs that do not fit the device's shared memory are pruned (flash-attn layer_norm style). Under the
# interpreter a single small config, no sweep.
# ---------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _smem_limit(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", getattr(props, "shared_memory_per_block", 49152)))


def _smem_of(cfg, meta: dict, extra_cols: int) -> int:
    """Rough pipelined shared memory of a GEMM-like config: stages × (x tile + W tile + rank tile)."""
    bm, br = meta.get("BLOCK_M", 64), meta.get("BLOCK_R", 16)
    bn, bk = cfg.kwargs.get("BLOCK_N", 0), cfg.kwargs.get("BLOCK_K", 0)
    x = meta.get("X")
    esize = x.element_size() if isinstance(x, Tensor) else 2
    per_stage = (bm * bk + bk * bn + bk * br * extra_cols) * esize
    return max(1, cfg.num_stages) * per_stage + br * max(bn, 1) * esize


def _prune(configs, named_args, **kwargs):
    meta = {**named_args, **kwargs}
    x = meta.get("X")
    if not isinstance(x, Tensor) or x.device.type != "cuda":
        return configs[:1]
    limit = _smem_limit(x.device.index if x.device.index is not None else torch.cuda.current_device())
    bm = meta.get("BLOCK_M", 64)
    fits = [c for c in configs
            if _smem_of(c, meta, 1) <= limit
            and bm * c.kwargs.get("BLOCK_N", 64) <= 128 * 32 * c.num_warps]  # fp32 acc ≤ 128 regs/thread
    return fits or [min(configs, key=lambda c: _smem_of(c, meta, 1))]


def _configs(kind: str):
    if INTERPRET:
        small = {"expand": {"BLOCK_N": 64, "BLOCK_K": 64}, "shrink": {"BLOCK_K": 64}, "pool": {"BLOCK_N": 64}}[kind]
        return [triton.Config(small, num_warps=4, num_stages=1)]
    if kind == "expand":
        return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
                for bn in (64, 128, 256) for bk in (32, 64) for w in (4, 8) for st in (3, 4)]
    if kind == "shrink":
        return [triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=st)
                for bk in (32, 64, 128) for w in (4, 8) for st in (2, 3, 4)]
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3)]


if triton is not None:
    _expand = triton.autotune(
        configs=_configs("expand"),
        key=["key_t", "key_k", "key_n", "BLOCK_M", "BLOCK_R", "HAS_BASE", "S_FROM_BUF", "DECODE"],
        prune_configs_by={"early_config_prune": _prune},
        restore_value=["OUT"],  # ACCUMULATE adds in place: each tuning run must start from the same OUT
    )(fwd_kernels.lrp_expand_kernel)
    _shrink = triton.autotune(
        configs=_configs("shrink"), key=["key_t", "key_k", "BLOCK_M", "BLOCK_R"],
        prune_configs_by={"early_config_prune": _prune},
    )(fwd_kernels.lrp_shrink_kernel)
    _one_pass = triton.autotune(
        configs=_configs("expand"), key=["key_t", "key_k", "key_n", "BLOCK_M", "BLOCK_R", "DECODE"],
        prune_configs_by={"early_config_prune": _prune},
    )(fwd_kernels.lrp_one_pass_kernel)
    _pool_grad = triton.autotune(
        configs=_configs("pool"), key=["key_t", "key_d", "BLOCK_M", "BLOCK_R", "ATOMIC"],
        reset_to_zero=["OUT"],  # atomics accumulate: each tuning run starts from zero
    )(bwd_kernels.pool_grad_kernel)


def forward_variant(T: int, B: int, d_in: int, d_out: int, R: int) -> str:
    """The forward variant for a shape: ``PCLR_TRITON_FWD`` when set to a variant, else by shape.

    auto: decode-sized batches (T ≤ 64) and narrow outputs take the single fused kernel (the redundant S per output
    tile costs R/BLOCK_N extra FLOPs, small there); large prefill shapes take the cuBLAS epilogue, whose extra cost is
    one more pass over x and y.
    """
    env = os.environ.get("PCLR_TRITON_FWD", "auto").strip().lower() or "auto"
    if env not in FWD_VARIANTS:
        raise ValueError(f"PCLR_TRITON_FWD must be one of {FWD_VARIANTS}, got {env!r}")
    if env != "auto":
        return env
    if T <= DECODE_MAX_T or d_out <= 512:
        return "fused"
    return "epilogue"


def _decode_block_m(T: int, B: int) -> int:
    """BLOCK_M of the single-launch decode path, or 0 when that path would waste too much (many samples)."""
    if T == 0 or T > DECODE_MAX_T:
        return 0
    bm = max(16, _next_pow2(T))
    return bm if B * bm <= 512 else 0


# ---------------------------------------------------------------------------------------------------------------
# Token segmentation (punica-style token → sample mapping), on device, sized by shapes only.
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Tiles:
    """Tokens grouped by sample and cut into tiles of BLOCK_M tokens of one sample.

    tok: int32 [T] token row of each sorted position (None: positions are token rows, x was [B, L]);
    seg_start, seg_count: int32 [B] each sample's range of sorted positions;
    tile_sample, tile_start, tile_end: int32 [num_tiles] (unused slots have start == end);
    """

    tok: Optional[Tensor]
    seg_start: Tensor
    seg_count: Tensor
    tile_sample: Tensor
    tile_start: Tensor
    tile_end: Tensor
    block_m: int

    @property
    def num_tiles(self) -> int:
        return self.tile_sample.shape[0]


def tile_block_m(T: int, B: int) -> int:
    """Tokens per tile: the mean tokens per sample, a power of two in [16, 128] (64 under the interpreter)."""
    per_sample = -(-T // max(1, min(B, T)))
    return min(64 if INTERPRET else 128, max(16, _next_pow2(per_sample)))


_TILE_CACHE: dict = {}


def segment_tokens(sot: Tensor, num_samples: int, padded_len: int, block_m: int) -> Tiles:
    """Group tokens by sample and build the tile map without a host sync (CUDA-graph capturable).

    sot: int32 [T]. The number of tile slots is a bound from shapes: Σ_b ceil(c_b / M) ≤ ceil(T / M) + min(B, T).
    The result is cached per ``sot`` object (the same mapping serves every linear of a forward).
    """
    capturing = sot.is_cuda and torch.cuda.is_current_stream_capturing()
    key = (id(sot), sot._version, num_samples, padded_len, block_m)
    hit = None if capturing else _TILE_CACHE.get(key)
    if hit is not None and hit[0] is sot:
        return hit[1]
    T, B, dev = sot.shape[0], num_samples, sot.device
    if padded_len:
        tok = None
        counts = torch.full((B,), padded_len, dtype=torch.int64, device=dev)
        max_tiles = B * -(-padded_len // block_m)
    else:
        s64 = sot.long()
        tok = torch.argsort(s64, stable=True).to(torch.int32)
        # scatter_add, not bincount: bincount on CUDA reads the max back to the host
        counts = torch.zeros(B, dtype=torch.int64, device=dev).scatter_add_(0, s64, torch.ones_like(s64))
        max_tiles = -(-T // block_m) + min(B, T)
    starts = counts.cumsum(0) - counts
    tiles = (counts + block_m - 1) // block_m
    tcum = tiles.cumsum(0)
    slot = torch.arange(max_tiles, device=dev)
    samp = torch.searchsorted(tcum, slot, right=True)
    valid = samp < B
    sc = samp.clamp(max=max(B - 1, 0))
    t_start = starts[sc] + (slot - (tcum[sc] - tiles[sc])) * block_m
    t_end = torch.minimum(t_start + block_m, starts[sc] + counts[sc])
    zero = torch.zeros_like(t_start)
    tiles_ = Tiles(
        tok=tok, seg_start=starts.to(torch.int32), seg_count=counts.to(torch.int32),
        tile_sample=sc.to(torch.int32), tile_start=torch.where(valid, t_start, zero).to(torch.int32),
        tile_end=torch.where(valid, t_end, zero).to(torch.int32), block_m=block_m,
    )
    if not capturing:
        if len(_TILE_CACHE) >= 8:
            _TILE_CACHE.clear()
        _TILE_CACHE[key] = (sot, tiles_)
    return tiles_


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


def _rows(s: Optional[Tensor], m: Tensor) -> Tensor:
    # the shared-row pointer is never dereferenced when n_s == 0 (all its lanes are masked)
    return m if s is None else s


def launch_shrink(X: Tensor, Ds: Optional[Tensor], Dm: Tensor, idx: Tensor, tiles: Tiles, R: int) -> Tensor:
    """S = X·Down_effᵀ per sample, unscaled: fp32 [T, BLOCK_R] in sorted token order.

    X [T, K]; Ds [n_s, K] | None; Dm [n, K]; idx int32 [B, r].
    """
    T, K = X.shape
    n_s = 0 if Ds is None else Ds.shape[0]
    assert Dm.shape[1] == K and (Ds is None or Ds.shape[1] == K)
    br = _block_r(R)
    acc_t, acc = _acc(X.dtype)
    sbuf = torch.empty((T, br), dtype=acc_t, device=X.device)
    if tiles.num_tiles == 0:
        return sbuf
    tok = tiles.tok if tiles.tok is not None else tiles.tile_start
    _shrink[(tiles.num_tiles,)](
        X, _rows(Ds, Dm), Dm, idx, sbuf, tok, tiles.tile_sample, tiles.tile_start, tiles.tile_end,
        T, K, n_s, idx.shape[1], X.stride(0), Dm.stride(0), idx.stride(0), sbuf.stride(0),
        _next_pow2(T), K,
        SORTED=tiles.tok is not None, BLOCK_M=tiles.block_m, BLOCK_R=br, ACC=acc,
    )
    return sbuf


def launch_expand(out: Tensor, X: Tensor, W: Optional[Tensor], w_strides: tuple[int, int], bias: Optional[Tensor],
                  Ds: Optional[Tensor], Dm: Tensor, Us: Optional[Tensor], Um: Tensor, idx: Tensor, val: Tensor,
                  beta_m: float, beta_s: float, *, tiles: Optional[Tiles], sot: Tensor, decode_bm: int = 0,
                  sbuf: Optional[Tensor] = None, accumulate: bool = False) -> None:
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
    br = _block_r(n_s + r)
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
    grid = lambda meta: (n_prog, triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    dummy = out
    _expand[grid](
        X, W if has_base else dummy, bias if bias is not None else dummy, out,
        _rows(Ds, Dm), Dm, _rows(Us, Um), Um, idx, val, sbuf if sbuf is not None else dummy,
        tok, t_sample, t_start, t_end, sot,
        T, K, N, n_s, r,
        X.stride(0), w_strides[0], w_strides[1], out.stride(0), Dm.stride(0), Um.stride(0), idx.stride(0),
        sbuf.stride(0) if sbuf is not None else 0,
        float(beta_m), float(beta_s),
        _next_pow2(T), K, N,
        HAS_BASE=has_base, HAS_BIAS=bias is not None, ACCUMULATE=accumulate, S_FROM_BUF=sbuf is not None,
        K_LOOP=has_base or sbuf is None, SORTED=sorted_, DECODE=decode, BLOCK_M=bm, BLOCK_R=br,
        ACC=_acc(X.dtype)[1],
    )


def _pool_targets(idx: Tensor, trainable: Optional[Tensor], n: int, n_s: int, br: int, need_pool: bool,
                  need_shared: bool) -> Tensor:
    """Output row of each per-sample partial row [B * BLOCK_R]: pool row, n + shared row, or n + n_s (dropped)."""
    B, r = idx.shape
    drop = n + n_s
    tgt = torch.full((B, br), drop, dtype=torch.int64, device=idx.device)
    if need_shared and n_s:
        tgt[:, :n_s] = torch.arange(n, n + n_s, device=idx.device)
    if need_pool:
        rows = idx.long()
        if trainable is not None:  # frozen rows: no contribution at all, their gradient stays exactly zero
            rows = torch.where(trainable[rows], rows, torch.full_like(rows, drop))
        tgt[:, n_s:n_s + r] = rows
    return tgt.reshape(-1)


def launch_pool_grads(G: Tensor, X: Tensor, idx: Tensor, val: Tensor, trainable: Optional[Tensor], n: int,
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
    acc_t, acc = _acc(X.dtype)
    if atomic:
        out = torch.zeros((n + n_s, D), dtype=acc_t, device=X.device)
    else:
        out = torch.empty((B * br, D), dtype=acc_t, device=X.device)
    grid = lambda meta: (B, triton.cdiv(D, meta["BLOCK_N"]))  # noqa: E731
    _pool_grad[grid](
        G, X, out, idx, val, train if train is not None else idx, tok, tiles.seg_start, tiles.seg_count,
        D, n, n_s, r, G.stride(0), X.stride(0), out.stride(0), idx.stride(0), float(beta_m), float(beta_s),
        _next_pow2(T), D,
        SORTED=tiles.tok is not None, ATOMIC=atomic, HAS_TRAIN=train is not None, NEED_POOL=need_pool,
        NEED_SHARED=need_shared, BLOCK_M=tiles.block_m, BLOCK_R=br, ACC=acc,
    )
    if atomic:
        return out
    # deterministic: group the partial rows by output row (stable sort), then sum each group in a fixed order
    tgt = _pool_targets(idx, trainable, n, n_s, br, need_pool, need_shared)
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
    acc_t, acc = _acc(dS.dtype)
    dval = torch.empty((B, r), dtype=acc_t, device=dS.device)
    if B:
        bwd_kernels.segment_dval_kernel[(B,)](
            dS, u, dval, tiles.seg_start, tiles.seg_count, n_s, r, dS.stride(0), dval.stride(0), float(beta_m),
            BLOCK_M=tiles.block_m, BLOCK_R=dS.shape[1], ACC=acc,
        )
    return dval


def _base(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return F.linear(x, weight, bias)


def _lrp_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], A_m: Tensor, B_m: Tensor, idx: Tensor,
                 val: Tensor, A_s: Optional[Tensor], B_s: Optional[Tensor], sot: Tensor,
                 trainable: Optional[Tensor], beta_m: float, beta_s: float, padded_len: int,
                 deterministic: bool) -> Tensor:
    """y [T, d_out] = x·Wᵀ + b + LRP term. x [T, d_in]; see :class:`pclr.dispatch.LinearInputs`."""
    T, d_in = x.shape
    d_out = weight.shape[0]
    B, r = idx.shape
    n_s = 0 if A_s is None else A_s.shape[0]
    R = n_s + r
    bias = None if bias is None else bias.contiguous()
    if T == 0 or B == 0 or R == 0:
        return _base(x, weight, bias)
    variant = forward_variant(T, B, d_in, d_out, R)
    decode_bm = _decode_block_m(T, B) if variant in ("fused", "epilogue") else 0
    tiles = None if decode_bm else segment_tokens(sot, B, padded_len, tile_block_m(T, B))
    args = (A_s, A_m, B_s, B_m, idx, val, beta_m, beta_s)
    if variant == "fused":
        y = torch.empty((T, d_out), dtype=x.dtype, device=x.device)
        launch_expand(y, x, weight, (weight.stride(0), weight.stride(1)), bias, *args, tiles=tiles, sot=sot,
                      decode_bm=decode_bm)
        return y
    if variant == "split":
        y = torch.empty((T, d_out), dtype=x.dtype, device=x.device)
        sbuf = launch_shrink(x, A_s, A_m, idx, tiles, R)
        launch_expand(y, x, weight, (weight.stride(0), weight.stride(1)), bias, *args, tiles=tiles, sot=sot,
                      sbuf=sbuf)
        return y
    y = _base(x, weight, bias)  # epilogue: cuBLAS base, LRP term added in place
    sbuf = None if decode_bm else launch_shrink(x, A_s, A_m, idx, tiles, R)
    launch_expand(y, x, None, (0, 0), None, *args, tiles=tiles, sot=sot, decode_bm=decode_bm, sbuf=sbuf,
                  accumulate=True)
    return y


def _lrp_backward(grad: Tensor, x: Tensor, weight: Tensor, A_m: Tensor, B_m: Tensor, idx: Tensor, val: Tensor,
                  A_s: Optional[Tensor], B_s: Optional[Tensor], sot: Tensor, trainable: Optional[Tensor],
                  beta_m: float, beta_s: float, padded_len: int, deterministic: bool, needs):
    """(dx, dA_m, dB_m, dval, dA_s, dB_s), each None when not in ``needs`` = (x, pool, val, shared)."""
    need_x, need_pool, need_val, need_shared = needs
    T, d_in = x.shape
    d_out = weight.shape[0]
    B, r = idx.shape
    n = A_m.shape[0]
    n_s = 0 if A_s is None else A_s.shape[0]
    need_shared = need_shared and n_s > 0
    R = n_s + r
    dx = dA_m = dB_m = dval = dA_s = dB_s = None
    if T == 0 or B == 0 or R == 0:  # no token reaches a rank row: only the base gradient
        if need_x:
            dx = grad @ weight
        if need_pool:
            dA_m, dB_m = torch.zeros_like(A_m), torch.zeros_like(B_m)
        if need_val:
            dval = torch.zeros(val.shape, dtype=val.dtype, device=val.device)
        if need_shared:
            dA_s, dB_s = torch.zeros_like(A_s), torch.zeros_like(B_s)
        return dx, dA_m, dB_m, dval, dA_s, dB_s
    tiles = segment_tokens(sot, B, padded_len, tile_block_m(T, B))
    dS = launch_shrink(grad, B_s, B_m, idx, tiles, R)  # dY·B_effᵀ
    u = launch_shrink(x, A_s, A_m, idx, tiles, R) if (need_pool or need_shared or need_val) else None
    common = (idx, val, trainable, n, n_s, beta_m, beta_s, tiles)
    if need_x:
        # dX = dY·W + (scale ⊙ dS)·A_eff: X := dY [T, d_out], W viewed [d_in, d_out] (strides swapped)
        wt = (weight.stride(1), weight.stride(0))
        if forward_variant(T, B, d_in, d_out, R) == "epilogue":
            dx = grad @ weight
            launch_expand(dx, grad, None, (0, 0), None, B_s, B_m, A_s, A_m, idx, val, beta_m, beta_s,
                          tiles=tiles, sot=sot, sbuf=dS, accumulate=True)
        else:
            dx = torch.empty_like(x)
            launch_expand(dx, grad, weight, wt, None, B_s, B_m, A_s, A_m, idx, val, beta_m, beta_s,
                          tiles=tiles, sot=sot, sbuf=dS)
    if need_pool or need_shared:
        kw = dict(need_pool=need_pool, need_shared=need_shared, deterministic=deterministic)
        gA = launch_pool_grads(dS, x, *common, **kw)
        gB = launch_pool_grads(u, grad, *common, **kw)
        if need_pool:
            dA_m, dB_m = gA[:n].to(A_m.dtype, copy=True), gB[:n].to(B_m.dtype, copy=True)
        if need_shared:
            dA_s, dB_s = gA[n:].to(A_s.dtype, copy=True), gB[n:].to(B_s.dtype, copy=True)
    if need_val:
        dval = launch_dval(dS, u, tiles, B, n_s, r, beta_m).to(val.dtype)
    return dx, dA_m, dB_m, dval, dA_s, dB_s


# ---------------------------------------------------------------------------------------------------------------
# Gate
# ---------------------------------------------------------------------------------------------------------------


def launch_gate(query: list[Tensor], keys: list[Tensor], weights: list[float], r: int,
                candidates: Optional[Tensor], scope: str, mode: str) -> tuple[Tensor, Tensor]:
    """idx int32 [B, r], val fp32 [B, r]. query_p [B, d_p], keys_p [n, d_p]; candidates bool [n] | [B, n]."""
    B, n = query[0].shape[0], keys[0].shape[0]
    dev = keys[0].device
    # the reference scores in fp64 when any part is fp64 (and returns soft val in fp64 then)
    f64 = any(t.dtype == torch.float64 for t in list(query) + list(keys))
    acc_t, acc = _acc(torch.float64 if f64 else torch.float32)
    idx = torch.empty((B, r), dtype=torch.int32, device=dev)
    val = torch.empty((B, r), dtype=acc_t if mode == "soft" else torch.float32, device=dev)
    if B == 0 or r == 0:
        return idx, val
    scores = torch.empty((B, n), dtype=acc_t, device=dev)
    bb, bnk, bd = 16, (32 if INTERPRET else 64), 64
    q = [t.contiguous() for t in query]
    k = [t.contiguous() for t in keys]
    for p in range(0, len(q), 2):  # two parts per launch; more parts accumulate
        two = p + 1 < len(q)
        q2, k2 = (q[p + 1], k[p + 1]) if two else (q[p], k[p])
        gate_kernels.gate_scores_kernel[(triton.cdiv(n, bnk), triton.cdiv(B, bb))](
            scores, q[p], k[p], q2, k2, B, n, k[p].shape[1], k2.shape[1],
            scores.stride(0), q[p].stride(0), k[p].stride(0), q2.stride(0), k2.stride(0),
            float(weights[p]), float(weights[p + 1]) if two else 0.0,
            TWO_PARTS=two, ACCUMULATE=p > 0, BLOCK_B=bb, BLOCK_N=bnk, BLOCK_D=bd, ACC=acc,
        )
    cand = None
    if candidates is not None:
        cand = candidates.to(torch.int8).contiguous()
    batch = scope == "batch"
    block_n = _next_pow2(n)
    gate_kernels.gate_topr_kernel[(1 if batch else B,)](
        scores, cand if cand is not None else idx, idx, val, B, n, r,
        scores.stride(0), (cand.stride(0) if cand is not None and cand.dim() == 2 else 0), idx.stride(0),
        HAS_CAND=cand is not None, BATCH=batch, SOFT=mode == "soft",
        BLOCK_N=block_n, BLOCK_R=_next_pow2(r), num_warps=4 if block_n <= 1024 else 8,
    )
    return idx, val


def chosen_scores(query: tuple[Tensor, ...], keys: tuple[Tensor, ...], weights: tuple[float, ...],
                  idx: Tensor) -> Tensor:
    """val [B, r] = Σ_p w_p·cos(q_p[b], K_p[idx[b, k]]), differentiable: only the B·r chosen scores (cheap)."""
    i = idx.long()
    dt = torch.float64 if any(t.dtype == torch.float64 for t in query + keys) else torch.float32
    out = None
    for q, k, w in zip(query, keys, weights):
        qn = F.normalize(q.to(dt), dim=-1)  # [B, d]
        kn = F.normalize(k.to(dt)[i], dim=-1)  # [B, r, d]
        s = w * torch.einsum("bd,brd->br", qn, kn)
        out = s if out is None else out + s
    return out


# ---------------------------------------------------------------------------------------------------------------
# Registered ops (torch.library custom ops with fake implementations: torch.compile(fullgraph=True) traces them)
# ---------------------------------------------------------------------------------------------------------------

lrp_linear_op = make_lrp_linear_op(NAME, _lrp_forward, _lrp_backward)


@torch.library.custom_op("pclr::triton_lrp_gate", mutates_args=())
def lrp_gate_op(query: list[Tensor], keys: list[Tensor], weights: list[float], r: int,
                candidates: Optional[Tensor], scope: str, mode: str) -> tuple[Tensor, Tensor]:
    return launch_gate(query, keys, weights, r, candidates, scope, mode)


@lrp_gate_op.register_fake
def _(query, keys, weights, r, candidates, scope, mode):
    B = query[0].shape[0]
    f64 = mode == "soft" and any(t.dtype == torch.float64 for t in list(query) + list(keys))
    return (keys[0].new_empty((B, r), dtype=torch.int32),
            keys[0].new_empty((B, r), dtype=torch.float64 if f64 else torch.float32))


# ---------------------------------------------------------------------------------------------------------------
# One pass: the per-sample gate in the prologue of the fused LRP linear (one launch, no separate gate)
# ---------------------------------------------------------------------------------------------------------------


def launch_one_pass(x: Tensor, weight: Tensor, bias: Optional[Tensor], A_m: Tensor, B_m: Tensor,
                    A_s: Optional[Tensor], B_s: Optional[Tensor], query: list[Tensor], keys: list[Tensor],
                    weights: list[float], r: int, candidates: Optional[Tensor], soft: bool, sot: Tensor,
                    beta_m: float, beta_s: float, padded_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """(y [T, d_out], idx int32 [B, r], val fp32 [B, r]); x [T, d_in], query_p [B, d_p], keys_p [n, d_p] (≤ 2 parts)."""
    T, d_in = x.shape
    d_out, n = weight.shape[0], A_m.shape[0]
    B = query[0].shape[0]
    n_s = 0 if A_s is None else A_s.shape[0]
    assert len(query) == len(keys) <= 2 and 1 <= r <= n and keys[0].shape[0] == n
    dev = x.device
    y = torch.empty((T, d_out), dtype=x.dtype, device=dev)
    idx = torch.empty((B, r), dtype=torch.int32, device=dev)
    val = torch.empty((B, r), dtype=torch.float32, device=dev)
    if B == 0:
        return _base(x, weight, bias), idx, val
    decode_bm = _decode_block_m(T, B)
    tiles = None if decode_bm or T == 0 else segment_tokens(sot, B, padded_len, tile_block_m(T, B))
    n_lrp = B if decode_bm else (tiles.num_tiles if tiles is not None else 0)
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
    grid = lambda meta: (n_lrp + B, triton.cdiv(d_out, meta["BLOCK_N"]))  # noqa: E731
    _one_pass[grid](
        x, weight, bias if bias is not None else y, y, _rows(A_s, A_m), A_m, _rows(B_s, B_m), B_m,
        q[0], k[0], q2, k2, cand if cand is not None else idx, idx, val,
        tok, t_sample, t_start, t_end, sot if T else idx,
        T, d_in, d_out, n, n_s, r, k[0].shape[1], k2.shape[1], n_lrp,
        x.stride(0), weight.stride(0), y.stride(0), A_m.stride(0), B_m.stride(0),
        q[0].stride(0), k[0].stride(0), q2.stride(0), k2.stride(0),
        (cand.stride(0) if cand is not None and cand.dim() == 2 else 0), idx.stride(0),
        float(weights[0]), float(weights[1]) if two else 0.0, float(beta_m), float(beta_s),
        _next_pow2(T), d_in, d_out,
        HAS_BIAS=bias is not None, TWO_PARTS=two, HAS_CAND=cand is not None, SOFT=soft,
        SORTED=tiles is not None and tiles.tok is not None, DECODE=tiles is None,
        BLOCK_M=decode_bm or (tiles.block_m if tiles is not None else 16), BLOCK_R=_block_r(n_s + r),
        BLOCK_NK=max(16, _next_pow2(n)), BLOCK_D=32 if n > 1024 else 64,
    )
    return y, idx, val


@torch.library.custom_op("pclr::triton_lrp_one_pass", mutates_args=())
def lrp_one_pass_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], A_m: Tensor, B_m: Tensor, A_s: Optional[Tensor],
    B_s: Optional[Tensor], query: list[Tensor], keys: list[Tensor], weights: list[float], r: int,
    candidates: Optional[Tensor], soft: bool, sample_of_token: Tensor, trainable: Optional[Tensor],
    beta_m: float, beta_s: float, padded_len: int, deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return launch_one_pass(x, weight, bias, A_m, B_m, A_s, B_s, query, keys, weights, r, candidates, soft,
                           sample_of_token, beta_m, beta_s, padded_len)


@lrp_one_pass_op.register_fake
def _(x, weight, bias, A_m, B_m, A_s, B_s, query, keys, weights, r, candidates, soft, sample_of_token, trainable,
      beta_m, beta_s, padded_len, deterministic):
    B = query[0].shape[0]
    return (x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((B, r), dtype=torch.int32),
            x.new_empty((B, r), dtype=torch.float32))


def _one_pass_setup(ctx, inputs, output):
    (x, weight, bias, A_m, B_m, A_s, B_s, query, keys, weights, r, cand, soft, sot, trainable, beta_m, beta_s,
     padded_len, det) = inputs
    _, idx, val = output
    ctx.n_parts = len(query)
    ctx.weights = tuple(weights)
    ctx.qk_grad = bool(soft) and any(t.requires_grad for t in list(query) + list(keys))
    ctx.scalars = (beta_m, beta_s, padded_len, det)
    ctx.save_for_backward(x, weight, A_m, B_m, A_s, B_s, idx, val, sot, trainable, *query, *keys)


def _one_pass_backward(ctx, grad_y, grad_idx, grad_val):
    x, weight, A_m, B_m, A_s, B_s, idx, val, sot, trainable, *qk = ctx.saved_tensors
    query, keys = qk[:ctx.n_parts], qk[ctx.n_parts:]
    ng = ctx.needs_input_grad
    need_x, need_pool = ng[0], ng[3] or ng[4]
    need_shared = A_s is not None and (ng[5] or ng[6])
    need_val = ctx.qk_grad
    dx, dA, dB, dval, dAs, dBs = torch.ops.pclr.triton_lrp_linear_backward(
        grad_y.contiguous(), x, weight, A_m, B_m, idx, val, A_s, B_s, sot, trainable, *ctx.scalars,
        need_x, need_pool, need_val, need_shared)
    dq, dk = [None] * ctx.n_parts, [None] * ctx.n_parts  # list inputs take a list of gradients
    if need_val:
        total = dval if grad_val is None else dval + grad_val
        with torch.enable_grad():  # soft gate: route dval through the chosen scores (B·r·d) to query and keys
            qs = [t.detach().requires_grad_(True) for t in query]
            ks = [t.detach().requires_grad_(True) for t in keys]
            v = chosen_scores(tuple(qs), tuple(ks), ctx.weights, idx)
            grads = torch.autograd.grad(v, qs + ks, total, allow_unused=True)
        dq, dk = list(grads[:ctx.n_parts]), list(grads[ctx.n_parts:])
    return (dx if need_x else None, None, None, dA if ng[3] else None, dB if ng[4] else None,
            dAs if need_shared and ng[5] else None, dBs if need_shared and ng[6] else None, dq, dk,
            None, None, None, None, None, None, None, None, None, None)


lrp_one_pass_op.register_autograd(_one_pass_backward, setup_context=_one_pass_setup)


def lrp_linear_one_pass(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], A_m: Tensor, B_m: Tensor,
    query, keys, r: int, *, weights=None, candidates: Optional[Tensor] = None,
    A_s: Optional[Tensor] = None, B_s: Optional[Tensor] = None, beta_m: float = 1.0, beta_s: float = 1.0,
    sample_of_token: Optional[Tensor] = None, mode: str = "hard", trainable: Optional[Tensor] = None,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gate and gated LRP linear in a single launch (per-sample scope): returns (y, idx, val).

    Same result as ``idx, val = lrp_gate(query, keys, r, weights=..., candidates=..., mode=...)`` followed by
    ``lrp_linear(x, weight, bias, A_m, B_m, idx, val, ...)``; idx/val are returned for reuse and for the backward.

    Args:
        x: [B, L, d_in] or packed [T, d_in] with ``sample_of_token`` int [T].
        query: [B, d_q] or a tuple of at most two parts; keys: [n, d_q] or the matching tuple.
        r: experts per sample; weights: per-part weights (default 1 each); candidates: bool [n] or [B, n].
        mode: "hard" (val = 1) or "soft" (val = score, gradients reach query and keys).
        Other arguments as :func:`pclr.lrp_linear`.
    """
    from pclr.dispatch import BackendUnavailableError

    q = (query,) if isinstance(query, Tensor) else tuple(query)
    k = (keys,) if isinstance(keys, Tensor) else tuple(keys)
    w = [1.0] * len(q) if weights is None else [float(v) for v in weights]
    if not (len(q) == len(k) == len(w)) or not 1 <= len(q) <= 2:
        raise ValueError(f"one pass takes 1 or 2 query/key parts with matching weights, got {len(q)}/{len(k)}/{len(w)}")
    if mode not in ("hard", "soft"):
        raise ValueError(f"mode must be 'hard' or 'soft', got {mode!r}")
    B, n = q[0].shape[0], A_m.shape[0]
    if not 1 <= r <= n or any(t.shape[0] != n for t in k) or any(t.shape[0] != B for t in q):
        raise ValueError(f"need 1 <= r <= n and keys [n={n}, d], query [B={B}, d]; got r={r}")
    d_out = weight.shape[0]
    if x.dim() == 3:
        if x.shape[0] != B:
            raise ValueError(f"x has batch {x.shape[0]} but query has {B} rows")
        padded_len = x.shape[1]
        x2 = x.reshape(-1, x.shape[-1])
        sot = torch.arange(B, device=x.device, dtype=torch.int32).repeat_interleave(padded_len)
    else:
        if sample_of_token is None:
            raise ValueError("packed x [T, d_in] needs sample_of_token (int [T])")
        padded_len, x2, sot = 0, x, sample_of_token.to(torch.int32).contiguous()
    why = _device_reasons(x.device) + _dtype_reasons("x", x.dtype, x.device)
    if x.dtype == torch.float64 or any(t.dtype == torch.float64 for t in q + k):
        why.append("the one-pass kernel computes in float32 (float16/bfloat16/float32 inputs); got float64")
    for p, (qp, kp) in enumerate(zip(q, k)):
        why += _dtype_reasons(f"query[{p}]", qp.dtype, qp.device) + _dtype_reasons(f"keys[{p}]", kp.dtype, kp.device)
    if _IMPORT_ERROR is not None:
        why = [_IMPORT_ERROR]
    if why:
        raise BackendUnavailableError("triton one pass cannot run: " + "; ".join(why))
    if A_s is not None and A_s.shape[0] == 0:
        A_s = B_s = None
    y, idx, val = lrp_one_pass_op(
        x2.contiguous(), weight.contiguous(), bias, A_m.contiguous(), B_m.contiguous(),
        None if A_s is None else A_s.contiguous(), None if B_s is None else B_s.contiguous(), list(q), list(k), w,
        int(r), candidates, mode == "soft", sot, trainable, float(beta_m), float(beta_s), int(padded_len),
        bool(deterministic))
    return y.reshape(*x.shape[:-1], d_out), idx, val


# ---------------------------------------------------------------------------------------------------------------
# Backend
# ---------------------------------------------------------------------------------------------------------------


def _device_reasons(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return []
    if device.type == "cpu":
        if INTERPRET:
            return []
        return ["triton needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"]
    return [f"triton cannot run on {device.type} tensors"]


def _dtype_reasons(name: str, dtype: torch.dtype, device: torch.device) -> list[str]:
    if dtype == torch.float64 and device.type == "cpu":
        return []  # numpy runs the interpreter's fp64 (accumulation in fp64 too); GPU kernels do not take fp64
    if dtype not in SUPPORTED_DTYPES:
        return [f"{name} has dtype {str(dtype).replace('torch.', '')}; triton supports float16, bfloat16, float32"]
    if device.type == "cpu" and dtype != torch.float32:
        return [f"{name} is {str(dtype).replace('torch.', '')}: the Triton CPU interpreter computes only float32"]
    return []


class TritonBackend:
    name = NAME

    def not_supported_reasons(self, op: str, inputs) -> list[str]:
        if _IMPORT_ERROR is not None:
            return [_IMPORT_ERROR]
        if op == "info":
            if not torch.cuda.is_available() and not INTERPRET:
                return ["triton needs a CUDA GPU (or TRITON_INTERPRET=1 for the CPU interpreter)"]
            return []
        why = _device_reasons(inputs.device)
        if op == "lrp_gate":
            for p, (q, k) in enumerate(zip(inputs.query, inputs.keys)):
                why += _dtype_reasons(f"query[{p}]", q.dtype, q.device) + _dtype_reasons(f"keys[{p}]", k.dtype,
                                                                                       k.device)
            n = inputs.keys[0].shape[0]
            if n > MAX_GATE_N:
                why.append(f"n = {n} experts exceeds the triton gate's limit of {MAX_GATE_N}")
            return why
        if op == "lrp_linear":
            why += _dtype_reasons("x", inputs.x.dtype, inputs.device)
            n_s = 0 if inputs.A_s is None else inputs.A_s.shape[0]
            R = n_s + inputs.idx.shape[1]
            if _block_r(R) > MAX_BLOCK_R:
                why.append(f"n_s + r = {R} active ranks exceed the triton kernels' limit of {MAX_BLOCK_R}")
            return why
        return [f"unknown op {op!r}"]

    def lrp_linear(self, inputs: LinearInputs) -> Tensor:
        return call_linear_op(lrp_linear_op, inputs)

    def lrp_gate(self, inputs: GateInputs) -> tuple[Tensor, Tensor]:
        # the kernel's outputs carry no autograd (hard gates are constants, as in the reference)
        idx, val = lrp_gate_op([t.detach() for t in inputs.query], [t.detach() for t in inputs.keys],
                               [float(w) for w in inputs.weights], inputs.r, inputs.candidates, inputs.scope,
                               inputs.mode)
        if inputs.mode == "soft" and torch.is_grad_enabled() and any(
                t.requires_grad for t in inputs.query + inputs.keys):
            # the kernel's val carries no autograd: recompute the chosen scores (B·r·d) so CE reaches the keys
            val = chosen_scores(inputs.query, inputs.keys, inputs.weights, idx)
        return idx, val


BACKEND = TritonBackend()
