"""Put LoRA rank pools into a Hugging Face model: target Linears → ``FusedLRPLinear``, one ``KeyPool`` per layer.

    model = inject_lrp(model, LRPConfig(r=64, budget=256))
    pools = lrp_pools(model)   # {"model.language_model.layers.0": KeyPool, ..., "model.multi_modal_projector": ...}

Each decoder layer gets one key pool (registered as ``layer.lrp_key_pool``) shared by all its target linears; the
multimodal projector gets its own. The model's own weights are frozen; only pools, keys and shared ranks can train.
"""
from __future__ import annotations

import re
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from pclr.config import LRPConfig
from pclr.modules import FusedLRPLinear, KeyPool

POOL_ATTR = "lrp_key_pool"
# Where multimodal projectors live in HF models (LLaVA / LLaVA-NeXT, LLaVA-1.5 original code). Qwen2-VL's merger
# runs on packed patches inside the vision tower; it is not wrapped (its decoder layers are).
PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector")
_VISION_HINTS = ("vision", "visual", "image_encoder")
LRP_PARAM_NAMES = ("A_m", "B_m", "A_s", "B_s")


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every decoder layer of the language model, in order.

    Uses ``model.get_decoder().layers`` when the model has it; otherwise the first ``*layers`` ModuleList outside
    the vision tower.
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
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks") and \
                not any(h in name for h in _VISION_HINTS):
            return [(f"{name}.{i}", m) for i, m in enumerate(mod)]
    raise ValueError(f"{type(model).__name__}: no decoder layers found (expected get_decoder().layers)")


def find_projector(model: nn.Module) -> Optional[tuple[str, nn.Module]]:
    """(name, module) of the multimodal projector, or None for a text-only model."""
    for name, mod in model.named_modules():
        if name.split(".")[-1] in PROJECTOR_NAMES and any(isinstance(m, nn.Linear) for m in mod.modules()):
            return name, mod
    return None


def _matches(rel_name: str, targets: Union[str, Sequence[str]]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, rel_name) is not None
    return any(rel_name == t or rel_name.endswith("." + t) for t in targets)


def _select_layers(units: list, layers: Optional[Sequence[int]]) -> list:
    """The decoder layers named by index in ``layers`` (negative indices count from the top), in model order."""
    if layers is None:
        return units
    n = len(units)
    picked = set()
    for i in layers:
        if not -n <= int(i) < n:
            raise ValueError(f"layers: index {i} out of range for {n} decoder layers")
        picked.add(int(i) % n)
    if not picked:
        raise ValueError("layers is empty")
    return [u for k, u in enumerate(units) if k in picked]


def _plan(model: nn.Module, config: LRPConfig, projector: bool,
          layers: Optional[Sequence[int]] = None) -> list[tuple[str, nn.Module, list[str]]]:
    """[(unit name, unit module, [relative names of the Linears to wrap])] — computed before anything changes."""
    targets = config.target_modules
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise ValueError(f"target_modules regex {targets!r} does not compile: {e}") from None
    elif not targets:
        raise ValueError("target_modules is empty")
    units = _select_layers(decoder_layers(model), layers)
    plan, seen_suffixes = [], set()
    for uname, unit in units:
        wrap = []
        for rel, mod in unit.named_modules():
            if not rel or not _matches(rel, targets):
                continue
            if isinstance(mod, FusedLRPLinear):
                raise ValueError(f"{uname}.{rel} already holds an LRP (inject_lrp was applied twice)")
            if not isinstance(mod, nn.Linear):
                if isinstance(targets, str):
                    continue  # a regex may also match containers; only Linears are wrapped
                raise ValueError(f"target module {uname}.{rel} is a {type(mod).__name__}, not an nn.Linear")
            wrap.append(rel)
            if not isinstance(targets, str):
                seen_suffixes.update(t for t in targets if rel == t or rel.endswith("." + t))
        plan.append((uname, unit, wrap))
    if isinstance(targets, str):
        if not any(w for _, _, w in plan):
            raise ValueError(f"target_modules regex {targets!r} matches no Linear inside the decoder layers "
                             f"(relative names such as {_example_names(units)})")
    else:
        missing = [t for t in targets if t not in seen_suffixes]
        if missing:
            raise ValueError(f"unknown target module(s) {missing}: no nn.Linear in the decoder layers ends with them "
                             f"(available: {_example_names(units)})")
    if projector:
        found = find_projector(model)
        if found is not None:
            pname, pmod = found
            plan.append((pname, pmod, [rel for rel, m in pmod.named_modules() if rel and isinstance(m, nn.Linear)]))
    return plan


