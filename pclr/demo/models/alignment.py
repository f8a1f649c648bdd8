"""Vision alignment in the language model's input-embedding space (no backward pass through the LM).

LLaVA's stage 1 trains the projector so that the LM, reading the projected image tokens, predicts a caption. On a
2-core CPU that costs a backward pass through all 30 SmolLM2 layers per step, so it never finishes in a few minutes.
This stage reaches the same end by a cheaper route: the k-th of the 16 image tokens is pulled onto the frozen input
embedding of the k-th token of a terse caption of the scene (``pclr.demo.data.captions.word_caption``: "small red
circle left, large blue square top"), so the LM afterwards reads an image much like the caption's words.

The vision encoder is frozen (pretrained EfficientNet-Lite0), so its grid tokens are computed once per alignment image
and stored on disk (keyed by the caption set and the encoder weights' digest); only the projector trains, on those
stored features (milliseconds per batch).

Loss per image token (target token t, caption vocabulary V with embeddings e_v):
    CE over V of logits -||x - e_v||² / tau   (the token must be nearest to its own word, not merely close)
  + ||x - e_t||² / mean ||e_v||²              (and land at the embeddings' scale)
Positions past the caption's end target a filler token ("."), or, with ``repeat``, the caption again: a sign's word or
a digit is then the target of several grid cells, not of one fixed cell that the rendered word may lie far from.

What the LM can read off the result is measured on held-out images after training
(:mod:`pclr.demo.models.readout`: per content class, the content word as the nearest word of its own token and of
any token), next to the plain held-out token accuracy.
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from pclr.demo.data.captions import caption_kind, word_captions
from pclr.demo.models.readout import content_word_readout

FILLER = "."
HELDOUT_SEED_OFFSET = 7919  # held-out images come from the caption stream of seed + this: never a training image


def _pixels(images: list, size: int) -> Tensor:
    """uint8 [N, 3, S, S] (normalised per batch later: 4x less memory than floats)."""
    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size))) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def grid_features(bundle: Any, images: list, *, batch: int = 64, progress: bool = False,
                  desc: str = "encoder features") -> Tensor:
    """Frozen-tower grid tokens [N, T, d_vision] of PIL ``images`` (resized and normalised as the collator does)."""
    mean = torch.tensor(bundle.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(bundle.image_std).view(1, 3, 1, 1)
    tower = bundle.model.model.vision_tower
    out = []
    for i in tqdm(range(0, len(images), batch), desc=desc, disable=not progress, leave=False):
        px = (_pixels(images[i:i + batch], bundle.image_size).float() / 255.0 - mean) / std
        out.append(tower.grid_tokens(px))
    return torch.cat(out)


def _cached_features(bundle: Any, images: list, path: Optional[Path], progress: bool) -> tuple[Tensor, float]:
    """(features [N, T, d] fp32, seconds spent computing them; 0 when read from ``path``)."""
    if path is not None and path.is_file():
        return torch.load(path, weights_only=True).float(), 0.0
    t0 = time.perf_counter()
    feats = grid_features(bundle, images, progress=progress, desc="encoder features (once, cached)")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(feats.half(), tmp)  # half precision: the projector trains on these, it needs no more
        tmp.replace(path)
        feats = feats.half().float()  # train on exactly what a later build reads back
    return feats, time.perf_counter() - t0


def caption_targets(tok: Any, captions: list[str], n_tok: int, *, repeat: bool) -> Tensor:
    """int64 [N, n_tok]: the target token id of each image token of each caption.

    ``repeat``: a caption shorter than ``n_tok`` tokens is repeated to fill the grid ("sign: stop sign: stop ..."),
    so its content word is the target of several grid positions rather than of one fixed cell the rendered word may
    lie far from; otherwise the positions past its end target a filler token (``FILLER``).
    """
    filler = tok(FILLER, add_special_tokens=False)["input_ids"][-1]
    targets = torch.full((len(captions), n_tok), filler, dtype=torch.long)
    for i, text in enumerate(captions):
        ids = tok(text, add_special_tokens=False)["input_ids"][:n_tok]
        if repeat:
            ids = (ids * -(-n_tok // len(ids)))[:n_tok]
        targets[i, : len(ids)] = torch.tensor(ids)
    return targets


def align_to_embeddings(bundle: Any, *, n_images: int, steps: int, batch: int, lr: float, seed: int,
                        repeat: bool = False, balance: bool = False, feature_cache: Optional[Path] = None,
                        progress: bool = True, n_heldout: int = 512) -> dict:
    """Train the projector of ``bundle.model`` (encoder and LM frozen; the LM never runs); returns statistics,
    among them the held-out token accuracy and content-word readout of ``n_heldout`` unseen images.

    ``repeat``: see :func:`caption_targets`. ``balance``: draw each caption kind (scene, sign, digit, book, photo)
    equally often, so the rarer kinds whose content is one word (a sign's, a digit's) get as many steps as scenes.
    ``feature_cache``: file holding the encoder features of the ``n_images`` alignment images (written when absent;
    the held-out images' features go next to it, suffixed ``-heldout<n_heldout>``).
    """
    model, tok = bundle.model, bundle.tokenizer
    n_tok = bundle.num_image_tokens
    t0 = time.perf_counter()
    pairs = word_captions(n_images, seed, bundle.image_size)
    targets = caption_targets(tok, [text for _, text in pairs], n_tok, repeat=repeat)
    feats, feature_seconds = _cached_features(bundle, [im for im, _ in pairs], feature_cache, progress)
    vocab, target_idx = torch.unique(targets, return_inverse=True)  # the captions' own vocabulary
    with torch.no_grad():
        emb = model.get_input_embeddings().weight[vocab].detach().float()  # [V, d]
        scale = emb.pow(2).sum(-1).mean()
        # temperature: the typical squared distance between two caption-word embeddings
        tau = torch.cdist(emb, emb).pow(2).sum() / max(1, len(vocab) * (len(vocab) - 1))
    data_seconds = time.perf_counter() - t0

    projector = model.model.multi_modal_projector
    if hasattr(projector, "fit_input_scale"):  # a fixed input standardisation, from the alignment images' features
        projector.fit_input_scale(feats)
    model.requires_grad_(False)
    params = list(projector.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, then linear decay to 5%
        opt, lambda s: (s + 1) / warm if s < warm else max(0.05, 1 - (s - warm) / max(1, steps - warm)))
    kinds = [caption_kind(text) for _, text in pairs]
    per_kind = Counter(kinds)
    weight = torch.tensor([1.0 / per_kind[k] if balance else 1.0 for k in kinds])  # per image
    gen = torch.Generator().manual_seed(seed)
    projector.train()
    t_train = time.perf_counter()
    losses, accs = [], []
    bar = tqdm(range(steps), desc="projector alignment (once, cached)", disable=not progress, leave=False)
    for step in bar:
        idx = torch.multinomial(weight, batch, replacement=True, generator=gen)
        x = projector(feats[idx]).float().reshape(-1, emb.shape[1])  # [B*n_tok, d]
        y = target_idx[idx].reshape(-1)
        d2 = torch.cdist(x, emb).pow(2)  # [B*n_tok, V]
        ce = F.cross_entropy(-d2 / tau, y)
        mse = d2.gather(1, y[:, None]).mean() / scale
        loss = ce + mse
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        accs.append(float((d2.argmin(1) == y).float().mean()))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_acc=f"{accs[-1]:.2f}")
    bar.close()
    train_seconds = time.perf_counter() - t_train
    model.requires_grad_(False)
    model.eval()
    held_cache = None if feature_cache is None else feature_cache.with_name(
        f"{feature_cache.stem}-heldout{n_heldout}{feature_cache.suffix}")
    held, readout = _heldout(bundle, emb, vocab, seed, n_tok, repeat, n_heldout, held_cache, progress)
    k = max(1, steps // 20)
    return {"method": "embedding-space (image tokens -> input embeddings of a terse caption); encoder and LM "
                      "frozen, LM not run; only the projector trains",
            "images": n_images, "steps": steps, "batch": batch, "lr": lr, "repeat": repeat, "balance": balance,
            "seconds": round(time.perf_counter() - t0, 1), "data_seconds": round(data_seconds, 1),
            "feature_seconds": round(feature_seconds, 1), "train_seconds": round(train_seconds, 1),
            "loss_first": round(sum(losses[:k]) / k, 4), "loss_last": round(sum(losses[-k:]) / k, 4),
            "token_accuracy_train": round(sum(accs[-k:]) / k, 4), "token_accuracy_heldout": held,
            "content_readout_heldout": readout}


@torch.no_grad()
def _heldout(bundle: Any, emb: Tensor, vocab: Tensor, seed: int, n_tok: int, repeat: bool, n: int,
             feature_cache: Optional[Path], progress: bool) -> tuple[float, dict]:
    """(share of image tokens of unseen images whose nearest caption-vocabulary embedding is their target word,
    content-word readout of those images: :func:`pclr.demo.models.readout.content_word_readout` with the caption
    vocabulary and with the LM's whole vocabulary)."""
    pairs = word_captions(n, seed + HELDOUT_SEED_OFFSET, bundle.image_size)
    tok = bundle.tokenizer
    feats, _ = _cached_features(bundle, [im for im, _ in pairs], feature_cache, progress)
    x = bundle.model.model.multi_modal_projector(feats).float()
    targets = caption_targets(tok, [text for _, text in pairs], n_tok, repeat=repeat)
    pred = vocab[torch.cdist(x, emb).argmin(-1)]  # [n, n_tok] nearest caption-vocabulary token ids
    token_accuracy = float((pred == targets).float().mean())
    table = bundle.model.get_input_embeddings().weight
    captions = [text for _, text in pairs]
    readout = {"images": n,
               "caption_vocab": content_word_readout(x, captions, tok, table, vocab),
               "lm_vocab": content_word_readout(x, captions, tok, table, None)}
    return round(token_accuracy, 4), readout
