"""Configuration dataclasses with documented defaults (HF/PEFT style: ``field(metadata={"help": ...})``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

from pclr.options import BACKEND_NAMES, GATE_MODES, GATE_SCOPES, BackendName, GateMode, GateScope, check_choice

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LRPConfig:
    """Settings of a LoRA Rank Pool (LRP) layer and its key pool.

    The defaults are the PCLR reference settings for CoIN / LLaVA-1.5. :class:`pclr.peft.PCLRConfig` derives its
    fields from these, so a field added here reaches the PEFT route with its default and help text.
    """

    r: int = field(default=64, metadata={"help": "Experts (rank-1 LoRA components) chosen per sample by the gate."})
    alpha: float = field(default=128.0, metadata={"help": "LoRA alpha: beta_m = alpha / r, beta_s = alpha / n_shared."})
    n_shared: int = field(default=32, metadata={"help": "Shared ranks (always active) created when first requested."})
    budget: int = field(default=256, metadata={"help": "Maximum number of experts in a pool (memory bound)."})
    query_weights: tuple[float, ...] = field(
        default=(1.0, 0.25), metadata={"help": "Per-part weights of the gate score (text, vision)."}
    )
    gate_scope: GateScope = field(
        default="sample",
        metadata={"help": "'sample': each sample routes itself; 'batch': one route for the batch (summed scores)."},
    )
    gate_mode: GateMode = field(
        default="hard", metadata={"help": "'hard': gate value 1; 'soft': gate value = score (keys get CE gradient)."}
    )
    init_std: Optional[float] = field(
        default=None, metadata={"help": "Std of new A rows; None means 1/sqrt(d_in) (B rows start at zero)."}
    )
    target_modules: Union[tuple[str, ...], str] = field(
        default=DEFAULT_TARGET_MODULES,
        metadata={"help": "Suffixes (list) or a regex (str) of the Linear modules that receive an LRP."},
    )
    deterministic: bool = field(
        default=False, metadata={"help": "Fused backends reduce pool gradients by segments instead of atomics."}
    )
    backend: Optional[BackendName] = field(
        default=None, metadata={"help": "Force a backend ('reference', 'triton', 'cuda'); None lets dispatch pick."}
    )

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LRPConfig.r must be >= 1, got {self.r}")
        if self.budget < self.r:
            raise ValueError(f"LRPConfig.budget ({self.budget}) must be >= r ({self.r})")
        if self.n_shared < 0:
            raise ValueError(f"LRPConfig.n_shared must be >= 0, got {self.n_shared}")
        check_choice("LRPConfig.gate_scope", self.gate_scope, GATE_SCOPES)
        check_choice("LRPConfig.gate_mode", self.gate_mode, GATE_MODES)
        if self.backend is not None:
            check_choice("LRPConfig.backend", self.backend, BACKEND_NAMES)
        self.query_weights = tuple(float(w) for w in self.query_weights)
        if isinstance(self.target_modules, list):
            self.target_modules = tuple(self.target_modules)

    @property
    def beta_m(self) -> float:
        """Scale of the gated pool term: alpha / r."""
        return self.alpha / self.r

    def beta_s(self, n_shared: Optional[int] = None) -> float:
        """Scale of the shared-rank term: alpha / n_shared (0 when there are no shared ranks)."""
        n = self.n_shared if n_shared is None else n_shared
        return self.alpha / n if n else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists; a regex target_modules stays a string)."""
        d = asdict(self)
        d["query_weights"] = list(self.query_weights)
        if not isinstance(self.target_modules, str):
            d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LRPConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if k == "query_weights" else v) for k, v in d.items() if k in known})
