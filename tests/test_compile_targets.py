"""Every Triton kernel of pclr compiles for sm_90 and sm_80 at the target point, without spills, within shared memory.

Target point: bf16, d_in = d_out = 4096, T = 4096 tokens in 8 samples (BLOCK_M = 128), n = 256, r = 64, n_s = 32
(R = 96); the decode kernels at T = 16, 32 and 64 tokens (every token tile decode_config picks for B = 1…64). Each
kernel is compiled with ``triton.compile`` for a ``GPUTarget`` (no GPU needed); the ptxas that ships with Triton
assembles it (``-v``: registers and spill bytes of each function) and shared memory comes from the compiled metadata.

The registry (:func:`registry`) is one table: a row per kernel launch the launchers make, with the configs taken
from the launchers' own config sources (the pinned tables of :mod:`pclr.backends.triton.pinned`, each compiled for
its own architecture,
:func:`pclr.backends.triton.decode.decode_config`, :func:`pclr.backends.triton.configs.gpu_configs`). Kernels of the
default paths (extended prefill / training, decode, the gate) compile every config their launcher keeps and fail
the test on a compile error, a spill or shared memory over the device limit (sm_90: 227 KB, sm_80: 163 KB). The
comparison paths (fused / split / epilogue, the deterministic pool-gradient reduction, one-pass) compile one
representative config each (the kept config with the largest accumulator per thread, the likeliest to spill);
their remaining violations are listed in :data:`KNOWN_VIOLATIONS` with the reason. ``PCLR_COMPILE_ALL=1`` compiles
every kept config of every kernel instead.

    python tests/test_compile_targets.py            # print the full table (sm_90 and sm_80)
    python tests/test_compile_targets.py 90 expand  # one arch, kernels whose name contains "expand"

Compilation runs in subprocesses because the test session runs Triton through the CPU interpreter, which replaces
every ``@triton.jit`` function by an interpreted one at import time; ptxas is the cost, so the jobs are spread over
one subprocess per core.
"""
from __future__ import annotations

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
from typing import Any

import pytest

from pclr.backends.triton import compile_stats
from pclr.backends.triton.compile_stats import (
    SMEM_LIMIT,
    LaunchSpec,
    config_str,
    ptxas_reason,
    ptxas_stats,
    violation,
)
from pclr.backends.triton.configs import next_pow2

ROOT = Path(__file__).resolve().parent.parent
ARCHS = (90, 80)
TARGET = {"d": 4096, "T": 4096, "B": 8, "n": 256, "r": 64, "n_s": 32}
DECODE_T = (16, 32, 64)  # decode_config's token tiles for 1…64 tokens
TIMEOUT_S = 900

# Comparison-path kernels whose representative config still violates a limit: name -> (archs, why). Default-path
# kernels never go here: a violation there fails the test.
KNOWN_VIOLATIONS: dict[str, tuple[tuple[int, ...], str]] = {
    "lrp_expand[fused]": ((80,), "sm_80 has no wgmma: the W and rank tiles pass through registers next to the "
                                 "[128, 64] accumulator and the [128, 128] S tile; 8 warps and 64 columns still spill "
                                 "a few hundred bytes"),
    "lrp_one_pass": ((80,), "its LRP phase is lrp_expand[fused]'s tile, and the kernel's register allocation also "
                            "covers the gate phase's branch: about 350 bytes spill on sm_80 (none on sm_90)"),
    "lrp_one_pass[n=1024]": ((80,), "as lrp_one_pass (the gate's key tile stays at 16K elements: narrower steps)"),
}


@dataclass
class Entry:
    """One kernel launch to compile: pointer dtypes, fp32 scalars, constexprs and the configs to try.

    path: "default" (every kept config must compile clean) or "comparison" (one representative config).
    configs: [(meta constexprs, num_warps, num_stages)].
    """

    name: str
    module: str
    fn: str
    path: str
    ptrs: dict[str, str]
    consts: dict[str, Any]
    configs: list[tuple[dict[str, Any], int, int]]
    floats: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)  # scalar args whose type is not i32
    archs: tuple[int, ...] = ARCHS  # the architectures it is compiled for (a pinned table: its own only)


def _acc_per_thread(cfg: Any, block_m: int, block_r: int) -> int:
    """fp32 accumulator elements per thread of an autotune config: the register pressure that makes ptxas spill."""
    bn = cfg.kwargs.get("BLOCK_N", 0)
    return (block_m * bn + block_m * block_r) // (32 * cfg.num_warps)


