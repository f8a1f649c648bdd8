"""Launcher of the K-extended GEMM with tensor descriptors (TMA) and a persistent tile schedule (kernel in
:mod:`pclr.kernels.lrp_prefill_tma`), a drop-in for :func:`pclr.backends.triton.prefill.launch_kext_gemm`.

:func:`kext_gemm_tma` takes the same arguments and writes the same ``out``; :func:`tma_reasons` says why a call cannot
take it (empty: it can). A caller with reasons runs the cp.async kernel instead. Nothing here picks this path by
default: it is meant for sm_90, chosen there once a measurement shows it faster.

Descriptors are built on the host (:class:`triton.tools.tensor_descriptor.TensorDescriptor`), not in the kernel
(``tl.make_tensor_descriptor``): a host descriptor reaches the kernel as a by-value parameter on sm_90 (the tensor
map is encoded once per launch, nothing is written to global memory), needs no ``triton.set_allocator`` (process-wide
state that another library may set too) and no per-program descriptor creation, and the same code runs on Triton 3.6
and 3.9 and through the 3.9 interpreter, which reads host descriptors as masked loads. TMA's rules then apply:
the base address 16-byte aligned, the last dimension contiguous and every other stride a multiple of 16 bytes (bf16:
a row of a multiple of 8 elements), which :func:`tma_reasons` checks.

Rank rows (Up_eff = [Up_s; Up_m[idx[s]]]) stay plain loads: they are gathered by pool index, and TMA on sm_90 copies
boxes only (row gather is an sm_100 feature that Triton's descriptors do not offer on sm_90).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from pclr.backends.triton.configs import INTERPRET
from pclr.backends.triton.configs import acc_types as _acc
from pclr.backends.triton.pinned import KernelConfig
from pclr.backends.triton.prefill import GROUP_M, rank_chunk, sm_count
from pclr.backends.triton.segments import Tiles

try:
    import triton
    from triton.tools.tensor_descriptor import TensorDescriptor

    from pclr.kernels import lrp_prefill_tma as kernels

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # an absent or too old triton is a reason, never an import error of pclr
    triton = None
    TensorDescriptor = None
    _IMPORT_ERROR = f"triton with tensor descriptors is not importable: {type(exc).__name__}: {exc}"

TMA_ALIGN = 16  # bytes: TMA's rule for the base address and every non-contiguous stride

# Pinned like prefill's table (no tuning mid-run). GPU: the cp.async GEMM's blocks with one more pipeline stage
# (four stages of [128, 64] X and W boxes, 128 KB, within sm_90's 227 KB): compiles for sm_90 at d = 4096, T = 4096,
# R = 96 in bf16 without spills (tests/test_compile_targets.py). The interpreter runs prefill's small blocks.
_GPU_CONFIG = KernelConfig(block_n=128, block_k=64, num_warps=8, num_stages=4)
_INTERPRET_CONFIG = KernelConfig(block_n=64, block_k=64)


def config() -> KernelConfig:
    """The pinned launch config of the TMA GEMM on this machine."""
    return _INTERPRET_CONFIG if INTERPRET else _GPU_CONFIG


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _stride_reasons(name: str, t: Tensor, strides: tuple[int, int]) -> list[str]:
    """TMA's layout rules for a 2-D view of ``t`` with ``strides``: one unit stride, the other 16-byte aligned."""
    size = t.element_size()
    if 1 not in strides:
        return [f"{name} has no contiguous dimension (strides {strides}): a tensor descriptor needs one"]
    outer = strides[0] if strides[1] == 1 else strides[1]
    why = []
    if (outer * size) % TMA_ALIGN:
        why.append(f"{name}'s row stride is {outer * size} bytes ({outer} elements), not a multiple of {TMA_ALIGN}")
    if t.data_ptr() % TMA_ALIGN:
        why.append(f"{name}'s data pointer is not {TMA_ALIGN}-byte aligned")
    return why


def tma_reasons(out: Tensor, X: Tensor, W: Tensor, w_strides: tuple[int, int]) -> list[str]:
    """Why :func:`kext_gemm_tma` cannot run this GEMM (empty list: it can).

    out [T, N]; X [T, K]; W viewed [N, K] through ``w_strides`` (as :func:`kext_gemm_tma`).
    """
    if _IMPORT_ERROR is not None:
        return [_IMPORT_ERROR]
    why = []
    if X.is_cuda:
        major, minor = _capability(X.device.index if X.device.index is not None else torch.cuda.current_device())
        if major < 9:
            why.append(f"tensor descriptors lower to TMA on sm_90 and newer, this GPU is sm_{major}{minor}")
    elif not INTERPRET:
        why.append(f"X is on {X.device.type}: a CPU call runs only through the Triton interpreter (TRITON_INTERPRET=1)")
    if X.dim() != 2 or out.dim() != 2:
        why.append(f"X and out must be 2-D, got X {tuple(X.shape)}, out {tuple(out.shape)}")
        return why
    if W.dtype != X.dtype:
        why.append(f"W ({W.dtype}) and X ({X.dtype}) must share a dtype: one MMA operand type")
    if X.shape[1] == 0 or out.shape[1] == 0:
        why.append(f"a descriptor needs non-empty dimensions, got K = {X.shape[1]}, N = {out.shape[1]}")
    if X.stride(1) != 1:
        why.append(f"X's columns are not contiguous (strides {tuple(X.stride())})")
    else:
        why += _stride_reasons("X", X, (X.stride(0), 1))
    why += _stride_reasons("W", W, tuple(w_strides))
    return why


