"""Value checks of the gate (NaN / Inf keys and weights, batch-scope candidates), the out-of-pool guarantee of the
Triton lrp_linear with validation off, and the warning for a base linear that asks for a gradient."""
import warnings

import pytest
import torch
from lrp_cases import make_case
from torch import nn

import pclr
import pclr.validation as validation


def _gate_inputs(B=3, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, 6, generator=g), torch.randn(B, 4, generator=g))
    k = (torch.randn(n, 6, generator=g), torch.randn(n, 4, generator=g))
    return q, k


@pytest.mark.parametrize("part, value", [(0, float("nan")), (1, float("inf")), (1, float("-inf"))])
def test_non_finite_keys_are_named(part, value):
    q, k = _gate_inputs()
    bad = [t.clone() for t in k]
    bad[part][3, 1] = value
    with pytest.raises(ValueError, match=rf"keys\[{part}\] holds NaN or Inf"):
        pclr.lrp_gate(q, tuple(bad), 2, backend="reference")


@pytest.mark.parametrize("weights", [(1.0, float("nan")), (float("inf"), 0.25)])
def test_non_finite_weights_are_named(weights):
    q, k = _gate_inputs()
    with pytest.raises(ValueError, match="weights holds NaN or Inf"):
        pclr.lrp_gate(q, k, 2, weights=weights, backend="reference")
    pclr.set_validation(False)  # without validation the ranking rule decides (tests/test_gate_nan.py)
    try:
        idx, _ = pclr.lrp_gate(q, k, 2, weights=weights, backend="reference")
        assert ((idx >= 0) & (idx < 8)).all()
    finally:
        pclr.set_validation(None)


def test_batch_scope_needs_r_common_candidates():
    q, k = _gate_inputs(B=3, n=8)
    cand = torch.zeros(3, 8, dtype=torch.bool)
    cand[0, [0, 1, 2, 3]] = True
    cand[1, [2, 3, 4, 5]] = True
    cand[2, [2, 3, 6, 7]] = True  # every row has 4 candidates, only experts 2 and 3 are common to all
    with pytest.raises(ValueError, match=r"scope='batch'.*only 2 are, fewer than r \(3\)"):
        pclr.lrp_gate(q, k, 3, candidates=cand, scope="batch", backend="reference")
    idx, _ = pclr.lrp_gate(q, k, 2, candidates=cand, scope="batch", backend="reference")
    assert sorted(idx[0].tolist()) == [2, 3] and (idx == idx[0]).all()


def _run(c, idx, val, backend, variant, deterministic):
    A_m, B_m = c.A_m.clone().requires_grad_(), c.B_m.clone().requires_grad_()
    x = c.x.clone().requires_grad_()
    y = pclr.lrp_linear(x, c.weight, c.bias, A_m, B_m, idx, val, A_s=c.A_s, B_s=c.B_s, beta_m=c.beta_m,
                        beta_s=c.beta_s, backend=backend, variant=variant, deterministic=deterministic)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad, A_m.grad, B_m.grad


@pytest.mark.parametrize("variant, L", [("fused", 5), ("epilogue", 5), ("split", 5), ("extended", 5),
                                        ("auto", 5), ("auto", 40)])  # auto: the decode path, then the extended one
@pytest.mark.parametrize("deterministic", [False, True])
def test_out_of_pool_idx_contributes_nothing_without_validation(variant, L, deterministic):
    """With validation off, an idx outside [0, n) is masked in every gather: y and every gradient are those of the
    same route with that expert dropped (val 0 on a valid row), and no row outside the pool is touched."""
    c = make_case(B=3, L=L, n=10, r=4, n_s=2, seed=3)
    bad = c.idx.clone()
    bad[0, 1], bad[1, 3], bad[2, 0] = 10, -1, 1 << 20  # just past the end, negative, far away
    out = (bad < 0) | (bad >= 10)
    dropped_idx = torch.where(out, torch.zeros_like(bad), bad)
    dropped_val = torch.where(out, torch.zeros_like(c.val), c.val)
    pclr.set_validation(False)
    try:
        got = _run(c, bad, c.val, "triton", variant, deterministic)
    finally:
        pclr.set_validation(None)
    want = _run(c, dropped_idx, dropped_val, "triton", variant, deterministic)
    ref = _run(c, dropped_idx, dropped_val, "reference", None, False)
    for g, w, r, name in zip(got, want, ref, ("y", "dx", "dA_m", "dB_m")):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4, msg=name)


def test_validation_on_still_refuses_out_of_pool_idx():
    c = make_case()
    with pytest.raises(ValueError, match="idx holds values outside"):
        pclr.lrp_linear(c.x, c.weight, c.bias, c.A_m, c.B_m, c.idx + 100, c.val, backend="triton")


@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(validation, "_warned_frozen_base", False)


def test_base_requiring_grad_warns_once(fresh_warning):
    c = make_case()
    weight = c.weight.clone().requires_grad_()
    with pytest.warns(UserWarning, match="weight require grad, but the base linear is frozen"):
        y = pclr.lrp_linear(c.x, weight, c.bias, c.A_m, c.B_m, c.idx, c.val, backend="reference")
    assert not y.requires_grad or weight.grad is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: the second call is quiet
        pclr.lrp_linear(c.x, weight, c.bias, c.A_m, c.B_m, c.idx, c.val, backend="reference")


def test_frozen_base_is_quiet(fresh_warning):
    c = make_case()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pclr.lrp_linear(c.x, c.weight, c.bias, c.A_m, c.B_m, c.idx, c.val, backend="reference")
        with torch.no_grad():
            pclr.lrp_linear(c.x, c.weight.clone().requires_grad_(), c.bias, c.A_m, c.B_m, c.idx, c.val,
                            backend="reference")


def test_module_base_unfrozen_by_the_user_warns(fresh_warning):
    layer = pclr.FusedLRPLinear.from_linear(nn.Linear(16, 12), pclr.LRPConfig(r=2, alpha=4, backend="reference"),
                                            query_dims=(8,))
    layer.grow(4)
    layer.base_layer.bias.requires_grad_(True)
    with pclr.routing((torch.randn(2, 8),)):
        with pytest.warns(UserWarning, match="bias require grad"):
            layer(torch.randn(2, 3, 16))