def _kept(kind: str, block_m: int, block_r: int) -> list[tuple[dict[str, Any], int, int]]:
    """The comparison launchers' autotune configs of ``kind`` that their prune rule keeps at the target point: all
    of them with ``PCLR_COMPILE_ALL=1``, else the representative one (largest accumulator per thread, then the
    most shared memory)."""
    from pclr.backends.triton import configs as tc

    meta = {"BLOCK_M": block_m, "BLOCK_R": block_r, "X": None}
    kept = [c for c in tc.gpu_configs(kind) if tc.fits(c, meta, SMEM_LIMIT[80], kind)]
    if not os.environ.get("PCLR_COMPILE_ALL"):
        kept = [max(kept, key=lambda c: (_acc_per_thread(c, block_m, block_r), tc.smem_estimate(c, meta, 1)))]
    return [(dict(c.kwargs), c.num_warps, c.num_stages) for c in kept]


def pinned_entries() -> list[Entry]:
    """One entry per (table, kernel, token tile, config) of the shipped pinned tables, for the table's arch only."""
    from pclr.backends.triton import pinned
    from pclr.tune import block_m, launch_spec

    tables = pinned.read_table(pinned.TABLE_FILE)
    out: dict[tuple, Entry] = {}
    for arch, table in tables.items():
        number = int(arch.removeprefix("sm_"))
        for (kernel, _, t), cfg in sorted(table.entries.items()):
            bm = block_m(t, TARGET["B"])
            spec, meta = launch_spec(kernel, bm, TARGET["n_s"] + TARGET["r"])
            key = (arch, kernel, bm, cfg)
            if key not in out:
                out[key] = Entry(f"{spec.name}@{arch}", spec.module, spec.fn, "default", dict(spec.ptrs),
                                 dict(spec.consts), [(meta(cfg), cfg.num_warps, cfg.num_stages)], spec.floats,
                                 dict(spec.extra), archs=(number,))
    return list(out.values())


