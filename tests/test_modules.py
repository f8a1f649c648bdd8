"""FusedLRPLinear and KeyPool: wrapping, pool ops, routing, merge, state_dict across pool sizes, compile."""
import io

import pytest
import torch
from torch import nn

import pclr
from pclr.modules import FusedLRPLinear, KeyPool


def _layer(n=10, n_s=2, r=4, qd=(8, 6), bias=True):
    cfg = pclr.LRPConfig(r=r, n_shared=n_s, budget=64)
    layer = FusedLRPLinear.from_linear(nn.Linear(16, 12, bias=bias), cfg, query_dims=qd)
    layer.grow(n)
    layer.add_shared()
    with torch.no_grad():
        layer.B_m.normal_()
        layer.B_s.normal_()
    return layer


def _query(B=3, qd=(8, 6)):
    return tuple(torch.randn(B, d) for d in qd)


def test_from_linear_shares_weight_and_freezes_it():
    lin = nn.Linear(16, 12)
    layer = FusedLRPLinear.from_linear(lin, pclr.LRPConfig(r=4), query_dims=(8,))
    assert layer.weight is lin.weight and layer.weight.data_ptr() == lin.weight.data_ptr()
    assert not lin.weight.requires_grad and not lin.bias.requires_grad
    x = torch.randn(2, 3, 16)
    with pclr.routing(torch.randn(2, 8)):
        torch.testing.assert_close(layer(x), lin(x))  # empty pool: exactly the Linear
    layer.grow(4)  # B = 0 at init: still the Linear
    with pclr.routing(torch.randn(2, 8)):
        torch.testing.assert_close(layer(x), lin(x))
    assert "n=4 (4 trainable)" in repr(layer)


def test_forward_matches_functional_with_gate():
    layer = _layer()
    q, x = _query(), torch.randn(3, 5, 16)
    idx, val = pclr.lrp_gate(q, tuple(layer.key_pool.keys), 4, weights=(1.0, 0.25))
    expected = pclr.lrp_linear(x, layer.weight, layer.bias, layer.A_m, layer.B_m, idx, val, A_s=layer.A_s,
                               B_s=layer.B_s, beta_m=128 / 4, beta_s=128 / 2)
    with pclr.routing(q):
        y = layer(x)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(layer(x, route=(idx, val)), expected)


def test_layer_gate_computed_once_per_forward(monkeypatch):
    pool = KeyPool((8, 6), pclr.LRPConfig(r=4), n=10)
    layers = [FusedLRPLinear.from_linear(nn.Linear(16, 16), key_pool=pool) for _ in range(3)]
    calls = []
    orig = pool.gate
    monkeypatch.setattr(pool, "gate", lambda q: calls.append(1) or orig(q))
    x = torch.randn(2, 4, 16)
    with pclr.routing(_query(2)):
        for layer in layers:
            x = layer(x)
    assert len(calls) == 1
    assert all(layer.n == 10 for layer in layers)
    pool.grow(5)
    assert all(layer.n == 15 and layer.trainable.sum() == 15 for layer in layers)
    assert "key_pool" not in dict(layers[0].named_modules())  # shared pool is not duplicated in the state


def test_grow_freeze_prune_keep_pool_and_layers_consistent():
    pool = KeyPool((8,), pclr.LRPConfig(r=2), n=6)
    a, b = (FusedLRPLinear.from_linear(nn.Linear(16, 16), key_pool=pool) for _ in range(2))
    pool.freeze()
    pool.grow(3, task=1)
    assert pool.trainable.tolist() == [False] * 6 + [True] * 3
    assert a.trainable.tolist() == pool.trainable.tolist() == b.trainable.tolist()
    rows_before = a.A_m.detach().clone()
    pool.prune(torch.tensor([0, 2, 4, 6, 7, 8]))
    assert pool.n == a.n == b.n == 6
    torch.testing.assert_close(a.A_m.detach(), rows_before[[0, 2, 4, 6, 7, 8]])
    assert pool.task_of_expert.tolist() == [-1, -1, -1, 1, 1, 1]


