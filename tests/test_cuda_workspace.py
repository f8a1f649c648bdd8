"""The cuda backward's bounded gradient workspace.

CPU (always): the chunking plan (pclr.backends.cuda.grad_workspace_plan) keeps the fp32 partials under the cap for
every B, covers every (sample, column) of both sides exactly once with samples in order, and is the very plan of the
C++ side: csrc/pclr_ops.h is plain C++, so a small driver compiled with the host compiler prints its plans.

GPU (marked ``gpu``, needs the built extension): a backward whose batch needs several chunks (and one that needs column
slices) matches the reference, gives frozen rows exact zeros, and is bit-identical whatever the cap, since the chunk
partials are added onto the running fp32 sums in sample order.
"""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess

import pytest
import torch
from lrp_cases import make_case

from pclr.backends import reference
from pclr.backends.base import LinearInputs, LinearNeeds
from pclr.backends.cuda import GRAD_WORKSPACE_CAP_BYTES, TILE_N, GradWorkspacePlan, grad_workspace_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

# (R, d_in, d_out): the target point, unequal sides, a rank above the decode pass, and a sample larger than the cap
SHAPES = [(96, 4096, 4096), (32, 1024, 1024), (1, 7, 3), (40, 100, 4000), (4096, 8192, 8192), (20000, 8192, 300)]
CAPS = [GRAD_WORKSPACE_CAP_BYTES, 1, 4096, 3 * 2**20 + 5]


def _covered(plan: GradWorkspacePlan, B: int, N: int, R: int) -> None:
    """The slices of one side tile the [B, N] partials exactly: sample chunks back to back from sample 0 in order,
    each chunk's column slices back to back from column 0 (so every (sample, column) exactly once)."""
    next_s0, next_c0, chunk = 0, 0, None
    for s0, ns, c0, cols in plan.slices(B, N):
        assert ns >= 1 and cols >= 1 and c0 % TILE_N == 0, (s0, ns, c0, cols)
        assert ns * R * cols * 4 <= plan.bytes, "a slice larger than the workspace"
        if c0 == 0:  # a new sample chunk starts where the previous one ended
            assert (s0, next_c0 in (0, N)) == (next_s0, True), (s0, next_s0, next_c0)
            chunk, next_s0 = (s0, ns), s0 + ns
        assert (s0, ns) == chunk and c0 == next_c0 % N, (s0, ns, c0, next_c0)
        next_c0 = c0 + cols
    assert next_s0 == B and next_c0 == N, (next_s0, next_c0)


@pytest.mark.parametrize("cap", CAPS, ids=["default", "1B", "4KiB", "3MiB+5"])
@pytest.mark.parametrize("R,d_in,d_out", SHAPES)
def test_plan_is_bounded_and_covers_every_sample_in_order(R, d_in, d_out, cap):
    bound = max(cap, R * TILE_N * 4)
    for B in range(1, 1025):
        plan = grad_workspace_plan(B, R, d_in, d_out, cap)
        assert 0 < plan.bytes <= bound, (B, plan)
        assert plan.num_chunks * plan.samples_per_chunk >= B > (plan.num_chunks - 1) * plan.samples_per_chunk
        if plan.cols_per_chunk < max(d_in, d_out):
            assert plan.samples_per_chunk == 1 and plan.cols_per_chunk % TILE_N == 0
    for B in (1, 2, 3, 37, 256, 1024):  # the slices of both sides, element by element
        plan = grad_workspace_plan(B, R, d_in, d_out, cap)
        _covered(plan, B, d_in, R)
        _covered(plan, B, d_out, R)


def test_plan_at_the_target_point():
    # B = 256, R = 96, d = 4096: 1.5 MiB of partials per sample and side (the sides take turns in one workspace), so
    # 42 samples per chunk and 63 MiB instead of 768 MiB for the batch
    plan = grad_workspace_plan(256, 96, 4096, 4096)
    assert plan == GradWorkspacePlan(samples_per_chunk=42, num_chunks=7, cols_per_chunk=4096, bytes=42 * 96 * 4096 * 4)
    assert grad_workspace_plan(8, 96, 4096, 4096).num_chunks == 1  # a small batch stays one chunk: no extra launches


