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
Positions past the caption's end target a filler token (".").
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from pclr.demo.data.captions import word_captions

FILLER = "."


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


def align_to_embeddings(bundle: Any, *, n_images: int, steps: int, batch: int, lr: float, seed: int,
                        feature_cache: Optional[Path] = None, progress: bool = True) -> dict:
    """Train the projector of ``bundle.model`` (encoder and LM frozen; the LM never runs); returns statistics.

    ``feature_cache``: file holding the encoder features of the ``n_images`` alignment images (written when absent).
    """
    model, tok = bundle.model, bundle.tokenizer
    n_tok = bundle.num_image_tokens
    t0 = time.perf_counter()
    pairs = word_captions(n_images, seed, bundle.image_size)
    filler = tok(FILLER, add_special_tokens=False)["input_ids"][-1]
    targets = torch.full((len(pairs), n_tok), filler, dtype=torch.long)
    for i, (_, text) in enumerate(pairs):
        ids = tok(text, add_special_tokens=False)["input_ids"][:n_tok]
        targets[i, : len(ids)] = torch.tensor(ids)
    feats, feature_seconds = _cached_features(bundle, [im for im, _ in pairs], feature_cache, progress)
    vocab, target_idx = torch.unique(targets, return_inverse=True)  # the captions' own vocabulary
    with torch.no_grad():
        emb = model.get_input_embeddings().weight[vocab].detach().float()  # [V, d]
        scale = emb.pow(2).sum(-1).mean()
        # temperature: the typical squared distance between two caption-word embeddings
        tau = torch.cdist(emb, emb).pow(2).sum() / max(1, len(vocab) * (len(vocab) - 1))
    data_seconds = time.perf_counter() - t0

    projector = model.model.multi_modal_projector
    model.requires_grad_(False)
    params = list(projector.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, then linear decay to 5%
        opt, lambda s: (s + 1) / warm if s < warm else max(0.05, 1 - (s - warm) / max(1, steps - warm)))
    gen = torch.Generator().manual_seed(seed)
    projector.train()
    losses, accs = [], []
    bar = tqdm(range(steps), desc="projector alignment (once, cached)", disable=not progress, leave=False)
    for step in bar:
        idx = torch.randint(0, len(pairs), (batch,), generator=gen)
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
    model.requires_grad_(False)
    model.eval()
    held = _heldout_token_accuracy(bundle, emb, vocab, seed, n_tok, filler)
    k = max(1, steps // 20)
    return {"method": "embedding-space (image tokens -> input embeddings of a terse caption); encoder and LM "
                      "frozen, LM not run; only the projector trains",
            "images": n_images, "steps": steps, "batch": batch, "lr": lr,
            "seconds": round(time.perf_counter() - t0, 1), "data_seconds": round(data_seconds, 1),
            "feature_seconds": round(feature_seconds, 1),
            "loss_first": round(sum(losses[:k]) / k, 4), "loss_last": round(sum(losses[-k:]) / k, 4),
            "token_accuracy_train": round(sum(accs[-k:]) / k, 4), "token_accuracy_heldout": held}


@torch.no_grad()
def _heldout_token_accuracy(bundle, emb, vocab, seed, n_tok, filler, n: int = 256) -> float:
    """Share of image tokens of unseen images whose nearest caption-vocabulary embedding is their target word."""
    pairs = word_captions(n, seed + 7919, bundle.image_size)
    tok = bundle.tokenizer
    lookup = {int(v): i for i, v in enumerate(vocab)}
    x = bundle.model.model.multi_modal_projector(grid_features(bundle, [im for im, _ in pairs])).float()
    hit = total = 0
    for i, (_, text) in enumerate(pairs):
        ids = tok(text, add_special_tokens=False)["input_ids"][:n_tok]
        ids = ids + [filler] * (n_tok - len(ids))
        pred = torch.cdist(x[i], emb).argmin(1)
        for k, t in enumerate(ids):
            hit += int(lookup.get(t, -1) == int(pred[k]))
            total += 1
    return round(hit / max(1, total), 4)
