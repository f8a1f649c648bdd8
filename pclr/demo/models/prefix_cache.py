"""Exact reuse of the frozen bottom of a decoder: cache the hidden states entering layer ``n_frozen`` per example.

When nothing below decoder layer ``n_frozen`` trains (LRP only in the top layers, projector and vision tower frozen),
the hidden states entering that layer are a pure function of the example's input embeddings and positions. Training
revisits each example every epoch and every method revisits the same data, so the bottom layers need to run only once
per example; each later step runs the top layers alone.

The cache sits inside the language model's ``forward`` (``PrefixCachedLlamaModel`` swaps the class of an existing
``LlamaModel`` instance, so parameter names and checkpoints are unchanged). It is used only for plain forwards (no
KV cache given): ``generate`` passes a KV cache and takes the ordinary path, because decoding needs the bottom
layers' keys/values, which this cache does not hold. The KV cache arrives as ``cache=`` (transformers >= 5.24, the
keyword LLaVA passes) or ``past_key_values=`` (earlier 5.x); both are recognised, and the installed LlamaModel is
called with the keyword its signature declares, so no deprecated keyword is ever passed. The prefix cache is
bypassed too when the input embeddings require grad (something below trains), so it can never silently drop a
gradient.

Rows are keyed by the bytes of their valid (attention-mask = 1) input embeddings and positions, so the same example
padded to a different batch length hits the same entry; padded positions of a hit row get zeros, which is exact for
every valid position because padded keys are masked out of attention.
"""
from __future__ import annotations

import hashlib
import inspect
from collections import OrderedDict
from typing import Any, Optional

import torch
from torch import Tensor
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaModel

from pclr.modules import FusedLRPLinear

# The KV-cache keyword of the installed transformers: "cache" from 5.24 on ("past_key_values" is deprecated there and
# removed in 5.40), "past_key_values" before. Read once from the signatures instead of from version numbers.
CACHE_KW = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
_MASK_CACHE_KW = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


