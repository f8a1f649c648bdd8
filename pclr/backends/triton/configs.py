"""Tile sizes and autotuning of the triton kernels, and the autotuned kernel handles the launchers call.

Autotuning keys only on shape buckets (key_t = next_pow2(T), model dims) so serving shapes do not re-tune every call.
Configs that do not fit the device's shared memory are pruned (flash-attn layer_norm style). Under the interpreter a
single small config, no sweep.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import torch
import triton
from torch import Tensor

from pclr.kernels import lrp_bwd as bwd_kernels
from pclr.kernels import lrp_fwd as fwd_kernels

# The interpreter is chosen when the kernels are decorated (import time), so that is the value that counts.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no")

MAX_BLOCK_R = 512  # n_s + r active ranks held as one register tile
MAX_GATE_N = 16384  # top-r holds one score row in registers


def next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def block_r(R: int) -> int:
    """The register tile holding R active ranks: a power of two, at least 16 (tl.dot needs every dim ≥ 16)."""
    return max(16, next_pow2(R))


def acc_types(dtype: torch.dtype) -> tuple[torch.dtype, Any]:
    """Accumulation dtype (torch, triton): fp32, or fp64 for fp64 inputs (the CPU interpreter only)."""
    if dtype == torch.float64:
        return torch.float64, triton.language.float64
    return torch.float32, triton.language.float32


@functools.cache
def _smem_limit(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", getattr(props, "shared_memory_per_block", 49152)))


def smem_estimate(cfg: triton.Config, meta: dict[str, Any], extra_cols: int) -> int:
    """Rough pipelined shared memory of a GEMM-like config: stages × (x tile + W tile + rank tile)."""
    bm, br = meta.get("BLOCK_M", 64), meta.get("BLOCK_R", 16)
    bn, bk = cfg.kwargs.get("BLOCK_N", 0), cfg.kwargs.get("BLOCK_K", 0)
    x = meta.get("X")
    esize = x.element_size() if isinstance(x, Tensor) else 2
    per_stage = (bm * bk + bk * bn + bk * br * extra_cols) * esize
    return max(1, cfg.num_stages) * per_stage + br * max(bn, 1) * esize


def fits(cfg: triton.Config, meta: dict[str, Any], smem_limit: int) -> bool:
    """Whether the prune rule keeps ``cfg`` for a launch with ``meta``: its shared memory estimate fits the device,
    and the fp32 [BLOCK_M, BLOCK_N] accumulator stays within 128 registers per thread."""
    bm = meta.get("BLOCK_M", 64)
    return (smem_estimate(cfg, meta, 1) <= smem_limit
            and bm * cfg.kwargs.get("BLOCK_N", 64) <= 128 * 32 * cfg.num_warps)


def _prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    meta = {**named_args, **kwargs}
    x = meta.get("X")
    if not isinstance(x, Tensor) or x.device.type != "cuda":
        return configs[:1]
    limit = _smem_limit(x.device.index if x.device.index is not None else torch.cuda.current_device())
    kept = [c for c in configs if fits(c, meta, limit)]
    return kept or [min(configs, key=lambda c: smem_estimate(c, meta, 1))]


def gpu_configs(kind: str) -> list[triton.Config]:
    """The autotune configs of ``kind`` (expand, shrink, one_pass, pool) on a GPU, whatever runs here.

    tests/test_compile_targets.py compiles them for sm_90 and sm_80 at the target point (bf16, BLOCK_M = 128,
    BLOCK_R = 128: R = 96 active ranks). The lists keep the configs that compile there without register spills,
    except where a comment says otherwise: with BLOCK_M = BLOCK_R = 128 the fp32 S tile alone is 64 registers per
    thread at 8 warps, so every accumulator wider than 64 columns, and every 4-warp config, spilled.
    """
    if kind == "expand":
        # [BLOCK_M, BLOCK_N] accumulator + S [BLOCK_M, BLOCK_R]: 8 warps and 64 columns. No spill on sm_90; on sm_80
        # (no wgmma, the operands go through registers) 72-240 bytes still spill.
        return [triton.Config({"BLOCK_N": 64, "BLOCK_K": bk}, num_warps=8, num_stages=3) for bk in (32, 64)]
    if kind == "one_pass":
        # as expand; the gate prologue adds registers: sm_80 still spills 288-544 bytes
        return gpu_configs("expand")
    if kind == "shrink":
        # S [BLOCK_M, BLOCK_R] in fp32 needs 8 warps; a 64-wide K step spills 8-16 bytes on sm_80
        return [triton.Config({"BLOCK_K": 32}, num_warps=8, num_stages=st) for st in (2, 3)]
    if kind == "pool":
        # [BLOCK_R, BLOCK_N] accumulator: 128 columns spill; two stages keep sm_80's shared memory in bounds
        return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=2) for bn in (32, 64) for w in (4, 8)]
    raise ValueError(f"kind must be expand, shrink, one_pass or pool, got {kind!r}")


def _configs(kind: str) -> list[triton.Config]:
    if INTERPRET:
        small = {"expand": {"BLOCK_N": 64, "BLOCK_K": 64}, "one_pass": {"BLOCK_N": 64, "BLOCK_K": 64},
                 "shrink": {"BLOCK_K": 64}, "pool": {"BLOCK_N": 64}}[kind]
        return [triton.Config(small, num_warps=4, num_stages=1)]
    return gpu_configs(kind)


expand_kernel = triton.autotune(
    configs=_configs("expand"),
    key=["key_t", "key_k", "key_n", "BLOCK_M", "BLOCK_R", "HAS_BASE", "S_FROM_BUF", "DECODE"],
    prune_configs_by={"early_config_prune": _prune},
    restore_value=["OUT"],  # ACCUMULATE adds in place: each tuning run must start from the same OUT
)(fwd_kernels.lrp_expand_kernel)
shrink_kernel = triton.autotune(
    configs=_configs("shrink"), key=["key_t", "key_k", "BLOCK_M", "BLOCK_R"],
    prune_configs_by={"early_config_prune": _prune},
)(fwd_kernels.lrp_shrink_kernel)
one_pass_kernel = triton.autotune(
    configs=_configs("one_pass"), key=["key_t", "key_k", "key_n", "BLOCK_M", "BLOCK_R", "DECODE"],
    prune_configs_by={"early_config_prune": _prune},
)(fwd_kernels.lrp_one_pass_kernel)
pool_grad_kernel = triton.autotune(
    configs=_configs("pool"), key=["key_t", "key_d", "BLOCK_M", "BLOCK_R", "ATOMIC"],
    reset_to_zero=["OUT"],  # atomics accumulate: each tuning run starts from zero
)(bwd_kernels.pool_grad_kernel)
