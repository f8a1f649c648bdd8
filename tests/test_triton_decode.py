"""The decode-sized Triton forward (T ≤ 64) against the reference, and the memory it moves (CPU interpreter)."""
from __future__ import annotations

import pytest
import torch

import pclr
from pclr import dispatch
from pclr.bench.work import WorkCounter

triton_decode = pytest.importorskip("pclr.backends.triton.decode")
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
    _check(_problem(5, 5, 96, 72, 150, 40, 20), torch.float64)  # n + n_s = 170 > one 128-row chunk


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


def test_rejects_too_many_tokens():
    p = _problem(65, 65, 16, 16, 4, 2, 0)
    with pytest.raises(ValueError, match="T = 65"):
        triton_decode.decode_forward(**p)


@pytest.mark.skipif(DEVICE != "cpu", reason="counts the interpreter's memory traffic")
@pytest.mark.parametrize("B", [8, 64])
def test_executed_bytes_near_floor(B):
    """Scaled point d = 1024, n = 64, r = 24, n_s = 8, one token per sample, fp32.

    Floor: W once + each used pool row once (A and B) + the shared rows + x + y. The base is a separate cuBLAS GEMM,
    so the low-rank pair reads x once more (shrink) and y once more and writes it once more (expand): 3·T·d
    elements on top, 9.9 % of the floor at B = 64 and 1.3 % at B = 8. Everything else must stay within 5 %.
    """
    d, n, r, n_s = 1024, 64, 24, 8
    p = _problem(B, B, d, d, n, r, n_s, dtype=torch.float32, bias=False, seed=7)
    used = int(torch.unique(p["idx"]).numel())
    esize = 4
    floor = esize * (d * d + 2 * B * d + 2 * (used + n_s) * d)
    with WorkCounter() as wc:
        y = triton_decode.decode_forward(**p)
    second_pass = 3 * esize * B * d  # x re-read by the shrink, y read and written again by the expand
    assert wc.work.bytes <= 1.05 * floor + second_pass, (wc.work.bytes / floor, wc.work.by_kernel)
    assert wc.work.launches == 3  # one GEMM, one shrink, one expand: nothing per sample
    torch.testing.assert_close(y, _reference(p), atol=2e-5, rtol=2e-5)
