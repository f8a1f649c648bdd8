"""The mini LLaVA pipeline on its tiny preset: cached alignment, and the exact frozen-prefix cache."""
import warnings

import torch

from pclr.cil.data import CoINCollator, split_batch
from pclr.demo.data.captions import caption_samples
from pclr.demo.models.smol import build_mini_llava, inject_top_layers


def test_tiny_build_is_cached_and_prefix_cache_is_exact(tmp_path):
    b = build_mini_llava("tiny", cache_dir=tmp_path, lrp_layers=2, progress=False, align_steps=2)
    assert b.info["alignment"]["ran_now"] and "token_accuracy_heldout" in b.info["alignment"]
    b2 = build_mini_llava("tiny", cache_dir=tmp_path, lrp_layers=2, progress=False, align_steps=2)
    assert not b2.info["alignment"]["ran_now"]
    model, lm = b.model, b.model.model.language_model
    assert lm.prefix_layers == b.model.config.text_config.num_hidden_layers - 2
    batch = CoINCollator(b, mode="train")(caption_samples(5, 1, b.image_size))
    mi, _ = split_batch(batch)
    valid = mi["attention_mask"].bool()
    with torch.no_grad():
        first, second = model(**mi).logits, model(**mi).logits
        lm.prefix_layers, keep = 0, lm.prefix_layers
        full = model(**mi).logits
        lm.prefix_layers = keep
    assert lm.prefix_stats == {"hits": 5, "misses": 5}
    torch.testing.assert_close(first[valid], full[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second[valid], full[valid], rtol=1e-5, atol=1e-5)
    # one sample alone (other padding) hits the same entry
    with torch.no_grad():
        single = model(**{k: v[:1] if k != "pixel_values" else v[:1] for k, v in mi.items()}).logits
    n = int(valid[0].sum())
    torch.testing.assert_close(single[0, :n], full[0, :n], rtol=1e-5, atol=1e-5)


def test_lrp_only_in_top_layers_and_cache_bypassed_below(tmp_path):
    from pclr.config import LRPConfig
    from pclr.inject import lrp_pools

    b = build_mini_llava("tiny", cache_dir=tmp_path, lrp_layers=2, progress=False, align_steps=2)
    inject_top_layers(b.model, LRPConfig(r=2, budget=4, n_shared=0), 2)
    names = list(lrp_pools(b.model))
    assert len(names) == 2 and all(n.endswith(("layers.2", "layers.3")) for n in names)
    assert b.model.model.language_model._bottom_is_frozen()
    b = build_mini_llava("tiny", cache_dir=tmp_path, lrp_layers=2, progress=False, align_steps=2)
    inject_top_layers(b.model, LRPConfig(r=2, budget=4, n_shared=0), 4)  # LRPs below the cached prefix too
    assert not b.model.model.language_model._bottom_is_frozen()  # so the cache is bypassed


def _generate(model, mi, n_new):
    return model.generate(**mi, max_new_tokens=n_new, do_sample=False, min_new_tokens=n_new)


def test_generate_keeps_its_kv_cache_with_the_prefix_cache_on(tmp_path):
    """Greedy generation through the prefix-cached LM equals generation without the prefix cache token for token,
    and equals the teacher-forced greedy argmax of the generated sequence, sample by sample; no deprecated
    KV-cache keyword is passed to transformers on the way."""
    b = build_mini_llava("tiny", cache_dir=tmp_path, lrp_layers=2, progress=False, align_steps=2)
    model, lm = b.model, b.model.model.language_model
    assert lm.prefix_layers > 0
    batch = CoINCollator(b, mode="generate")(caption_samples(4, 3, b.image_size))
    mi, _ = split_batch(batch)
    n_new, L = 6, mi["input_ids"].shape[1]
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        cached = _generate(model, mi, n_new)
        forced_in = {"input_ids": cached, "attention_mask": torch.cat(
            [mi["attention_mask"], torch.ones(cached.shape[0], n_new, dtype=torch.long)], 1),
            "pixel_values": mi["pixel_values"]}
        logits = model(**forced_in).logits[:, L - 1: L - 1 + n_new]  # plain forward: the prefix-cache path
    assert lm.prefix_stats["misses"] > 0  # the forced forward did go through the prefix cache
    deprecated = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
                  and ("past_key_values" in str(w.message) or "cache" in str(w.message))]
    assert not deprecated, deprecated[:3]
    lm.prefix_layers, keep = 0, lm.prefix_layers
    try:
        with torch.no_grad():
            plain = _generate(model, mi, n_new)
    finally:
        lm.prefix_layers = keep
    for s in range(cached.shape[0]):
        assert cached[s].tolist() == plain[s].tolist(), s
    # teacher-forced greedy: the argmax at each generated position is the generated token (positions whose best
    # two logits lie within 1e-4 are skipped: there the winner may depend on float summation order)
    logits = logits.float()
    logits[..., b.tokenizer.eos_token_id] = float("-inf")  # min_new_tokens forbids eos during generation: here too
    top2 = logits.topk(2, dim=-1)
    clear = (top2.values[..., 0] - top2.values[..., 1]) > 1e-4
    assert clear.float().mean() > 0.5
    gen = cached[:, L:]
    for s in range(gen.shape[0]):
        assert torch.equal(top2.indices[s, :, 0][clear[s]], gen[s][clear[s]]), s
