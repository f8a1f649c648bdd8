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
from pclr.hf_anatomy import POOL_ATTR, decoder_layers, find_projector, infer_query_dims
from pclr.key_pool import KeyPool
from pclr.modules import FusedLRPLinear

__all__ = ["inject_lrp", "lrp_pools", "lrp_layers", "is_lrp_key", "lrp_state_dict", "load_lrp_state_dict",
           "lrp_parameters", "freeze_base", "lrp_num_experts", "check_lrp_state", "decoder_layers", "find_projector",
           "POOL_ATTR"]

LRP_PARAM_NAMES = ("A_m", "B_m", "A_s", "B_s")
LRP_BUFFER_NAMES = ("trainable", "shared_trainable")


def _matches(rel_name: str, targets: Union[str, Sequence[str]]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, rel_name) is not None
    return any(rel_name == t or rel_name.endswith("." + t) for t in targets)


def _select_layers(units: list[tuple[str, nn.Module]],
                   layers: Optional[Sequence[int]]) -> list[tuple[str, nn.Module]]:
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


def _example_names(units: list[tuple[str, nn.Module]]) -> list[str]:
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
        query_dims: size of each query part; default (d_text, d_vision) from
            :func:`pclr.hf_anatomy.infer_query_dims`.
        projector: also wrap every Linear of the multimodal projector (with its own key pool).
        freeze: freeze all the model's own parameters (only pools, keys and shared ranks can train).
        layers: indices of the decoder layers that get LRP (negative = from the top, e.g. ``range(-4, 0)`` for the
            top four); default all. Layers below the lowest adapted one stay plain, so their outputs can be cached
            (:mod:`pclr.models.prefix_cache`).

    Raises ValueError before anything changes if a target module is unknown or not a Linear.
    """
    config = config or LRPConfig()
    query_dims = tuple(query_dims) if query_dims is not None else infer_query_dims(model)
    plan = _plan(model, config, projector, layers)
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for _, unit, rels in plan:
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
    model.register_load_state_dict_pre_hook(check_lrp_state)
    return model


def check_lrp_state(model: nn.Module, state_dict: dict, prefix: str = "", *args: object) -> None:
    """Check every LRP entry of ``state_dict`` against ``model`` before anything is loaded, so a bad state (an
    adapter for another width or query dims, pool sizes that disagree between a key pool and its layers) changes
    nothing. ``inject_lrp`` registers it as a load_state_dict pre-hook of the model; the layers and pools check
    their own entries again as they load, which covers loading a single submodule. Each pool is told the n it is
    about to receive, so its layers (which load first) can be checked against it."""
    named = [(f"{prefix}{name}." if name else prefix, mod) for name, mod in model.named_modules()]
    pool_n, pools = {}, []
    for at, mod in named:
        if isinstance(mod, KeyPool):
            n = mod.check_state(state_dict, at)
            pool_n[id(mod)] = mod.n if n is None else n
            pools.append((mod, n))
    for at, mod in named:
        if isinstance(mod, FusedLRPLinear):
            mod.check_state(state_dict, at, pool_n=pool_n.get(id(mod.key_pool)))
    for pool, n in pools:
        pool.incoming_n = n


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
    return parts[-1] in LRP_PARAM_NAMES or (parts[-1] in LRP_BUFFER_NAMES and "base_layer" not in parts)


def lrp_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the LRP tensors (pool rows, shared ranks, keys, trainable masks, task_of_expert), detached clones."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if is_lrp_key(k)}


def load_lrp_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load LRP tensors (pools resize to the stored n); every LRP key of the model must be present (a missing
    ``shared_trainable`` flag, from a state saved before it existed, keeps the current setting)."""
    own = {k for k in model.state_dict() if is_lrp_key(k)}
    missing = sorted(k for k in own - set(state) if not k.endswith(".shared_trainable"))
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