def test_frozen_rows_bit_identical_after_training_step():
    layer = _layer(n=8)
    layer.freeze(torch.arange(4))
    before = layer.A_m.detach().clone(), layer.B_m.detach().clone(), layer.key_pool.keys[0].detach().clone()
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    layer.key_pool.config.gate_mode = "soft"
    for _ in range(3):
        with pclr.routing(_query()):
            loss = layer(torch.randn(3, 5, 16)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(layer.A_m[:4], before[0][:4]) and torch.equal(layer.B_m[:4], before[1][:4])
    assert torch.equal(layer.key_pool.keys[0][:4], before[2][:4])
    assert not torch.equal(layer.A_m[4:], before[0][4:])


def test_always_and_candidates():
    pool = KeyPool((8,), pclr.LRPConfig(r=4), n=10)
    pool.set_candidates(torch.arange(6), always=torch.tensor([8, 9]))
    idx, val = pool.gate(torch.randn(5, 8))
    assert (idx[:, :2] == torch.tensor([8, 9], dtype=torch.int32)).all()
    assert set(idx[:, 2:].flatten().tolist()) <= set(range(6))


def test_merge_unmerge_equals_routed_forward():
    layer = _layer(bias=False).double()
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    q = tuple(t.double() for t in _query(1))
    w0 = layer.weight.detach().clone()
    route = layer.key_pool.gate(q)
    y = layer(x, route=route)
    layer.merge(route)
    torch.testing.assert_close(nn.functional.linear(x, layer.weight), y)
    torch.testing.assert_close(layer(x), y)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0)


def test_state_dict_round_trip_across_pool_sizes():
    src = _layer(n=12)
    src.freeze(torch.arange(5))
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    dst = _layer(n=3, n_s=0)
    buf.seek(0)
    dst.load_state_dict(torch.load(buf))
    assert dst.n == 12 and dst.n_shared == 2
    assert torch.equal(dst.trainable, src.trainable)
    q, x = _query(), torch.randn(3, 5, 16)
    with pclr.routing(q):
        torch.testing.assert_close(dst(x), src(x))


def test_key_pool_state_dict_resizes():
    a = KeyPool((8, 6), n=7)
    b = KeyPool((8, 6), n=2)
    b.load_state_dict(a.state_dict())
    assert b.n == 7 and torch.equal(b.keys[1], a.keys[1])


def test_missing_route_is_clear_error():
    layer = _layer()
    with pytest.raises(RuntimeError, match="pclr.routing"):
        layer(torch.randn(2, 3, 16))


def test_beam_expansion_and_single_token_input():
    layer = _layer()
    q = _query(2)
    x = torch.randn(2, 16)
    with pclr.routing(q):
        y1 = layer(x)  # [B, d]: one token per sample
        y2 = layer(x.repeat_interleave(3, 0).unsqueeze(1))  # beams: B*3 rows
    torch.testing.assert_close(y2.squeeze(1), y1.repeat_interleave(3, 0))


def _compile_model():
    layer = _layer()

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = layer

        def forward(self, x, q):
            with pclr.routing(q):
                return self.l(x).relu().sum()

    return Block()


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    m, q, x = _compile_model(), _query(), torch.randn(3, 5, 16)
    ref = m(x, q)
    ref_grads = torch.autograd.grad(ref, [m.l.A_m, m.l.B_m])
    cm = torch.compile(m, fullgraph=True, backend=compile_backend)
    out = cm(x, q)
    grads = torch.autograd.grad(out, [m.l.A_m, m.l.B_m])
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("bad, match", [
    (dict(r=0), "r must be >= 1"),
    (dict(r=64, budget=32), "budget"),
    (dict(gate_scope="token"), "gate_scope"),
    (dict(gate_mode="gumbel"), "gate_mode"),
    (dict(backend="tpu"), "backend"),
    (dict(n_shared=-1), "n_shared"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        pclr.LRPConfig(**bad)


def test_config_round_trips_through_dict():
    cfg = pclr.LRPConfig(r=8, query_weights=[1.0, 0.5], target_modules=["q_proj"])
    assert pclr.LRPConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.beta_m == 128 / 8 and cfg.beta_s(0) == 0.0
