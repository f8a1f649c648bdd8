"""Vision alignment in the language model's input-embedding space (no backward pass through the LM).

LLaVA's stage 1 trains the projector so that the LM, reading the projected image tokens, predicts a caption. On a
2-core CPU that costs a backward pass through all 30 SmolLM2 layers per step (14-60 s per step measured), so it never
finishes in a few minutes. This stage reaches the same end by a cheaper route: the k-th of the 16 image tokens is
pulled onto the frozen input embedding of the k-th token of a terse caption of the scene
(``pclr.demo.data.captions.word_caption``: "small red circle left, large blue square top"), so the LM afterwards
reads an image much like the caption's words. Only the small vision tower and the projector run forward and backward
(milliseconds per batch), so thousands of image-caption pairs fit in about a minute.

Loss per image token (target token t, caption vocabulary V with embeddings e_v):
    CE over V of logits -||x - e_v||² / tau   (the token must be nearest to its own word, not merely close)
  + ||x - e_t||² / mean ||e_v||²              (and land at the embeddings' scale)
Positions past the caption's end target a filler token (".").
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from pclr.demo.data.captions import word_captions

FILLER = "."


def image_token_features(model: Any, pixel_values: Tensor) -> Tensor:
    """Projected image tokens [N, n_tokens, d_lm] exactly as ``LlavaModel`` computes them (penultimate vision layer,
    CLS dropped, projector)."""
    cfg = model.config
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    feats = out.hidden_states[cfg.vision_feature_layer]
    if cfg.vision_feature_select_strategy == "default":
        feats = feats[:, 1:]
    return model.model.multi_modal_projector(feats)


def _pixels(images: list, size: int, mean, std) -> Tensor:
    """uint8 [N, 3, S, S] (normalised per batch later: 4x less memory than floats)."""
    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size))) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def align_to_embeddings(bundle: Any, *, n_images: int, steps: int, batch: int, lr: float, seed: int,
                        progress: bool = True) -> dict:
    """Train vision tower + projector of ``bundle.model`` (LM frozen, never run); returns statistics."""
    model, tok = bundle.model, bundle.tokenizer
    n_tok = bundle.num_image_tokens
    t0 = time.perf_counter()
    pairs = word_captions(n_images, seed, bundle.image_size)
    filler = tok(FILLER, add_special_tokens=False)["input_ids"][-1]
    targets = torch.full((len(pairs), n_tok), filler, dtype=torch.long)
    for i, (_, text) in enumerate(pairs):
        ids = tok(text, add_special_tokens=False)["input_ids"][:n_tok]
        targets[i, : len(ids)] = torch.tensor(ids)
    pixels = _pixels([im for im, _ in pairs], bundle.image_size, bundle.image_mean, bundle.image_std)
    mean = torch.tensor(bundle.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(bundle.image_std).view(1, 3, 1, 1)
    vocab, target_idx = torch.unique(targets, return_inverse=True)  # the captions' own vocabulary
    with torch.no_grad():
        emb = model.get_input_embeddings().weight[vocab].detach().float()  # [V, d]
        scale = emb.pow(2).sum(-1).mean()
        # temperature: the typical squared distance between two caption-word embeddings
        tau = torch.cdist(emb, emb).pow(2).sum() / max(1, len(vocab) * (len(vocab) - 1))
    data_seconds = time.perf_counter() - t0

    model.requires_grad_(False)
    params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, then linear decay to 5%
        opt, lambda s: (s + 1) / warm if s < warm else max(0.05, 1 - (s - warm) / max(1, steps - warm)))
    gen = torch.Generator().manual_seed(seed)
    model.model.vision_tower.train()
    model.model.multi_modal_projector.train()
    losses, accs = [], []
    bar = tqdm(range(steps), desc="vision alignment (once, cached)", disable=not progress, leave=False)
    for step in bar:
        idx = torch.randint(0, len(pairs), (batch,), generator=gen)
        px = (pixels[idx].float().div_(255.0) - mean) / std
        x = image_token_features(model, px).float().reshape(-1, emb.shape[1])  # [B*n_tok, d]
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
    held = _heldout_token_accuracy(model, bundle, emb, vocab, seed, n_tok, filler, mean, std)
    k = max(1, steps // 20)
    return {"method": "embedding-space (image tokens -> input embeddings of a terse caption); LM frozen, not run",
            "images": n_images, "steps": steps, "batch": batch, "lr": lr,
            "seconds": round(time.perf_counter() - t0, 1), "data_seconds": round(data_seconds, 1),
            "loss_first": round(sum(losses[:k]) / k, 4), "loss_last": round(sum(losses[-k:]) / k, 4),
            "token_accuracy_train": round(sum(accs[-k:]) / k, 4), "token_accuracy_heldout": held}


@torch.no_grad()
def _heldout_token_accuracy(model, bundle, emb, vocab, seed, n_tok, filler, mean, std, n: int = 256) -> float:
    """Share of image tokens of unseen images whose nearest caption-vocabulary embedding is their target word."""
    pairs = word_captions(n, seed + 7919, bundle.image_size)
    tok = bundle.tokenizer
    lookup = {int(v): i for i, v in enumerate(vocab)}
    px = (_pixels([im for im, _ in pairs], bundle.image_size, None, None).float() / 255.0 - mean) / std
    x = image_token_features(model, px).float()
    hit = total = 0
    for i, (_, text) in enumerate(pairs):
        ids = tok(text, add_special_tokens=False)["input_ids"][:n_tok]
        ids = ids + [filler] * (n_tok - len(ids))
        pred = torch.cdist(x[i], emb).argmin(1)
        for k, t in enumerate(ids):
            hit += int(lookup.get(t, -1) == int(pred[k]))
            total += 1
    return round(hit / max(1, total), 4)
