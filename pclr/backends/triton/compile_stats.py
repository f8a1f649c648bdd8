"""Compile a Triton kernel of :mod:`pclr.kernels` for a GPU target and read registers, spills and shared memory.

No GPU is needed: ``triton.compile`` takes a ``GPUTarget`` and the ptxas that ships with Triton assembles the PTX
(``-v`` prints registers and spill bytes per function); shared memory comes from the compiled metadata. On a GPU the
same compile is loaded instead, and the driver reports registers and spills.

Under ``TRITON_INTERPRET=1`` every ``@triton.jit`` function is replaced by an interpreted one when its module is
imported, so a process running the interpreter cannot compile; :func:`compile_rows` runs the compiles in worker
subprocesses without it (one per core), which is also how a CPU machine spreads ptxas over its cores. A worker
runs this file as a script and loads only :mod:`pclr.kernels` (not torch, not the rest of pclr: seconds saved per
worker), which is why this module imports nothing but the standard library at the top.

    python compile_stats.py --worker KERNELS_DIR   # reads JSON jobs on stdin, writes JSON rows
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

SMEM_LIMIT = {90: 232448, 80: 166912}  # bytes a block may opt into: 227 KB (sm_90), 163 KB (sm_80)
ARCH_NUMBER = {"sm_90": 90, "sm_80": 80}

# Ints the JIT does not mark divisible by 16 at a real launch (counts, small strides); model dims, row strides and
# pointers carry the hint.
NOT_DIV16 = frozenset({"num_tiles", "n_lrp", "R", "BR", "n_s", "r", "n", "B", "nblk_a", "splits", "split", "row0",
                       "numel", "stride_idx", "stride_dval", "stride_u", "stride_g", "stride_cand", "stride_sbuf",
                       "stride_sg_t"})

_ENTRY = re.compile(r"Compiling entry function '([^']+)'")


@dataclass(frozen=True)
class LaunchSpec:
    """What a kernel is compiled with, apart from its tile config: the function (module of pclr.kernels, name),
    pointer dtypes by argument name ("*bf16", "*fp32", "*i32", ...), constexprs, fp32 scalars, and scalar args
    whose type is not i32."""

    name: str
    module: str
    fn: str
    ptrs: Mapping[str, str]
    consts: Mapping[str, Any]
    floats: tuple[str, ...] = ()
    extra: Mapping[str, str] = field(default_factory=dict)
    not_div16: frozenset[str] | None = None  # ints without the divisibility hint (None: NOT_DIV16's names)


def ptxas_stats(log: str, kernel: str) -> tuple[int, int]:
    """(registers, spill bytes stored + loaded) of ``kernel``'s own entry function in a ``ptxas -v`` log.

    ptxas writes one block per function (the entry, then any device function it did not inline); the block of an
    entry starts at "Compiling entry function '<name>'" and holds its "Function properties" and "Used N registers"
    lines. Reading the first "Used" line of the whole log can report another function's registers.
    """
    starts = [(m.start(), m.group(1)) for m in _ENTRY.finditer(log)]
    block = ""
    for i, (pos, name) in enumerate(starts):
        if name == kernel:
            end = starts[i + 1][0] if i + 1 < len(starts) else len(log)
            block = log[pos:end]
            break
    if not block:
        raise ValueError(f"no entry function {kernel!r} in the ptxas log:\n{log[:2000]}")
    # the entry's own properties (a device function's "Function properties for f" may follow inside the block)
    props = re.search(rf"Function properties for {re.escape(kernel)}\s*\n(.*)", block)
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", props.group(1) if props else ""))
    regs = re.search(r"Used (\d+) registers", block)
    if regs is None:
        raise ValueError(f"no register count for {kernel!r} in the ptxas log:\n{block[:2000]}")
    return int(regs.group(1)), spills


def ptxas_reason() -> str:
    """Why Triton's bundled ptxas cannot be used here ('' when it can): the compile statistics need it."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            get_ptxas(90)
        except TypeError:  # before Triton 3.7 the helper takes no arch
            get_ptxas()
        return ""
    except Exception as exc:  # noqa: BLE001 -- any failure means: no ptxas to read registers with
        return f"triton's bundled ptxas is not usable here: {type(exc).__name__}: {exc}"


def config_str(meta: Mapping[str, Any], warps: int, stages: int) -> str:
    """"N=128,K=64 w8 s3": a config as the tables print it."""
    blocks = ",".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in meta.items())
    return f"{blocks} w{warps} s{stages}".strip()


def signature(fn: Any, spec: LaunchSpec, consts: Mapping[str, Any]) -> tuple[dict[str, str], dict]:
    """(signature, attrs) of ``fn`` for ``triton.compile``: every argument typed, ints and pointers hinted divisible
    by 16 as a launch at the model's shapes would be."""
    sig: dict[str, str] = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in spec.ptrs:
            sig[name] = spec.ptrs[name]
        elif name in spec.floats:
            sig[name] = "fp32"
        else:
            sig[name] = spec.extra.get(name, "i32")
    plain = NOT_DIV16 if spec.not_div16 is None else spec.not_div16
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name] not in ("constexpr", "fp32") and name not in plain}
    return sig, attrs