def _example_names(units) -> list[str]:
    if not units:
        return []
    return sorted({rel.split(".")[-1] for rel, m in units[0][1].named_modules() if isinstance(m, nn.Linear)})


def inject_lrp(model: nn.Module, config: Optional[LRPConfig] = None, query_dims: Optional[Sequence[int]] = None,
               *, projector: bool = True, freeze: bool = True,
               layers: Optional[Sequence[int]] = None) -> nn.Module:
    """Replace the target Linears of ``model`` in place by ``FusedLRPLinear`` and return ``model``.

    Args:
        model: an HF causal LM, ``LlavaForConditionalGeneration`` or Qwen2-VL style model.
        config: pool/gate settings; ``config.target_modules`` is a suffix list (default q/k/v/o/gate/up/down) or a
            regex over names relative to a decoder layer.
        query_dims: size of each query part; default (d_text, d_vision) from :func:`pclr.query.infer_query_dims`.
        projector: also wrap every Linear of the multimodal projector (with its own key pool).
        freeze: freeze all the model's own parameters (only pools, keys and shared ranks can train).
        layers: indices of the decoder layers that get LRP (negative = from the top, e.g. ``range(-4, 0)`` for the
            top four); default all. Layers below the lowest adapted one stay plain, so their outputs can be cached
            (:mod:`pclr.models.prefix_cache`).

    Raises ValueError before anything changes if a target module is unknown or not a Linear.
    """
    from pclr.query import infer_query_dims

    config = config or LRPConfig()
    query_dims = tuple(query_dims) if query_dims is not None else infer_query_dims(model)
    plan = _plan(model, config, projector, layers)
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for uname, unit, rels in plan:
        if not rels:
            continue
        ref = unit.get_submodule(rels[0]).weight
        pool = KeyPool(query_dims, config).to(device=ref.device)
        unit.add_module(POOL_ATTR, pool)
        for rel in rels:
            parent_name, _, child = rel.rpartition(".")
            parent = unit.get_submodule(parent_name) if parent_name else unit
            linear = getattr(parent, child)
            setattr(parent, child, FusedLRPLinear.from_linear(linear, config, key_pool=pool))
    model.lrp_config = config  # read back by helpers, save/load and the trainer
    return model


def lrp_pools(model: nn.Module) -> dict[str, KeyPool]:
    """{name of the layer/projector that owns it: KeyPool}, in module order."""
    return {n.rpartition(".")[0]: m for n, m in model.named_modules() if isinstance(m, KeyPool)}


def lrp_layers(model: nn.Module) -> dict[str, FusedLRPLinear]:
    """{module name: FusedLRPLinear}, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FusedLRPLinear)}


def is_lrp_key(name: str) -> bool:
    """Whether a state-dict key belongs to the LRP (pool rows, shared ranks, keys, their buffers)."""
    parts = name.split(".")
    if f"{POOL_ATTR}" in parts:
        return True
    return parts[-1] in LRP_PARAM_NAMES or (parts[-1] == "trainable" and "base_layer" not in parts)


def lrp_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the LRP tensors (pool rows, shared ranks, keys, trainable masks, task_of_expert), detached clones."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if is_lrp_key(k)}


def load_lrp_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load LRP tensors (pools resize to the stored n); every LRP key of the model must be present."""
    own = {k for k in model.state_dict() if is_lrp_key(k)}
    missing = sorted(own - set(state))
    unexpected = sorted(set(state) - own)
    if missing or unexpected:
        raise KeyError(f"LRP state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)
    for pool in lrp_pools(model).values():
        pool.set_candidates(None, None)


def lrp_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every LRP parameter (trainable or not)."""
    for n, p in model.named_parameters():
        if is_lrp_key(n):
            yield n, p


def freeze_base(model: nn.Module) -> None:
    """requires_grad=False for every parameter that is not part of an LRP."""
    for n, p in model.named_parameters():
        if not is_lrp_key(n):
            p.requires_grad_(False)


@torch.no_grad()
def lrp_num_experts(model: nn.Module) -> dict[str, int]:
    return {n: p.n for n, p in lrp_pools(model).items()}
