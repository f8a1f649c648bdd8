"""The cuda decode kernel at ranks past one shared-memory pass (GPU only; needs the built extension).

The decode kernel stages a token's rank rows in shared memory kDecodeRankChunk (1024) rows at a time, so R = n_s + r
is not bounded by the 48 KB a launch gets without an opt-in (R of about 4096 used to fail to launch). Every forward
here has T <= DECODE_MAX_TOKENS, so it takes the decode kernel; the backward (tiled kernels) is checked too.
"""
from __future__ import annotations

import pytest
import torch
from lrp_cases import Case, assert_matches_reference, dense_lrp, make_case, with_

import pclr
from pclr.options import DECODE_MAX_TOKENS

# R = n_s + r around the old limit, and several passes; small d so the reference stays fast
RANKS = [1023, 1024, 1025, 4095, 4096, 4097, 9000]


@pytest.mark.gpu
@pytest.mark.parametrize("R", RANKS)
def test_gpu_decode_large_rank_matches_reference(ext, R):
    n_s = 16
    lens = [1, 2, 0, 5]  # 8 tokens in 4 samples, one without tokens
    assert sum(lens) <= DECODE_MAX_TOKENS
    c = make_case(B=len(lens), lens=lens, d_in=64, d_out=300, n=R + 7, r=R - n_s, n_s=n_s, soft=True, device="cuda")
    assert_matches_reference(c, "cuda", atol=2e-3, rtol=2e-3, soft=True)


def _fp64(c: Case) -> Case:
    """The same problem, every float tensor upcast exactly to fp64 (the truth for a half-precision run)."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return with_(c, x=d(c.x), weight=d(c.weight), bias=d(c.bias), A_m=d(c.A_m), B_m=d(c.B_m), A_s=d(c.A_s),
                 B_s=d(c.B_s), val=d(c.val))


def _forward(c: Case, backend: str) -> torch.Tensor:
    return pclr.lrp_linear(c.x, c.weight, c.bias, c.A_m, c.B_m, c.idx, c.val, A_s=c.A_s, B_s=c.B_s, beta_m=c.beta_m,
                           beta_s=c.beta_s, sample_of_token=c.sot, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_decode_large_rank_half_error_rule(ext, dtype):
    R, n_s = 4100, 4
    c = make_case(B=8, lens=[1] * 8, d_in=128, d_out=256, n=R, r=R - n_s, n_s=n_s, soft=True, device="cuda",
                  dtype=dtype, seed=3)
    truth = _forward(_fp64(c), "reference")
    err_k = (_forward(c, "cuda").double() - truth).abs().max().item()
    err_t = (dense_lrp(c).double() - truth).abs().max().item()  # the unfused torch formulation in the same dtype
    atol = {torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype] * (1.0 + truth.abs().max().item())
    assert err_k <= 2 * err_t + atol, f"decode error {err_k:.3g} > 2 x torch {dtype} error {err_t:.3g} + {atol:.3g}"
