"""The floor-shaped Triton prefill/training path (pclr.backends.triton.prefill) against the reference backend.

CPU runs through TRITON_INTERPRET=1 in float32 and float64; shapes stay small so the interpreter finishes quickly.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from lrp_cases import GRAD_NAMES, make_case

from pclr import dispatch
from pclr.backends import reference
from pclr.backends.base import LinearInputs, LinearNeeds
from pclr.bench.work import WorkCounter
from pclr.padded_batch import padded_sample_of_token

prefill = pytest.importorskip("pclr.backends.triton.prefill")
pytestmark = pytest.mark.skipif(bool(dispatch.reasons("triton", "info", None)),
                                reason="triton backend unavailable here")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _packed(c):
    """(x [T, d_in], sample_of_token int32 [T], padded_len) as pclr.functional hands them to a backend."""
    if c.sot is None:
        B, L, d = c.x.shape
        sot = torch.arange(B, dtype=torch.int32, device=c.x.device).repeat_interleave(L)
        return c.x.reshape(B * L, d), sot, L
    return c.x, c.sot.to(torch.int32), 0


def _inputs(c) -> LinearInputs:
    x, sot, padded_len = _packed(c)
    return LinearInputs(x=x, weight=c.weight, bias=c.bias, A_m=c.A_m, B_m=c.B_m, idx=c.idx, val=c.val, A_s=c.A_s,
                        B_s=c.B_s, beta_m=c.beta_m, beta_s=c.beta_s, sample_of_token=sot, trainable=c.trainable,
                        padded_len=padded_len, deterministic=True)


def _needs(x=False, pool=False, val=False, shared=False) -> LinearNeeds:
    return LinearNeeds(x=x, A_m=pool, B_m=pool, val=val, A_s=shared, B_s=shared)


NEEDS_ALL = _needs(True, True, True, True)


def _grad_out(y):
    return torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)


def _reference(c, needs=NEEDS_ALL):
    i = _inputs(c)
    y = reference.linear_forward(i)
    g = reference.linear_backward(_grad_out(y), i, needs)
    return y, {name: getattr(g, name) for name in GRAD_NAMES}


def _prefill(c, needs=NEEDS_ALL, keep_saved=True):
    i = _inputs(c)
    y, saved = prefill.linear_forward(i)
    g = prefill.linear_backward(_grad_out(y), i, saved if keep_saved else [], needs)
    return y, {name: getattr(g, name) for name in GRAD_NAMES}


def _check(c, atol, rtol):
    y_ref, g_ref = _reference(c)
    y, g = _prefill(c)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    for name, ref in g_ref.items():
        if ref is None:
            assert g[name] is None, f"grad {name} should be None"
            continue
        assert g[name] is not None and g[name].dtype == ref.dtype, f"grad {name}: missing or wrong dtype"
        torch.testing.assert_close(g[name], ref, atol=atol, rtol=rtol, msg=lambda m, n=name: f"grad {n}: {m}")
    # samples without tokens give their experts nothing; every other chosen trainable row gets a gradient
    counts = torch.bincount(_packed(c)[1].long(), minlength=c.num_samples)
    chosen = torch.zeros(c.A_m.shape[0], dtype=torch.bool, device=c.A_m.device)
    chosen[c.idx[counts > 0].long().reshape(-1)] = True
    if c.trainable is not None:
        for name in ("A_m", "B_m"):
            assert torch.count_nonzero(g[name][~c.trainable]) == 0, f"frozen rows of {name} got a gradient"
        chosen &= c.trainable
    for name in ("A_m", "B_m"):
        assert bool((g[name][chosen].abs().sum(1) > 0).all()), f"a chosen trainable row of {name} got no grad"
    for name in ("x", "val", "A_s", "B_s"):
        if g.get(name) is not None:
            assert g[name].abs().sum() > 0, f"grad {name} is all zero"


CASES = {
    "padded": dict(B=3, L=5),
    "padded_full_tiles_nobias": dict(B=2, L=128, d_in=33, d_out=66, n=8, r=4, bias=False),
    "packed_zero_sample_frozen": dict(lens=[5, 0, 12], d_in=37, d_out=29, frozen=(0, 4), soft=True),
    "varlen_odd_d_R21": dict(lens=[150, 0, 1, 82], d_in=45, d_out=71, n=24, r=18, n_s=3, frozen=(1, 2, 3, 5, 8),
                             soft=True),
    "many_samples_R7": dict(lens=[2, 1, 1, 3, 1, 0, 2, 1, 1, 1, 2, 1], d_in=20, d_out=24, n=12, r=3, n_s=4,
                            soft=True),
    "r1_ns0": dict(B=2, L=9, n=6, r=1, n_s=0, d_in=18, d_out=23),
    "R40_chunk16": dict(lens=[70, 30], d_in=24, d_out=40, n=48, r=32, n_s=8, soft=True),
    "R64_two_chunks": dict(lens=[40, 25], d_in=20, d_out=36, n=70, r=56, n_s=8, frozen=(3, 9), soft=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_prefill_matches_reference_fp32(name):
    c = make_case(**CASES[name], device=DEVICE, seed=hash(name) % 1000)
    _check(c, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(DEVICE != "cpu", reason="float64 runs only through the CPU interpreter")
@pytest.mark.parametrize("name", ["padded", "packed_zero_sample_frozen", "varlen_odd_d_R21"])
def test_prefill_matches_reference_fp64(name):
    c = make_case(**CASES[name], dtype=torch.float64, seed=31)
    _check(c, atol=1e-11, rtol=1e-10)


def test_subsets_of_gradients():
    c = make_case(lens=[9, 0, 20], d_in=19, d_out=27, n=9, r=3, n_s=2, frozen=(1,), soft=True, device=DEVICE,
                  seed=5)
    for flags in [(True, False, False, False), (False, True, False, False), (False, False, True, False),
                  (False, False, False, True), (False, True, False, True)]:
        needs = _needs(*flags)
        _, g_ref = _reference(c, needs)
        _, g = _prefill(c, needs)
        for name, ref in g_ref.items():
            assert (g[name] is None) == (ref is None), f"{needs}: grad {name} presence differs"
            if ref is not None:
                torch.testing.assert_close(g[name], ref, atol=1e-4, rtol=1e-4)


def test_saved_like_matches_saved():
    c = make_case(lens=[5, 0, 12], d_in=17, d_out=9, n=7, r=3, n_s=2, device=DEVICE)
    _, saved = prefill.linear_forward(_inputs(c))
    like = prefill.linear_saved_like(_inputs(c))
    assert [(t.shape, t.dtype) for t in saved] == [(t.shape, t.dtype) for t in like]


def test_backward_without_saved_recomputes():
    # the one-launch gate + linear hands the backward no saved u: the result must not change
    c = make_case(lens=[30, 0, 41], d_in=26, d_out=19, n=9, r=4, n_s=2, frozen=(2,), soft=True, device=DEVICE,
                  seed=8)
    _, with_saved = _prefill(c)
    _, without = _prefill(c, keep_saved=False)
    for name, t in with_saved.items():
        torch.testing.assert_close(without[name], t, atol=1e-6, rtol=1e-6)


def test_no_tokens_and_no_ranks():
    c = make_case(lens=[0, 0], d_in=8, d_out=8, device=DEVICE)
    y, g = _prefill(c)
    assert y.shape == (0, 8) and g["x"].shape == (0, 8)
    assert torch.count_nonzero(g["A_m"]) == 0 and torch.count_nonzero(g["B_m"]) == 0


def test_deterministic_bit_identical():
    # many samples share pool rows and the shared rows: the row reduction sums several partials per row
    c = make_case(lens=[40, 3, 70, 1, 65, 9], d_in=70, d_out=90, n=6, r=4, n_s=2, soft=True, device=DEVICE,
                  seed=9)
    y1, g1 = _prefill(c)
    y2, g2 = _prefill(c)
    assert torch.equal(y1, y2)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), f"grad {name} differs between two runs"


def test_frozen_rank_chunk_does_no_gradient_work():
    # R = 8 + 72 runs as five chunks of 16, grouped 4 + 1 per program; freezing the pool rows of sample 0's last
    # group (ranks 64..79 = its experts 56..71) skips those programs
    c = make_case(B=2, L=64, d_in=32, d_out=48, n=80, r=72, n_s=8, soft=True, device=DEVICE, seed=4)
    assert prefill.rank_chunk(80) == 16 and prefill.MAX_RANK_CHUNKS == 4
    with WorkCounter() as before:
        _prefill(c)
    trainable = torch.ones(80, dtype=torch.bool, device=DEVICE)
    trainable[c.idx[0, 56:].long()] = False
    frozen = replace(c, trainable=trainable)
    with WorkCounter() as after:
        _prefill(frozen)
    assert after.work.flops < before.work.flops
    _check(frozen, atol=1e-4, rtol=1e-4)


def test_rank_chunk_wastes_least():
    assert prefill.rank_chunk(96) == 32 and prefill.rank_chunk(32) == 32
    assert prefill.rank_chunk(40) == 16 and prefill.rank_chunk(8) == 16 and prefill.rank_chunk(7) == 16


def test_shrink_splits_fill_two_waves():
    # 32 tiles × 3 rank chunks on 132 SMs: split K so ≥ 264 programs; each split whole BLOCK_K blocks
    splits, per = prefill.shrink_splits(96, 4096, 64, 132)
    assert splits * 96 >= 264 and per % 64 == 0 and (splits - 1) * per < 4096
    assert prefill.shrink_splits(300, 4096, 64, 132) == (1, 4096)
    assert prefill.shrink_splits(1, 100, 64, 132) == (2, 64)  # never more splits than K blocks


def test_padded_tile_map_built_once_per_shape():
    a = torch.arange(3, dtype=torch.int32).repeat_interleave(70)
    b = a.clone()  # a fresh sample_of_token per call (what a 3-D x gets) must still hit
    assert prefill.segment_map(a, 3, 70, 64) is prefill.segment_map(b, 3, 70, 64)
    assert prefill.segment_map(a, 3, 70, 64).tok is None  # padded: no sort
    sot = padded_sample_of_token(3, 70, a.device)
    assert sot is padded_sample_of_token(3, 70, a.device) and torch.equal(sot, a)
    assert padded_sample_of_token(3, 71, a.device) is not sot


def test_executed_flops_at_the_floor():
    # full tiles (T / B a multiple of the interpreter's BLOCK_M = 64) and R = 32 (one rank chunk): no padded lane
    T, B, d_in, d_out, n, r, n_s = 256, 4, 128, 64, 40, 24, 8
    c = make_case(lens=[T // B] * B, d_in=d_in, d_out=d_out, n=n, r=r, n_s=n_s, bias=False, soft=True, seed=3)
    R = n_s + r
    x, sot, padded_len = _packed(c)
    fargs = (x, c.weight, None, c.A_m, c.B_m, c.idx, c.val, c.A_s, c.B_s, sot, None, c.beta_m, c.beta_s,
             padded_len, True)
    prefill.prefill_forward(*fargs)  # build the tile map outside the count (it is built once per batch)
    with WorkCounter() as wf:
        y, saved = prefill.prefill_forward(*fargs)
    bargs = (x, c.weight, c.A_m, c.B_m, c.idx, c.val, c.A_s, c.B_s, sot, None, c.beta_m, c.beta_s, padded_len, True)
    with WorkCounter() as wb:
        prefill.prefill_backward(torch.ones_like(y), *bargs, saved, (True, True, True, True))
    fwd_floor = 2 * T * d_in * d_out + 2 * T * R * (d_in + d_out)
    fb_floor = 4 * T * d_in * d_out + 6 * T * R * (d_in + d_out)
    assert wf.work.flops <= 1.01 * fwd_floor, (wf.work.flops, fwd_floor)
    assert wf.work.flops + wb.work.flops <= 1.01 * fb_floor, (wf.work.flops + wb.work.flops, fb_floor)
    assert wf.work.by_kernel["kext_gemm_kernel"] == 1 and wb.work.by_kernel["kext_gemm_kernel"] == 1


def _fenced(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` as a view into a NaN-filled buffer with a poisoned row on each side: a kernel that reads the row
    before or after the pool (idx -1 or n) gets NaN into its result."""
    buf = torch.full((rows.shape[0] + 2, rows.shape[1]), float("nan"), dtype=rows.dtype, device=rows.device)
    buf[1:-1] = rows
    return buf[1:-1]