def _descriptors(X: Tensor, W: Tensor, w_strides: tuple[int, int], N: int, block_m: int,
                 cfg: KernelConfig) -> tuple[object, object, bool]:
    """(X descriptor [T, K] in [block_m, BLOCK_K] boxes, W descriptor, W stored [K, N])."""
    T, K = X.shape
    x_desc = TensorDescriptor(X, [T, K], [X.stride(0), 1], [block_m, cfg.block_k])
    if w_strides[1] == 1:  # W stored [N, K]: y = x·Wᵀ
        return x_desc, TensorDescriptor(W, [N, K], [w_strides[0], 1], [cfg.block_n, cfg.block_k]), False
    # W stored [K, N]: dX = dY·W with W's strides swapped
    return x_desc, TensorDescriptor(W, [K, N], [w_strides[1], 1], [cfg.block_k, cfg.block_n]), True


def persistent_programs(tiles: int, device: torch.device) -> int:
    """Programs of the persistent grid: one per SM, never more than there are tiles."""
    return max(1, min(sm_count(device), tiles))


def kext_gemm_tma(out: Tensor, X: Tensor, W: Tensor, w_strides: tuple[int, int], bias: Tensor | None,
                  U: Tensor, Us: Tensor | None, Um: Tensor, idx: Tensor, val: Tensor, beta_m: float,
                  beta_s: float, tiles: Tiles, kind: str = "gemm") -> None:
    """out = [X | scale ⊙ U]·[W | Up_eff]ᵀ + bias, per sample: the contract of ``prefill.launch_kext_gemm``.

    out [T, N] (token order, written); X [T, K] (token order); W viewed [N, K] with strides ``w_strides``
    ((W.stride(0), W.stride(1)) for y = x·Wᵀ + …, swapped for dX = dY·W + …); bias [N] | None; U ACC [T, R] (sorted
    order, unscaled: the shrink's output); Us [n_s, N] | None, Um [n, N] (one row stride); idx int32 [B, r];
    val [B, r]; tiles: the batch's tile map; routes whose idx lies outside [0, n) add nothing. ``kind`` ("gemm" for
    y, "gemm_dx" for dX) is accepted for the launcher contract: one pinned config serves both here. Raises
    ValueError with :func:`tma_reasons` when they are not empty.
    """
    if kind not in ("gemm", "gemm_dx"):
        raise ValueError(f"kind must be 'gemm' or 'gemm_dx', got {kind!r}")
    why = tma_reasons(out, X, W, w_strides)
    if why:
        raise ValueError("kext_gemm_tma cannot run this call: " + "; ".join(why))
    T, K = X.shape
    N = out.shape[1]
    R = U.shape[1]
    if U.shape[0] != T or out.shape[0] != T:
        raise ValueError(f"U [T, R] and out [T, N] must have X's T = {T} rows, got U {tuple(U.shape)}, "
                         f"out {tuple(out.shape)}")
    n_s = 0 if Us is None else Us.shape[0]
    if tiles.num_tiles == 0 or T == 0:
        return
    cfg = config()
    x_desc, w_desc, w_kn = _descriptors(X, W, w_strides, N, tiles.block_m, cfg)
    tok = tiles.tok if tiles.tok is not None else tiles.tile_start  # never read when positions are token rows
    total = tiles.num_tiles * triton.cdiv(N, cfg.block_n)
    kernels.kext_gemm_tma_kernel[(persistent_programs(total, X.device),)](
        X, x_desc, w_desc, bias if bias is not None else out, out, U, Um if Us is None else Us, Um, idx, val, tok,
        tiles.tile_sample, tiles.tile_start, tiles.tile_end,
        tiles.num_tiles, K, N, R, Um.shape[0], n_s, idx.shape[1],
        X.stride(0), out.stride(0), U.stride(0), Um.stride(0), idx.stride(0),
        float(beta_m), float(beta_s),
        HAS_BIAS=bias is not None, SORTED=tiles.tok is not None, W_KN=w_kn, GROUP_M=GROUP_M,
        BLOCK_M=tiles.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, RC=rank_chunk(R), ACC=_acc(X.dtype)[1],
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
