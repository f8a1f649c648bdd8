"""Tiny random-weight models with an in-code tokenizer, for tests and smoke runs (nothing is downloaded).

    bundle = tiny_llava()          # LlavaForConditionalGeneration: tiny Llama + tiny CLIP vision tower
    bundle = tiny_causal_lm()      # LlamaForCausalLM, text only
"""
from __future__ import annotations

import string
from typing import Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from pclr.models.bundle import ModelBundle

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
# A chat template in the LLaVA-1.5 style ("USER: ... ASSISTANT: ...</s>"), written for the word-level tokenizer.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER : {{ message['content'] }} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT : {{ message['content'] }}{{ eos_token }} "
    "{% else %}{{ message['content'] }} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)
BASE_WORDS = (
    "USER", "ASSISTANT", ":", "?", ".", ",", "(", ")", "[", "]", "-", "the", "a", "an", "is", "what", "which",
    "color", "shape", "answer", "question", "of", "in", "image", "option", "options", "with", "letter", "word",
    "number", "one", "yes", "no", "and", "or", "to", "this", "that", "box", "object", "where", "how", "many",
    "red", "green", "blue", "yellow", "black", "white", "circle", "square", "triangle", "left", "right", "top",
    "bottom", "small", "large", "task", "say", "repeat", "count", "next", "first", "last",
)


def tiny_tokenizer(extra_words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``BASE_WORDS`` + letters + digits (+ ``extra_words``) with a chat template.

    Words split on whitespace and punctuation; unknown words map to ``<unk>``; ``<image>`` is one special token.
    """
    words = list(dict.fromkeys([*SPECIAL_TOKENS, *BASE_WORDS, *string.ascii_lowercase, *string.ascii_uppercase,
                                *string.digits, *extra_words]))
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=["<image>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _llama_text_config(vocab_size: int, hidden: int, layers: int, tok) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
                       initializer_range=0.2)  # wide enough that a frozen lm_head can express a peaked answer


def tiny_causal_lm(hidden: int = 32, layers: int = 2, seed: int = 0,
                   extra_words: Sequence[str] = ()) -> ModelBundle:
    """A random ``LlamaForCausalLM`` (≈50k parameters with the defaults) and its word-level tokenizer."""
    tok = tiny_tokenizer(extra_words)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_text_config(len(tok), hidden, layers, tok)).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return ModelBundle(model=model, tokenizer=tok, info={"name": "tiny-causal-lm", "random_init": True})


def tiny_llava(hidden: int = 32, layers: int = 2, vision_hidden: int = 16, vision_layers: int = 2,
               image_size: int = 16, patch_size: int = 8, seed: int = 0,
               extra_words: Sequence[str] = ()) -> ModelBundle:
    """A random ``LlavaForConditionalGeneration``: tiny Llama text model, tiny CLIP vision tower (with CLS),
    2-layer MLP projector; features from the penultimate vision layer without CLS ("default" strategy), so one
    ``<image>`` expands into (image_size / patch_size)² placeholder tokens."""
    tok = tiny_tokenizer(extra_words)
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=2, image_size=image_size,
                              patch_size=patch_size, projection_dim=vision_hidden)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    cfg = LlavaConfig(vision_config=vision, text_config=_llama_text_config(len(tok), hidden, layers, tok),
                      image_token_id=image_token_id, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return ModelBundle(
        model=model, tokenizer=tok, image_size=image_size, image_mean=(0.48145466, 0.4578275, 0.40821073),
        image_std=(0.26862954, 0.26130258, 0.27577711), num_image_tokens=(image_size // patch_size) ** 2,
        image_token_id=image_token_id, info={"name": "tiny-llava", "random_init": True},
    )


def tiny_qwen2_vl(hidden: int = 32, layers: int = 2, seed: int = 0) -> ModelBundle:
    """A random ``Qwen2VLForConditionalGeneration`` (8×8 images → 4 patches → 1 merged token). For injection and
    query tests: the CoIN collator expands ``<image>`` LLaVA-style and does not build Qwen2-VL's grid inputs."""
    tok = tiny_tokenizer()
    image_token_id = tok.convert_tokens_to_ids("<image>")
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, rope_parameters={
                    "rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0})
    vision = dict(depth=2, embed_dim=16, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=image_token_id,
                        vision_start_token_id=tok.bos_token_id, vision_end_token_id=tok.eos_token_id,
                        video_token_id=tok.unk_token_id)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return ModelBundle(model=model, tokenizer=tok, image_size=8, image_token_id=image_token_id,
                       num_image_tokens=(8 // 4 // 2) ** 2, info={"name": "tiny-qwen2-vl", "random_init": True})
