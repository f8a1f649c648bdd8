"""The prefill kernels compile for sm_90 with every config the launcher keeps: no register spill, shared memory
within the device limit, at the target point (bf16, d = 4096, T = 4096 in 8 samples, R = 96). No GPU needed:
Triton compiles to PTX and its bundled ptxas reports registers and spills."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia.compiler")

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "prefill_compile.py")
SM90_SMEM = 232448  # bytes of shared memory a block may opt into on sm_90


def test_kept_configs_compile_without_spills():
    # a separate process: the kernels must be real JIT functions, and this session imported them interpreted
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.strip("|").split("|") for line in run.stdout.splitlines() if line.startswith("| ") and "yes" in line]
    names = {cells[0].split()[0] for cells in rows}
    assert names >= {"kext_gemm[y]", "kext_gemm[dX]", "shrink", "rank_grad", "rows_reduce", "split_sum"}, run.stdout
    for cells in rows:
        name, regs, spill, smem = cells[0].strip(), cells[3].strip(), cells[4].strip(), cells[5].strip()
        assert regs.isdigit(), f"{name}: {regs}"  # a compile error lands in the registers column
        assert int(spill) == 0, f"{name}: {spill} bytes of register spill"
        assert int(smem) <= SM90_SMEM, f"{name}: {smem} bytes of shared memory"
