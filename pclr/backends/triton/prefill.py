"""Prefill / training launchers of the Triton backend at the work floor (kernels in :mod:`pclr.kernels.lrp_prefill`).

Reference semantics: :mod:`pclr.backends.reference` (``_forward``, ``_backward``) defines every result here.

* Forward: u = x·A_effᵀ (unscaled, ACC [T, R], sorted token order) once per token by a shrink whose grid covers two
  waves of SMs (rank chunks × tiles, then split-K with a fixed-order sum when that is still short), then ONE
  K-extended GEMM per (token tile, N tile): y = [x | scale ⊙ u]·[W | B_eff]ᵀ + bias. u is returned as ``saved``.
* Backward from the saved u: dS = dY·B_effᵀ (the same shrink), dX = [dY | scale ⊙ dS]·[W ; A_eff] (the same GEMM
  with W's strides swapped), dA_eff / dB_eff / dval in one launch of per-sample partial rows, then one fixed-order
  row reduction that writes dA_m, dB_m, dA_s, dB_s in their own dtype (zeros on frozen and unchosen rows). Always
  deterministic: the reduction order depends on idx only, never on scheduling.
* An idx outside [0, n) is masked inside every kernel (no row outside the pool is read or written): that expert adds
  nothing to y, nothing to any row gradient, and its dval is exactly 0, with no torch op over idx per call.
* Segment metadata: the tile map of a padded batch [B, L] depends on (B, L) only and is built once per shape (no
  sort, ``sample_of_token`` never read); a packed batch's map is cached on the ``sample_of_token`` tensor, so every
  linear of a forward (and its backward) reuses it.

Executed work at a point where tiles are full and R is a multiple of the rank chunk equals the FLOP floor:
forward 2·T·d_in·d_out + 2·T·R·(d_in + d_out), forward + backward 4·T·d_in·d_out + 6·T·R·(d_in + d_out).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pclr.backends.base import LinearGrads, LinearInputs, LinearNeeds
from pclr.backends.triton.configs import INTERPRET
from pclr.backends.triton.configs import acc_types as _acc
from pclr.backends.triton.segments import Tiles, partial_row_targets, segment_tokens, tile_block_m

try:
    import triton

    from pclr.kernels import lrp_prefill as kernels

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # an absent or broken triton is a reason, never an import error of pclr
    triton = None
    _IMPORT_ERROR = f"triton is not importable: {type(exc).__name__}: {exc}"

DEFAULT_SMS = 132  # H100 / H200: the machine the interpreter's split decisions imitate
GROUP_M = 8  # token tiles per group of the GEMM's tile walk (L2 reuse of X and W tiles)
MAX_RANK_CHUNKS = 4  # rank chunks one rank-grad program feeds from each x / dY tile (one accumulator each)


# ---------------------------------------------------------------------------------------------------------------
# Configs: pinned per kernel (no tuning run mid-training or inside a CUDA-graph capture). The GPU table keeps only
# configs that compile for sm_90 without register spills at d = 4096, T = 4096, R = 96 in bf16; the interpreter
# runs small blocks.
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    block_n: int = 0
    block_k: int = 0
    num_warps: int = 4
    num_stages: int = 1


_GPU_CONFIGS = {
    "gemm": KernelConfig(block_n=128, block_k=64, num_warps=8, num_stages=3),
    "shrink": KernelConfig(block_k=64, num_warps=4, num_stages=3),
    "grad": KernelConfig(block_n=128, num_warps=8, num_stages=3),
    "reduce": KernelConfig(block_n=256, num_warps=4, num_stages=1),
    "split_sum": KernelConfig(block_n=1024, num_warps=4, num_stages=1),
}
_INTERPRET_CONFIGS = {
    "gemm": KernelConfig(block_n=64, block_k=64),
    "shrink": KernelConfig(block_k=64),
    "grad": KernelConfig(block_n=64),
    "reduce": KernelConfig(block_n=64),
    "split_sum": KernelConfig(block_n=1024),
}


def config(kind: str) -> KernelConfig:
    """The pinned launch config of kernel ``kind`` (gemm, shrink, grad, reduce, split_sum) on this machine."""
    return (_INTERPRET_CONFIGS if INTERPRET else _GPU_CONFIGS)[kind]


def rank_chunk(R: int) -> int:
    """Ranks per MMA step: 16 or 32, whichever pads R less (32 on a tie: fewer steps); R = 96 runs as 3 × 32."""
    return min((32, 16), key=lambda c: -(-R // c) * c)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def shrink_splits(programs: int, K: int, block_k: int, sms: int) -> tuple[int, int]:
    """(splits, K columns per split) so that programs · splits covers two waves of ``sms`` SMs where K allows.

    Each split is a whole number of BLOCK_K blocks; no split is empty.
    """
    k_blocks = max(1, -(-K // block_k))
    want = 1 if programs >= 2 * sms else -(-2 * sms // max(1, programs))
    per = -(-k_blocks // min(want, k_blocks)) * block_k
    return max(1, -(-K // per)), per


# ---------------------------------------------------------------------------------------------------------------
# Segment metadata, built once per batch
# ---------------------------------------------------------------------------------------------------------------

_PADDED_MAPS: dict = {}


def segment_map(sot: Tensor, num_samples: int, padded_len: int, block_m: int) -> Tiles:
    """The tile map of a batch. Padded ([B, L]): keyed on (B, L, BLOCK_M, device) only, so a fresh
    ``sample_of_token`` per call still hits; packed: :func:`segment_tokens` (cached on the tensor itself)."""
    if not padded_len:
        return segment_tokens(sot, num_samples, padded_len, block_m)
    key = (num_samples, padded_len, block_m, sot.device)
    hit = _PADDED_MAPS.get(key)
    if hit is not None:
        return hit
    tiles = segment_tokens(sot, num_samples, padded_len, block_m)  # reads only sot's shape and device when padded
    if not (sot.is_cuda and torch.cuda.is_current_stream_capturing()):
        if len(_PADDED_MAPS) >= 16:
            _PADDED_MAPS.clear()
        _PADDED_MAPS[key] = tiles
    return tiles


_TARGETS: dict = {}


def reduce_plan(idx: Tensor, trainable: Tensor | None, n: int, n_s: int, R: int, need_pool: bool,
                need_shared: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(src, starts, counts) of the row reduction: the partial rows s·R + k (sample s, rank k) grouped by output
    row (pool row, then n + shared row), in sample order within a group. src int32 [B·R]; starts, counts int32
    [n + n_s + 1] (the last group collects dropped partials: frozen rows, unwanted rows). Cached on idx/trainable
    (a layer's linears share one route)."""
    key = (id(idx), idx._version, id(trainable), None if trainable is None else trainable._version, n, n_s, R,
           need_pool, need_shared)
    hit = _TARGETS.get(key)
    if hit is not None and hit[0] is idx and hit[1] is trainable:
        return hit[2]
    tgt = partial_row_targets(idx, trainable, n, n_s, R, need_pool, need_shared)
    src = torch.argsort(tgt, stable=True).to(torch.int32)
    counts = torch.zeros(n + n_s + 1, dtype=torch.int64, device=idx.device).scatter_add_(0, tgt,
                                                                                       torch.ones_like(tgt))
    starts = counts.cumsum(0) - counts
    plan = (src, starts.to(torch.int32), counts.to(torch.int32))
    if not (idx.is_cuda and torch.cuda.is_current_stream_capturing()):
        if len(_TARGETS) >= 32:
            _TARGETS.clear()
        _TARGETS[key] = (idx, trainable, plan)
    return plan


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


