"""CoIN-format data: LLaVA conversation JSON with optional image paths, and the collator that tokenizes it.

A sample::

    {"id": "sqa-17", "image": "sqa/17.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhich color ...? A. red B. blue"},
                       {"from": "gpt", "value": "A"}]}

``image`` may also be a PIL image (synthetic data built in memory). The collator renders each conversation with the
tokenizer's chat template, expands ``<image>`` into ``bundle.num_image_tokens`` placeholders, puts labels only on the
assistant tokens and returns the instruction-token mask the text query is computed from.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence, Union

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

IMAGE_TAG = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def load_coin_json(source: Union[str, os.PathLike, Sequence[dict]]) -> list[dict]:
    """Samples from a CoIN JSON file (a list, or JSON lines) or an already-loaded list."""
    if not isinstance(source, (str, os.PathLike)):
        return list(source)
    with open(source, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(data, list):
        raise ValueError(f"{source}: expected a JSON list of samples")
    for i, s in enumerate(data[:5]):
        if "conversations" not in s:
            raise ValueError(f"{source}: sample {i} has no 'conversations' (CoIN / LLaVA format expected)")
    return data


def check_samples(samples: Sequence[dict], where: str = "samples") -> None:
    """Raise ValueError naming the sample id (and ``where``) for a sample the trainer could not use: no
    ``conversations`` list, a turn with an unknown role, or no assistant ("gpt") turn to learn or score."""
    for i, s in enumerate(samples):
        sid = s.get("id", f"#{i}") if isinstance(s, dict) else f"#{i}"
        conv = s.get("conversations") if isinstance(s, dict) else None
        if not isinstance(conv, list):
            raise ValueError(f"{where}: sample {sid!r} has no 'conversations' list (CoIN / LLaVA format expected)")
        for turn in conv:
            if not isinstance(turn, dict) or _ROLES.get(turn.get("from")) is None or "value" not in turn:
                raise ValueError(f"{where}: sample {sid!r} has a turn that is not {{'from': one of "
                                 f"{sorted(_ROLES)}, 'value': text}}: {turn!r}"[:300])
        if not any(_ROLES[t["from"]] == "assistant" for t in conv):
            raise ValueError(f"{where}: sample {sid!r} has no gpt (assistant) turn: nothing to learn or score")


class CoINDataset(Dataset):
    """A list of CoIN samples plus the image root their ``image`` paths are relative to."""

    def __init__(self, source: Union[str, Sequence[dict]], image_root: Optional[str] = None,
                 max_samples: Optional[int] = None):
        self.samples = load_coin_json(source)
        if max_samples is not None:
            self.samples = self.samples[:max_samples]
        self.image_root = image_root

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = dict(self.samples[i])
        s["_image_root"] = self.image_root
        return s


def answer_of(sample: dict) -> str:
    """The reference answer: the last assistant turn."""
    turns = [t for t in sample["conversations"] if _ROLES.get(t["from"]) == "assistant"]
    if not turns:
        raise ValueError(f"sample {sample.get('id')} has no assistant turn")
    return turns[-1]["value"]


class CoINCollator:
    """Turns CoIN samples into model inputs.

    Args:
        bundle: :class:`pclr.models.ModelBundle` (tokenizer with a chat template, image settings).
        mode: "train" (full conversation, labels on assistant tokens, right padding) or "generate" (prompt up to the
            last assistant turn + generation prompt, left padding, ``answers`` returned).
        max_length: truncate longer sequences (train mode; tokens are cut from the end).

    Returns (dict): input_ids long [B, L]; attention_mask long [B, L]; labels long [B, L] (train: -100 except
    assistant tokens); instruction_mask bool [B, L] (tokens of the user turns, placeholders excluded); has_image
    bool [B]; pixel_values float [N_img, 3, S, S] only when a sample has an image (order = samples with an image);
    answers list[str] and ids list (generate mode).
    """

    def __init__(self, bundle: Any, mode: str = "train", max_length: Optional[int] = None):
        if mode not in ("train", "generate"):
            raise ValueError(f"mode must be 'train' or 'generate', got {mode!r}")
        self.bundle, self.tok, self.mode, self.max_length = bundle, bundle.tokenizer, mode, max_length
        if getattr(self.tok, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template")
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id

    # ------------------------------------------------------------------------------------------- text
    def _messages(self, sample: dict, has_image: bool) -> list[dict]:
        n_img = self.bundle.num_image_tokens if has_image else 0
        msgs = []
        for turn in sample["conversations"]:
            role = _ROLES.get(turn["from"])
            if role is None:
                raise ValueError(f"unknown conversation role {turn['from']!r} in sample {sample.get('id')}")
            text = turn["value"]
            if role == "user":
                if has_image and IMAGE_TAG not in text and not any(IMAGE_TAG in m["content"] for m in msgs):
                    text = IMAGE_TAG + "\n" + text
                if not has_image or n_img == 0:
                    text = text.replace(IMAGE_TAG + "\n", "").replace(IMAGE_TAG, "").strip()
                else:
                    text = text.replace(IMAGE_TAG, IMAGE_TAG * n_img)
            msgs.append({"role": role, "content": text})
        return msgs

    def _render(self, msgs: list[dict], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    def _encode(self, sample: dict, has_image: bool):
        msgs = self._messages(sample, has_image)
        if self.mode == "generate":
            turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
            if not turns:
                raise ValueError(f"sample {sample.get('id')!r} has no gpt (assistant) turn to generate")
            last = turns[-1]
            msgs = msgs[:last]
            text = self._render(msgs, True)
        else:
            text = self._render(msgs, False)
        answer_spans, user_spans = [], []
        for i, m in enumerate(msgs):
            before = self._render(msgs[:i], m["role"] == "assistant") if i else ""
            start = text.find(m["content"], len(before) if text.startswith(before) else 0)
            if start < 0:
                continue
            end = start + len(m["content"])
            if m["role"] == "assistant":
                after = self._render(msgs[: i + 1], False)
                # the answer span includes what the template appends to close the turn (e.g. the EOS token)
                answer_spans.append((start, len(after) if text.startswith(after) else end))
            elif m["role"] == "user":
                user_spans.append((start, end))
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        image_id = self.bundle.image_token_id

        def inside(spans, a, b):
            return any(s <= a and b <= e and b > a for s, e in spans)

        labels = [i if inside(answer_spans, a, b) and not text[a:b].isspace() else -100
                  for i, (a, b) in zip(ids, offsets)]
        instr = [inside(user_spans, a, b) and i != image_id for i, (a, b) in zip(ids, offsets)]
        return ids, labels, instr

    # ------------------------------------------------------------------------------------------- images
    def _image(self, sample: dict) -> Optional[Tensor]:
        img = sample.get("image")
        if img is None or self.bundle.image_size is None:
            return None
        if isinstance(img, (str, os.PathLike)):
            root = sample.get("_image_root")
            path = os.path.join(root, img) if root and not os.path.isabs(img) else img
            img = Image.open(path)
        elif not isinstance(img, Image.Image):
            img = Image.fromarray(img)
        size = self.bundle.image_size
        img = img.convert("RGB").resize((size, size), Image.BICUBIC)
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
        x = x.permute(2, 0, 1).float().div_(255.0)
        mean = torch.tensor(self.bundle.image_mean).view(3, 1, 1)
        std = torch.tensor(self.bundle.image_std).view(3, 1, 1)
        return (x - mean) / std

    # ------------------------------------------------------------------------------------------- batch
    def __call__(self, samples: list[dict]) -> dict[str, Any]:
        rows, images, has = [], [], []
        for s in samples:
            px = self._image(s)
            has.append(px is not None)
            if px is not None:
                images.append(px)
            ids, labels, instr = self._encode(s, px is not None)
            if self.mode == "train" and self.max_length is not None and len(ids) > self.max_length:
                ids, labels, instr = ids[: self.max_length], labels[: self.max_length], instr[: self.max_length]
            rows.append((ids, labels, instr))
        L = max(len(r[0]) for r in rows)
        B = len(rows)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        attention = torch.zeros(B, L, dtype=torch.long)
        labels_t = torch.full((B, L), -100, dtype=torch.long)
        instr_t = torch.zeros(B, L, dtype=torch.bool)
        for b, (ids, labels, instr) in enumerate(rows):
            n = len(ids)
            sl = slice(L - n, L) if self.mode == "generate" else slice(0, n)  # left padding for generation
            input_ids[b, sl] = torch.tensor(ids)
            attention[b, sl] = 1
            labels_t[b, sl] = torch.tensor(labels)
            instr_t[b, sl] = torch.tensor(instr, dtype=torch.bool)
        out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention, "instruction_mask": instr_t,
                               "has_image": torch.tensor(has, dtype=torch.bool)}
        if self.mode == "train":
            out["labels"] = labels_t
        else:
            out["answers"] = [answer_of(s) for s in samples]
            out["ids"] = [s.get("id", i) for i, s in enumerate(samples)]
        if images:
            out["pixel_values"] = torch.stack(images)
        return out


MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values")


def split_batch(batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model inputs, the rest: labels / instruction_mask / has_image / answers / ids)."""
    model_in = {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS}
    rest = {k: v for k, v in batch.items() if k not in MODEL_INPUT_KEYS}
    return model_in, rest
