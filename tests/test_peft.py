"""PEFT route: get_peft_model(model, PCLRConfig(...)), forward/generate routing, save_pretrained/from_pretrained."""
import pytest
import torch

pytest.importorskip("peft")
from peft import PeftModel, get_peft_model  # noqa: E402
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING  # noqa: E402

from pclr.inject import lrp_layers, lrp_pools  # noqa: E402
from pclr.models.tiny import tiny_llava  # noqa: E402
from pclr.peft import PCLRConfig, PCLRModel  # noqa: E402


def _inputs(b):
    ids = torch.tensor([[2, 5, 7, *[b.image_token_id] * b.num_image_tokens, 20, 22, 19, 6, 7]])
    return ids, torch.randn(1, 3, b.image_size, b.image_size)


def test_registered_in_peft_mappings():
    assert PEFT_TYPE_TO_CONFIG_MAPPING["PCLR"] is PCLRConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["PCLR"] is PCLRModel
    assert PCLRConfig().peft_type == "PCLR"
    with pytest.raises(ValueError, match="budget"):
        PCLRConfig(r=8, budget=4)


def test_get_peft_model_save_and_load(tmp_path):
    b = tiny_llava()
    ids, px = _inputs(b)
    with torch.no_grad():
        ref = b.model(input_ids=ids, pixel_values=px).logits
    pm = get_peft_model(b.model, PCLRConfig(r=2, alpha=4.0, budget=16, n_init=4, n_shared=2))
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids, pixel_values=px).logits, ref, rtol=0, atol=0)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".A_m", ".B_m")) or ".keys." in n for n in trainable)
    # train-like change, a grown pool and shared ranks: from_pretrained must resize and reproduce exactly
    for pool in lrp_pools(pm).values():
        pool.grow(3, task=1)
    for layer in lrp_layers(pm).values():
        layer.add_shared(2)
        torch.nn.init.normal_(layer.B_m, std=0.2)
        torch.nn.init.normal_(layer.B_s, std=0.2)
    with torch.no_grad():
        out = pm(input_ids=ids, pixel_values=px).logits
    assert (out - ref).abs().max() > 1e-3
    pm.base_model.disable_adapter_layers()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids, pixel_values=px).logits, ref, rtol=0, atol=0)
    pm.base_model.enable_adapter_layers()
    pm.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(tiny_llava().model, tmp_path)
    assert [p.n for p in lrp_pools(loaded).values()] == [7, 7, 7]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, pixel_values=px).logits, out, rtol=0, atol=0)
        gen = loaded.generate(input_ids=ids, pixel_values=px, max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 3) or gen.shape[1] <= ids.shape[1] + 3


def test_causal_lm_task_type_trains_and_generates():
    from pclr.models.tiny import tiny_causal_lm

    pm = get_peft_model(tiny_causal_lm().model, PCLRConfig(r=2, budget=8, n_init=2, task_type="CAUSAL_LM"))
    ids = torch.tensor([[2, 5, 20, 22, 6, 7]])
    out = pm(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in pm.named_parameters() if p.grad is not None}
    assert grads and all(n.endswith((".A_m", ".B_m")) for n in grads)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.endswith(".B_m"))
    with torch.no_grad():
        assert pm.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape == (1, 9)


# a value other than the default for every LRPConfig field (a new field must be added here, or the test fails)
NON_DEFAULT = dict(r=3, alpha=6.0, n_shared=5, budget=40, query_weights=(1.0, 0.5), gate_scope="batch",
                   gate_mode="soft", init_std=0.02, target_modules=("q_proj", "v_proj"), deterministic=True,
                   backend="reference")


def test_every_lrp_field_round_trips_through_the_peft_config(tmp_path):
    from dataclasses import fields

    from pclr import LRPConfig

    assert {f.name for f in fields(LRPConfig)} == set(NON_DEFAULT)
    expected = LRPConfig(**NON_DEFAULT)
    assert all(getattr(expected, f.name) != f.default for f in fields(LRPConfig))
    cfg = PCLRConfig(**NON_DEFAULT, n_init=3)
    assert cfg.to_lrp_config() == expected
    assert PCLRConfig().to_lrp_config() == LRPConfig()  # same defaults
    cfg.save_pretrained(tmp_path)
    assert PCLRConfig.from_pretrained(tmp_path).to_lrp_config() == expected
    with pytest.raises(ValueError, match="gate_mode"):
        PCLRConfig(gate_mode="gumbel")


def _trained_adapter(tmp_path):
    pm = get_peft_model(tiny_llava().model, PCLRConfig(r=2, alpha=4.0, budget=16, n_init=4, n_shared=2))
    for layer in lrp_layers(pm).values():
        layer.add_shared(2, trainable=True)
    pm.save_pretrained(tmp_path)
    return pm


def test_inference_load_trains_nothing(tmp_path):
    _trained_adapter(tmp_path)
    served = PeftModel.from_pretrained(tiny_llava().model, tmp_path)
    assert not [n for n, p in served.named_parameters() if p.requires_grad]


def test_trainable_load_keeps_shared_ranks_trainable(tmp_path):
    _trained_adapter(tmp_path)
    resumed = PeftModel.from_pretrained(tiny_llava().model, tmp_path, is_trainable=True)
    layers = list(lrp_layers(resumed).values())
    assert all(layer.A_s.requires_grad and layer.B_s.requires_grad and layer.A_m.requires_grad for layer in layers)
    trainable = [n for n, p in resumed.named_parameters() if p.requires_grad]
    assert all(n.endswith((".A_m", ".B_m", ".A_s", ".B_s")) or ".keys." in n for n in trainable)


def test_adapter_for_another_hidden_size_fails_at_load(tmp_path):
    _trained_adapter(tmp_path)
    with pytest.raises(ValueError, match="another width|query dims"):
        PeftModel.from_pretrained(tiny_llava(hidden=48).model, tmp_path)
