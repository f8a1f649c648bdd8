"""The reference backend against an independent dense computation, and float64 gradcheck of every input."""
import pytest
import torch
from lrp_cases import (
    GRAD_NAMES,
    assert_matches_reference,
    dense_lrp,
    make_case,
    run_case,
)

import pclr

SHAPES = [
    {},
    {"B": 1, "L": 1, "d_in": 7, "d_out": 5, "n": 3, "r": 1, "n_s": 0},
    {"B": 4, "L": 17, "d_in": 33, "d_out": 19, "n": 40, "r": 8, "n_s": 3},
    {"packed": True},
    {"lens": [3, 0, 7, 1]},
    {"B": 5, "lens": [1, 1, 0, 1, 1]},  # B > T/2
    {"bias": False, "n_s": 0},
]


@pytest.mark.parametrize("kw", SHAPES, ids=[str(k) for k in SHAPES])
def test_reference_equals_dense_float64(kw):
    c = make_case(dtype=torch.float64, soft=True, **kw)
    y, _ = run_case(c, "reference")
    err = (y - dense_lrp(c)).abs().max().item() if y.numel() else 0.0
    assert err < 1e-12, err


@pytest.mark.parametrize("kw", SHAPES[:5], ids=[str(k) for k in SHAPES[:5]])
def test_reference_gradients_equal_dense_autograd(kw):
    c = make_case(dtype=torch.float64, soft=True, **kw)
    _y, grads = run_case(c, "reference")
    leaves = {n: getattr(c, n).detach().clone().requires_grad_(True) for n in grads}
    from dataclasses import replace
    yd = dense_lrp(replace(c, **leaves))
    yd.backward(torch.randn(yd.shape, generator=torch.Generator().manual_seed(1)).to(yd))
    for n in grads:
        torch.testing.assert_close(grads[n], leaves[n].grad, atol=1e-11, rtol=1e-10, msg=lambda m, n=n: f"{n}: {m}")


def test_gradcheck_every_differentiable_input():
    c = make_case(B=2, L=3, d_in=5, d_out=4, n=6, r=3, n_s=2, dtype=torch.float64, soft=True)
    names = [n for n in GRAD_NAMES if getattr(c, n) is not None]
    leaves = [getattr(c, n).detach().clone().requires_grad_(True) for n in names]

    def f(*ts):
        kw = dict(zip(names, ts))
        return pclr.lrp_linear(kw["x"], c.weight, c.bias, kw["A_m"], kw["B_m"], c.idx, kw["val"], A_s=kw["A_s"],
                               B_s=kw["B_s"], beta_m=c.beta_m, beta_s=c.beta_s, backend="reference")

    assert torch.autograd.gradcheck(f, leaves)


def test_gradcheck_packed_with_frozen_rows():
    c = make_case(B=3, d_in=5, d_out=4, n=6, r=3, n_s=0, dtype=torch.float64, soft=True, lens=[2, 0, 3],
                  frozen=(0, 1))
    x = c.x.detach().clone().requires_grad_(True)
    val = c.val.detach().clone().requires_grad_(True)

    def f(x, val):
        return pclr.lrp_linear(x, c.weight, c.bias, c.A_m, c.B_m, c.idx, val, sample_of_token=c.sot,
                               trainable=c.trainable)

    assert torch.autograd.gradcheck(f, (x, val))


def test_gradcheck_through_soft_gate_to_query_and_keys():
    g = torch.Generator().manual_seed(3)
    qt, qv = torch.randn(2, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)
    kt, kv = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    c = make_case(B=2, L=3, d_in=5, d_out=4, n=6, r=3, n_s=0, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (qt, qv, kt, kv)]

    def f(qt, qv, kt, kv):
        idx, val = pclr.lrp_gate((qt, qv), (kt, kv), 3, weights=(1.0, 0.25), mode="soft")
        return pclr.lrp_linear(c.x, c.weight, c.bias, c.A_m, c.B_m, idx, val)

    assert torch.autograd.gradcheck(f, leaves)


def test_frozen_rows_zero_trainable_rows_nonzero():
    c = make_case(B=4, L=6, n=12, r=6, frozen=(0, 2, 4, 6, 8, 10))
    assert_matches_reference(c, "reference")  # includes the zero / non-zero row checks


def test_packed_equals_padded():
    c = make_case(B=3, L=4, n_s=2, soft=True)
    y_pad, g_pad = run_case(c, "reference")
    perm = torch.randperm(12)
    sot = torch.arange(3, dtype=torch.int32).repeat_interleave(4)[perm]
    from dataclasses import replace
    cp = replace(c, x=c.x.reshape(12, -1)[perm], sot=sot)
    go = torch.randn(y_pad.shape, generator=torch.Generator().manual_seed(1))
    y_pk, g_pk = run_case(cp, "reference", grad_out=go.reshape(12, -1)[perm])
    torch.testing.assert_close(y_pk, y_pad.reshape(12, -1)[perm])
    torch.testing.assert_close(g_pk["x"], g_pad["x"].reshape(12, -1)[perm])
    for n in ("A_m", "B_m", "val", "A_s", "B_s"):
        torch.testing.assert_close(g_pk[n], g_pad[n])


def test_empty_token_count():
    c = make_case(packed=True, lens=[0, 0, 0])
    y, grads = run_case(c, "reference")
    assert y.shape == (0, 12)
    assert all(float(g.abs().sum()) == 0.0 for g in grads.values())
    c3 = make_case(B=2, L=0)
    y3, _ = run_case(c3, "reference")
    assert y3.shape == (2, 0, 12)


def test_half_precision_accumulates_in_fp32():
    c = make_case(B=2, L=8, d_in=64, d_out=32, n=16, r=8, dtype=torch.bfloat16)
    y, _ = run_case(c, "reference")
    c32 = make_case(B=2, L=8, d_in=64, d_out=32, n=16, r=8, dtype=torch.float32)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), dense_lrp(c32), atol=0.1, rtol=0.05)
