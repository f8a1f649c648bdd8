"""inject_lrp: which linears get pools, frozen base, unchanged outputs at init, clear errors."""
import pytest
import torch

from pclr import FusedLRPLinear, KeyPool, LRPConfig
from pclr.inject import (
    POOL_ATTR,
    decoder_layers,
    inject_lrp,
    load_lrp_state_dict,
    lrp_layers,
    lrp_pools,
    lrp_state_dict,
)
from pclr.models.tiny import tiny_causal_lm, tiny_llava
from pclr.query import QueryExtractor

CFG = LRPConfig(r=2, alpha=4.0, budget=8, n_shared=2)


def _llava_inputs(bundle, batch=2):
    img = [bundle.image_token_id] * bundle.num_image_tokens
    ids = torch.tensor([[2, 5, 7, *img, 20, 22, 19, 6, 7]] * batch)
    return ids, torch.randn(batch, 3, bundle.image_size, bundle.image_size)


def test_llava_pools_per_decoder_layer_and_projector():
    b = tiny_llava()
    inject_lrp(b.model, CFG)
    pools = lrp_pools(b.model)
    layers = [n for n, _ in decoder_layers(b.model)]
    assert set(pools) == {*layers, "model.multi_modal_projector"}
    for name, pool in pools.items():
        owner = b.model.get_submodule(name)
        assert getattr(owner, POOL_ATTR) is pool
    lin = lrp_layers(b.model)
    # 7 targets per decoder layer + the projector's 2 linears; the vision tower is untouched
    assert len(lin) == 7 * len(layers) + 2
    assert not any("vision_tower" in n for n in lin)
    for name, layer in lin.items():
        assert isinstance(layer, FusedLRPLinear)
        owner = name.rsplit(".self_attn", 1)[0].rsplit(".mlp", 1)[0] if "layers" in name else \
            "model.multi_modal_projector"
        assert layer.key_pool is pools[owner]
    assert pools[layers[0]].query_dims == (32, 16)


def test_outputs_unchanged_at_init_and_only_lrp_trains():
    b = tiny_llava()
    ids, px = _llava_inputs(b)
    with torch.no_grad():
        ref = b.model(input_ids=ids, pixel_values=px).logits
    inject_lrp(b.model, CFG)
    for pool in lrp_pools(b.model).values():
        pool.grow(4)  # B rows start at zero
    qx = QueryExtractor(b.model)
    with torch.no_grad(), qx.route(ids):
        out = b.model(input_ids=ids, pixel_values=px).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    trainable = {n for n, p in b.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".A_m", ".B_m")) or f"{POOL_ATTR}.keys" in n for n in trainable)
    assert not any(p.requires_grad for n, p in b.model.named_parameters() if "base_layer" in n)


def test_causal_lm_single_query_part():
    b = tiny_causal_lm()
    inject_lrp(b.model, CFG)
    pools = lrp_pools(b.model)
    assert len(pools) == 2 and all(p.query_dims == (32,) for p in pools.values())


def test_unknown_target_module_raises_before_changing_anything():
    b = tiny_llava()
    before = {n for n, _ in b.model.named_modules()}
    with pytest.raises(ValueError, match="unknown target module"):
        inject_lrp(b.model, LRPConfig(r=2, budget=8, target_modules=["q_proj", "qkv_fused"]))
    assert {n for n, _ in b.model.named_modules()} == before
    assert all(p.requires_grad for p in b.model.parameters())  # nothing frozen either
    with pytest.raises(ValueError, match="matches no Linear"):
        inject_lrp(b.model, LRPConfig(r=2, budget=8, target_modules=r".*nothing_here"))
    with pytest.raises(ValueError, match="not an nn.Linear"):
        inject_lrp(b.model, LRPConfig(r=2, budget=8, target_modules=["input_layernorm"]))


def test_regex_targets_and_no_projector():
    b = tiny_causal_lm()
    inject_lrp(b.model, LRPConfig(r=2, budget=8, target_modules=r"self_attn\.(q|v)_proj"), projector=False)
    names = list(lrp_layers(b.model))
    assert len(names) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in names)
    with pytest.raises(ValueError, match="applied twice"):
        inject_lrp(b.model, LRPConfig(r=2, budget=8, target_modules=["q_proj"]))