def violation(row: Mapping[str, Any]) -> str:
    """Why a compiled row breaks the hardware limits ('' when it does not)."""
    if "error" in row:
        return f"compile error: {row['error']}"
    why = []
    if row["spills"]:
        why.append(f"{row['spills']} B spilled")
    limit = SMEM_LIMIT.get(row["arch"])
    if limit is not None and row["smem"] > limit:
        why.append(f"{row['smem']} B shared > {limit}")
    return ", ".join(why)


def compile_one(spec: LaunchSpec, meta: Mapping[str, Any], warps: int, stages: int, arch: int,
                load: bool = False) -> dict[str, Any]:
    """One row: kernel, config, arch and regs / spills / smem (or the compile error).

    ``load``: load the compiled kernel on the current GPU and take registers / spills from the driver (the ptxas log
    is printed only when ``TRITON_DUMP_PTXAS_LOG`` is set and the kernel is not in Triton's cache).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"pclr.kernels.{spec.module}"), spec.fn)
    consts = {**spec.consts, **meta}
    sig, attrs = signature(fn, spec, consts)
    row: dict[str, Any] = {"kernel": spec.name, "config": config_str(meta, warps, stages), "arch": arch}
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                               target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
        row["smem"] = int(k.metadata.shared)
        if load:
            k._init_handles()  # the only way to the driver's register / spill counts of a compiled kernel
            row["regs"], row["spills"] = int(k.n_regs), int(k.n_spills)
        else:
            row["regs"], row["spills"] = ptxas_stats(log.getvalue(), k.metadata.name)
    except Exception as exc:  # noqa: BLE001 -- reported in the row; callers decide what an error means
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


# ---------------------------------------------------------------------------------------------------------------
# Jobs as JSON (constexprs may hold Triton dtypes), and the worker subprocesses
# ---------------------------------------------------------------------------------------------------------------

Job = tuple[LaunchSpec, Mapping[str, Any], int, int, int]  # (spec, meta, warps, stages, arch)


def _encode(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return {"tl": str(v)}  # a triton.language dtype ("fp32", "bf16", ...)


def _decode(v: Any) -> Any:
    if isinstance(v, dict) and set(v) == {"tl"}:
        import triton.language as tl

        return {"fp32": tl.float32, "fp64": tl.float64, "bf16": tl.bfloat16, "fp16": tl.float16}[v["tl"]]
    return v


def encode_job(job: Job) -> dict[str, Any]:
    spec, meta, warps, stages, arch = job
    d = asdict(spec)
    d["not_div16"] = None if spec.not_div16 is None else sorted(spec.not_div16)
    d["consts"] = {k: _encode(v) for k, v in spec.consts.items()}
    return {"spec": d, "meta": {k: _encode(v) for k, v in meta.items()}, "warps": warps, "stages": stages,
            "arch": arch}


def decode_job(d: Mapping[str, Any]) -> Job:
    s = dict(d["spec"])
    s["consts"] = {k: _decode(v) for k, v in s["consts"].items()}
    s["floats"] = tuple(s.get("floats", ()))
    s["not_div16"] = None if s.get("not_div16") is None else frozenset(s["not_div16"])
    return LaunchSpec(**s), {k: _decode(v) for k, v in d["meta"].items()}, int(d["warps"]), int(d["stages"]), \
        int(d["arch"])


def worker_env() -> dict[str, str]:
    """A compile worker's environment: no interpreter, the ptxas log printed, an empty cache (a cached kernel
    prints no log), fp fusion as launches use it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="pclr-compile-")
    return env


def compile_rows(jobs: Sequence[Job], workers: int | None = None, timeout_s: float = 1800) -> list[dict[str, Any]]:
    """Compile ``jobs`` in worker subprocesses (at most ``workers``, default one per core up to 8); rows in job
    order, each with ``job`` = its index."""
    if not jobs:
        return []
    shards = max(1, min(workers or os.cpu_count() or 1, 8, len(jobs)))
    env = worker_env()
    payload = [encode_job(j) for j in jobs]
    kernels_dir = importlib.util.find_spec("pclr.kernels").submodule_search_locations[0]

    def run(shard: int) -> list[dict[str, Any]]:
        mine = [{"index": i, **payload[i]} for i in range(shard, len(jobs), shards)]
        res = subprocess.run([sys.executable, __file__, "--worker", kernels_dir],
                             input=json.dumps(mine), check=False, capture_output=True, text=True, env=env,
                             timeout=timeout_s)
        if res.returncode != 0:
            raise RuntimeError(f"compile worker failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
        return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]

    with ThreadPoolExecutor(max_workers=shards) as pool:
        rows = [row for part in pool.map(run, range(shards)) for row in part]
    return sorted(rows, key=lambda r: r["job"])


def _worker(kernels_dir: str) -> None:
    # pclr.kernels without pclr's __init__ (torch and the library): the kernels import only triton and each other
    for name, path in (("pclr", []), ("pclr.kernels", [kernels_dir])):
        stub = types.ModuleType(name)
        stub.__path__ = path
        sys.modules[name] = stub
    for d in json.loads(sys.stdin.read()):
        row = compile_one(*decode_job(d))
        row["job"] = d["index"]
        print(json.dumps(row), file=sys.__stdout__, flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        sys.exit("usage: python compile_stats.py --worker KERNELS_DIR  (JSON jobs on stdin)")
    _worker(sys.argv[2])
