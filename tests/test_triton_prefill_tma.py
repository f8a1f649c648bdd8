"""The TMA / persistent K-extended GEMM (pclr.backends.triton.prefill_tma) against the reference backend.

CPU runs through TRITON_INTERPRET=1 (the interpreter reads host tensor descriptors as masked loads, zero past the
edge, and asserts TMA's alignment rules), in float32 and float64, at odd shapes: T not a multiple of the token tile,
K and N not multiples of the blocks, d not a multiple of 16. Each GEMM writes into a NaN-filled output, so a tile
that the persistent walk skipped shows.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from lrp_cases import make_case
from test_triton_prefill import _inputs, _packed

from pclr import dispatch
from pclr.backends import reference
from pclr.backends.base import LinearNeeds
from pclr.backends.triton.compile_stats import ptxas_reason
from pclr.backends.triton.segments import tile_block_m
from pclr.bench.work import WorkCounter

prefill = pytest.importorskip("pclr.backends.triton.prefill")
prefill_tma = pytest.importorskip("pclr.backends.triton.prefill_tma")
linear = pytest.importorskip("pclr.backends.triton.linear")
interp = pytest.importorskip("triton.runtime.interpreter")
pytestmark = pytest.mark.skipif(bool(dispatch.reasons("triton", "info", None)),
                                reason="triton backend unavailable here")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parent.parent
NEEDS_X = LinearNeeds(x=True, A_m=False, B_m=False, val=False, A_s=False, B_s=False)
NEEDS_ALL = LinearNeeds(x=True, A_m=True, B_m=True, val=True, A_s=True, B_s=True)


def _tiles(c):
    x, sot, padded_len = _packed(c)
    return prefill.segment_map(sot, c.idx.shape[0], padded_len, tile_block_m(x.shape[0], c.idx.shape[0]))


def _rank(c) -> int:
    return c.idx.shape[1] + (0 if c.A_s is None else c.A_s.shape[0])


def _y(c, gemm):
    """y = [x | scale ⊙ u]·[W | B_eff]ᵀ + bias with u from the prefill shrink and ``gemm`` the GEMM launcher."""
    x = _packed(c)[0]
    tiles = _tiles(c)
    u = prefill.launch_shrink(x, c.A_s, c.A_m, c.idx, tiles, _rank(c))
    y = torch.full((x.shape[0], c.weight.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    gemm(y, x, c.weight, (c.weight.stride(0), c.weight.stride(1)), c.bias, u, c.B_s, c.B_m, c.idx, c.val, c.beta_m,
         c.beta_s, tiles)
    return y


def _dx(c, grad, gemm):
    """dX = [dY | scale ⊙ dS]·[W ; A_eff] with dS = dY·B_effᵀ: the GEMM with W's strides swapped."""
    x = _packed(c)[0]
    tiles = _tiles(c)
    dS = prefill.launch_shrink(grad, c.B_s, c.B_m, c.idx, tiles, _rank(c))
    dx = torch.full_like(x, float("nan"))
    gemm(dx, grad, c.weight, (c.weight.stride(1), c.weight.stride(0)), None, dS, c.A_s, c.A_m, c.idx, c.val,
         c.beta_m, c.beta_s, tiles)
    return dx


def _grad_out(c):
    T, d_out = _packed(c)[0].shape[0], c.weight.shape[0]
    return torch.randn((T, d_out), generator=torch.Generator().manual_seed(1)).to(c.x)


def _check(c, atol, rtol):
    i = _inputs(c)
    grad = _grad_out(c)
    assert not prefill_tma.tma_reasons(torch.empty_like(grad), i.x, c.weight, (c.weight.stride(0), 1))
    y = _y(c, prefill_tma.kext_gemm_tma)
    torch.testing.assert_close(y, reference.linear_forward(i), atol=atol, rtol=rtol)
    dx = _dx(c, grad, prefill_tma.kext_gemm_tma)
    torch.testing.assert_close(dx, reference.linear_backward(grad, i, NEEDS_X).x, atol=atol, rtol=rtol)
    # and the same call through the cp.async GEMM: one contract, one result
    torch.testing.assert_close(y, _y(c, prefill.launch_kext_gemm), atol=atol, rtol=rtol)
    torch.testing.assert_close(dx, _dx(c, grad, prefill.launch_kext_gemm), atol=atol, rtol=rtol)


