"""``pclr tune``: regenerate the pinned config tables of the extended prefill / training kernels.

For each architecture the table (:mod:`pclr.backends.triton.pinned`) holds one config per kernel and shape bucket.
``pclr tune`` builds it from the candidates of :data:`CANDIDATES`:

* on a GPU: every candidate is compiled for the device (registers, spills, shared memory from the driver); among
  those that compile clean each is timed through the real launcher at each bucket (CUDA events, warmup, median of
  the repeats) and the fastest is pinned;
* ``--compile-only`` (no GPU needed): every candidate is compiled for the target with ``triton.compile`` and the
  bundled ptxas; the pick is the first clean one in :func:`preference` order (no spills, shared memory within the
  architecture's limit, then the largest tile). The compile depends on a bucket only through its token tile
  (BLOCK_M), so buckets sharing a token tile share the pick. This is how the shipped sm_80 table is made.

The table file is JSON (format in :mod:`pclr.backends.triton.pinned`); a markdown summary is written beside it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl

from pclr.backends.triton import pinned, prefill
from pclr.backends.triton.compile_stats import (
    ARCH_NUMBER,
    SMEM_LIMIT,
    LaunchSpec,
    compile_one,
    compile_rows,
    violation,
)
from pclr.backends.triton.pinned import KERNELS, KernelConfig

TUNE_SAMPLES = 8  # samples per batch the buckets are tuned at (the target point's)
TUNE_R = 96  # n_s + r active ranks at the target point (n_s = 32, r = 64)

# the candidate grid per kernel: (block_n values, block_k values, num_warps values, num_stages values)
# (256-column GEMM tiles are left out: at BLOCK_M = 128 their fp32 accumulator alone is 128 registers per thread
# at 8 warps, next to the rank chunk's operands; they spill on sm_80 and sm_90.)
CANDIDATES: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
    "gemm": ((64, 128), (32, 64), (4, 8), (2, 3, 4)),
    "gemm_dx": ((64, 128), (32, 64), (4, 8), (2, 3, 4)),
    "shrink": ((0,), (32, 64, 128), (4, 8), (2, 3, 4)),
    "grad": ((64, 128, 256), (0,), (4, 8), (2, 3)),
    "reduce": ((128, 256, 512), (0,), (4, 8), (1,)),
    "split_sum": ((512, 1024, 2048), (0,), (4, 8), (1,)),
}


def candidates(kernel: str) -> list[KernelConfig]:
    """Every candidate config of ``kernel``, most preferred first (:func:`preference`)."""
    if kernel not in CANDIDATES:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    grid = [KernelConfig(bn, bk, w, s) for bn, bk, w, s in itertools.product(*CANDIDATES[kernel])]
    return sorted(grid, key=preference)


def preference(cfg: KernelConfig) -> tuple[int, int, int, int]:
    """Sort key of the compile-only pick: the largest tile first (block_n × block_k, then block_n), then more
    pipeline stages, then more warps (more threads to hide the latency of a large tile)."""
    return (-max(1, cfg.block_n) * max(1, cfg.block_k), -cfg.block_n, -cfg.num_stages, -cfg.num_warps)


def block_m(t: int, samples: int = TUNE_SAMPLES) -> int:
    """The token tile of a launch of ``t`` tokens in ``samples`` samples on a GPU (segments.tile_block_m, which
    caps it at 64 under the interpreter)."""
    per_sample = -(-t // max(1, min(samples, t)))
    return min(128, max(16, 1 << max(0, per_sample - 1).bit_length()))


_PRE = {"X": "*bf16", "DS": "*bf16", "DM": "*bf16", "W": "*bf16", "BIAS": "*bf16", "OUT": "*bf16", "US": "*bf16",
        "UM": "*bf16", "XA": "*bf16", "XB": "*bf16", "AM": "*bf16", "BM": "*bf16", "AS": "*bf16", "BS": "*bf16",
        "U": "*fp32", "P": "*fp32", "PA": "*fp32", "PB": "*fp32", "DVAL": "*fp32", "VAL": "*fp32", "DS_ACC": "*fp32",
        "IDX": "*i32", "TRAIN": "*i8", "SRC": "*i32", "STARTS": "*i32", "COUNTS": "*i32", "SEG_START": "*i32",
        "SEG_COUNT": "*i32", "TOK": "*i32", "TILE_SAMPLE": "*i32", "TILE_START": "*i32", "TILE_END": "*i32"}


def launch_spec(kernel: str, bm: int, R: int = TUNE_R) -> tuple[LaunchSpec, Callable[[KernelConfig], dict]]:
    """(what ``kernel`` is compiled with at token tile ``bm`` and R ranks, bf16 data; the config -> tile constexprs
    map). Mirrors the launch in :mod:`pclr.backends.triton.prefill`."""
    rc = prefill.rank_chunk(R)
    f32 = tl.float32
    mod = "lrp_prefill"
    if kernel == "shrink":
        return (LaunchSpec("shrink", mod, "shrink_kernel", _PRE,
                           {"SORTED": True, "BLOCK_M": bm, "RC": rc, "ACC": f32}),
                lambda c: {"BLOCK_K": c.block_k})
    if kernel in ("gemm", "gemm_dx"):
        y = kernel == "gemm"
        # dX reads W transposed: the unit stride is the other one
        consts = {"HAS_BIAS": y, "SORTED": True, "GROUP_M": prefill.GROUP_M, "BLOCK_M": bm, "RC": rc, "ACC": f32,
                  ("stride_wk" if y else "stride_wn"): 1}
        return (LaunchSpec(f"kext_gemm[{'y' if y else 'dX'}]", mod, "kext_gemm_kernel", _PRE, consts,
                           floats=("beta_m", "beta_s")),
                lambda c: {"BLOCK_N": c.block_n, "BLOCK_K": c.block_k})
    if kernel == "grad":
        # rank_grad reads the fp32 dS of the shrink and the saved fp32 u
        consts = {"NEED_POOL": True, "NEED_SHARED": True, "HAS_TRAIN": True, "NEED_GRAD": True, "NEED_VAL": True,
                  "SORTED": True, "BLOCK_M": bm, "RC": rc, "NUM_RC": min(prefill.MAX_RANK_CHUNKS, -(-R // rc)),
                  "ACC": f32}
        return (LaunchSpec("rank_grad", mod, "rank_grad_kernel", {**_PRE, "DS": "*fp32"}, consts,
                           floats=("beta_m", "beta_s")),
                lambda c: {"BLOCK_N": c.block_n})
    if kernel == "reduce":
        return (LaunchSpec("rows_reduce", mod, "rows_reduce_kernel", _PRE, {"ACC": f32}),
                lambda c: {"BLOCK_N": c.block_n})
    if kernel == "split_sum":
        return (LaunchSpec("split_sum", mod, "split_sum_kernel", _PRE, {"ACC": f32}),
                lambda c: {"BLOCK": c.block_n})
    raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")


def compile_jobs(kernel: str, bm: int, arch: int, cfgs: Sequence[KernelConfig]) -> list[tuple]:
    spec, meta = launch_spec(kernel, bm)
    return [(spec, meta(c), c.num_warps, c.num_stages, arch) for c in cfgs]


# ---------------------------------------------------------------------------------------------------------------
# Compile-only pick
# ---------------------------------------------------------------------------------------------------------------

CompileFn = Callable[[list[tuple]], list[dict[str, Any]]]


def pick_by_compile(kernel: str, bm: int, arch: int, compile_fn: CompileFn = compile_rows,
                    wave: int = 2) -> tuple[KernelConfig, dict[str, Any], list[dict[str, Any]]]:
    """(config, its compile row, every row compiled): the first candidate in preference order that compiles for
    ``arch`` without spills and within its shared memory. Compiles ``wave`` candidates at a time (one per worker)
    and stops at the first wave holding a clean one."""
    cands = candidates(kernel)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(cands), wave):
        part = cands[start:start + wave]
        got = compile_fn(compile_jobs(kernel, bm, arch, part))
        rows += got
        for cfg, row in zip(part, got):
            if not violation(row):
                return cfg, row, rows
    raise RuntimeError(f"no candidate of {kernel} compiles clean for sm_{arch} at BLOCK_M = {bm}:\n"
                       + "\n".join(f"  {r['config']}: {violation(r)}" for r in rows))


def stats_of(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("regs", "spills", "smem") if k in row}


def tune_compile_only(arch: str, kernels: Sequence[str], ds: Sequence[int], ts: Sequence[int],
                      compile_fn: CompileFn = compile_rows, wave: int = 2,
                      log: Callable[[str], None] = print) -> dict[str, Any]:
    """The table of ``arch`` ({"method", "triton", "device", "shapes", "entries"}) picked by compile statistics."""
    number = ARCH_NUMBER[arch]
    entries = []
    picked: dict[tuple[str, int], tuple[KernelConfig, dict]] = {}
    for kernel in kernels:
        for t in ts:
            bm = block_m(t)
            if (kernel, bm) not in picked:
                cfg, row, rows = pick_by_compile(kernel, bm, number, compile_fn, wave)
                picked[(kernel, bm)] = (cfg, row)
                log(f"{arch} {kernel:<9} BLOCK_M={bm:<4} {row['config']:<22} regs {row['regs']:>3} spills "
                    f"{row['spills']} smem {row['smem'] / 1024:.1f} KB ({len(rows)} compiled)")
            cfg, row = picked[(kernel, bm)]
            entries += [pinned.entry_dict(kernel, d, t, cfg, stats_of(row)) for d in ds]
    return {"method": "compile-only: the largest tile that compiles without spills within shared memory "
                      f"(pclr tune --compile-only --target {arch})",
            "triton": _triton_version(), "device": None,
            "shapes": {"B": TUNE_SAMPLES, "R": TUNE_R, "dtype": "bfloat16"}, "entries": entries}


# ---------------------------------------------------------------------------------------------------------------
# Timed pick (GPU)
# ---------------------------------------------------------------------------------------------------------------


def median_ms(fn: Callable[[], None], warmup: int = 3, reps: int = 20) -> float:
    """Median of ``reps`` CUDA-event timings of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fastest(timed: Sequence[tuple[KernelConfig, float]]) -> tuple[KernelConfig, float]:
    """The fastest (config, ms); a tie goes to the earlier config in preference order."""
    if not timed:
        raise ValueError("timed must hold at least one (config, ms)")
    order = {c: i for i, (c, _) in enumerate(sorted(timed, key=lambda p: preference(p[0])))}
    return min(timed, key=lambda p: (p[1], order[p[0]]))


