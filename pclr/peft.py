"""PEFT route: ``get_peft_model(model, PCLRConfig(...))``, ``save_pretrained`` / ``PeftModel.from_pretrained``.

    import pclr.peft                                   # registers peft_type "PCLR" in PEFT's mapping dictionaries
    from pclr.peft import PCLRConfig
    model = get_peft_model(base, PCLRConfig(r=8, budget=32, n_init=8))
    out = model(input_ids=..., pixel_values=...)       # routes itself (query from the prompt, vision hook)
    ids = model.generate(input_ids=..., max_new_tokens=8)
    model.save_pretrained("adapter/")                 # adapter_config.json + adapter_model.safetensors
    model = PeftModel.from_pretrained(fresh_base, "adapter/")   # pools resize to the saved sizes

PEFT knows its methods through the ``PeftType`` enum, which has no member for third-party tuners; registering adds
the member ``PeftType.PCLR`` to the enum (the only way ``peft.utils.register_peft_method`` accepts a name) and then
fills ``PEFT_TYPE_TO_CONFIG_MAPPING`` / ``PEFT_TYPE_TO_TUNER_MAPPING`` / ``PEFT_TYPE_TO_PREFIX_MAPPING`` through it.
The LRP layers are not ``BaseTunerLayer`` subclasses (their pools are shared per decoder layer), so the tuner selects
and remaps its state-dict entries itself. Consequences: one adapter per model (PEFT's multi-adapter switching does
not apply to a pool whose size changes over tasks); ``PeftModel.disable_adapter()`` raises inside PEFT (its status
introspection only counts ``BaseTunerLayer`` modules) — use ``model.base_model.disable_adapter_layers()`` /
``enable_adapter_layers()``; ``merge_and_unload`` is undefined for a routed pool (merge one fixed route per task with
``FusedLRPLinear.merge``); ``inject_adapter_in_model`` is refused (the key pools are state shared across layers).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import Any, ContextManager, Iterator, Optional

from peft.config import PeftConfig  # peft is an optional dependency: a missing install surfaces here
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType, register_peft_method
from torch import nn

from pclr.config import DEFAULT_TARGET_MODULES, LRPConfig
from pclr.hf_anatomy import POOL_ATTR
from pclr.inject import inject_lrp, is_lrp_key, lrp_layers, lrp_pools
from pclr.query import QueryExtractor
from pclr.routing import current_routing

PEFT_TYPE = "PCLR"
PREFIX = "lrp_"


def _add_peft_type(name: str = PEFT_TYPE) -> PeftType:
    """Add ``name`` as a member of ``PeftType`` (a ``str`` Enum) if it is not one yet."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_, member._value_ = name, name
    member.__objclass__ = PeftType
    member.__init__(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


_add_peft_type()


@dataclass
class _PCLROnlyConfig(PeftConfig):
    """The settings that exist only on the PEFT route; :class:`PCLRConfig` adds every :class:`LRPConfig` field."""

    n_init: int = field(default=64, metadata={"help": "Experts created per pool at injection."})
    projector: bool = field(default=True, metadata={"help": "Wrap the multimodal projector too (own key pool)."})
    query_dims: Optional[list] = field(default=None, metadata={"help": "Query part sizes (default from the model)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.PCLR
        if self.target_modules is None:  # adapter configs written before the field had a default
            self.target_modules = DEFAULT_TARGET_MODULES
        self.to_lrp_config()  # validate now, before any model is touched

    def to_lrp_config(self) -> LRPConfig:
        """The :class:`LRPConfig` of these settings (every LRPConfig field, nothing dropped)."""
        return LRPConfig(**{f.name: getattr(self, f.name) for f in fields(LRPConfig)})


def _lrp_field_specs() -> list[tuple[str, Any, Any]]:
    """(name, type, field) of every LRPConfig field with its default and help text, so the PEFT config keeps no
    copy of them that could drift."""
    specs = []
    for f in fields(LRPConfig):
        if f.default_factory is not MISSING:
            spec = field(default_factory=f.default_factory, metadata=f.metadata)
        else:
            spec = field(default=f.default, metadata=f.metadata)
        specs.append((f.name, f.type, spec))
    return specs


PCLRConfig = make_dataclass(
    "PCLRConfig", _lrp_field_specs(), bases=(_PCLROnlyConfig,),
    namespace={"__module__": __name__, "__doc__": """PEFT configuration of a PCLR LoRA rank pool.

    Every :class:`pclr.LRPConfig` field (r, alpha, n_shared, budget, query_weights, gate_scope, gate_mode, init_std,
    target_modules, deterministic, backend), with the same defaults and checks, plus the PEFT-only settings:
    n_init: experts created per pool at injection (the trainer grows/compresses pools itself; a plain PEFT user
    trains these). projector: also wrap the multimodal projector. query_dims: per-part query sizes (default from the
    model: (d_text, d_vision) or (d_text,)).
    """},
)


class PCLRModel(BaseTuner):
    """PEFT tuner wrapping :func:`pclr.inject_lrp`; its forward/generate route by the prompt's query."""

    prefix: str = PREFIX
    tuner_layer_cls = BaseTunerLayer  # LRP layers are not BaseTunerLayers; selection is structural (is_lrp_key)
    target_module_mapping: dict = {}
    uses_shared_state = True

    def _prepare_adapter_config(self, peft_config: PCLRConfig, model_config: dict) -> PCLRConfig:
        return peft_config

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - inject_adapter injects
        raise NotImplementedError("PCLR injects through pclr.inject_lrp")

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: Optional[dict] = None) -> None:
        if lrp_pools(model):
            raise ValueError("the model already holds LRP layers; PCLR supports one adapter per model")
        cfg: PCLRConfig = self.peft_config[adapter_name]
        inject_lrp(model, cfg.to_lrp_config(), cfg.query_dims, projector=cfg.projector)
        for pool in lrp_pools(model).values():
            pool.grow(cfg.n_init, task=0)
        self.targeted_module_names = list(lrp_layers(model))
        self._query = QueryExtractor(model)
        self._apply_inference_mode()
        self.register_load_state_dict_post_hook(_after_load)

    def _apply_inference_mode(self) -> None:
        """An inference-mode adapter (``PeftModel.from_pretrained`` without ``is_trainable=True``) trains nothing:
        the pools' own bookkeeping would mark trainable rows as requiring grad again after a load."""
        if any(cfg.inference_mode for cfg in self.peft_config.values()):  # one adapter per model
            for _, p in self.model.named_parameters():
                p.requires_grad_(False)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if not is_lrp_key(n):
                p.requires_grad_(False)

    # ------------------------------------------------------------------------------------------ routing
    def _route(self, kwargs: dict[str, Any]) -> ContextManager:
        if current_routing() is not None:
            return nullcontext()
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError("PCLR needs input_ids to build the routing query")
        return self._query.route(input_ids, kwargs.get("attention_mask"), kwargs.pop("instruction_mask", None),
                                 kwargs.pop("has_image", None))

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """PeftModel enters this around its forward/generate: open the routing context of the batch. Task-specific
        PeftModels (e.g. CAUSAL_LM) pass input_ids separately; then PCLRModel.forward/generate open it instead."""
        with self._route(dict(kwargs)) if kwargs.get("input_ids") is not None else nullcontext():
            yield

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._route(kwargs):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with self._route(kwargs):
            return self.model.generate(*args, **kwargs)

    # ------------------------------------------------------------------------------------------ enable / disable
    def _set_adapter_layers(self, enabled: bool = True) -> None:
        for layer in lrp_layers(self.model).values():
            layer.enabled = enabled

    def enable_adapter_layers(self) -> None:
        self._set_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        self._set_adapter_layers(False)

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} not found")
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        raise NotImplementedError("PCLR holds one adapter per model")

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise NotImplementedError("a routed pool has no single merge; use FusedLRPLinear.merge(route) per task")

    # ------------------------------------------------------------------------------------------ state dict
    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict,
                                unwanted_adapter_names: Any) -> dict:
        return {k: v for k, v in state_dict.items() if is_lrp_key(k)}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key  # LRP keys carry no adapter name

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: PeftConfig, adapter_name: str,
                                           state_dict: dict) -> dict:
        own = {k for k in model.state_dict() if is_lrp_key(k)}
        prefix = "base_model.model."
        out = {}
        for k, v in state_dict.items():
            if k not in own and k.startswith(prefix) and k[len(prefix):] in own:
                k = k[len(prefix):]
            elif k not in own and prefix + k in own:
                k = prefix + k
            out[k] = v
        return out


def _after_load(module: PCLRModel, incompatible_keys: Any) -> None:
    module._apply_inference_mode()


def register() -> None:
    """Register PCLR with PEFT (idempotent; done on import of this module)."""
    if PeftType.PCLR in PEFT_TYPE_TO_CONFIG_MAPPING and PEFT_TYPE_TO_TUNER_MAPPING.get(PeftType.PCLR) is PCLRModel:
        return
    register_peft_method(name="pclr", config_cls=PCLRConfig, model_cls=PCLRModel, prefix=PREFIX)


register()

__all__ = ["PCLRConfig", "PCLRModel", "register", "POOL_ATTR"]