def test_lrp_state_round_trip_with_resized_pools():
    torch.manual_seed(0)
    b = tiny_causal_lm()
    inject_lrp(b.model, CFG)
    for pool in lrp_pools(b.model).values():
        pool.grow(5, task=0)
        pool.prune(torch.tensor([0, 2, 4]))
        pool.grow(2, task=1)
    for layer in lrp_layers(b.model).values():
        layer.add_shared(2)
        torch.nn.init.normal_(layer.B_m)
    state = lrp_state_dict(b.model)
    other = tiny_causal_lm()
    inject_lrp(other.model, CFG)
    load_lrp_state_dict(other.model, state)
    for k, v in lrp_state_dict(other.model).items():
        assert torch.equal(v, state[k]), k
    assert all(isinstance(p, KeyPool) and p.n == 5 for p in lrp_pools(other.model).values())
    ids = torch.tensor([[2, 5, 20, 22, 6, 7]])
    q1, q2 = QueryExtractor(b.model), QueryExtractor(other.model)
    with torch.no_grad(), q1.route(ids):
        y1 = b.model(input_ids=ids).logits
    with torch.no_grad(), q2.route(ids):
        y2 = other.model(input_ids=ids).logits
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


def test_layers_option_injects_only_the_chosen_decoder_layers():
    b = tiny_llava()
    layers = [n for n, _ in decoder_layers(b.model)]
    inject_lrp(b.model, CFG, projector=False, layers=range(-2, 0))
    assert list(lrp_pools(b.model)) == layers[-2:]
    assert not any(n.startswith(tuple(name + "." for name in layers[:-2])) for n in lrp_layers(b.model))
    with pytest.raises(ValueError, match="out of range"):
        inject_lrp(tiny_llava().model, CFG, layers=[99])


def _grown_state(seed=0, hidden=32):
    b = tiny_causal_lm(hidden=hidden, seed=seed)
    inject_lrp(b.model, CFG)
    for pool in lrp_pools(b.model).values():
        pool.grow(6, task=0)
    return lrp_state_dict(b.model)


def _sizes(model):
    return [p.n for p in lrp_pools(model).values()] + [layer.n for layer in lrp_layers(model).values()]


@pytest.mark.parametrize("spoil, match", [
    # one layer's pool rows disagree with its key pool: the layers before it must not have resized already
    (lambda s: s.update({k: s[k][:4] for k in s if k.endswith("layers.1.mlp.down_proj.A_m")}), "rows|experts"),
    (lambda s: s.update({k: s[k][:4] for k in s if k.endswith("layers.1.lrp_key_pool.keys.0")}), "shape"),
    (lambda s: s.update({k: s[k][:, :8] for k in s if k.endswith("layers.1.lrp_key_pool.keys.0")}), "keys.0"),
    (lambda s: s.update({k: s[k][:4] for k in s if ".layers.1.lrp_key_pool." in k}), "experts"),
])
def test_model_load_is_all_or_nothing(spoil, match):
    state = _grown_state()
    spoil(state)
    b = tiny_causal_lm()
    inject_lrp(b.model, CFG)
    for pool in lrp_pools(b.model).values():
        pool.grow(2)
    before = _sizes(b.model)
    with pytest.raises(ValueError, match=match):
        load_lrp_state_dict(b.model, state)
    assert _sizes(b.model) == before


def test_state_of_another_hidden_size_fails_clearly():
    state = _grown_state(hidden=48)
    b = tiny_causal_lm()
    inject_lrp(b.model, CFG)
    with pytest.raises(ValueError, match="another width"):
        load_lrp_state_dict(b.model, state)
    assert all(n == 0 for n in _sizes(b.model))


def test_inject_and_query_do_not_import_each_other():
    import subprocess
    import sys

    code = "import sys, pclr.inject; assert 'pclr.query' not in sys.modules, 'inject pulled in query'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_whole_model_state_of_a_merged_layer_is_unmerged():
    torch.manual_seed(0)
    b = tiny_causal_lm()
    inject_lrp(b.model, CFG)
    for pool in lrp_pools(b.model).values():
        pool.grow(4)
    for layer in lrp_layers(b.model).values():
        torch.nn.init.normal_(layer.B_m, std=0.3)
    ids = torch.tensor([[2, 5, 20, 22, 6, 7]])
    with torch.no_grad(), QueryExtractor(b.model).route(ids):
        ref = b.model(input_ids=ids).logits
    name, layer = next(iter(lrp_layers(b.model).items()))
    w0 = layer.weight.detach().clone()
    layer.merge((torch.tensor([0, 1]), torch.ones(2)))
    state = b.model.state_dict()
    assert torch.equal(state[f"{name}.base_layer.weight"], w0)
    other = tiny_causal_lm(seed=1)
    inject_lrp(other.model, CFG)
    other.model.load_state_dict(state)
    with torch.no_grad(), QueryExtractor(other.model).route(ids):
        torch.testing.assert_close(other.model(input_ids=ids).logits, ref, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="unmerge"):
        b.model.load_state_dict(state)