def tune_timed(kernels: Sequence[str], ds: Sequence[int], ts: Sequence[int],
               log: Callable[[str], None] = print) -> tuple[str, dict[str, Any]]:
    """(arch, table) on the current GPU: clean-compiling candidates timed through the launchers at each bucket."""
    cap = torch.cuda.get_device_capability()
    arch, why = pinned.arch_for_capability(cap)
    number = cap[0] * 10 + cap[1]
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    limit = int(getattr(props, "shared_memory_per_block_optin", SMEM_LIMIT.get(number, 49152)))
    log(f"{torch.cuda.get_device_name()}: {why}")
    entries = []
    for kernel in kernels:
        for t in ts:
            bm = block_m(t)
            rows = [compile_one(*job, load=True) for job in compile_jobs(kernel, bm, number, candidates(kernel))]
            clean = [(c, r) for c, r in zip(candidates(kernel), rows)
                     if "error" not in r and not r["spills"] and r["smem"] <= limit]
            if not clean:
                raise RuntimeError(f"no candidate of {kernel} compiles clean on this device at BLOCK_M = {bm}")
            for d in ds:
                run = bucket_runner(kernel, d, t, TUNE_SAMPLES, TUNE_R)
                timed = [(c, median_ms(lambda c=c: run(c))) for c, _ in clean]
                cfg, ms = fastest(timed)
                row = dict(zip(candidates(kernel), rows))[cfg]
                log(f"{arch} {kernel:<9} d={d:<5} t={t:<6} {row['config']:<22} {ms:.4f} ms "
                    f"({len(timed)} timed)")
                entries.append(pinned.entry_dict(kernel, d, t, cfg, {**stats_of(row), "ms": round(ms, 5)}))
    return arch, {"method": "timed: the fastest clean-compiling candidate (pclr tune on the device)",
                  "triton": _triton_version(), "device": torch.cuda.get_device_name(),
                  "shapes": {"B": TUNE_SAMPLES, "R": TUNE_R, "dtype": "bfloat16"}, "entries": entries}


