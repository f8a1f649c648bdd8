"""The mini LLaVA pipeline on its tiny preset: cached alignment, and the exact frozen-prefix cache."""
import torch

from pclr.demo.data.captions import caption_samples
from pclr.cil.data import CoINCollator, split_batch
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
