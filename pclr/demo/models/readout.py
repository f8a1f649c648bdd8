"""What the language model can read off the aligned image tokens: per content class of the alignment captions (sign
word, digit, colour, shape), on images the projector never saw, how often the caption's content word comes back as
the nearest word embedding of the image tokens.

Two readings per content word:
  * ``own_token``: every token of the word is the nearest vocabulary embedding of the image token at the word's
    own caption position (what the alignment loss asks for);
  * ``any_token``: every token of the word is the nearest vocabulary embedding of SOME image token (what a reader
    of the whole image needs: the word is there, wherever it lands).

The vocabulary is the alignment captions' own (``vocab``: token ids) or, with ``vocab=None``, the LM's whole input
vocabulary (stricter: any of ~49k words may be nearest). The alignment (:mod:`pclr.demo.models.alignment`) reports
both after training.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from pclr.demo.data.captions import CONTENT_CLASSES, content_words

_CHUNK = 4096  # image tokens per distance block (bounds memory for the whole-vocabulary reading)


def _nearest(x: Tensor, emb: Tensor) -> Tensor:
    """x [M, d], emb [V, d] -> int64 [M]: index of the nearest row of ``emb`` (Euclidean) for each row of ``x``."""
    return torch.cat([torch.cdist(x[i:i + _CHUNK], emb).argmin(1) for i in range(0, len(x), _CHUNK)])


def _word_tokens(tok: Any, text: str, start: int, word: str) -> tuple[list[int], list[int]]:
    """(caption positions, token ids) of the tokens of ``word`` at character ``start`` of ``text``."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    end = start + len(word)
    span = [(k, t) for k, (t, (a, b)) in enumerate(zip(enc["input_ids"], enc["offset_mapping"]))
            if a < end and b > start]
    return [k for k, _ in span], [t for _, t in span]


@torch.no_grad()
def content_word_readout(image_tokens: Tensor, captions: list[str], tok: Any, table: Tensor,
                         vocab: Optional[Tensor] = None) -> dict:
    """Content-word readout of projected image tokens (see the module docstring).

    Args:
        image_tokens: [N, T, d] projector outputs of N images (held out from the alignment).
        captions: the N images' terse captions (:func:`pclr.demo.data.captions.word_caption`).
        tok: the LM's (fast) tokenizer.
        table: [V_all, d] the LM's input-embedding matrix.
        vocab: int64 [V] token ids the nearest word is searched among, or None for the whole of ``table``.

    Returns:
        ``{class: {"n": words, "own_token": share, "any_token": share}}`` for each class of ``CONTENT_CLASSES``
        (shares are None where ``n`` is 0).
    """
    if image_tokens.dim() != 3 or len(image_tokens) != len(captions):
        raise ValueError(f"image_tokens must be [N, T, d] with N = len(captions) = {len(captions)}, "
                         f"got {tuple(image_tokens.shape)}")
    n, n_tok, d = image_tokens.shape
    table = table.detach().float()
    ids = torch.arange(len(table)) if vocab is None else vocab.long()
    nearest = ids[_nearest(image_tokens.reshape(-1, d).float(), table[ids])].reshape(n, n_tok)  # token ids
    counts = {c: [0, 0, 0] for c in CONTENT_CLASSES}  # words, own hits, any hits
    for i, text in enumerate(captions):
        seen = set(nearest[i].tolist())
        for cls, word, start in content_words(text):
            pos, tids = _word_tokens(tok, text, start, word)
            c = counts[cls]
            c[0] += 1
            # a word whose tokens fall past the last image token can never be read at its own position: a miss
            c[1] += int(bool(pos) and all(k < n_tok and int(nearest[i, k]) == t for k, t in zip(pos, tids)))
            c[2] += int(bool(tids) and set(tids) <= seen)
    return {cls: {"n": w, "own_token": round(own / w, 4) if w else None, "any_token": round(anyt / w, 4) if w else None}
            for cls, (w, own, anyt) in counts.items()}