def bucket_runner(kernel: str, d: int, t: int, samples: int, R: int, n: int = 256,
                  n_s: int = 32) -> Callable[[KernelConfig], None]:
    """A function that runs ``kernel``'s launcher once with a given config on bf16 inputs of the bucket: d_in =
    d_out = d, t tokens in ``samples`` equal samples, n pool rows, n_s shared rows, R = n_s + r active ranks."""
    dev, bf = torch.device("cuda"), torch.bfloat16
    r = R - n_s
    L = max(1, t // samples)
    T = L * samples
    x, grad = torch.randn(T, d, device=dev, dtype=bf), torch.randn(T, d, device=dev, dtype=bf)
    W, bias = torch.randn(d, d, device=dev, dtype=bf) / d ** 0.5, torch.zeros(d, device=dev, dtype=bf)
    A_m, B_m = torch.randn(n, d, device=dev, dtype=bf), torch.randn(n, d, device=dev, dtype=bf)
    A_s, B_s = torch.randn(n_s, d, device=dev, dtype=bf), torch.randn(n_s, d, device=dev, dtype=bf)
    idx = torch.stack([torch.randperm(n, device=dev)[:r] for _ in range(samples)]).to(torch.int32)
    val = torch.rand(samples, r, device=dev)
    sot = prefill.padded_sample_of_token(samples, L, dev)
    tiles = prefill.segment_map(sot, samples, L, prefill.tile_block_m(T, samples))
    u = prefill.launch_shrink(x, A_s, A_m, idx, tiles, R)
    out = torch.empty(T, d, device=dev, dtype=bf)
    grads = (torch.empty_like(A_m), torch.empty_like(B_m)), (torch.empty_like(A_s), torch.empty_like(B_s))

    def run(cfg: KernelConfig) -> None:
        # the candidate stands in for the kernel's table entry; the other kernels keep theirs
        with pinned.override({kernel: cfg} if kernel not in ("gemm", "gemm_dx") else {"gemm": cfg, "gemm_dx": cfg}):
            if kernel == "gemm":
                prefill.launch_kext_gemm(out, x, W, (W.stride(0), W.stride(1)), bias, u, B_s, B_m, idx, val, 1.0,
                                         1.0, tiles)
            elif kernel == "gemm_dx":
                prefill.launch_kext_gemm(out, grad, W, (W.stride(1), W.stride(0)), None, u, A_s, A_m, idx, val,
                                         1.0, 1.0, tiles)
            elif kernel in ("shrink", "split_sum"):
                prefill.launch_shrink(x, A_s, A_m, idx, tiles, R)
            else:  # grad, reduce: the rank gradients and their row reduction
                prefill.launch_rank_grads(u, u, x, grad, idx, val, None, n, n_s, 1.0, 1.0, tiles, *grads, True)

    return run


def _triton_version() -> str:
    return triton.__version__


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------


def summary_markdown(table: Mapping[str, Any]) -> str:
    """A markdown summary of a table file's content: one row per (arch, kernel, config) with its buckets."""
    lines = ["# Pinned launch configs", "",
             "Generated by `pclr tune`; read by pclr/backends/triton/pinned.py.", ""]
    for arch, body in table["archs"].items():
        lines += [f"## {arch}", "", f"method: {body.get('method', '')}  ", f"triton: {body.get('triton', '')}  ",
                  f"device: {body.get('device') or 'none (compile statistics only)'}", "",
                  "| kernel | d | t | block_n | block_k | warps | stages | regs | spills | smem KB | ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in body["entries"]:
            c, s = e["config"], e.get("stats", {})
            smem = f"{s['smem'] / 1024:.1f}" if "smem" in s else ""
            lines.append(f"| {e['kernel']} | {e['d']} | {e['t']} | {c['block_n']} | {c['block_k']} | "
                         f"{c['num_warps']} | {c['num_stages']} | {s.get('regs', '')} | {s.get('spills', '')} | "
                         f"{smem} | {s.get('ms', '')} |")
        lines.append("")
    return "\n".join(lines)


def write_table(out: Path, archs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Write ``archs`` into the table file ``out`` (other architectures already there are kept) and the markdown
    summary beside it (``out`` with suffix .md); return the file content."""
    existing = json.loads(out.read_text()) if out.exists() else None
    content = pinned.merge_into(existing, archs)
    pinned.parse_table(content, str(out))  # never write a table the package would refuse
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(pinned.dumps_table(content))
    out.with_suffix(".md").write_text(summary_markdown(content))
    return content


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

DESCRIPTION = ("Regenerate the pinned launch configs of the extended prefill / training kernels (one table per GPU "
               "architecture, one config per kernel and shape bucket), so that launches never autotune mid-run.")
EPILOG = """\
examples:
  pclr tune                                   GPU: time every clean-compiling candidate, write the device's table
  pclr tune --compile-only --target sm_80     CPU: pick by compile statistics (how the shipped sm_80 table is made)
  pclr tune --compile-only --target sm_90 --shapes 4096x4096 --kernels gemm,gemm_dx --out /tmp/t.json

The table is written to --out (default: the file the package reads, pclr/backends/triton/pinned_configs.json in
the installed package); tables of other architectures already in that file are kept, and so are the entries of
kernels not named by --kernels. A markdown summary is written beside it (same name, .md). Set
PCLR_PINNED_CONFIGS=FILE to run with a table written elsewhere.
"""


def _shape(s: str) -> tuple[int, int]:
    try:
        d, t = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is DxT (model dim x tokens), e.g. 4096x4096; got {s!r}") from None
    if d <= 0 or t <= 0:
        raise argparse.ArgumentTypeError(f"shape sizes must be positive, got {s!r}")
    return d, t


def _kernels(s: str) -> list[str]:
    names = [p.strip() for p in s.split(",") if p.strip()]
    bad = [n for n in names if n not in KERNELS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--kernels takes a comma list of {','.join(KERNELS)}; got {s!r}")
    return names


def add_tune_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``pclr tune`` (also sets the parser's description and examples)."""
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--shapes", type=_shape, nargs="+", metavar="DxT", default=None,
                        help="shape buckets as model dim x tokens (default: every d in "
                             f"{','.join(map(str, pinned.D_BUCKETS))} with every T in "
                             f"{','.join(map(str, pinned.T_BUCKETS))}); tokens are tuned in {TUNE_SAMPLES} samples")
    parser.add_argument("--kernels", type=_kernels, default=list(KERNELS),
                        help=f"comma list of {','.join(KERNELS)} (default: all)")
    parser.add_argument("--out", type=Path, default=pinned.TABLE_FILE, metavar="FILE",
                        help="table file to write (default: the shipped table)")
    parser.add_argument("--target", choices=pinned.ARCHS, default=None,
                        help="architecture to tune for (default: the GPU's; required with --compile-only)")
    parser.add_argument("--compile-only", action="store_true",
                        help="pick by compile statistics for --target (no spills, fits shared memory, then the "
                             "largest tile); needs no GPU")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="compile subprocesses with --compile-only (default: one per core, at most 8)")
    return parser


def tune_main(args: argparse.Namespace) -> int:
    shapes = {(d, 1 << max(0, t - 1).bit_length()) for d, t in args.shapes or pinned.iter_buckets()}
    ds, ts = sorted({d for d, _ in shapes}), sorted({t for _, t in shapes})
    if len(ds) * len(ts) != len(shapes):
        print("pclr tune: --shapes must form a grid (every d with every T): the table keys on (d, t) pairs",
              file=sys.stderr)
        return 2
    if args.compile_only:
        if args.target is None:
            print("pclr tune: --compile-only needs --target sm_90 or sm_80", file=sys.stderr)
            return 2
        table = tune_compile_only(args.target, args.kernels, ds, ts,
                                  lambda jobs: compile_rows(jobs, workers=args.workers),
                                  wave=max(1, args.workers or 2))
        arch = args.target
    else:
        if not torch.cuda.is_available():
            print("pclr tune: no CUDA device; use --compile-only --target sm_90|sm_80 to pick by compile statistics",
                  file=sys.stderr)
            return 2
        arch = pinned.arch_for_capability(torch.cuda.get_device_capability())[0]
        if args.target is not None and args.target != arch:
            print(f"pclr tune: --target {args.target} but this device uses the {arch} table (use --compile-only "
                  f"to pick for another architecture)", file=sys.stderr)
            return 2
        arch, table = tune_timed(args.kernels, ds, ts)
    if set(args.kernels) != set(KERNELS):
        # a partial run keeps the other kernels' entries of the existing table
        old = json.loads(args.out.read_text())["archs"].get(arch, {}) if args.out.exists() else {}
        table["entries"] = [e for e in old.get("entries", []) if e["kernel"] not in args.kernels] + table["entries"]
    write_table(args.out, {arch: table})
    print(f"wrote {args.out} ({arch}: {len(table['entries'])} entries) and {args.out.with_suffix('.md')}")
    return 0
