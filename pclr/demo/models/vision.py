"""The vision side of the mini LLaVA: the frozen EfficientNet-Lite0 tower (with a per-image feature cache) and the
trainable projector, both shaped to slot into ``transformers``' ``LlavaModel``.

``LlavaModel.get_image_features`` calls ``vision_tower(pixel_values, return_dict=True)`` and reads
``hidden_states[vision_feature_layer]``; with ``vision_feature_layer=-1`` and ``vision_feature_select_strategy="full"``
it passes this tower's [N, 16, 1280] grid tokens straight to ``multi_modal_projector``.

The tower never trains, so an image's features are a pure function of its pixels: they are computed once per distinct
image (keyed by the bytes of its normalised pixels) and reused by every later forward of every method. The output
passes through ``blocks`` (one identity layer) on every forward, cached or not, so hooks that read a tower's last
layer (PCLR's vision query: the mean grid token) see every image.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from pclr.demo.models.efficientnet import EfficientNetLite0

FEATURE_DIM = 1280


class FrozenEncoderTower(nn.Module):
    """``EfficientNetLite0`` as a LLaVA vision tower: [N, 3, S, S] -> grid tokens [N, (S/32)^2, 1280], cached."""

    def __init__(self, encoder: EfficientNetLite0, max_entries: int = 50_000) -> None:
        super().__init__()
        self.net = encoder.eval().requires_grad_(False)
        self.blocks = nn.ModuleList([nn.Identity()])
        self.max_entries = max_entries
        self._cache: "OrderedDict[bytes, Tensor]" = OrderedDict()
        self.stats = {"hits": 0, "misses": 0}

    def train(self, mode: bool = True) -> "FrozenEncoderTower":
        # BatchNorm must keep its ImageNet running statistics whatever mode the surrounding model is put in
        super().train(mode)
        self.net.eval()
        return self

    @torch.no_grad()
    def grid_tokens(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [N, 3, S, S] -> [N, (S/32)^2, 1280] (row-major cells), uncached."""
        fmap = self.net.features(pixel_values.float())
        return fmap.flatten(2).transpose(1, 2).contiguous()

    def forward(self, pixel_values: Tensor, return_dict: bool = True, **_: object) -> BaseModelOutputWithPooling:
        keys = [hashlib.blake2b(px.detach().float().cpu().numpy().tobytes(), digest_size=16).digest()
                for px in pixel_values]
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        if missing:
            feats = self.grid_tokens(pixel_values[missing])
            for i, f in zip(missing, feats):
                self._cache[keys[i]] = f.cpu()
                if len(self._cache) > self.max_entries:
                    self._cache.popitem(last=False)
        self.stats["hits"] += len(keys) - len(missing)
        self.stats["misses"] += len(missing)
        out = self.blocks[0](torch.stack([self._cache[k] for k in keys]).to(pixel_values.device))
        return BaseModelOutputWithPooling(last_hidden_state=out, hidden_states=(out,))


class GridProjector(nn.Module):
    """Projector from grid tokens to the LM's embedding space: per-channel standardisation of the encoder features,
    then a per-token 2-layer GELU MLP with a learned mixing of the token positions in between.

    The standardisation (``fit_input_scale``: fixed per-channel mean and std of the alignment images' features, kept
    as buffers) matters for reading rendered words: the channels that tell one word from another vary little next to
    the ones that code colour and layout, and a per-token LayerNorm alone leaves them drowned (held-out sign words
    read off any image token after 500 alignment steps: 9 % without it, 31 % with it).
    The mixing gives every output token global context: a CNN cell sees mostly its own region, but the caption word
    a token is aligned to (the sign's word, the digit) may be drawn anywhere in the image. Initialised as identity
    mixing (each token its own cell), it learns how much of the other cells each position reads.

    Parameters: d_in*d_out + n_tokens*(n_tokens + d_out + 1) + d_out*d_out + 2*d_in + 2*d_out (1.08 M for 1280 -> 576
    over 16 tokens), plus 2*d_in buffers.

    Shapes: x [N, T, d_in] -> [N, T, d_out].
    """

    def __init__(self, d_in: int, d_out: int, n_tokens: int) -> None:
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(d_in))
        self.register_buffer("input_std", torch.ones(d_in))
        self.norm = nn.LayerNorm(d_in)
        self.linear_1 = nn.Linear(d_in, d_out)
        self.mix = nn.Linear(n_tokens, n_tokens)
        self.linear_2 = nn.Linear(d_out, d_out)
        self.pos = nn.Parameter(torch.zeros(n_tokens, d_out))
        with torch.no_grad():
            self.mix.weight.copy_(torch.eye(n_tokens))
            self.mix.bias.zero_()

    @torch.no_grad()
    def fit_input_scale(self, features: Tensor, eps: float = 1e-3) -> None:
        """Set the input standardisation from encoder features [N, T, d_in] (or [M, d_in])."""
        if features.shape[-1] != self.input_mean.numel():
            raise ValueError(f"features must end in d_in = {self.input_mean.numel()}, got {tuple(features.shape)}")
        flat = features.reshape(-1, features.shape[-1]).float()
        self.input_mean.copy_(flat.mean(0))
        self.input_std.copy_(flat.std(0) + eps)  # eps: channels that never fire stay finite

    def forward(self, x: Tensor) -> Tensor:
        x = (x - self.input_mean) / self.input_std
        h = F.gelu(self.linear_1(self.norm(x)) + self.pos)
        h = h + self.mix(h.transpose(1, 2)).transpose(1, 2)
        return self.linear_2(F.gelu(h))