def test_plan_degenerate_shapes_and_bad_cap():
    assert grad_workspace_plan(0, 96, 64, 64) == GradWorkspacePlan(0, 0, 0, 0)
    assert grad_workspace_plan(4, 0, 64, 64) == GradWorkspacePlan(0, 0, 0, 0)
    with pytest.raises(ValueError, match="cap"):
        grad_workspace_plan(4, 8, 64, 64, cap=0)


DRIVER = r"""
#include <cstdio>
#include "pclr_ops.h"
int main() {
  std::printf("cap %lld tile_n %d\n", static_cast<long long>(pclr::kGradWorkspaceCapBytes), pclr::kTileN);
  long long B, R, di, dout, cap;
  while (std::scanf("%lld %lld %lld %lld %lld", &B, &R, &di, &dout, &cap) == 5) {
    const pclr::GradWorkspacePlan p = pclr::grad_workspace_plan(B, R, di, dout, cap);
    std::printf("%lld %lld %lld %lld\n", static_cast<long long>(p.samples_per_chunk),
                static_cast<long long>(p.num_chunks), static_cast<long long>(p.cols_per_chunk),
                static_cast<long long>(p.bytes));
  }
  return 0;
}
"""


def test_python_plan_is_the_cpp_plan(tmp_path):
    cxx = next((shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c and shutil.which(c)),
               None)
    if cxx is None:
        pytest.skip("no host C++ compiler (g++, c++, clang++) to build the plan driver")
    src, exe = tmp_path / "plan.cpp", tmp_path / "plan"
    src.write_text(DRIVER)
    build = subprocess.run([cxx, "-std=c++17", "-O1", f"-I{CSRC}", str(src), "-o", str(exe)], capture_output=True,
                           text=True, timeout=300, check=False)
    assert build.returncode == 0, build.stderr[-4000:]
    queries = [(B, R, di, do, cap) for (R, di, do), cap in itertools.product(SHAPES, CAPS)
               for B in (1, 2, 5, 21, 22, 255, 256, 1023, 1024)]
    queries += [(0, 8, 64, 64, 100), (3, 8, 0, 0, 100)]
    run = subprocess.run([str(exe)], input="\n".join(" ".join(map(str, q)) for q in queries), capture_output=True,
                         text=True, timeout=60, check=True)
    header, *rows = run.stdout.splitlines()
    assert header == f"cap {GRAD_WORKSPACE_CAP_BYTES} tile_n {TILE_N}"
    assert len(rows) == len(queries)
    for q, row in zip(queries, rows):
        p = grad_workspace_plan(*q)
        assert tuple(map(int, row.split())) == (p.samples_per_chunk, p.num_chunks, p.cols_per_chunk, p.bytes), q


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------


def _backward(c, grad_out, cap: int):
    """All six gradients of torch.ops.pclr.cuda_lrp_backward with the workspace capped at ``cap`` bytes."""
    x = c.x.reshape(-1, c.x.shape[-1])
    sot = c.sot if c.sot is not None else torch.arange(c.idx.shape[0], device=x.device,
                                                       dtype=torch.int32).repeat_interleave(c.x.shape[1])
    padded = 0 if c.sot is not None else c.x.shape[1]
    return torch.ops.pclr.cuda_lrp_backward(
        grad_out.reshape(-1, grad_out.shape[-1]), x, c.weight, c.A_m, c.B_m, c.idx, c.val, c.A_s, c.B_s,
        sot.contiguous(), c.trainable, float(c.beta_m), float(c.beta_s), padded, True, True, True, c.A_s is not None,
        cap)


