"""Tile sizes and autotuning of the triton kernels, and the autotuned kernel handles the launchers call.

Autotuning keys only on shape buckets (key_t = next_pow2(T), model dims) so serving shapes do not re-tune every call.
Before a sweep, each config is compiled for the device and pruned by what the compiled kernel really uses
(:func:`prune_by_compile`: spilled registers, shared memory over the device's limit), cached per (kernel,
constexprs, device); the shared-memory / register estimate (:func:`fits`) remains only for when compiling fails.
Under the interpreter a single small config, no sweep.
"""
from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import triton
from torch import Tensor

from pclr.backends.triton.compile_stats import SMEM_LIMIT, LaunchSpec, compile_one, config_str
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


def acc_elements(kind: str, cfg: triton.Config, meta: Mapping[str, Any]) -> int:
    """fp32 accumulator elements a program of ``cfg`` holds: expand / one_pass keep [BLOCK_M, BLOCK_N] and the S tile
    [BLOCK_M, BLOCK_R] live together (the second accumulator), shrink only S, pool [BLOCK_R, BLOCK_N]."""
    bm, br = meta.get("BLOCK_M", 64), meta.get("BLOCK_R", 16)
    bn = cfg.kwargs.get("BLOCK_N", 64)
    if kind in ("expand", "one_pass"):
        return bm * bn + bm * br
    if kind == "shrink":
        return bm * br
    if kind == "pool":
        return br * bn
    raise ValueError(f"kind must be expand, shrink, one_pass or pool, got {kind!r}")


def fits(cfg: triton.Config, meta: dict[str, Any], smem_limit: int, kind: str = "expand") -> bool:
    """The estimate the prune falls back on when compiling is impossible: ``cfg``'s shared memory estimate fits the
    device, and its fp32 accumulators (:func:`acc_elements`) stay within 128 registers per thread."""
    return (smem_estimate(cfg, meta, 1) <= smem_limit
            and acc_elements(kind, cfg, meta) <= 128 * 32 * cfg.num_warps)


# (kernel, constexprs, pointer dtypes, config, arch) -> compile row: a config is compiled once per process and device
_COMPILED: dict[tuple, dict[str, Any]] = {}
CompileFn = Callable[[list[tuple]], list[dict[str, Any]]]


def _compile_key(spec: LaunchSpec, cfg: triton.Config, arch: int) -> tuple:
    return (spec.module, spec.fn, tuple(sorted((k, str(v)) for k, v in spec.consts.items())),
            tuple(sorted(spec.ptrs.items())), spec.floats, tuple(sorted(spec.extra.items())),
            None if spec.not_div16 is None else tuple(sorted(spec.not_div16)),
            config_str(cfg.kwargs, cfg.num_warps, cfg.num_stages), arch)


def prune_by_compile(configs: Sequence[triton.Config], spec: LaunchSpec, arch: int, compile_fn: CompileFn,
                     smem_limit: int | None = None,
                     fallback: Callable[[triton.Config], bool] | None = None,
                     ) -> tuple[list[triton.Config], dict[str, str]]:
    """(kept configs, why per config) for ``spec`` compiled for sm_``arch``.

    ``compile_fn`` compiles a list of jobs ``(spec, constexprs, num_warps, num_stages, arch)`` and returns one row
    each ({"regs", "spills", "smem"} or {"error"}): in-process on a GPU, worker subprocesses on a CPU (see
    :mod:`pclr.backends.triton.compile_stats`). A config is kept when its kernel spills nothing and its shared
    memory fits ``smem_limit`` (default: the architecture's opt-in limit). If none does, the one with the fewest
    spilled bytes (then the least shared memory) among those that compile is kept, so the launch still runs. If
    compiling itself fails (no ptxas, an old Triton), ``fallback`` (the estimate) decides, and the reasons say so.
    Rows are cached per (kernel, constexprs, pointer dtypes, config, arch).
    """
    limit = smem_limit if smem_limit is not None else SMEM_LIMIT[arch]
    keys = [_compile_key(spec, c, arch) for c in configs]
    todo = [(k, c) for k, c in zip(keys, configs) if k not in _COMPILED]
    try:
        if todo:
            rows = compile_fn([(spec, dict(c.kwargs), c.num_warps, c.num_stages, arch) for _, c in todo])
            if len(rows) != len(todo):
                raise RuntimeError(f"compile_fn returned {len(rows)} rows for {len(todo)} configs")
            for (k, _), row in zip(todo, rows):
                _COMPILED[k] = row
    except Exception as exc:  # noqa: BLE001 -- no compiler here: the estimate decides, and says why
        keep = fallback or (lambda c: True)
        note = f"estimate (compiling failed: {type(exc).__name__}: {exc})"
        kept = [c for c in configs if keep(c)] or list(configs[:1])
        return kept, {config_str(c.kwargs, c.num_warps, c.num_stages):
                      f"{'kept' if c in kept else 'dropped'}: {note}" for c in configs}
    why: dict[str, str] = {}
    kept, compiled = [], []
    for k, c in zip(keys, configs):
        row, name = _COMPILED[k], config_str(c.kwargs, c.num_warps, c.num_stages)
        if "error" in row:
            why[name] = f"dropped: compile error: {row['error']}"
            continue
        compiled.append((c, row))
        stats = f"{row['regs']} registers, {row['spills']} B spilled, {row['smem']} B shared (limit {limit})"
        bad = row["spills"] or row["smem"] > limit
        why[name] = f"{'dropped' if bad else 'kept'}: {stats}"
        if not bad:
            kept.append(c)
    if not kept and compiled:
        c, row = min(compiled, key=lambda p: (p[1]["spills"], p[1]["smem"]))
        kept = [c]
        why[config_str(c.kwargs, c.num_warps, c.num_stages)] += "; kept anyway: no config compiles clean"
    if not kept:
        raise RuntimeError(f"no config of {spec.name} compiles for sm_{arch}: {why}")
    return kept, why


_TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
               torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
               torch.bool: "i1"}
_KIND_KERNEL = {"expand": ("lrp_fwd", "lrp_expand_kernel"), "one_pass": ("lrp_fwd", "lrp_one_pass_kernel"),
                "shrink": ("lrp_fwd", "lrp_shrink_kernel"), "pool": ("lrp_bwd", "pool_grad_kernel")}


def launch_spec(kind: str, named_args: Mapping[str, Any], constexprs: Mapping[str, Any]) -> LaunchSpec:
    """The compile spec of an autotuned launch from its arguments: pointer dtypes from the tensors, fp32 for
    floats, i64 for ints past int32, the divisibility hint where the value has it."""
    module, fn = _KIND_KERNEL[kind]
    ints = {k: v for k, v in named_args.items() if isinstance(v, int) and not isinstance(v, bool)}
    return LaunchSpec(
        name=kind, module=module, fn=fn,
        ptrs={k: "*" + _TYPE_NAMES[v.dtype] for k, v in named_args.items() if isinstance(v, Tensor)},
        consts=dict(constexprs),
        floats=tuple(k for k, v in named_args.items() if isinstance(v, float)),
        extra={k: "i64" for k, v in ints.items() if not -2 ** 31 <= v < 2 ** 31},
        not_div16=frozenset(k for k, v in ints.items() if v % 16),
    )


def _compile_loaded(jobs: list[tuple]) -> list[dict[str, Any]]:
    return [compile_one(*job, load=True) for job in jobs]


def _pruner(kind: str) -> Callable[..., list[triton.Config]]:
    """The autotuner's early prune of ``kind``: real compiles for the launch's device (one config off a GPU)."""
    module, name = _KIND_KERNEL[kind]
    kernel = getattr(fwd_kernels if module == "lrp_fwd" else bwd_kernels, name)
    # the autotuner's kwargs also carry launch options (grid, warmup): keep the kernel's own arguments only
    fn_args = set(inspect.signature(kernel.fn).parameters)

    def prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
        meta = {**named_args, **kwargs}
        x = meta.get("X")
        if not isinstance(x, Tensor) or x.device.type != "cuda":
            return configs[:1]
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        limit = _smem_limit(index)
        consts = {k: v for k, v in kwargs.items() if k in fn_args}
        kept, _ = prune_by_compile(configs, launch_spec(kind, named_args, consts), major * 10 + minor,
                                   _compile_loaded, limit, lambda c: fits(c, meta, limit, kind))
        return kept

    return prune


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
    prune_configs_by={"early_config_prune": _pruner("expand")},
    restore_value=["OUT"],  # ACCUMULATE adds in place: each tuning run must start from the same OUT
)(fwd_kernels.lrp_expand_kernel)
shrink_kernel = triton.autotune(
    configs=_configs("shrink"), key=["key_t", "key_k", "BLOCK_M", "BLOCK_R"],
    prune_configs_by={"early_config_prune": _pruner("shrink")},
)(fwd_kernels.lrp_shrink_kernel)
one_pass_kernel = triton.autotune(
    configs=_configs("one_pass"), key=["key_t", "key_k", "key_n", "BLOCK_M", "BLOCK_R", "DECODE"],
    prune_configs_by={"early_config_prune": _pruner("one_pass")},
)(fwd_kernels.lrp_one_pass_kernel)
pool_grad_kernel = triton.autotune(
    configs=_configs("pool"), key=["key_t", "key_d", "BLOCK_M", "BLOCK_R", "ATOMIC"],
    prune_configs_by={"early_config_prune": _pruner("pool")},
    reset_to_zero=["OUT"],  # atomics accumulate: each tuning run starts from zero
)(bwd_kernels.pool_grad_kernel)
