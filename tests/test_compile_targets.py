"""Every Triton kernel of pclr compiles for sm_90 and sm_80 at the target point, without spills, within shared memory.

Target point: bf16, d_in = d_out = 4096, T = 4096 tokens in 8 samples, n = 256, r = 64, n_s = 32 (R = 96); the
decode kernels at T = 8 and T = 64. Each kernel is compiled with ``triton.compile`` for a ``GPUTarget`` (no GPU
needed), its PTX is assembled by the ptxas that ships with Triton (``-v``: registers and spill bytes), and shared
memory is read from the compiled metadata. The test fails on a compile error, on a spill in a config the launcher
keeps, or on shared memory over the device limit (sm_90: 227 KB, sm_80: 163 KB).

Configs: the launcher's autotune lists, filtered by the launcher's own prune rule at the target point. Compiling the
full product (≈ 70 configs × 2 targets) takes tens of minutes on a CI CPU (ptxas alone needs minutes for the
largest tiles), so by default each autotuned kernel compiles its heaviest kept config (most shared memory);
``PCLR_COMPILE_ALL=1`` compiles a representative subset instead: for every (BLOCK_N, num_warps) pair the deepest
pipeline with the widest K step. The fixed-config kernels always compile exactly their launch config. A new
kernel adds one entry to :func:`registry`. ``pytest -s`` prints the table (kernel × config: regs / spills / smem).

Compilation runs in a subprocess because the test session runs Triton through the CPU interpreter, which replaces
every ``@triton.jit`` function by an interpreted one at import time.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
TARGET = {"d": 4096, "T": 4096, "B": 8, "n": 256, "r": 64, "n_s": 32}
TIMEOUT_S = 1200
# Kernels whose heaviest kept config is known to spill (or, pool_grad on sm_80, to exceed shared memory) at the
# target point. Their rows are printed and their violations turn the test into an expected failure that lists
# them; any other kernel that spills fails the test. Remove a name once its configs are fixed.
KNOWN_VIOLATIONS = {"gate_scores", "lrp_expand[fused]", "lrp_expand[epilogue]", "lrp_shrink", "lrp_one_pass",
                    "pool_grad", "segment_dval"}


@dataclass
class Entry:
    """One kernel launch to compile: pointer dtypes, fp32 scalars, constexprs and the configs to try."""

    name: str
    module: str
    fn: str
    ptrs: dict
    consts: dict
    configs: list  # [(meta constexprs, num_warps, num_stages)]
    floats: tuple = ()
    extra: dict = field(default_factory=dict)  # scalar args whose type is not i32


def _pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _kept(kind: str, block_m: int, block_r: int) -> list:
    """The launcher's autotune configs of ``kind`` that its prune rule keeps at the target point, reduced to the
    representative subset (deepest pipeline and widest K step per (BLOCK_N, num_warps))."""
    from pclr.backends import triton as tb

    meta = {"BLOCK_M": block_m, "BLOCK_R": block_r, "X": None}
    kept = [c for c in tb._configs(kind)
            if tb._smem_of(c, meta, 1) <= SMEM_LIMIT[80]
            and block_m * c.kwargs.get("BLOCK_N", 64) <= 128 * 32 * c.num_warps]
    best: dict = {}
    for c in kept:
        key = (c.kwargs.get("BLOCK_N"), c.num_warps)
        rank = (c.num_stages, c.kwargs.get("BLOCK_K", 0))
        if key not in best or rank > best[key][0]:
            best[key] = (rank, c)
    chosen = [c for _, c in sorted(best.values(), key=lambda v: str(v[1]))]
    if not os.environ.get("PCLR_COMPILE_ALL"):  # CI: the heaviest kept config only (most shared memory)
        chosen = [max(chosen, key=lambda c: tb._smem_of(c, meta, 1))]
    return [(dict(c.kwargs), c.num_warps, c.num_stages) for c in chosen]


def registry() -> list[Entry]:
    """Every Triton kernel of pclr at the target point (bf16 data, fp32 accumulation)."""
    import triton.language as tl

    from pclr.backends.triton.decode import decode_config

    t = TARGET
    R = t["n_s"] + t["r"]
    br = max(16, _pow2(R))
    bm = min(128, max(16, _pow2(-(-t["T"] // t["B"]))))
    f32 = tl.float32
    bf = "*bf16"
    tiles = {"TOK": "*i32", "TILE_SAMPLE": "*i32", "TILE_START": "*i32", "TILE_END": "*i32"}
    out = [
        Entry("gate_scores", "gate", "gate_scores_kernel",
              {"S": "*fp32", "Q1": bf, "K1": bf, "Q2": bf, "K2": bf},
              {"TWO_PARTS": True, "ACCUMULATE": False, "ACC": f32},
              [({"BLOCK_B": 16, "BLOCK_N": 64, "BLOCK_D": 64}, 4, 3)], floats=("w1", "w2")),
        Entry("gate_topr", "gate", "gate_topr_kernel",
              {"S": "*fp32", "CAND": "*i8", "IDX": "*i32", "VAL": "*fp32"},
              {"HAS_CAND": True, "BATCH": False, "SOFT": True},
              [({"BLOCK_N": _pow2(t["n"]), "BLOCK_R": _pow2(t["r"])}, 4, 3)]),
    ]
    expand_ptrs = {"X": bf, "W": bf, "BIAS": bf, "OUT": bf, "DS": bf, "DM": bf, "US": bf, "UM": bf, "IDX": "*i32",
                   "VAL": "*fp32", "SBUF": "*fp32", **tiles, "SOT": "*i32"}
    for variant, base, from_buf in (("fused", True, False), ("epilogue", False, True)):
        out.append(Entry(
            f"lrp_expand[{variant}]", "lrp_fwd", "lrp_expand_kernel", expand_ptrs,
            {"HAS_BASE": base, "HAS_BIAS": base, "ACCUMULATE": not base, "S_FROM_BUF": from_buf,
             "K_LOOP": base or not from_buf, "SORTED": True, "DECODE": False, "BLOCK_M": bm, "BLOCK_R": br,
             "ACC": f32},
            _kept("expand", bm, br), floats=("beta_m", "beta_s")))
    out.append(Entry(
        "lrp_shrink", "lrp_fwd", "lrp_shrink_kernel",
        {"X": bf, "DS": bf, "DM": bf, "IDX": "*i32", "SBUF": "*fp32", **tiles},
        {"SORTED": True, "BLOCK_M": bm, "BLOCK_R": br, "ACC": f32}, _kept("shrink", bm, br)))
    one_pass = _kept("expand", bm, br)
    out.append(Entry(
        "lrp_one_pass", "lrp_fwd", "lrp_one_pass_kernel",
        {"X": bf, "W": bf, "BIAS": bf, "OUT": bf, "AS": bf, "AM": bf, "BS": bf, "BM": bf, "Q1": bf, "K1": bf,
         "Q2": bf, "K2": bf, "CAND": "*i8", "IDX": "*i32", "VAL": "*fp32", **tiles, "SOT": "*i32"},
        {"HAS_BIAS": True, "TWO_PARTS": True, "HAS_CAND": False, "SOFT": True, "SORTED": True, "DECODE": False,
         "BLOCK_M": bm, "BLOCK_R": br, "BLOCK_NK": max(16, _pow2(t["n"])), "BLOCK_D": 64},
        one_pass, floats=("w1", "w2", "beta_m", "beta_s")))
    out.append(Entry(
        "pool_grad", "lrp_bwd", "pool_grad_kernel",
        {"G": "*fp32", "X": bf, "OUT": "*fp32", "IDX": "*i32", "VAL": "*fp32", "TRAIN": "*i8", "TOK": "*i32",
         "SEG_START": "*i32", "SEG_COUNT": "*i32"},
        {"SORTED": True, "ATOMIC": True, "HAS_TRAIN": True, "NEED_POOL": True, "NEED_SHARED": True,
         "BLOCK_M": bm, "BLOCK_R": br, "ACC": f32}, _kept("pool", bm, br), floats=("beta_m", "beta_s")))
    out.append(Entry(
        "segment_reduce", "lrp_bwd", "segment_reduce_kernel",
        {"P": "*fp32", "OUT": "*fp32", "SRC": "*i32", "STARTS": "*i32", "COUNTS": "*i32"},
        {"ACC": f32}, [({"BLOCK_N": 256}, 4, 3)]))
    out.append(Entry(
        "segment_dval", "lrp_bwd", "segment_dval_kernel",
        {"G": "*fp32", "H": "*fp32", "DVAL": "*fp32", "SEG_START": "*i32", "SEG_COUNT": "*i32"},
        {"ACC": f32}, [({"BLOCK_M": bm, "BLOCK_R": br}, 4, 3)], floats=("beta_m",)))
    rows = t["n"] + t["n_s"]
    for T in (8, 64):
        cfg = decode_config(T, t["d"], t["d"], rows, T * t["r"])
        out.append(Entry(
            f"decode_shrink[T={T}]", "lrp_decode", "decode_shrink_kernel",
            {"X": bf, "AS": bf, "AM": bf, "IDX": "*i32", "VAL": "*fp32", "SOT": "*i32", "SG": "*fp32",
             "USED": "*i8"}, {"ACC": f32},
            [({"BLOCK_T": cfg.block_t, "BLOCK_J": cfg.block_j, "BLOCK_K": cfg.block_k, "BLOCK_U": cfg.block_u},
              cfg.shrink_warps, 3)], floats=("beta_m", "beta_s")))
        out.append(Entry(
            f"decode_expand[T={T}]", "lrp_decode", "decode_expand_kernel",
            {"Y": bf, "BS": bf, "BM": bf, "SG": "*fp32", "USED": "*i8"}, {"ACC": f32},
            [({"BLOCK_T": cfg.block_t, "BLOCK_J": cfg.expand_block_j, "BLOCK_N": cfg.block_n}, cfg.expand_warps, 3)]))
    return out


def _ptxas_stats(log: str) -> tuple[int, int]:
    """(registers, spill bytes stored + loaded) from a ``ptxas -v`` log."""
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spills


def _compile_one(entry: Entry, meta: dict, warps: int, stages: int, arch: int) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"pclr.kernels.{entry.module}"), entry.fn)
    consts = {**entry.consts, **meta}
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in entry.ptrs:
            sig[name] = entry.ptrs[name]
        elif name in entry.floats:
            sig[name] = "fp32"
        else:
            sig[name] = entry.extra.get(name, "i32")
    row = {"kernel": entry.name, "config": _config_str(meta, warps, stages), "arch": arch}
    log = io.StringIO()
    try:
        # Triton already runs its bundled ptxas with -v (sm_90a for sm_90); TRITON_DUMP_PTXAS_LOG prints that log
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                               target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
        row["smem"] = int(k.metadata.shared)
        row["regs"], row["spills"] = _ptxas_stats(log.getvalue())
    except Exception as exc:  # noqa: BLE001 -- reported in the table, then failed on by the test
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    return row


def _config_str(meta: dict, warps: int, stages: int) -> str:
    blocks = ",".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in meta.items())
    return f"{blocks} w{warps} s{stages}"


def _worker(arch: int, only: str = "") -> None:
    rows = []
    for e in registry():
        if only and only not in e.name:
            continue
        for cfg in e.configs:
            t0 = time.perf_counter()
            rows.append(_compile_one(e, *cfg, arch))
            rows[-1]["seconds"] = round(time.perf_counter() - t0, 1)
            sys.stderr.write(json.dumps(rows[-1]) + "\n")
    sys.stdout.write("\n" + json.dumps(rows) + "\n")


def _run_arch(arch: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="pclr-compile-")  # a cached kernel prints no ptxas log
    res = subprocess.run([sys.executable, __file__, str(arch)], check=False, capture_output=True, text=True, env=env,
                         timeout=TIMEOUT_S, cwd=str(Path(__file__).resolve().parent.parent))
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _ptxas(arch: int) -> str:
    """Path of the ptxas Triton ships (the helper takes the arch from Triton 3.7 on)."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        return get_ptxas(arch).path
    except TypeError:
        return get_ptxas().path


