"""Compile the prefill kernels for sm_90 with every config the launcher keeps and report registers / spills /
shared memory from Triton's bundled ptxas (no GPU needed).

    python benchmarks/prefill_compile.py [--extra]      # --extra also tries the configs that were not kept

Target point: bf16, d_in = d_out = 4096, T = 4096 in 8 samples (BLOCK_M = 128), R = 96 (rank chunk 32).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from pclr.backends.triton import prefill as triton_prefill
from pclr.kernels import lrp_prefill as K

PTR = {"X": "*bf16", "DS": "*bf16", "DM": "*bf16", "W": "*bf16", "BIAS": "*bf16", "OUT": "*bf16", "US": "*bf16",
       "UM": "*bf16", "XA": "*bf16", "XB": "*bf16", "AM": "*bf16", "BM": "*bf16", "AS": "*bf16", "BS": "*bf16",
       "U": "*fp32", "P": "*fp32", "PA": "*fp32", "PB": "*fp32", "DVAL": "*fp32", "VAL": "*fp32"}
FLOATS = {"beta_m", "beta_s"}
INTS = {"K", "N", "R", "D", "DA", "DB", "T"}


def signature(fn, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in PTR:
            sig[name] = PTR[name]
        elif name.isupper() and name not in INTS:
            sig[name] = "*i32"
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def ptxas_stats(ptx: str) -> tuple[int, int]:
    ptxas = get_ptxas(90).path  # the ptxas Triton itself runs for sm_90 (it matches the PTX version it emits)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spill = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return regs, spill


# What the JIT specializes at a real launch at the target point: ints equal to 1 become constants, pointers and
# ints divisible by 16 carry that hint (strides and model dims are multiples of 16 there; counts are not).
NOT_DIV16 = {"num_tiles", "R", "n_s", "r", "nblk_a", "splits", "row0", "n", "numel", "stride_idx", "stride_dval",
             "stride_u", "stride_g"}


def attrs_of(fn, constexprs: dict) -> dict:
    sig = signature(fn, constexprs)
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if sig[name] != "constexpr" and sig[name] not in ("fp32",) and name not in NOT_DIV16}


def compile_one(fn, constexprs: dict, warps: int, stages: int):
    src = ASTSource(fn=fn, signature=signature(fn, constexprs), constexprs=constexprs,
                    attrs=attrs_of(fn, constexprs))
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    regs, spill = ptxas_stats(k.asm["ptx"])
    return regs, spill, int(k.metadata.shared)


def cases(extra: bool) -> list:
    """(name, kernel, constexprs, num_warps, num_stages, kept) for every kept config (and the others if extra)."""
    f32 = tl.float32
    cfg = triton_prefill._GPU_CONFIGS
    rc = triton_prefill.rank_chunk(96)
    out = []

    def add(name, fn, cx, c, kept):
        out.append((name, fn, cx, c.num_warps, c.num_stages, kept))

    C = triton_prefill.KernelConfig
    gemm = [(cfg["gemm"], True)] + ([(C(128, 64, 4, 3), False), (C(256, 64, 8, 3), False), (C(128, 64, 8, 4), False),
                                       (C(256, 64, 8, 4), False), (C(128, 128, 8, 3), False)] if extra else [])
    for c, kept in gemm:
        for tag, unit in (("y", "stride_wk"), ("dX", "stride_wn")):
            add(f"kext_gemm[{tag}] BN={c.block_n} BK={c.block_k}", K.kext_gemm_kernel,
                dict(HAS_BIAS=tag == "y", SORTED=True, GROUP_M=triton_prefill.GROUP_M, BLOCK_M=128,
                     BLOCK_N=c.block_n, BLOCK_K=c.block_k, RC=rc,
                     ACC=f32, **{unit: 1}), c, kept)
    shrink = [(cfg["shrink"], True)] + ([(C(0, 128, 4, 3), False), (C(0, 64, 8, 4), False), (C(0, 128, 8, 3), False)]
                                        if extra else [])
    for c, kept in shrink:
        add(f"shrink BK={c.block_k}", K.shrink_kernel,
            dict(SORTED=True, BLOCK_M=128, RC=rc, BLOCK_K=c.block_k, ACC=f32), c, kept)
    grad = [(cfg["grad"], True)] + ([(C(128, 0, 4, 2), False), (C(256, 0, 8, 2), False), (C(64, 0, 4, 3), False)]
                                    if extra else [])
    for c, kept in grad:
        add(f"rank_grad BN={c.block_n}", K.rank_grad_kernel,
            dict(NEED_POOL=True, NEED_SHARED=True, HAS_TRAIN=True, NEED_GRAD=True, NEED_VAL=True, SORTED=True,
                 BLOCK_M=128, BLOCK_N=c.block_n, RC=rc, NUM_RC=3, ACC=f32), c,
            kept)
    c = cfg["reduce"]
    add(f"rows_reduce BN={c.block_n}", K.rows_reduce_kernel, dict(BLOCK_N=c.block_n, ACC=f32), c, True)
    c = cfg["split_sum"]
    add(f"split_sum BLOCK={c.block_n}", K.split_sum_kernel, dict(BLOCK=c.block_n, ACC=f32), c, True)
    return out


def kept_stats() -> list[tuple[str, int, int, int]]:
    """(name, registers, spill bytes, shared memory bytes) of every kept config."""
    return [(name, *compile_one(fn, cx, w, st)) for name, fn, cx, w, st, kept in cases(False) if kept]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--extra", action="store_true")
    a = ap.parse_args()
    rc = triton_prefill.rank_chunk(96)
    print(f"triton {triton.__version__}, sm_90a, bf16, BLOCK_M=128, RC={rc}")
    print("| kernel (config) | warps | stages | regs | spill bytes | shared mem (B) | kept |")
    print("|---|---|---|---|---|---|---|")
    for name, fn, cx, w, st, kept in cases(a.extra):
        try:
            regs, spill, smem = compile_one(fn, cx, w, st)
            print(f"| {name} | {w} | {st} | {regs} | {spill} | {smem} | {'yes' if kept else 'no'} |", flush=True)
        except Exception as exc:  # report and go on: one failing config must not hide the others
            print(f"| {name} | {w} | {st} | compile error: {type(exc).__name__}: {str(exc)[:120]} | | | |",
                  flush=True)


if __name__ == "__main__":
    main()
