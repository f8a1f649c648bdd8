"""Per-sample queries: text = masked mean of input embeddings, vision = penultimate-layer CLS from the model's own
vision pass (hook, one pass), zero without an image; generation reuses the prompt's route."""
import pytest
import torch
import torch.nn.functional as F

from pclr import LRPConfig
from pclr.inject import inject_lrp, lrp_layers, lrp_pools
from pclr.models.tiny import tiny_causal_lm, tiny_llava, tiny_qwen2_vl
from pclr.query import QueryExtractor


def _llava():
    b = tiny_llava()
    inject_lrp(b.model, LRPConfig(r=2, alpha=4.0, budget=8))
    torch.manual_seed(1)
    for pool in lrp_pools(b.model).values():
        pool.grow(4)
    for layer in lrp_layers(b.model).values():
        torch.nn.init.normal_(layer.B_m, std=0.3)  # a visible LRP contribution
    return b


def _mixed_batch(b):
    img = [b.image_token_id] * b.num_image_tokens
    ids = torch.tensor([[2, 5, 7, *img, 20, 22, 19, 6, 7], [0, 0, 0, 0, 0, 2, 5, 7, 20, 23, 6, 7]])
    att = (ids != 0).long()
    instr = torch.zeros_like(ids, dtype=torch.bool)
    instr[0, 7:10] = True
    instr[1, 7:10] = True
    return ids, att, instr, torch.randn(1, 3, b.image_size, b.image_size)


def test_text_and_vision_query_values_and_single_vision_pass():
    b = _llava()
    ids, att, instr, px = _mixed_batch(b)
    qx = QueryExtractor(b.model)
    calls = []
    h = b.model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad(), qx.route(ids, att, instr) as st:
        b.model(input_ids=ids, attention_mask=att, pixel_values=px)
    h.remove()
    assert len(calls) == 1  # the query reused the model's own vision pass
    q_text, q_vis = st.query
    emb = b.model.get_input_embeddings().weight
    for i in range(2):
        expect = F.normalize(emb[ids[i][instr[i]]].mean(0), dim=-1)
        torch.testing.assert_close(q_text[i], expect)
    with torch.no_grad():
        hs = b.model.model.vision_tower(px, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(q_vis[0], F.normalize(hs[0, 0], dim=-1))  # CLS of the penultimate layer
    assert torch.count_nonzero(q_vis[1]) == 0  # no image → zero vision part


def test_mixed_batch_rows_match_single_sample_forwards():
    b = _llava()
    ids, att, instr, px = _mixed_batch(b)
    qx = QueryExtractor(b.model)
    with torch.no_grad(), qx.route(ids, att, instr):
        both = b.model(input_ids=ids, attention_mask=att, pixel_values=px).logits
    with torch.no_grad(), qx.route(ids[:1], att[:1], instr[:1]):
        first = b.model(input_ids=ids[:1], attention_mask=att[:1], pixel_values=px).logits
    torch.testing.assert_close(both[:1], first, atol=1e-5, rtol=1e-5)


def test_generate_reuses_prompt_route_and_matches_full_recompute():
    b = _llava()
    ids, att, instr, px = _mixed_batch(b)
    qx = QueryExtractor(b.model)
    with torch.no_grad():
        gen = qx.generate(ids, att, instr, pixel_values=px, max_new_tokens=4, do_sample=False,
                          pad_token_id=0, eos_token_id=-1)
    # greedy decoding without cache, route fixed by the prompt query, must give the same tokens
    with torch.no_grad():
        q = qx.query_fn(ids, att, instr)
        with qx.route(ids, att, instr) as st:
            seq, a = ids, att
            for _ in range(4):
                logits = b.model(input_ids=seq, attention_mask=a, pixel_values=px, use_cache=False).logits
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                seq, a = torch.cat([seq, nxt], 1), torch.cat([a, torch.ones_like(nxt)], 1)
    assert torch.equal(gen, seq)
    del q, st


def test_auto_mode_and_cached_step_without_context_raises():
    b = _llava()
    ids, att, _, px = _mixed_batch(b)
    qx = QueryExtractor(b.model, auto=True)
    with torch.no_grad():
        out = b.model(input_ids=ids, attention_mask=att, pixel_values=px)
        with pytest.raises(RuntimeError, match="routing context"):
            b.model(input_ids=ids[:, -1:], attention_mask=torch.cat([att, att[:, -1:]], 1),
                    past_key_values=out.past_key_values)
    qx.remove()


def test_causal_lm_query_and_generate():
    b = tiny_causal_lm()
    inject_lrp(b.model, LRPConfig(r=2, budget=8))
    for pool in lrp_pools(b.model).values():
        pool.grow(2)
    qx = QueryExtractor(b.model)
    assert qx.query_dims == (32,) and qx.tower is None
    ids = torch.tensor([[2, 5, 20, 22, 6, 7]])
    with torch.no_grad():
        out = qx.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 9)


def test_qwen2_vl_query_mean_of_patches():
    b = tiny_qwen2_vl()
    m = b.model
    inject_lrp(m, LRPConfig(r=2, budget=8))
    for pool in lrp_pools(m).values():
        pool.grow(4)
    img = b.image_token_id
    ids = torch.tensor([[2, 5, 7, img, 20, 22, 6, 7], [2, 5, 7, 20, 22, 19, 6, 7]])
    px, grid = torch.randn(4, 96), torch.tensor([[1, 2, 2]])
    qx = QueryExtractor(m)
    assert qx.query_dims == (32, 16)
    with torch.no_grad(), qx.route(ids) as st:
        m(input_ids=ids, pixel_values=px, image_grid_thw=grid, mm_token_type_ids=(ids == img).long())
    feats = {}
    h = m.model.visual.blocks[-2].register_forward_hook(lambda mod, a, o: feats.setdefault("x", o))
    with torch.no_grad():
        m.model.visual(px, grid_thw=grid)
    h.remove()
    torch.testing.assert_close(st.query[1][0], F.normalize(feats["x"].float().mean(0), dim=-1))
    assert torch.count_nonzero(st.query[1][1]) == 0


def test_text_only_model_with_a_zero_vision_part():
    b = tiny_causal_lm()
    inject_lrp(b.model, LRPConfig(r=2, budget=8), query_dims=(32, 16))
    for pool in lrp_pools(b.model).values():
        pool.grow(2)
    qx = QueryExtractor(b.model)
    ids = torch.tensor([[2, 5, 20, 22, 6, 7]])
    with torch.no_grad(), qx.route(ids) as st:
        b.model(input_ids=ids)
    assert [tuple(q.shape) for q in st.query] == [(1, 32), (1, 16)] and torch.count_nonzero(st.query[1]) == 0