def _reference_grads(c, grad_out):
    """The same gradients from the reference backend in fp64."""
    x = c.x.reshape(-1, c.x.shape[-1]).double()
    dbl = lambda t: None if t is None else t.double()  # noqa: E731
    sot = c.sot if c.sot is not None else torch.arange(c.idx.shape[0], device=x.device,
                                                       dtype=torch.int32).repeat_interleave(c.x.shape[1])
    padded = 0 if c.sot is not None else c.x.shape[1]
    inputs = LinearInputs(x, c.weight.double(), None, c.A_m.double(), c.B_m.double(), c.idx, c.val.double(),
                          dbl(c.A_s), dbl(c.B_s), c.beta_m, c.beta_s, sot, c.trainable, padded)
    needs = LinearNeeds(x=True, A_m=True, B_m=True, val=True, A_s=c.A_s is not None, B_s=c.B_s is not None)
    g = reference.linear_backward(grad_out.reshape(-1, grad_out.shape[-1]).double(), inputs, needs)
    return (g.x, g.A_m, g.B_m, g.val, g.A_s, g.B_s)


NAMES = ("x", "A_m", "B_m", "val", "A_s", "B_s")

# 48 samples of a few tokens (some none): at R = 96 and d = max(1024, 768) one sample's partials take 384 KiB, so these
# caps give 1-sample chunks in 64-column slices, 5-sample chunks, 1-sample chunks in 960-column slices, one chunk.
GPU_CASE = {"B": 48, "lens": [(3 * i) % 7 for i in range(48)], "d_in": 1024, "d_out": 768, "n": 256, "r": 64,
            "n_s": 32, "frozen": tuple(range(0, 256, 5))}
GPU_CAPS = [1, 5 * 96 * 1024 * 4, 96 * 1024 * 4 - 1, 1 << 40]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_chunked_backward_matches_reference_and_is_bit_identical_across_caps(ext, dtype):
    c = make_case(**GPU_CASE, soft=True, device="cuda", dtype=dtype)
    grad_out = torch.randn(c.x.shape[0], c.weight.shape[0], generator=torch.Generator().manual_seed(5)).to("cuda", dtype)
    plans = [grad_workspace_plan(c.idx.shape[0], 96, 1024, 768, cap) for cap in GPU_CAPS]
    assert [p.num_chunks for p in plans] == [48, 10, 48, 1] and plans[2].cols_per_chunk < 1024
    runs = [_backward(c, grad_out, cap) for cap in GPU_CAPS]
    for cap, run in zip(GPU_CAPS[1:], runs[1:]):
        for name, a, b in zip(NAMES, runs[0], run):
            assert torch.equal(a, b), f"{name} differs between workspace caps 1 and {cap}"
    truth = _reference_grads(c, grad_out)
    tol = {torch.float32: 2e-4, torch.bfloat16: 3e-2}[dtype]
    for name, got, want in zip(NAMES, runs[0], truth):
        scale = 1.0 + want.abs().max().item()
        err = (got.double() - want).abs().max().item()
        assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol * scale:.3g}"
    for name, got in (("A_m", runs[0][1]), ("B_m", runs[0][2])):
        assert torch.count_nonzero(got[~c.trainable]) == 0, f"frozen rows of {name} got gradient"


@pytest.mark.gpu
def test_gpu_backward_memory_is_bounded_at_b256(ext):
    # the target point's layer at B = 256 (one token each): the old per-sample buffers alone took 768 MiB
    B, R, d = 256, 96, 4096
    c = make_case(B=B, lens=[1] * B, d_in=d, d_out=d, n=256, r=64, n_s=32, soft=True, device="cuda",
                  dtype=torch.bfloat16)
    grad_out = torch.randn(B, d, device="cuda", dtype=torch.bfloat16)
    _backward(c, grad_out, 0)  # warm-up: allocator and lazy init
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grads = _backward(c, grad_out, 0)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    plan = grad_workspace_plan(B, R, d, d)
    outputs = sum(g.numel() * g.element_size() for g in grads)
    # workspace + fp32 running sums of the pool and shared rows + [T, R] intermediates + the outputs, with slack
    bound = plan.bytes + (256 + 32) * 2 * d * 4 + 4 * B * R * 4 + outputs + (8 << 20)
    assert plan.num_chunks > 1 and peak <= bound, f"peak {peak / 2**20:.1f} MiB > {bound / 2**20:.1f} MiB"
