"""Where things are in a Hugging Face model: decoder layers, the multimodal projector, the vision tower and its
encoder blocks, the query widths, the image placeholder id, and the attribute that holds a layer's key pool.

Both :mod:`pclr.inject` (which wraps Linears) and :mod:`pclr.query` (which hooks the vision pass) read the model's
layout from here, so neither needs the other to find its way around a model.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

POOL_ATTR = "lrp_key_pool"
"""Name under which a decoder layer (or the projector) registers its :class:`pclr.KeyPool`."""

PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector")
"""Module names of multimodal projectors (LLaVA / LLaVA-NeXT in transformers, LLaVA-1.5's original code). Qwen2-VL's
merger runs on packed patches inside the vision tower; it is not a projector here (its decoder layers are wrapped)."""

VISION_TOWER_NAMES = ("vision_tower", "visual", "vision_model")
"""Module names of vision encoders (LLaVA: ``vision_tower``, Qwen2-VL: ``visual``)."""

_VISION_HINTS = ("vision", "visual", "image_encoder")
_LAYER_LIST_NAMES = ("layers", "h", "blocks")
_VISION_BLOCK_PATHS = ("encoder.layers", "vision_model.encoder.layers", "blocks", "layers", "encoder.layer")


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every decoder layer of the language model, in order.

    Uses ``model.get_decoder().layers`` when the model has it; otherwise the first ``layers``/``h``/``blocks``
    ModuleList outside the vision tower.
    """
    names = {id(m): n for n, m in model.named_modules()}
    decoder = None
    if hasattr(model, "get_decoder"):
        try:
            decoder = model.get_decoder()
        except Exception:  # some wrappers raise when there is no decoder
            decoder = None
    layers = getattr(decoder, "layers", None) if decoder is not None else None
    if isinstance(layers, nn.ModuleList) and id(layers) in names:
        base = names[id(layers)]
        return [(f"{base}.{i}", m) for i, m in enumerate(layers)]
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] in _LAYER_LIST_NAMES and \
                not any(h in name for h in _VISION_HINTS):
            return [(f"{name}.{i}", m) for i, m in enumerate(mod)]
    raise ValueError(f"{type(model).__name__}: no decoder layers found (expected get_decoder().layers)")


def find_projector(model: nn.Module) -> Optional[tuple[str, nn.Module]]:
    """(name, module) of the multimodal projector, or None for a text-only model."""
    for name, mod in model.named_modules():
        if name.split(".")[-1] in PROJECTOR_NAMES and any(isinstance(m, nn.Linear) for m in mod.modules()):
            return name, mod
    return None


def find_vision_tower(model: nn.Module) -> Optional[nn.Module]:
    """The vision encoder of a multimodal model (``model.model.vision_tower`` for LLaVA, ``.visual`` for
    Qwen2-VL), or None for a text-only model."""
    for name, mod in model.named_modules():
        if name.split(".")[-1] in VISION_TOWER_NAMES:
            return mod
    return None


def vision_blocks(tower: nn.Module) -> nn.ModuleList:
    """The encoder layer list of a vision tower (CLIP/SigLIP: ``encoder.layers``, Qwen2-VL: ``blocks``)."""
    for attr in _VISION_BLOCK_PATHS:
        try:
            mod = tower.get_submodule(attr)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return mod
    raise ValueError(f"{type(tower).__name__}: cannot find the vision encoder layers (encoder.layers / blocks)")


def vision_has_cls(tower: nn.Module) -> bool:
    """Whether the tower prepends a CLS token (CLIP does; SigLIP and Qwen2-VL do not)."""
    emb = getattr(tower, "embeddings", None) or getattr(getattr(tower, "vision_model", None), "embeddings", None)
    return emb is not None and hasattr(emb, "class_embedding")


def infer_query_dims(model: nn.Module) -> tuple[int, ...]:
    """(d_text,) for a text-only model, (d_text, d_vision) for a multimodal one (d_vision = width of the vision
    encoder layers, where the query's CLS is read)."""
    d_text = model.get_input_embeddings().weight.shape[1]
    if find_vision_tower(model) is None:
        return (d_text,)
    vcfg = getattr(getattr(model, "config", None), "vision_config", None)
    for attr in ("embed_dim", "hidden_size"):  # Qwen2-VL: blocks are embed_dim wide (hidden_size is the output)
        d = getattr(vcfg, attr, None)
        if isinstance(d, int):
            return (d_text, d)
    raise ValueError(f"{type(model).__name__}: cannot infer the vision query width from config.vision_config")


def image_token_id(model: nn.Module) -> Optional[int]:
    """The id of the image placeholder token in ``model.config`` (``image_token_id`` or ``image_token_index``)."""
    cfg = getattr(model, "config", None)
    for attr in ("image_token_id", "image_token_index"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int):
            return v
    return None