def _rows(s: Tensor | None, m: Tensor) -> Tensor:
    # the shared-row pointer is never dereferenced when n_s == 0 (all its lanes are masked)
    return m if s is None else s


def _tile_args(tiles: Tiles) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    tok = tiles.tok if tiles.tok is not None else tiles.tile_start  # never read when positions are token rows
    return tok, tiles.tile_sample, tiles.tile_start, tiles.tile_end


def launch_shrink(X: Tensor, Ds: Tensor | None, Dm: Tensor, idx: Tensor, tiles: Tiles, R: int) -> Tensor:
    """U = X·Down_effᵀ per sample, unscaled: ACC [T, R] in sorted token order.

    X [T, K]; Ds [n_s, K] | None; Dm [n, K]; idx int32 [B, r] (an idx outside [0, n) gives a zero column).
    """
    T, K = X.shape
    n_s = 0 if Ds is None else Ds.shape[0]
    if Dm.shape[1] != K or (Ds is not None and Ds.shape[1] != K):
        raise ValueError(f"rank rows must have {K} columns (X's K), got Dm {tuple(Dm.shape)}")
    acc_t, acc = _acc(X.dtype)
    u = torch.empty((T, R), dtype=acc_t, device=X.device)
    if tiles.num_tiles == 0 or T == 0:
        return u
    cfg = config("shrink")
    rc = rank_chunk(R)
    r_chunks = -(-R // rc)
    splits, per = shrink_splits(tiles.num_tiles * r_chunks, K, cfg.block_k, sm_count(X.device))
    part = u if splits == 1 else torch.empty((splits, T, R), dtype=acc_t, device=X.device)
    kernels.shrink_kernel[(tiles.num_tiles, r_chunks, splits)](
        X, _rows(Ds, Dm), Dm, idx, part, *_tile_args(tiles),
        K, R, Dm.shape[0], n_s, idx.shape[1], per,
        X.stride(0), Dm.stride(0), idx.stride(0), T * R, R,
        SORTED=tiles.tok is not None, BLOCK_M=tiles.block_m, RC=rc, BLOCK_K=cfg.block_k, ACC=acc,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        sc = config("split_sum")
        kernels.split_sum_kernel[(triton.cdiv(T * R, sc.block_n),)](
            part, u, T * R, splits, T * R, BLOCK=sc.block_n, ACC=acc, num_warps=sc.num_warps,
        )
    return u


def launch_kext_gemm(out: Tensor, X: Tensor, W: Tensor, w_strides: tuple[int, int], bias: Tensor | None,
                     U: Tensor, Us: Tensor | None, Um: Tensor, idx: Tensor, val: Tensor, beta_m: float,
                     beta_s: float, tiles: Tiles) -> None:
    """out = [X | scale ⊙ U]·[W | Up_eff]ᵀ + bias, per sample.

    out [T, N]; X [T, K]; W viewed [N, K] with strides ``w_strides``; bias [N] | None; U ACC [T, R] (sorted order,
    unscaled); Us [n_s, N] | None, Um [n, N]; idx int32 [B, r] (an idx outside [0, n) adds nothing); val [B, r].
    """
    T, K = X.shape
    N = out.shape[1]
    R = U.shape[1]
    n_s = 0 if Us is None else Us.shape[0]
    if tiles.num_tiles == 0:
        return
    cfg = config("gemm")
    grid = (tiles.num_tiles * triton.cdiv(N, cfg.block_n),)
    kernels.kext_gemm_kernel[grid](
        X, W, bias if bias is not None else out, out, U, _rows(Us, Um), Um, idx, val, *_tile_args(tiles),
        tiles.num_tiles, K, N, R, Um.shape[0], n_s, idx.shape[1],
        X.stride(0), w_strides[0], w_strides[1], out.stride(0), U.stride(0), Um.stride(0), idx.stride(0),
        float(beta_m), float(beta_s),
        HAS_BIAS=bias is not None, SORTED=tiles.tok is not None, GROUP_M=GROUP_M,
        BLOCK_M=tiles.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, RC=rank_chunk(R), ACC=_acc(X.dtype)[1],
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def launch_rank_grads(dS: Tensor, u: Tensor, x: Tensor, grad: Tensor, idx: Tensor, val: Tensor,
                      trainable: Tensor | None, n: int, n_s: int, beta_m: float, beta_s: float, tiles: Tiles,
                      out_pool: tuple[Tensor, Tensor] | None, out_shared: tuple[Tensor, Tensor] | None,
                      need_val: bool) -> Tensor | None:
    """Fill dA_m/dB_m (``out_pool``) and dA_s/dB_s (``out_shared``) in place; return dval [B, r] when asked.

    dS, u ACC [T, R] (sorted order, unscaled); x [T, d_in], grad [T, d_out] (token order).
    """
    T, d_in = x.shape
    d_out = grad.shape[1]
    B, r = idx.shape
    R = dS.shape[1]
    acc_t, acc = _acc(x.dtype)
    need_grad = out_pool is not None or out_shared is not None
    cfg = config("grad")
    rc = rank_chunk(R)
    nblk_a, nblk_b = triton.cdiv(d_in, cfg.block_n), triton.cdiv(d_out, cfg.block_n)
    dval = torch.empty((B, r), dtype=val.dtype, device=x.device) if need_val else None
    pa = torch.empty((B * R, d_in), dtype=acc_t, device=x.device) if need_grad else dS
    pb = torch.empty((B * R, d_out), dtype=acc_t, device=x.device) if need_grad else dS
    tok = tiles.tok if tiles.tok is not None else tiles.seg_start
    train = None if trainable is None or out_pool is None else trainable  # bool, read as is (no cast per call)
    num_rc = min(MAX_RANK_CHUNKS, -(-R // rc))
    grid = (-(-R // (rc * num_rc)), nblk_a + nblk_b if need_grad else 1, B)
    kernels.rank_grad_kernel[grid](
        dS, u, x, grad, pa, pb, dval if dval is not None else dS, idx, val, train if train is not None else idx, tok,
        tiles.seg_start, tiles.seg_count, d_in, d_out, R, n, n_s, r, nblk_a,
        dS.stride(0), x.stride(0), grad.stride(0), pa.stride(0), pb.stride(0),
        dval.stride(0) if dval is not None else 0, idx.stride(0), float(beta_m), float(beta_s),
        NEED_POOL=out_pool is not None, NEED_SHARED=out_shared is not None, HAS_TRAIN=train is not None,
        NEED_GRAD=need_grad, NEED_VAL=need_val, SORTED=tiles.tok is not None,
        BLOCK_M=tiles.block_m, BLOCK_N=cfg.block_n, RC=rc, NUM_RC=num_rc, ACC=acc,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if need_grad:
        src, starts, counts = reduce_plan(idx, trainable, n, n_s, R, out_pool is not None, out_shared is not None)
        row0 = 0 if out_pool is not None else n
        rows = (n if out_pool is not None else 0) + (n_s if out_shared is not None else 0)
        am, bm = out_pool if out_pool is not None else out_shared
        as_, bs = out_shared if out_shared is not None else out_pool
        rcfg = config("reduce")
        ra, rb = triton.cdiv(d_in, rcfg.block_n), triton.cdiv(d_out, rcfg.block_n)
        if rows:
            kernels.rows_reduce_kernel[(rows, ra + rb)](
                pa, pb, am, bm, as_, bs, src, starts, counts,
                row0, n, ra, d_in, d_out,
                pa.stride(0), pb.stride(0), am.stride(0), bm.stride(0), as_.stride(0), bs.stride(0),
                BLOCK_N=rcfg.block_n, ACC=acc, num_warps=rcfg.num_warps,
            )
    return dval


# ---------------------------------------------------------------------------------------------------------------
# Forward / backward (argument meaning as pclr.backends.custom_op's forward_impl / backward_impl)
# ---------------------------------------------------------------------------------------------------------------


def prefill_forward(x: Tensor, weight: Tensor, bias: Tensor | None, A_m: Tensor, B_m: Tensor, idx: Tensor,
                    val: Tensor, A_s: Tensor | None, B_s: Tensor | None, sot: Tensor,
                    trainable: Tensor | None, beta_m: float, beta_s: float, padded_len: int,
                    deterministic: bool) -> tuple[Tensor, list[Tensor]]:
    """(y [T, d_out], saved) with saved = [u], u ACC [T, R] = x·A_effᵀ unscaled in sorted token order.

    x [T, d_in]; weight [d_out, d_in]; see :class:`pclr.dispatch.LinearInputs`. Always deterministic.
    """
    T = x.shape[0]
    d_out = weight.shape[0]
    B, r = idx.shape
    n_s = 0 if A_s is None else A_s.shape[0]
    R = n_s + r
    bias = None if bias is None else bias.contiguous()
    if T == 0 or B == 0 or R == 0:
        return F.linear(x, weight, bias), prefill_saved_like(x, idx, A_s)
    tiles = segment_map(sot, B, padded_len, tile_block_m(T, B))
    u = launch_shrink(x, A_s, A_m, idx, tiles, R)
    y = torch.empty((T, d_out), dtype=x.dtype, device=x.device)
    launch_kext_gemm(y, x, weight, (weight.stride(0), weight.stride(1)), bias, u, B_s, B_m, idx, val, beta_m,
                     beta_s, tiles)
    return y, [u]


def prefill_saved_like(x: Tensor, idx: Tensor, A_s: Tensor | None) -> list[Tensor]:
    """Uninitialised tensors shaped like :func:`prefill_forward`'s ``saved`` (for fake / meta implementations)."""
    R = idx.shape[1] + (0 if A_s is None else A_s.shape[0])
    return [x.new_empty((x.shape[0], R), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)]


def prefill_backward(grad: Tensor, x: Tensor, weight: Tensor, A_m: Tensor, B_m: Tensor, idx: Tensor, val: Tensor,
                     A_s: Tensor | None, B_s: Tensor | None, sot: Tensor, trainable: Tensor | None,
                     beta_m: float, beta_s: float, padded_len: int, deterministic: bool,
                     saved: Sequence[Tensor], needs: tuple[bool, bool, bool, bool]):
    """(dx, dA_m, dB_m, dval, dA_s, dB_s), each None when not in ``needs`` = (x, pool, val, shared).

    grad [T, d_out]; ``saved`` = the forward's [u]. Deterministic whatever ``deterministic`` says.
    """
    need_x, need_pool, need_val, need_shared = needs
    T = x.shape[0]
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
    if saved and saved[0].shape != (T, R):
        raise ValueError(f"saved must be the forward's [u] with u [T={T}, R={R}] (or empty); got "
                         f"{[tuple(t.shape) for t in saved]}")
    grad = grad.contiguous()
    tiles = segment_map(sot, B, padded_len, tile_block_m(T, B))
    # empty saved: the forward that made y was not this one (the one-launch gate + linear); only then recompute u
    u = saved[0] if saved else None
    if u is None and (need_pool or need_shared or need_val):
        u = launch_shrink(x, A_s, A_m, idx, tiles, R)
    dS = launch_shrink(grad, B_s, B_m, idx, tiles, R)  # dY·B_effᵀ, unscaled
    if need_x:
        # dX = [dY | scale ⊙ dS]·[W ; A_eff]: X := dY [T, d_out], W viewed [d_in, d_out] (strides swapped)
        dx = torch.empty_like(x)
        launch_kext_gemm(dx, grad, weight, (weight.stride(1), weight.stride(0)), None, dS, A_s, A_m, idx, val,
                         beta_m, beta_s, tiles)
    if need_pool or need_shared or need_val:
        out_pool = out_shared = None
        if need_pool:
            dA_m, dB_m = torch.empty_like(A_m), torch.empty_like(B_m)
            out_pool = (dA_m, dB_m)
        if need_shared:
            dA_s, dB_s = torch.empty_like(A_s), torch.empty_like(B_s)
            out_shared = (dA_s, dB_s)
        dval = launch_rank_grads(dS, u, x, grad, idx, val, trainable, n, n_s, beta_m, beta_s, tiles, out_pool,
                                 out_shared, need_val)
    return dx, dA_m, dB_m, dval, dA_s, dB_s


# ---------------------------------------------------------------------------------------------------------------
# The LinearKernels form (what pclr.backends.custom_op.make_lrp_linear_op turns into a registered op)
# ---------------------------------------------------------------------------------------------------------------


def _positional(i: LinearInputs) -> tuple:
    return (i.weight, i.A_m, i.B_m, i.idx, i.val, i.A_s, i.B_s, i.sample_of_token, i.trainable, i.beta_m, i.beta_s,
            i.padded_len, i.deterministic)


def linear_forward(inputs: LinearInputs) -> tuple[Tensor, list[Tensor]]:
    """(y [T, d_out], saved = [u]) of :func:`prefill_forward` for a :class:`LinearInputs`."""
    i = inputs
    return prefill_forward(i.x, i.weight, i.bias, i.A_m, i.B_m, i.idx, i.val, i.A_s, i.B_s, i.sample_of_token,
                           i.trainable, i.beta_m, i.beta_s, i.padded_len, i.deterministic)


def linear_saved_like(inputs: LinearInputs) -> list[Tensor]:
    return prefill_saved_like(inputs.x, inputs.idx, inputs.A_s)


def linear_backward(grad_y: Tensor, inputs: LinearInputs, saved: Sequence[Tensor],
                    needs: LinearNeeds) -> LinearGrads:
    """The gradients named in ``needs`` from :func:`prefill_backward` (saved empty: u is recomputed once)."""
    i = inputs
    dx, dA_m, dB_m, dval, dA_s, dB_s = prefill_backward(
        grad_y, i.x, *_positional(i), saved, (needs.x, needs.pool, needs.val, needs.shared))
    return LinearGrads(x=dx, A_m=dA_m, B_m=dB_m, val=dval, A_s=dA_s, B_s=dB_s)