@pytest.mark.skipif(DEVICE != "cpu", reason="float64 runs only through the CPU interpreter")
@pytest.mark.parametrize("layout", [dict(B=3, L=70), dict(lens=[41, 0, 66])])
def test_out_of_pool_idx_adds_nothing_fp64(layout):
    """An idx outside [0, n) (negative, n, huge) is masked inside the kernels: y and every gradient equal the
    reference's for that expert dropped (row 0 at val 0), its dval is exactly 0, frozen rows stay exactly 0, and
    neither the row before nor the row after the pool is read."""
    base = make_case(**layout, d_in=24, d_out=20, n=10, r=4, n_s=2, frozen=(2, 7), soft=True, dtype=torch.float64,
                     seed=13)
    n = base.A_m.shape[0]
    bad = base.idx.clone()
    bad[0, 1], bad[1, 3], bad[2, 0], bad[2, 2] = -1, n, 1 << 30, n
    out = (bad < 0) | (bad >= n)
    dropped = replace(base, idx=torch.where(out, torch.zeros_like(bad), bad),
                      val=torch.where(out, torch.zeros_like(base.val), base.val))
    y_ref, g_ref = _reference(dropped)
    g_ref["val"] = torch.where(out, torch.zeros_like(g_ref["val"]), g_ref["val"])
    y, g = _prefill(replace(base, idx=bad, A_m=_fenced(base.A_m), B_m=_fenced(base.B_m)))
    torch.testing.assert_close(y, y_ref, atol=1e-11, rtol=1e-10)
    for name, ref in g_ref.items():
        torch.testing.assert_close(g[name], ref, atol=1e-11, rtol=1e-10, msg=lambda m, k=name: f"grad {k}: {m}")
    assert torch.equal(g["val"][out], torch.zeros_like(g["val"][out]))
    for name in ("A_m", "B_m"):
        assert torch.count_nonzero(g[name][~base.trainable]) == 0, f"frozen rows of {name} got a gradient"
