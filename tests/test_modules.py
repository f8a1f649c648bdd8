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


# ----------------------------------------------------------------------------------------------- merged state
def _merged_pair():
    torch.manual_seed(0)
    layer = _layer(bias=False)
    route = layer.key_pool.gate(_query(1))
    return layer, route


def test_merged_state_dict_holds_the_unmerged_weight():
    layer, route = _merged_pair()
    w0 = layer.weight.detach().clone()
    x = torch.randn(1, 5, 16)
    y = layer(x, route=route)
    layer.merge(route)
    state = layer.state_dict()
    assert torch.equal(state["base_layer.weight"], w0)  # the delta is not baked into the saved W
    fresh = _layer(bias=False)
    fresh.load_state_dict(state)
    assert not fresh.merged
    torch.testing.assert_close(fresh(x, route=route), y)  # the delta is applied once, not twice
    fresh.merge(route)
    torch.testing.assert_close(fresh(x), y)


def test_unmerge_restores_the_weight_bit_for_bit():
    layer, route = _merged_pair()
    w0 = layer.weight.detach().clone()
    layer.merge(route)
    assert not torch.equal(layer.weight, w0)
    with torch.no_grad():
        layer.B_m.mul_(3.0)  # an edit while merged must not make unmerge restore another W
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


@pytest.mark.parametrize("make, match", [
    (lambda idx, val: (idx.expand(3, -1), val.expand(3, -1)), "exactly one route"),
    (lambda idx, val: (torch.full_like(idx, -1), val), r"\[0, 10\)"),
    (lambda idx, val: (torch.full_like(idx, 10), val), r"\[0, 10\)"),
    (lambda idx, val: (idx, val[:, :2]), "shape of idx"),
    (lambda idx, val: (idx.float(), val), "integer"),
    (lambda idx, val: (idx, torch.full_like(val, float("nan"))), "finite"),
])
def test_merge_accepts_exactly_one_valid_route(make, match):
    layer, (idx, val) = _merged_pair()
    w0 = layer.weight.detach().clone()
    with pytest.raises((ValueError, TypeError), match=match):
        layer.merge(make(idx, val))
    assert not layer.merged and torch.equal(layer.weight, w0)


@pytest.mark.parametrize("op", [
    lambda layer: layer.grow(2),
    lambda layer: layer.prune(torch.arange(5)),
    lambda layer: layer.freeze(),
    lambda layer: layer.key_pool.freeze(torch.arange(2)),
    lambda layer: layer.add_shared(2),
    lambda layer: layer.load_state_dict(_layer(bias=False).state_dict()),
    lambda layer: layer.merge(layer.merged_route),
])
def test_pool_surgery_refused_while_merged(op):
    layer, route = _merged_pair()
    layer.merge(route)
    n, n_s = layer.n, layer.n_shared
    with pytest.raises(RuntimeError, match="unmerge"):
        op(layer)
    assert (layer.n, layer.n_shared, layer.key_pool.n) == (n, n_s, n)


# ----------------------------------------------------------------------------------------------- pool surgery
@pytest.mark.parametrize("args, kwargs, err, match", [
    ((2,), dict(copy_from=[0, 1, 2]), ValueError, "copy_from"),
    ((2,), dict(copy_from=[0, 99]), ValueError, "copy_from"),
    ((-3,), {}, ValueError, "n_new"),
    ((2.5,), {}, TypeError, "n_new"),
])
def test_grow_rejects_bad_arguments_and_changes_nothing(args, kwargs, err, match):
    pool = KeyPool((8,), pclr.LRPConfig(r=2), n=10)
    a, b = (FusedLRPLinear.from_linear(nn.Linear(16, 16), key_pool=pool) for _ in range(2))
    with pytest.raises(err, match=match):
        pool.grow(*args, **kwargs)
    with pytest.raises(err, match=match):
        a.grow(*args, **kwargs)
    assert pool.n == a.n == b.n == 10 and a.trainable.shape == (10,) and pool.trainable.shape == (10,)


