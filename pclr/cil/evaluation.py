"""Scoring the current model on test samples (CoIN scoring), one verdict per sample.

Two ways, chosen by ``CILConfig.eval_mode``:

* "generate": greedy generation, then the task's scorer on the decoded text;
* "forced": one teacher-forced forward per batch; a sample scores 1 iff the argmax at every answer position (end
  token included) is the gold token, i.e. iff greedy decoding returns the gold answer verbatim;
* "forced_generate": as "forced", then samples of grounding tasks that fail it are generated and scored by IoU.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable

import torch
from torch import Tensor, nn

from pclr.cil.config import CILConfig
from pclr.cil.data import split_batch

Collate = Callable[[list[dict]], dict]
CollatorFactory = Callable[..., Collate]
"""``factory(bundle, mode="train" | "generate", max_length=None) -> collate(samples) -> batch``
(:class:`pclr.cil.data.CoINCollator` is one)."""
RouteFn = Callable[[dict, dict, bool], AbstractContextManager]
"""``route(model_in, rest, inference) -> routing context`` of a batch."""
Scorer = Callable[[str, str], float]


def split_to(batch: dict, device: torch.device | str) -> tuple[dict, dict]:
    """(model inputs, the rest) of a collated batch, tensors moved to ``device``."""
    model_in, rest = split_batch(batch)
    model_in = {k: v.to(device) for k, v in model_in.items()}
    rest = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in rest.items()}
    return model_in, rest


def answer_logits(model: nn.Module, model_in: dict, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Next-token logits only at the columns that predict an answer token in some row (the LM head over every
    position would cost as much as several decoder layers of a small LM).

    labels: long [B, L] (-100 outside answers). Returns (logits [B, K, V], the predicted labels [B, K], bool mask
    [B, K] of real answer tokens)."""
    target = labels[:, 1:]
    cols = (target != -100).any(0).nonzero().flatten()
    try:
        logits = model(**model_in, logits_to_keep=cols).logits
    except TypeError:  # a model without logits_to_keep: full logits, then the same columns
        logits = model(**model_in).logits[:, cols]
    lab = target[:, cols]
    return logits, lab, lab != -100


class Evaluator:
    """Per-sample verdicts of ``model`` on lists of samples (each carrying its ``_image_root``).

    Args:
        model, bundle: the routed model and its :class:`pclr.models.ModelBundle` (tokenizer, image settings).
        collator: a :data:`CollatorFactory`.
        config: eval_mode, eval_batch_size, max_new_tokens, max_length are read.
        route: the trainer's routing context of a batch.
        autocast: a callable returning the mixed-precision context (``accelerator.autocast``).
        device: where batches go.
    """

    def __init__(self, model: nn.Module, bundle: Any, collator: CollatorFactory, config: CILConfig, route: RouteFn,
                 autocast: Callable[[], AbstractContextManager], device: torch.device | str):
        self.model, self.bundle, self.collator, self.config = model, bundle, collator, config
        self.route, self.autocast, self.device = route, autocast, device

    @torch.no_grad()
    def scores(self, samples: list[dict], scorer: Scorer, grounding: bool = False) -> list[float]:
        """One verdict in [0, 1] per sample, by ``config.eval_mode``; ``grounding`` marks an IoU-scored task."""
        if self.config.eval_mode in ("forced", "forced_generate"):
            return self.forced_scores(samples, scorer, grounding)
        return self.generated_scores(samples, scorer)

    @torch.no_grad()
    def generated_scores(self, samples: list[dict], scorer: Scorer) -> list[float]:
        """Greedy generation + ``scorer`` per sample."""
        collate = self.collator(self.bundle, mode="generate")
        tok = self.bundle.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        bs, scores = self.config.eval_batch_size, []
        for i in range(0, len(samples), bs):
            model_in, rest = split_to(collate(samples[i: i + bs]), self.device)
            with self.route(model_in, rest, True), self.autocast():
                gen = self.model.generate(**model_in, max_new_tokens=self.config.max_new_tokens, do_sample=False,
                                          pad_token_id=pad_id, eos_token_id=tok.eos_token_id)
            new = gen[:, model_in["input_ids"].shape[1]:]
            preds = tok.batch_decode(new, skip_special_tokens=True)
            scores += [scorer(p.strip(), a) for p, a in zip(preds, rest["answers"])]
        return scores

    @torch.no_grad()
    def forced_scores(self, samples: list[dict], scorer: Scorer, grounding: bool = False) -> list[float]:
        """1 for a sample whose gold answer (and end token) is the argmax at every answer position of one
        teacher-forced forward: exactly the samples on which greedy decoding returns the gold answer verbatim.
        Failing samples score 0; under ``eval_mode="forced_generate"`` failing samples of grounding tasks are
        generated and scored by ``scorer`` instead."""
        collate = self.collator(self.bundle, mode="train", max_length=self.config.max_length)
        bs, scores = self.config.eval_batch_size, []
        for i in range(0, len(samples), bs):
            model_in, rest = split_to(collate(samples[i: i + bs]), self.device)
            with self.route(model_in, rest, True), self.autocast():
                logits, labels, mask = answer_logits(self.model, model_in, rest["labels"])
            ok = ((logits.argmax(-1) == labels) | ~mask).all(1) & mask.any(1)
            scores += [float(v) for v in ok.tolist()]
        if self.config.eval_mode == "forced_generate" and grounding:
            failed = [k for k, v in enumerate(scores) if v < 1.0]
            if failed:
                for k, v in zip(failed, self.generated_scores([samples[k] for k in failed], scorer)):
                    scores[k] = v
        return scores
