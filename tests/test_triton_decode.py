"""The decode-sized Triton forward (T ≤ 64) against the reference, and the memory it moves (CPU interpreter)."""
from __future__ import annotations

import pytest
import torch

import pclr
from pclr import dispatch
from pclr.bench.work import WorkCounter

triton_decode = pytest.importorskip("pclr.backends.triton.decode")
phases = pytest.importorskip("pclr.backends.triton.phases")
pytestmark = pytest.mark.skipif(bool(dispatch.reasons("triton", "info", None)),
                                reason="triton backend unavailable here")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _problem(T, B, d_in, d_out, n, r, n_s, *, dtype=torch.float64, sot=None, idx=None, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(DEVICE, dtype)

    x, W = rnd(T, d_in), rnd(d_out, d_in)
    b = rnd(d_out) if bias else None
    A_m, B_m = rnd(n, d_in), rnd(n, d_out)
    A_s, B_s = (rnd(n_s, d_in), rnd(n_s, d_out)) if n_s else (None, None)
    if idx is None:
        idx = torch.stack([torch.randperm(n, generator=g)[:r] for _ in range(B)])
    val = torch.rand(B, r, generator=g).to(DEVICE, torch.float32)
    if sot is None:
        sot = torch.arange(T) % B
    return {"x": x, "weight": W, "bias": b, "A_m": A_m, "B_m": B_m, "idx": idx.to(DEVICE, torch.int32), "val": val, "A_s": A_s,
                "B_s": B_s, "beta_m": 1.5, "beta_s": 0.5, "sot": sot.to(DEVICE, torch.int32)}


def _reference(p):
    return pclr.lrp_linear(p["x"], p["weight"], p["bias"], p["A_m"], p["B_m"], p["idx"], p["val"], A_s=p["A_s"],
                           B_s=p["B_s"], beta_m=p["beta_m"], beta_s=p["beta_s"], sample_of_token=p["sot"],
                           backend="reference")


def _check(p, dtype):
    y = triton_decode.decode_forward(**p)
    tol = {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 2e-5, "rtol": 2e-5}
    torch.testing.assert_close(y, _reference(p), **tol)
    return y


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B", [1, 8, 64])
def test_one_token_per_sample(B, dtype):
    _check(_problem(B, B, 48, 80, 20, 5, 3, dtype=dtype, seed=B), dtype)


def test_several_tokens_per_sample_in_any_order():
    sot = torch.tensor([2, 0, 1, 2, 2, 0, 3, 1, 3, 3, 0, 2])  # 4 samples, 12 tokens, interleaved
    _check(_problem(12, 4, 70, 130, 16, 4, 2, sot=sot), torch.float64)


def test_samples_without_tokens_and_t_64():
    sot = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1))  # B = 12: samples 10, 11 idle
    _check(_problem(64, 12, 40, 33, 9, 3, 1, sot=sot), torch.float64)


def test_rows_repeated_across_samples_and_within_a_route():
    idx = torch.tensor([[0, 1, 2], [2, 1, 0], [0, 0, 3], [3, 2, 2]])  # shared across samples; repeated in one route
    _check(_problem(4, 4, 64, 64, 6, 3, 2, idx=idx), torch.float64)


def test_no_shared_rows_and_no_bias():
    _check(_problem(8, 8, 64, 96, 12, 4, 0, bias=False), torch.float64)


def test_r_equals_n():
    _check(_problem(6, 3, 65, 31, 7, 7, 2), torch.float64)


def test_many_rows_span_several_chunks():
    _check(_problem(5, 5, 96, 72, 150, 40, 20), torch.float64)  # n + n_s = 170: six 32-row shrink chunks


def test_split_d_in_sums_in_a_fixed_order():
    p = _problem(3, 3, 2200, 40, 10, 4, 2)  # d_in ≥ 2048: two d_in slices
    assert triton_decode.decode_config(3, 2200, 40, 12, 12).split == 2
    _check(p, torch.float64)