def registry() -> list[Entry]:
    """Every Triton kernel launch of pclr at the target point (bf16 data, fp32 accumulation)."""
    import triton.language as tl

    from pclr.backends.triton import linear, prefill, prefill_tma
    from pclr.backends.triton.decode import decode_config
    from pclr.backends.triton.one_pass import MAX_ONE_PASS_N, gate_block_d

    t = TARGET
    R = t["n_s"] + t["r"]
    br = max(16, next_pow2(R))
    bm = min(128, max(16, next_pow2(-(-t["T"] // t["B"]))))
    f32 = tl.float32
    bf = "*bf16"
    tiles = {"TOK": "*i32", "TILE_SAMPLE": "*i32", "TILE_START": "*i32", "TILE_END": "*i32"}

    # --- the gate (launch_gate: BLOCK_B = 16, BLOCK_N = 64, BLOCK_D = 64 on a GPU, default warps / stages) --------
    out = [
        Entry("gate_scores", "gate", "gate_scores_kernel", "default",
              {"S": "*fp32", "Q1": bf, "K1": bf, "Q2": bf, "K2": bf},
              {"TWO_PARTS": True, "ACCUMULATE": False, "ACC": f32},
              [({"BLOCK_B": 16, "BLOCK_N": 64, "BLOCK_D": 64}, 4, 3)], floats=("w1", "w2")),
        Entry("gate_topr", "gate", "gate_topr_kernel", "default",
              {"S": "*fp32", "CAND": "*i8", "IDX": "*i32", "VAL": "*fp32"},
              {"HAS_CAND": True, "BATCH": False, "SOFT": True},
              [({"BLOCK_N": next_pow2(t["n"]), "BLOCK_R": next_pow2(t["r"])}, 4 if next_pow2(t["n"]) <= 1024 else 8, 3)]),
    ]

    # --- extended prefill / training: every config of every pinned table (pclr.backends.triton.pinned), compiled
    # for its own architecture at each bucket's token tile --------------------------------------------------------
    out += pinned_entries()
    # the TMA / persistent variant of the K-extended GEMM (prefill_tma's pinned config; sm_90 only: tma_reasons
    # sends every other architecture to the cp.async kernel): X and W through tensor descriptors
    c = prefill_tma._GPU_CONFIG
    tma_ptrs = {"X": bf, "BIAS": bf, "OUT": bf, "US": bf, "UM": bf, "U": "*fp32", "VAL": "*fp32", "IDX": "*i32",
                **tiles}
    for tag, w_box in (("y", (c.block_n, c.block_k)), ("dX", (c.block_k, c.block_n))):
        descs = {"X_DESC": f"tensordesc<bf16[{bm}, {c.block_k}]>", "W_DESC": f"tensordesc<bf16[{w_box[0]}, {w_box[1]}]>"}
        out.append(Entry(f"kext_gemm_tma[{tag}]", "lrp_prefill_tma", "kext_gemm_tma_kernel", "default",
                         {**tma_ptrs, **descs},
                         {"HAS_BIAS": tag == "y", "SORTED": True, "W_KN": tag == "dX", "GROUP_M": prefill.GROUP_M,
                          "BLOCK_M": bm, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k, "RC": prefill.rank_chunk(R),
                          "ACC": f32},
                         [({}, c.num_warps, c.num_stages)], floats=("beta_m", "beta_s"), archs=(90,)))

    # --- decode (decode_config at every token tile of B = 1…64 one-token samples) --------------------------------
    rows = t["n"] + t["n_s"]
    for T in DECODE_T:
        d = decode_config(T, t["d"], t["d"], rows, T * t["r"])
        out.append(Entry(
            f"decode[T={T}]", "lrp_decode", "decode_kernel", "default",
            {"Y": bf, "X": bf, "W": bf, "BIAS": bf, "AS": bf, "AM": bf, "BS": bf, "BM": bf, "IDX": "*i32",
             "VAL": "*fp32", "SOT": "*i32", "SG": "*fp32", "USED": "*i8", "COUNTERS": "*i32"},
            {"ACC": f32, "HAS_BASE": True, "HAS_BIAS": True, "INTERPRET": False},
            [({"BLOCK_T": d.block_t, "BLOCK_J": d.block_j, "BLOCK_K": d.block_k, "BLOCK_U": d.block_u,
               "EXPAND_BLOCK_J": d.expand_block_j, "BLOCK_N": d.block_n, "EXPAND_BLOCK_K": d.expand_block_k},
              d.num_warps, 3)], floats=("beta_m", "beta_s")))

    # --- comparison paths: fused / split / epilogue forward and their backward ------------------------------------
    expand_ptrs = {"X": bf, "W": bf, "BIAS": bf, "OUT": bf, "DS": bf, "DM": bf, "US": bf, "UM": bf, "IDX": "*i32",
                   "VAL": "*fp32", "SBUF": "*fp32", **tiles, "SOT": "*i32"}
    expand = _kept("expand", bm, br)
    # fused: base + LRP in one K loop; split (and the dX of fused / split): S from the shrink's buffer, base in the
    # K loop; epilogue: S from the buffer, LRP term added to cuBLAS's y
    for variant, base, from_buf in (("fused", True, False), ("split", True, True), ("epilogue", False, True)):
        out.append(Entry(
            f"lrp_expand[{variant}]", "lrp_fwd", "lrp_expand_kernel", "comparison", expand_ptrs,
            {"HAS_BASE": base, "HAS_BIAS": base, "ACCUMULATE": not base, "S_FROM_BUF": from_buf,
             "K_LOOP": base or not from_buf, "SORTED": True, "DECODE": False, "BLOCK_M": bm, "BLOCK_R": br,
             "ACC": f32},
            expand, floats=("beta_m", "beta_s")))
    out.append(Entry(
        "lrp_shrink", "lrp_fwd", "lrp_shrink_kernel", "comparison",
        {"X": bf, "DS": bf, "DM": bf, "IDX": "*i32", "SBUF": "*fp32", **tiles},
        {"SORTED": True, "BLOCK_M": bm, "BLOCK_R": br, "ACC": f32}, _kept("shrink", bm, br)))
    out.append(Entry(
        "pool_grad", "lrp_bwd", "pool_grad_kernel", "comparison",
        {"G": "*fp32", "X": bf, "OUT": "*fp32", "IDX": "*i32", "VAL": "*fp32", "TRAIN": "*i8", "TOK": "*i32",
         "SEG_START": "*i32", "SEG_COUNT": "*i32"},
        {"SORTED": True, "ATOMIC": True, "HAS_TRAIN": True, "NEED_POOL": True, "NEED_SHARED": True,
         "BLOCK_M": bm, "BLOCK_R": br, "ACC": f32}, _kept("pool", bm, br), floats=("beta_m", "beta_s")))
    out.append(Entry(
        "segment_reduce", "lrp_bwd", "segment_reduce_kernel", "comparison",
        {"P": "*fp32", "OUT": "*fp32", "SRC": "*i32", "STARTS": "*i32", "COUNTS": "*i32"},
        {"ACC": f32}, [({"BLOCK_N": 256}, 4, 3)]))
    out.append(Entry(
        "segment_dval", "lrp_bwd", "segment_dval_kernel", "comparison",
        {"G": "*fp32", "H": "*fp32", "DVAL": "*fp32", "SEG_START": "*i32", "SEG_COUNT": "*i32"},
        {"ACC": f32}, [({"BLOCK_T": linear.DVAL_TOKENS, "BLOCK_R": br}, 4, 3)], floats=("beta_m",)))

    # --- one-pass gate phase + LRP phase (launch_one_pass: the "expand" autotune list, its gate's key tile) -------
    one_pass_ptrs = {"X": bf, "W": bf, "BIAS": bf, "OUT": bf, "AS": bf, "AM": bf, "BS": bf, "BM": bf, "Q1": bf,
                     "K1": bf, "Q2": bf, "K2": bf, "CAND": "*i8", "IDX": "*i32", "VAL": "*fp32", "COUNTERS": "*i32",
                     **tiles, "SOT": "*i32"}
    one_pass_consts = {"HAS_BIAS": True, "TWO_PARTS": True, "HAS_CAND": False, "SOFT": True, "SORTED": True,
                       "DECODE": False, "INTERPRET": False, "BLOCK_M": bm, "BLOCK_R": br}
    # the target point's n, and the largest n the one-pass path takes (its gate holds n scores per program)
    for tag, n_keys in (("", t["n"]), (f"[n={MAX_ONE_PASS_N}]", MAX_ONE_PASS_N)):
        out.append(Entry(
            f"lrp_one_pass{tag}", "lrp_fwd", "lrp_one_pass_kernel", "comparison", one_pass_ptrs,
            {**one_pass_consts, "BLOCK_NK": max(16, next_pow2(n_keys)), "BLOCK_D": gate_block_d(n_keys)},
            _kept("one_pass", bm, br), floats=("w1", "w2", "beta_m", "beta_s")))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Compiling (in the worker subprocess)
# ---------------------------------------------------------------------------------------------------------------

def compile_one(entry: Entry, meta: dict[str, Any], warps: int, stages: int, arch: int) -> dict[str, Any]:
    """One table row: kernel, config, arch, path, and regs / spills / smem (or the compile error)."""
    spec = LaunchSpec(entry.name, entry.module, entry.fn, entry.ptrs, entry.consts, entry.floats, entry.extra)
    return {**compile_stats.compile_one(spec, meta, warps, stages, arch), "path": entry.path}


def jobs(archs: tuple[int, ...] = ARCHS, only: str = "") -> list[tuple[int, int, int]]:
    """(entry index, config index, arch) of every compile, in registry order."""
    return [(i, j, arch) for arch in archs for i, e in enumerate(registry()) if only in e.name and arch in e.archs
            for j in range(len(e.configs))]


def _worker(shard: int, shards: int, archs: tuple[int, ...], only: str) -> None:
    """Compile every ``shards``-th job from ``shard`` on; one JSON row per line on stdout."""
    reg = registry()
    for i, j, arch in jobs(archs, only)[shard::shards]:
        row = compile_one(reg[i], *reg[i].configs[j], arch)
        print(json.dumps(row), file=sys.__stdout__, flush=True)


def compile_all(archs: tuple[int, ...] = ARCHS, only: str = "") -> list[dict[str, Any]]:
    """Compile the registry in one subprocess per core (real ``@triton.jit`` functions: no interpreter there)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what Triton < 3.10 does by default, and what launches use
    env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="pclr-compile-")  # a cached kernel prints no ptxas log
    shards = max(1, min(os.cpu_count() or 1, 8))

    def run(shard: int) -> list[dict[str, Any]]:
        res = subprocess.run([sys.executable, __file__, "--worker", str(shard), str(shards), ",".join(map(str, archs)),
                              only], check=False, capture_output=True, text=True, env=env, timeout=TIMEOUT_S,
                             cwd=str(ROOT))
        assert res.returncode == 0, res.stderr[-3000:]
        return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]

    with ThreadPoolExecutor(max_workers=shards) as pool:
        rows = [row for part in pool.map(run, range(shards)) for row in part]
    order = {(i, j, a): k for k, (i, j, a) in enumerate(jobs(archs, only))}
    reg = registry()
    key = {(e.name, config_str(*c), a): order[(i, j, a)] for (i, j, a) in order for e in [reg[i]]
           for c in [e.configs[j]]}
    return sorted(rows, key=lambda r: key.get((r["kernel"], r["config"], r["arch"]), 0))


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'kernel':<22} {'config':<40} {'arch':<5} {'regs':>5} {'spills':>7} {'smem KB':>8} {'s':>6}  path"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['kernel']:<22} {r['config']:<40} sm_{r['arch']:<2}  ERROR {r['error']}")
        else:
            lines.append(f"{r['kernel']:<22} {r['config']:<40} sm_{r['arch']:<2} {r['regs']:>5} {r['spills']:>7} "
                         f"{r['smem'] / 1024:>8.1f} {r['seconds']:>6}  {r['path']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------------------------------------


def _launched_kernels() -> set[tuple[str, str]]:
    """(module, function) of every ``*_kernel`` defined in pclr.kernels."""
    import pclr.kernels

    found = set()
    for path in Path(pclr.kernels.__path__[0]).glob("*.py"):
        found |= {(path.stem, m) for m in re.findall(r"^def (\w+_kernel)\(", path.read_text(), re.M)}
    return found


def test_registry_covers_every_kernel() -> None:
    covered = {(e.module, e.fn) for e in registry()}
    missing = _launched_kernels() - covered
    assert not missing, f"kernels without a compile entry: {sorted(missing)}"
    names = {e.name: e.path for e in registry()}
    assert set(KNOWN_VIOLATIONS) <= set(names), set(KNOWN_VIOLATIONS) - set(names)
    assert all(names[k] == "comparison" for k in KNOWN_VIOLATIONS), "a default-path kernel may not violate a limit"


def test_ptxas_parser_reads_the_entry_function() -> None:
    log = ("ptxas info    : 0 bytes gmem\n"
           "ptxas info    : Compiling entry function 'helper_kernel' for 'sm_90a'\n"
           "ptxas info    : Function properties for helper_kernel\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 32 registers, used 0 barriers\n"
           "ptxas info    : Compiling entry function 'big_kernel' for 'sm_90a'\n"
           "ptxas info    : Function properties for big_kernel\n"
           "    40960 bytes stack frame, 20480 bytes spill stores, 20480 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 40960 bytes cumulative stack size\n")
    assert ptxas_stats(log, "big_kernel") == (255, 40960)
    assert ptxas_stats(log, "helper_kernel") == (32, 0)
    with pytest.raises(ValueError, match="no entry function"):
        ptxas_stats(log, "absent_kernel")


@pytest.mark.skipif(bool(ptxas_reason()), reason=ptxas_reason() or "ptxas available")
def test_kernels_compile_for_sm90_and_sm80() -> None:
    rows = compile_all()
    print("\n" + format_table(rows))
    assert len(rows) == len(jobs()), f"{len(jobs()) - len(rows)} compiles returned no row"
    errors = [f"{r['kernel']} {r['config']} sm_{r['arch']}: {r['error']}" for r in rows if "error" in r]
    assert not errors, "compile errors:\n" + "\n".join(errors)
    bad = [r for r in rows if violation(r) and r["arch"] not in KNOWN_VIOLATIONS.get(r["kernel"], ((), ""))[0]]
    assert not bad, "spills or shared memory over the limit:\n" + "\n".join(
        f"{r['kernel']} {r['config']} sm_{r['arch']} ({r['path']}): {violation(r)}" for r in bad)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker(int(sys.argv[2]), int(sys.argv[3]), tuple(int(a) for a in sys.argv[4].split(",")),
                sys.argv[5] if len(sys.argv) > 5 else "")
    else:
        archs = tuple(int(a) for a in sys.argv[1].split(",")) if len(sys.argv) > 1 else ARCHS
        t0 = time.perf_counter()
        table = compile_all(archs, sys.argv[2] if len(sys.argv) > 2 else "")
        print(format_table(table))
        print(f"{len(table)} compiles in {time.perf_counter() - t0:.0f} s")