def test_layer_load_of_another_width_fails_before_changing_anything():
    dst = _layer(n=3)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    src = FusedLRPLinear.from_linear(nn.Linear(20, 12), pclr.LRPConfig(r=4, n_shared=2), query_dims=(8, 6))
    src.grow(7)
    with pytest.raises(ValueError, match="A_m"):
        dst.load_state_dict(src.state_dict())
    after = dst.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_key_pool_load_of_other_query_dims_fails_before_changing_anything():
    dst = KeyPool((8, 6), n=2)
    with pytest.raises(ValueError, match="keys.1"):
        dst.load_state_dict(KeyPool((8, 5), n=7).state_dict())
    assert dst.n == 2 and dst.keys[1].shape == (2, 6)
    with pytest.raises(ValueError, match="query part"):
        dst.load_state_dict(KeyPool((8, 6, 4), n=7).state_dict())
    assert dst.n == 2


def test_layer_sharing_a_pool_cannot_load_another_pool_size():
    pool = KeyPool((8,), pclr.LRPConfig(r=2), n=10)
    layer = FusedLRPLinear.from_linear(nn.Linear(16, 16), key_pool=pool)
    other = FusedLRPLinear.from_linear(nn.Linear(16, 16), pclr.LRPConfig(r=2), query_dims=(8,))
    other.grow(12)
    state = {k: v for k, v in other.state_dict().items() if not k.startswith("own_key_pool.")}
    with pytest.raises(ValueError, match="key pool"):
        layer.load_state_dict(state)
    assert layer.n == pool.n == 10
    with pytest.raises(ValueError, match="attached layer"):
        pool.load_state_dict(KeyPool((8,), pclr.LRPConfig(r=2), n=12).state_dict())
    assert layer.n == pool.n == 10


@pytest.mark.parametrize("trainable", [True, False])
def test_shared_rank_trainability_survives_a_reload(trainable):
    src = _layer()
    src.A_s.requires_grad_(trainable)
    src.B_s.requires_grad_(trainable)
    dst = _layer(n=3, n_s=0)
    dst.load_state_dict(src.state_dict())
    assert dst.n_shared == 2 and dst.A_s.requires_grad is trainable and dst.B_s.requires_grad is trainable


def test_state_saved_without_the_shared_flag_still_loads():
    src = _layer()
    state = {k: v for k, v in src.state_dict().items() if k != "shared_trainable"}
    dst = _layer(n=3, n_s=0)
    dst.load_state_dict(state)
    assert dst.n == 10 and dst.n_shared == 2


# ----------------------------------------------------------------------------------------------- frozen rows
@pytest.mark.parametrize("momentum_before_freeze", [False, True])
def test_frozen_rows_bit_identical_under_default_adamw(momentum_before_freeze):
    """torch's default AdamW (weight_decay=0.01), created before freeze() and kept across it."""
    layer = _layer(n=8)
    layer.key_pool.config.gate_mode = "soft"
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)  # the own key pool is a child: its keys are in

    def step():
        with pclr.routing(_query()):
            loss = layer(torch.randn(3, 5, 16)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    if momentum_before_freeze:
        step()  # every row now carries AdamW momentum
    layer.freeze(torch.arange(4))
    layer.A_s.requires_grad_(False)
    layer.B_s.requires_grad_(False)
    before = [t.detach().clone() for t in (layer.A_m, layer.B_m, layer.key_pool.keys[0], layer.A_s, layer.B_s)]
    for _ in range(3):
        step()
    a_m, b_m, k0, a_s, b_s = before
    assert torch.equal(layer.A_m[:4], a_m[:4]) and torch.equal(layer.B_m[:4], b_m[:4])
    assert torch.equal(layer.key_pool.keys[0][:4], k0[:4])
    assert torch.equal(layer.A_s, a_s) and torch.equal(layer.B_s, b_s)
    assert not torch.equal(layer.A_m[4:], a_m[4:]) and not torch.equal(layer.key_pool.keys[0][4:], k0[4:])


def test_frozen_rows_guard_follows_a_deepcopy():
    import copy

    layer = _layer(n=6)
    layer.freeze(torch.arange(3))
    twin = copy.deepcopy(layer)
    opt = torch.optim.SGD([twin.A_m], lr=0.1, weight_decay=0.5)
    before = twin.A_m.detach().clone()
    twin.A_m.grad = torch.ones_like(twin.A_m)
    opt.step()
    assert torch.equal(twin.A_m[:3], before[:3]) and not torch.equal(twin.A_m[3:], before[3:])