def test_out_of_range_routes_read_nothing():
    # without validation nothing stops a route outside [0, n): it must add nothing rather than read past the pool
    p = _problem(4, 4, 32, 48, 8, 3, 1)
    bad = p["idx"].clone()
    bad[1, 0], bad[2, 2] = 8, -1
    y = triton_decode.decode_forward(**{**p, "idx": bad})
    val = p["val"].clone()
    val[1, 0] = val[2, 2] = 0.0  # the same routes with those entries weighted 0
    torch.testing.assert_close(y, _reference({**p, "val": val}), atol=1e-12, rtol=1e-10)


def test_one_launch_leaves_its_counters_zero_and_repeats_exactly():
    # the phase counters are reused by every call on the stream: each launch must leave them at zero
    p = _problem(8, 8, 96, 80, 12, 4, 2, dtype=torch.float32)
    y1 = triton_decode.decode_forward(**p)
    assert phases.phase_counters(p["x"].device).tolist() == [0, 0]
    y2 = triton_decode.decode_forward(**p)
    assert torch.equal(y1, y2)  # the splits are summed in a fixed order: deterministic
    assert phases.phase_counters(p["x"].device).tolist() == [0, 0]


def test_rejects_too_many_tokens():
    p = _problem(65, 65, 16, 16, 4, 2, 0)
    with pytest.raises(ValueError, match="T = 65"):
        triton_decode.decode_forward(**p)


def test_cublas_base_variant_matches():
    # the base as a cuBLAS GEMM and the low-rank term added in place: the same result as the fused expand
    p = _problem(8, 8, 96, 80, 12, 4, 2)
    y = triton_decode.decode_forward(**p, fuse_base=False)
    torch.testing.assert_close(y, _reference(p), atol=1e-12, rtol=1e-10)


def test_bias_shape_is_checked():
    p = _problem(2, 2, 16, 24, 4, 2, 0)
    with pytest.raises(ValueError, match="bias"):
        triton_decode.decode_forward(**{**p, "bias": p["bias"][:8]})


def test_expand_grid_fills_the_machine_at_d_out_4096():
    for T in (1, 8, 64):
        cfg = triton_decode.decode_config(T, 4096, 4096, 288, T * 64)
        assert 128 <= -(-4096 // cfg.block_n) <= 256  # ≥ one wave of programs on 132 SMs, each streaming W rows


@pytest.mark.skipif(DEVICE != "cpu", reason="counts the interpreter's memory traffic")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [8, 64])
def test_executed_bytes_near_floor(B, dtype):
    """Scaled point d = 1024, n = 64, r = 24, n_s = 8, one token per sample.

    Floor: W once + each used pool row once (A and B) + the shared rows + x + y. The fused expand writes y once and
    reads W and each used B row once over its output tiles; what it adds is per output tile: every tile reads all
    of x [T, d_in], the gated S of the live rows [split, T, used + n_s] and the usage bitmap. The shrink phase
    reads x once per row chunk. On a GPU those re-reads hit L2 (x is at most 64 rows); the interpreter counts
    every load, so they are named here and everything else must stay within 5 % of the floor.
    """
    d, n, r, n_s = 1024, 64, 24, 8
    p = _problem(B, B, d, d, n, r, n_s, dtype=dtype, bias=False, seed=7)
    used = int(torch.unique(p["idx"]).numel())
    esize = torch.finfo(dtype).bits // 8
    floor = esize * (d * d + 2 * B * d + 2 * (used + n_s) * d)
    cfg = triton_decode.decode_config(B, d, d, n + n_s, B * r)
    tiles = -(-d // cfg.block_n)
    per_tile = esize * B * d + esize * cfg.split * B * (used + n_s) + (n + n_s)
    chunk_rereads = (-(-(n + n_s) // cfg.block_j) - 1) * esize * B * d
    phases.phase_counters(p["x"].device)  # created (zero-filled) once per stream, not per call
    with WorkCounter() as wc:
        y = triton_decode.decode_forward(**p)
    assert wc.work.bytes <= 1.05 * floor + tiles * per_tile + chunk_rereads, (wc.work.bytes / floor,
                                                                              wc.work.by_kernel)
    assert wc.work.launches == 1  # shrink and fused base + expand phases in one launch: nothing per sample
    tol = {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 2e-5, "rtol": 2e-5}
    torch.testing.assert_close(y, _reference(p), **tol)