def _ptxas_available() -> str:
    try:
        _ptxas(90)
        return ""
    except Exception as exc:  # noqa: BLE001 -- any failure means: no ptxas to read registers with
        return f"triton's bundled ptxas is not usable here: {type(exc).__name__}: {exc}"


@pytest.mark.skipif(bool(_ptxas_available()), reason=_ptxas_available() or "ptxas available")
def test_kernels_compile_for_sm90_and_sm80():
    with ThreadPoolExecutor(max_workers=2) as pool:  # one subprocess per target
        rows = [row for part in pool.map(_run_arch, (90, 80)) for row in part]
    print("\n{:<22} {:<34} {:>5} {:>5} {:>7} {:>8}".format("kernel", "config", "arch", "regs", "spills", "smem KB"))
    for row in rows:
        if "error" in row:
            print(f"{row['kernel']:<22} {row['config']:<34} {row['arch']:>5}  ERROR {row['error']}")
        else:
            print(f"{row['kernel']:<22} {row['config']:<34} sm_{row['arch']:<2} {row['regs']:>5} {row['spills']:>7} "
                  f"{row['smem'] / 1024:>8.1f}")
    errors = [f"{r['kernel']} {r['config']} sm_{r['arch']}: {r['error']}" for r in rows if "error" in r]
    assert len(rows) >= 2 * len(registry())
    assert not errors, "compile errors:\n" + "\n".join(errors)
    bad = [r for r in rows if r["spills"] or r["smem"] > SMEM_LIMIT[r["arch"]]]
    report = "\n".join(f"{r['kernel']} {r['config']} sm_{r['arch']}: {r['spills']} B spilled, {r['smem']} B shared"
                       for r in bad)
    assert all(r["kernel"] in KNOWN_VIOLATIONS for r in bad), "spills or shared memory over the limit:\n" + report
    if bad:
        pytest.xfail("known spills / shared memory over the limit (KNOWN_VIOLATIONS):\n" + report)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), *sys.argv[2:3])