class PrefixCachedLlamaModel(LlamaModel):
    """A ``LlamaModel`` whose plain forwards reuse cached outputs of its first ``prefix_layers`` layers."""

    prefix_layers: int = 0
    prefix_cache_size: int = 0
    _prefix_cache: "OrderedDict[bytes, Tensor]"
    prefix_stats: dict

    @classmethod
    def enable(cls, model: LlamaModel, n_frozen: int, max_entries: int = 100_000) -> "PrefixCachedLlamaModel":
        """Turn ``model`` (in place) into a prefix-cached model over its first ``n_frozen`` layers."""
        if not isinstance(model, LlamaModel):
            raise TypeError(f"prefix caching supports LlamaModel, got {type(model).__name__}")
        if not 0 <= n_frozen <= model.config.num_hidden_layers:
            raise ValueError(f"n_frozen must lie in [0, {model.config.num_hidden_layers}], got {n_frozen}")
        model.__class__ = cls
        model.prefix_layers = n_frozen
        model.prefix_cache_size = max_entries
        model._prefix_cache = OrderedDict()
        model.prefix_stats = {"hits": 0, "misses": 0}
        return model

    def clear_prefix_cache(self) -> None:
        self._prefix_cache.clear()

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, cache: Any = None, inputs_embeds: Optional[Tensor] = None,
                use_cache: Optional[bool] = None, past_key_values: Any = None,
                **kwargs: Any) -> BaseModelOutputWithPast:
        """``LlamaModel.forward``; the KV cache may come as ``cache=`` or ``past_key_values=`` (see module doc).

        inputs_embeds: [B, L, d] (or input_ids [B, L]); attention_mask: [B, L] (1 = token) or 4-D; returns the
        last hidden state [B, L, d] (and the KV cache on the ordinary path)."""
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("pass the KV cache once: cache= or past_key_values=, not two different ones")
        kv = cache if cache is not None else past_key_values
        if inputs_embeds is None and input_ids is not None:
            inputs_embeds = self.embed_tokens(input_ids)
        if self.prefix_layers == 0 or kv is not None or inputs_embeds.requires_grad or not self._bottom_is_frozen():
            return super().forward(input_ids=None, attention_mask=attention_mask, position_ids=position_ids,
                                   inputs_embeds=inputs_embeds, use_cache=use_cache, **{CACHE_KW: kv}, **kwargs)
        B, L, _ = inputs_embeds.shape
        if position_ids is None:
            position_ids = torch.arange(L, device=inputs_embeds.device).unsqueeze(0)
        mask2d = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else \
            torch.ones(B, L, dtype=torch.long, device=inputs_embeds.device)
        hidden = self._prefix(inputs_embeds, mask2d, position_ids, attention_mask)
        causal_mask = self._causal_mask(hidden, attention_mask, position_ids)
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.layers[self.prefix_layers: self.config.num_hidden_layers]:
            hidden = layer(hidden, attention_mask=causal_mask, position_embeddings=position_embeddings,
                           position_ids=position_ids, use_cache=False, **{CACHE_KW: None}, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden))

    def _causal_mask(self, embeds: Tensor, attention_mask: Optional[Tensor], position_ids: Tensor) -> Any:
        return create_causal_mask(config=self.config, inputs_embeds=embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, **{_MASK_CACHE_KW: None})

    def _bottom_is_frozen(self) -> bool:
        """True when the bottom layers hold only frozen, unadapted weights (an LRP there, even a frozen one,
        changes with routing and across tasks, so its outputs must not be reused)."""
        for layer in self.layers[: self.prefix_layers]:
            for m in layer.modules():
                if isinstance(m, FusedLRPLinear) or any(p.requires_grad for p in m.parameters(recurse=False)):
                    return False
        return True

    def _row_key(self, emb: Tensor, pos: Tensor, valid: Tensor) -> bytes:
        h = hashlib.blake2b(digest_size=20)
        h.update(emb[valid].detach().float().cpu().numpy().tobytes())
        h.update(pos[valid].cpu().numpy().tobytes())
        return h.digest()

    @torch.no_grad()
    def _prefix(self, emb: Tensor, mask2d: Tensor, position_ids: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
        B, L, D = emb.shape
        pos = position_ids.expand(B, L)
        valid = mask2d.bool()
        keys = [self._row_key(emb[b], pos[b], valid[b]) for b in range(B)]
        miss = [b for b in range(B) if keys[b] not in self._prefix_cache]
        out = emb.new_zeros(B, L, D)
        if miss:
            idx = torch.tensor(miss, device=emb.device)
            sub_mask = attention_mask[idx] if attention_mask is not None and attention_mask.dim() == 2 else None
            sub_pos = position_ids if position_ids.shape[0] == 1 else position_ids[idx]
            h = emb[idx]
            causal = self._causal_mask(h, sub_mask, sub_pos)
            pe = self.rotary_emb(h, position_ids=sub_pos)
            for layer in self.layers[: self.prefix_layers]:
                h = layer(h, attention_mask=causal, position_embeddings=pe, position_ids=sub_pos, use_cache=False,
                          **{CACHE_KW: None})
            for i, b in enumerate(miss):
                self._prefix_cache[keys[b]] = h[i][valid[b]].clone()
                if len(self._prefix_cache) > self.prefix_cache_size:
                    self._prefix_cache.popitem(last=False)
            self.prefix_stats["misses"] += len(miss)
        self.prefix_stats["hits"] += B - len(miss)
        for b in range(B):
            cached = self._prefix_cache.get(keys[b])
            if cached is None:  # evicted within this very batch (tiny cache): recompute without storing
                self.prefix_cache_size = max(self.prefix_cache_size, 2 * B)
                return self._prefix(emb, mask2d, position_ids, attention_mask)
            out[b][valid[b]] = cached.to(out.dtype)
        return out