# fp32 rows must be a multiple of 4 elements (16 bytes) for TMA: d = 20, 36, 100, 132 are, 16 does not divide them
CASES = {
    # 5 tokens per sample in 16-token tiles: each X box reads the next samples' rows, which must not leak
    "padded_odd_T": dict(B=3, L=5, d_in=36, d_out=20),
    "padded_full_tiles_nobias_K_over_block": dict(B=2, L=128, d_in=132, d_out=100, n=8, r=4, bias=False),
    "packed_shuffled_zero_sample": dict(lens=[70, 0, 3, 41], d_in=36, d_out=100, n=24, r=18, n_s=3, soft=True),
    "many_samples_R7": dict(lens=[2, 1, 1, 3, 1, 0, 2, 1, 1, 1, 2, 1], d_in=20, d_out=24, n=12, r=3, n_s=4,
                            soft=True),
    "r1_ns0": dict(B=2, L=9, n=6, r=1, n_s=0, d_in=20, d_out=24),
    "R40_chunk16": dict(lens=[70, 30], d_in=24, d_out=40, n=48, r=32, n_s=8, soft=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_tma_gemm_matches_reference_fp32(name):
    c = make_case(**CASES[name], device=DEVICE, seed=hash(name) % 1000)
    _check(c, atol=1e-4, rtol=1e-4)


def _grouped(c):
    """The case with its packed tokens grouped by sample (sample_of_token sorted): every tile is a run of X rows."""
    return replace(c, sot=torch.sort(c.sot).values)


def test_tma_gemm_packed_grouped_by_sample_fp32():
    c = make_case(lens=[70, 0, 3, 41, 90], d_in=44, d_out=68, n=20, r=6, n_s=2, soft=True, device=DEVICE, seed=12)
    _check(_grouped(c), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(DEVICE != "cpu", reason="float64 runs only through the CPU interpreter")
@pytest.mark.parametrize("name", ["padded_odd_T", "packed_shuffled_zero_sample"])
def test_tma_gemm_matches_reference_fp64(name):
    c = make_case(**CASES[name], dtype=torch.float64, seed=31)
    _check(c, atol=1e-11, rtol=1e-10)


def test_persistent_walk_covers_every_tile(monkeypatch):
    # 3 programs for 2 · 3 · 2 = 12 (token tile, N tile) pairs and 3 empty tile slots: each program walks several
    c = make_case(lens=[40, 0, 70, 20], d_in=36, d_out=100, n=10, r=4, n_s=2, device=DEVICE, seed=6)
    tiles = _tiles(c)
    assert tiles.num_tiles * -(-100 // prefill_tma.config().block_n) > 3
    monkeypatch.setattr(prefill_tma, "sm_count", lambda device: 3)
    assert prefill_tma.persistent_programs(1000, c.x.device) == 3 and prefill_tma.persistent_programs(2, c.x.device) == 2
    _check(c, atol=1e-4, rtol=1e-4)
    _check(_grouped(c), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(DEVICE != "cpu", reason="counts the interpreter's descriptor loads")
def test_x_rows_through_the_descriptor_when_contiguous():
    """X boxes come through the descriptor for a padded batch and a packed batch grouped by sample (every tile), and
    only for the tiles that happen to be one run of rows (e.g. one-token tiles) of a shuffled batch."""
    builder = interp.interpreter_builder
    cls = type(builder)

    def boxes(c) -> tuple[int, int]:
        """(X boxes loaded through the X descriptor, X boxes a full descriptor walk loads)."""
        x = _packed(c)[0]
        seen = []

        def load(desc, indices, cache_policy):
            seen.append(int(desc.base.data.item()) == x.data_ptr())
            return cls.create_descriptor_load(builder, desc, indices, cache_policy)

        builder.create_descriptor_load = load  # an instance attribute over the class's method, as WorkCounter does
        try:
            _y(c, prefill_tma.kext_gemm_tma)
        finally:
            del builder.create_descriptor_load
        cfg = prefill_tma.config()
        tiles = _tiles(c)
        live = int((tiles.tile_start < tiles.tile_end).sum())
        n_tiles, k_blocks = -(-c.weight.shape[0] // cfg.block_n), -(-x.shape[1] // cfg.block_k)
        return sum(seen), live * n_tiles * k_blocks

    padded = make_case(B=3, L=50, d_in=72, d_out=68, device=DEVICE, seed=2)
    shuffled = make_case(lens=[70, 1, 41], d_in=72, d_out=68, device=DEVICE, seed=2)
    x_boxes, full = boxes(padded)
    assert x_boxes == full > 0
    x_boxes, full = boxes(_grouped(shuffled))
    assert x_boxes == full > 0
    x_boxes, full = boxes(shuffled)
    assert 0 < x_boxes < full  # the one-token sample's tile only


def test_tma_reasons_name_the_offending_argument():
    c = make_case(B=2, L=9, d_in=33, d_out=24, device=DEVICE, seed=1)  # 33 fp32 = 132-byte rows
    x = _packed(c)[0]
    out = torch.empty((x.shape[0], 24), device=DEVICE)
    why = prefill_tma.tma_reasons(out, x, c.weight, (c.weight.stride(0), c.weight.stride(1)))
    assert any("X's row stride is 132 bytes" in w for w in why) and any("W's row stride" in w for w in why), why
    # dX of the same layer: W read [K, N] = weight [24, 33]; its rows are still 132 bytes
    assert any("W's row stride" in w for w in prefill_tma.tma_reasons(
        torch.empty_like(x), out, c.weight, (c.weight.stride(1), c.weight.stride(0))))
    with pytest.raises(ValueError, match="X's row stride"):
        _y(c, prefill_tma.kext_gemm_tma)
    # the caller's fallback: the cp.async GEMM runs the same call
    torch.testing.assert_close(_y(c, prefill.launch_kext_gemm), reference.linear_forward(_inputs(c)), atol=1e-4,
                               rtol=1e-4)

    d = make_case(B=2, L=9, d_in=36, d_out=24, device=DEVICE, seed=1)
    x = _packed(d)[0]
    out = torch.empty((x.shape[0], 24), device=DEVICE)
    w_every_other = torch.empty((24, 72), device=DEVICE)[:, ::2]  # no unit stride
    assert any("W has no contiguous dimension" in w for w in prefill_tma.tma_reasons(
        out, x, w_every_other, (w_every_other.stride(0), w_every_other.stride(1))))
    shifted = torch.empty(x.numel() + 1, device=DEVICE)[1:].view_as(x)  # 4 bytes past a 16-byte boundary
    assert any("X's data pointer" in w for w in prefill_tma.tma_reasons(out, shifted, d.weight, (36, 1)))
    assert any("share a dtype" in w for w in prefill_tma.tma_reasons(out, x, d.weight.double(), (36, 1)))
    assert not prefill_tma.tma_reasons(out, x, d.weight, (36, 1))


@pytest.mark.skipif(DEVICE != "cpu", reason="executed work is counted through the interpreter")
def test_executed_flops_at_the_scaled_point_are_the_floor():
    """The forward with the TMA GEMM executes exactly the floor's FLOPs at the scaled target point (d = 1024,
    T = 1024 in 8 samples, n = 64, r = 24, n_s = 8: R = 32, one rank chunk, full tiles): FLOPs / floor = 1.0000, the
    cp.async extended forward's ratio there (tests/test_executed_work.py counts that one; one counted forward at
    this size takes a minute of interpreter time, so it is not repeated here)."""
    T, B, d, n, r, n_s = 1024, 8, 1024, 64, 24, 8
    c = make_case(B=B, L=T // B, d_in=d, d_out=d, n=n, r=r, n_s=n_s, bias=False, soft=True, seed=3)
    R = n_s + r
    _tiles(c)  # the tile map is built once per batch, outside the count
    with WorkCounter() as wc:
        y = _y(c, prefill_tma.kext_gemm_tma)
    assert wc.work.flops == 2 * T * d * d + 2 * T * R * (d + d), wc.work.flops
    assert wc.work.by_kernel["kext_gemm_tma_kernel"] == 1 and wc.work.by_kernel["shrink_kernel"] == 1, wc.work.by_kernel
    torch.testing.assert_close(y, reference.linear_forward(_inputs(c)), atol=1e-3, rtol=1e-4)


_PTX_SCRIPT = """
import importlib, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sys.path.insert(0, "tests")
import test_compile_targets as ct
from pclr.backends.triton.compile_stats import LaunchSpec, signature
for e in ct.registry():
    if e.fn != "kext_gemm_tma_kernel":
        continue
    fn = getattr(importlib.import_module("pclr.kernels." + e.module), e.fn)
    meta, warps, stages = e.configs[0]
    consts = {**e.consts, **meta}
    sig, attrs = signature(fn, LaunchSpec(e.name, e.module, e.fn, e.ptrs, e.consts, e.floats, e.extra), consts)
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    ptx = k.asm["ptx"]
    print(e.name, ptx.count("cp.async.bulk.tensor"), ptx.count("wgmma.mma_async"))
"""


def test_sm90_build_loads_tiles_with_tma():
    """The sm_90 build of both GEMMs (y and dX) copies its X and W boxes with TMA (cp.async.bulk.tensor) and
    multiplies with wgmma. Compiled in a subprocess: this session's kernels are the interpreter's."""
    why = ptxas_reason()
    if why:
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="pclr-tma-ptx-")
    res = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], capture_output=True, text=True, env=env, timeout=600,
                         cwd=str(ROOT), check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    counts = {name: (int(tma), int(mma)) for name, tma, mma in (line.split() for line in res.stdout.splitlines())}
    assert set(counts) == {"kext_gemm_tma[y]", "kext_gemm_tma[dX]"}, res.stdout
    assert all(tma > 0 and mma > 0 for tma, mma in counts.values()), counts


@pytest.mark.skipif(DEVICE != "cpu", reason="float64 runs only through the CPU interpreter")
@pytest.mark.parametrize("layout", [dict(B=3, L=70), dict(lens=[41, 0, 66])])
def test_extended_tma_variant_matches_extended_fp64(layout):
    """``variant="extended-tma"`` runs the whole extended path (forward, and dX in the backward) with the TMA GEMM:
    y and every gradient equal the cp.async kernel's, with an out-of-pool idx (-1, n) adding nothing and frozen
    rows getting exact zeros."""
    base = make_case(**layout, d_in=32, d_out=24, n=10, r=4, n_s=2, frozen=(2, 7), soft=True, dtype=torch.float64,
                     seed=17)
    idx = base.idx.clone()
    idx[0, 1], idx[2, 3] = -1, base.A_m.shape[0]
    i = _inputs(replace(base, idx=idx))
    results = {}
    for variant in ("extended", "extended-tma"):
        iv = replace(i, variant=variant)
        y, saved = linear.linear_forward(iv)
        g = linear.linear_backward(torch.cos(y), iv, saved, NEEDS_ALL)
        results[variant] = (y, g)
    (y0, g0), (y1, g1) = results["extended"], results["extended-tma"]
    torch.testing.assert_close(y1, y0, atol=1e-12, rtol=1e-12)
    for name in ("x", "A_m", "B_m", "val", "A_s", "B_s"):
        torch.testing.assert_close(getattr(g1, name), getattr(g0, name), atol=1e-12, rtol=1e-12,
                                   msg=lambda m, k=name: f"grad {k}: {m}")
    assert torch.count_nonzero(g1.A_m[~base.trainable]) == 0 and torch.count_nonzero(g1.B_m[~base.trainable]) == 0
    assert g1.val[0, 1] == 0 and g1.val[2, 3] == 0
