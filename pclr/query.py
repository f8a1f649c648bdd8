"""Per-sample routing queries for HF models, computed once per forward from frozen features.

    q_text [B, d_t] = L2-normalised masked mean of the input embeddings of the instruction tokens (no transformer pass)
    q_vis  [B, d_v] = L2-normalised CLS token of the penultimate vision layer (mean of patches for towers without
                      CLS), read by a forward hook from the vision pass the model makes anyway; zero without an image.

    qx = QueryExtractor(model)                      # installs the vision hook (LLaVA, Qwen2-VL); text-only: no hook
    with qx.route(input_ids, attention_mask, instruction_mask):
        out = model(input_ids=..., pixel_values=..., ...)   # every key pool gates once, after the vision tower ran
    ids = qx.generate(**batch, max_new_tokens=8)    # the prompt's route is reused for every new token

The vision part is known only after the vision tower ran, so the routing context gets a lazy query: it is resolved
when the first LRP layer (the projector or decoder layer 0) asks for its gate, which is after the hook filled it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pclr.hf_anatomy import (
    POOL_ATTR,
    find_projector,
    find_vision_tower,
    infer_query_dims,
    vision_blocks,
    vision_has_cls,
)
from pclr.hf_anatomy import image_token_id as model_image_token_id
from pclr.inject import lrp_pools
from pclr.routing import RoutingState, current_routing, routing

__all__ = ["QueryExtractor", "find_vision_tower", "infer_query_dims"]

class QueryExtractor:
    """Builds the per-sample query of every forward of ``model`` (see module docstring).

    Args:
        model: the HF model (before or after :func:`pclr.inject_lrp`).
        image_token_id: placeholder id excluded from the text query (default: ``model.config.image_token_id``).
        auto: also open a routing context automatically around plain ``model(...)`` calls made outside one (the
            text query then uses every attended non-image token; use :meth:`route` for instruction masks).

    Query parts follow the key pools of an injected model: (q_text, q_vis) for multimodal models, (q_text,) for a
    text-only model (the same scores as a zero vision part), or (q_text, 0) when a text-only model was injected with
    query_dims=(d_text, d_vision).
    """

    def __init__(self, model: nn.Module, image_token_id: Optional[int] = None, auto: bool = False) -> None:
        self.model = model
        self.image_token_id = image_token_id if image_token_id is not None else model_image_token_id(model)
        pools = list(lrp_pools(model).values())
        # an injected model fixes the parts (a text-only model may carry a zero vision part: (d_text, d_vision))
        self.query_dims = pools[0].query_dims if pools else infer_query_dims(model)
        self.tower = find_vision_tower(model)
        self._features: list[Tensor] = []  # per image, [d_v], from the vision pass of the current forward
        self._grid: Optional[Tensor] = None  # Qwen2-VL: grid_thw [N_img, 3] of the current vision pass
        self._handles = []
        if self.tower is not None:
            self._cls = vision_has_cls(self.tower)
            blocks = vision_blocks(self.tower)
            self._handles.append(self.tower.register_forward_pre_hook(self._tower_pre_hook, with_kwargs=True))
            self._handles.append(blocks[-2 if len(blocks) > 1 else -1].register_forward_hook(self._block_hook))
        proj = find_projector(model)
        self.projector = proj[1] if proj is not None else None
        if self.projector is not None:
            self._handles.append(self.projector.register_forward_pre_hook(self._projector_pre_hook))
        self._has: Optional[Tensor] = None  # bool [B] of the current routing context
        self._active: Optional[RoutingState] = None  # the routing state this extractor opened last
        if auto:
            self._handles.append(model.register_forward_pre_hook(self._auto_pre, with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._auto_post, always_call=True))
        self._auto_stack: list = []

    def remove(self) -> None:
        """Remove every hook this extractor installed."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------------------------------- vision hooks
    def _tower_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._features = []
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self._grid = grid if isinstance(grid, Tensor) else None

    @torch.no_grad()
    def _block_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        h = output[0] if isinstance(output, (tuple, list)) else output
        h = h.detach()
        if h.dim() == 3:  # [N_img, 1 + P, d] (CLIP, SigLIP)
            feats = h[:, 0] if self._cls else h.mean(1)
            self._features.extend(feats.float().unbind(0))
        elif h.dim() == 2:  # packed patches [sum_i P_i, d] (Qwen2-VL), split by grid_thw
            if self._grid is None:
                self._features.append(h.float().mean(0))
            else:
                sizes = self._grid.prod(-1).tolist()
                self._features.extend(c.float().mean(0) for c in torch.split(h, sizes, 0))

    def _projector_pre_hook(self, module: nn.Module, args: tuple) -> None:
        """The projector sees one row per IMAGE ([N_img, P, d]), not per sample: give its key pool the route rows
        of the image-holding samples, in order, before its first LRP layer gates."""
        pool, state = getattr(module, POOL_ATTR, None), current_routing()
        if pool is None or state is None or state is not self._active or id(pool) in state.cache or not args:
            return  # another extractor's (or a hand-made) routing context: not ours to fill
        n_img = args[0].shape[0]
        rows = self._has.nonzero().flatten()
        if rows.numel() and n_img % rows.numel() == 0:
            rows = rows.repeat_interleave(n_img // rows.numel())
        elif n_img != self._has.shape[0]:
            raise ValueError(f"the projector got {n_img} images for {rows.numel()} samples with an image")
        else:
            rows = torch.arange(n_img, device=self._has.device)
        idx, val = pool.gate(state.query)
        state.cache[id(pool)] = (idx[rows].contiguous(), val[rows].contiguous())

    # ------------------------------------------------------------------------------------------- queries
    @torch.no_grad()
    def text_query(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                   instruction_mask: Optional[Tensor] = None) -> Tensor:
        """q_text [B, d_t] (fp32): normalised mean embedding over ``instruction_mask`` (bool [B, L]); default mask =
        attended tokens that are not image placeholders."""
        mask = instruction_mask
        if mask is None:
            mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            if self.image_token_id is not None:
                mask = mask & (input_ids != self.image_token_id)
        mask = mask.to(input_ids.device)
        emb = self.model.get_input_embeddings()(input_ids).float()  # [B, L, d_t]
        m = mask.unsqueeze(-1).float()
        mean = (emb * m).sum(1) / m.sum(1).clamp_min(1.0)
        return F.normalize(mean, dim=-1)

    def _has_image(self, input_ids: Tensor) -> Tensor:
        if self.image_token_id is None:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return (input_ids == self.image_token_id).any(-1)

    def vision_query(self, batch: int, has_image: Tensor, device) -> Tensor:
        """q_vis [B, d_v] from the features captured by the hook (zero rows for samples without an image)."""
        d_v = self.query_dims[1]
        q = torch.zeros(batch, d_v, device=device)
        rows = has_image.nonzero().flatten()
        feats = self._features
        if not feats or rows.numel() == 0:
            return q
        if len(feats) != rows.numel():
            # several images per sample: give each image-holding sample the mean of an even share of the images
            if len(feats) % rows.numel():
                raise ValueError(f"{len(feats)} images were encoded for {rows.numel()} samples with an image")
            k = len(feats) // rows.numel()
            stacked = torch.stack(feats).view(rows.numel(), k, -1).mean(1)
        else:
            stacked = torch.stack(feats)
        q[rows] = F.normalize(stacked.to(device), dim=-1)
        return q

    def query_fn(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                 instruction_mask: Optional[Tensor] = None, has_image: Optional[Tensor] = None):
        """A lazy query for :func:`pclr.routing`: the text part now, the vision part when first asked for."""
        q_text = self.text_query(input_ids, attention_mask, instruction_mask)
        if len(self.query_dims) == 1:
            return lambda: (q_text,)
        has = self._has_image(input_ids) if has_image is None else has_image.bool().to(input_ids.device)
        self._has = has
        self._features = []  # a stale vision pass must not leak into this forward
        return lambda: (q_text, self.vision_query(input_ids.shape[0], has, q_text.device))

    @contextmanager
    def route(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
              instruction_mask: Optional[Tensor] = None, has_image: Optional[Tensor] = None) -> Iterator[RoutingState]:
        """Routing context for forwards/generation of this batch (input_ids [B, L], masks [B, L], has_image [B])."""
        with routing(self.query_fn(input_ids, attention_mask, instruction_mask, has_image)) as state:
            outer, self._active = self._active, state
            try:
                yield state
            finally:
                self._active = outer

    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                 instruction_mask: Optional[Tensor] = None, has_image: Optional[Tensor] = None, **kwargs: Any):
        """``model.generate`` with the query fixed from the prompt (the KV cache is left to HF)."""
        with self.route(input_ids, attention_mask, instruction_mask, has_image):
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    # ------------------------------------------------------------------------------------------- auto mode
    def _auto_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if current_routing() is not None:
            self._auto_stack.append(None)
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise RuntimeError("pclr query (auto mode) needs input_ids; open `QueryExtractor.route(...)` instead")
        cache = kwargs.get("past_key_values")
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            raise RuntimeError("a cached decoding step ran without a routing context: the query must come from the "
                               "prompt; use QueryExtractor.generate(...) or wrap generate in QueryExtractor.route(...)")
        ctx = self.route(input_ids, kwargs.get("attention_mask"))
        ctx.__enter__()
        self._auto_stack.append(ctx)

    def _auto_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        ctx = self._auto_stack.pop() if self._auto_stack else None
        if ctx is not None:
            ctx.__exit__(None, None, None)
