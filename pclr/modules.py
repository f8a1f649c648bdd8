"""``FusedLRPLinear``: a frozen Linear plus a LoRA rank pool routed per sample (its keys live in a ``KeyPool``).

Pool operations (grow/freeze/prune) go through the layer's key pool so every layer sharing it keeps the same n.
``KeyPool`` lives in :mod:`pclr.key_pool` and is re-exported here, where it has always been importable from.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from pclr import frozen_rows
from pclr.config import LRPConfig
from pclr.functional import lrp_linear
from pclr.key_pool import KeyPool
from pclr.pool_rows import Rows, check_rows, check_vector, count_arg, resize_from_state, row_mask, source_rows
from pclr.routing import expand_route

__all__ = ["FusedLRPLinear", "KeyPool"]


class FusedLRPLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a LoRA Rank Pool routed per sample.

    y = x·Wᵀ + b + beta_s·(x·A_sᵀ)·B_s + beta_m·Σ_k val[b,k]·(x·A_m[idx[b,k]]ᵀ)·B_m[idx[b,k]]

    Parameters: ``A_m`` [n, d_in], ``B_m`` [n, d_out] (row j = expert j), ``A_s`` [n_s, d_in], ``B_s`` [n_s, d_out].
    Buffers: ``trainable`` bool [n]; ``shared_trainable`` bool [] (whether A_s/B_s learn, kept across a reload).
    The wrapped Linear is ``base_layer`` (weight shared, frozen, not copied). Frozen rows stay bit-identical under
    any ``torch.optim`` optimizer, weight decay and momentum included (:mod:`pclr.frozen_rows`).

    Routing, in order: ``forward(x, route=(idx, val))``; else the ``key_pool``'s gate under ``pclr.routing(query)``.
    """

    def __init__(self, base_layer: nn.Linear, config: Optional[LRPConfig] = None,
                 key_pool: Optional[KeyPool] = None, query_dims: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        self.config = config or (key_pool.config if key_pool is not None else LRPConfig())
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        w = base_layer.weight
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.A_m = nn.Parameter(w.new_zeros(0, self.in_features))
        self.B_m = nn.Parameter(w.new_zeros(0, self.out_features))
        self.A_s = nn.Parameter(w.new_zeros(0, self.in_features), requires_grad=False)
        self.B_s = nn.Parameter(w.new_zeros(0, self.out_features), requires_grad=False)
        self.register_buffer("trainable", torch.zeros(0, dtype=torch.bool, device=w.device))
        self.register_buffer("shared_trainable", torch.zeros((), dtype=torch.bool, device=w.device))
        self.register_state_dict_post_hook(_save_unmerged)
        self._has_frozen = False
        self._frozen_idx: Optional[Tensor] = None  # int64 [n_frozen], None when every row trains
        self.enabled = True  # False: the forward is the plain base Linear (PEFT's disable_adapter_layers)
        self.merged_route: Optional[tuple[Tensor, Tensor]] = None
        self._unmerged_weight: Optional[Tensor] = None  # W before merge(): unmerge() restores it bit for bit
        self.own_key_pool: Optional[KeyPool] = None
        if key_pool is None and query_dims is not None:
            self.own_key_pool = KeyPool(query_dims, self.config).to(w.device)
            key_pool = self.own_key_pool
        object.__setattr__(self, "_key_pool", key_pool)  # shared pools are not submodules (no duplicate state)
        if key_pool is not None:
            if key_pool.n:
                self._grow_rows(key_pool.n)
            key_pool.attach(self)
        frozen_rows.track(self)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        frozen_rows.track(self)  # deepcopy / pickling bypass __init__

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Optional[LRPConfig] = None, key_pool: Optional[KeyPool] = None,
                    query_dims: Optional[Sequence[int]] = None) -> FusedLRPLinear:
        """Wrap ``linear`` (its weight is shared, not copied, and frozen). Give ``key_pool`` to share a layer's
        keys, or ``query_dims`` to create keys of its own (a standalone routed layer)."""
        return cls(linear, config, key_pool=key_pool, query_dims=query_dims)

    @property
    def key_pool(self) -> Optional[KeyPool]:
        return self._key_pool

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base_layer.bias

    @property
    def n(self) -> int:
        return self.A_m.shape[0]

    @property
    def n_shared(self) -> int:
        return self.A_s.shape[0]

    @property
    def beta_m(self) -> float:
        return self.config.beta_m

    @property
    def beta_s(self) -> float:
        return self.config.beta_s(self.n_shared)

    @property
    def merged(self) -> bool:
        return self.merged_route is not None

    def refuse_if_merged(self, action: str) -> None:
        """Raise when merged: the folded delta was computed from the current rows, so changing them (or loading a
        state) while merged would leave W holding a delta that no longer matches the pool."""
        if self.merged:
            raise RuntimeError(f"cannot {action} a merged FusedLRPLinear: call unmerge() first")

    # ----------------------------------------------------------------------------------------------- pool ops
    def grow(self, n_new: int, **kwargs: Any) -> None:
        """Add ``n_new`` trainable experts (through the key pool when there is one, so all its layers grow)."""
        if self.key_pool is not None:
            self.key_pool.grow(n_new, **kwargs)
            return
        n_new = count_arg(n_new, "n_new")
        self.refuse_if_merged("grow")
        src = source_rows(kwargs.get("copy_from"), n_new, self.n, self.A_m.device)
        if n_new:
            self._grow_rows(n_new, src)

    def freeze(self, rows: Rows = None) -> None:
        """Freeze experts (default all) and the shared ranks."""
        if self.key_pool is not None:
            self.key_pool.freeze(rows)
        else:
            self.refuse_if_merged("freeze")
            self._freeze_rows(row_mask(rows, self.n, self.trainable.device))
        if rows is None:
            self._set_shared_trainable(False)

    def prune(self, keep: Rows) -> None:
        """Keep only the experts in ``keep`` (bool [n] or indices)."""
        if self.key_pool is not None:
            self.key_pool.prune(keep)
        else:
            self.refuse_if_merged("prune")
            self._keep_rows(row_mask(keep, self.n, self.trainable.device, name="keep"))

    @torch.no_grad()
    def add_shared(self, n_s: Optional[int] = None, *, trainable: bool = True) -> None:
        """Create ``n_s`` (default config.n_shared) shared ranks: A ~ N(0, 1/sqrt(d_in)), B = 0."""
        n_s = count_arg(self.config.n_shared if n_s is None else n_s, "n_s")
        self.refuse_if_merged("add shared ranks to")
        if n_s == 0:
            return
        A = self._new_A(n_s)
        self.A_s = nn.Parameter(torch.cat([self.A_s.data, A]))
        self.B_s = nn.Parameter(torch.cat([self.B_s.data, self.B_s.new_zeros(n_s, self.out_features)]))
        self._set_shared_trainable(trainable)

    def _set_shared_trainable(self, trainable: bool) -> None:
        self.A_s.requires_grad_(trainable)
        self.B_s.requires_grad_(trainable)
        self.shared_trainable.fill_(trainable)

    def _new_A(self, n_new: int) -> Tensor:
        std = self.config.init_std or 1.0 / math.sqrt(self.in_features)
        w = self.base_layer.weight
        return torch.randn(n_new, self.in_features, device=w.device, dtype=torch.float32).mul_(std).to(w.dtype)

    @torch.no_grad()
    def _grow_rows(self, n_new: int, src: Optional[Tensor] = None) -> None:
        """Append rows (copies of ``src`` int64 [n_new] when given); the key pool checked the arguments."""
        if src is not None:
            src = src.to(self.A_m.device)
            A, B = self.A_m.data[src].clone(), self.B_m.data[src].clone()
        else:
            A, B = self._new_A(n_new), self.B_m.new_zeros(n_new, self.out_features)
        self.A_m = nn.Parameter(torch.cat([self.A_m.data, A]))
        self.B_m = nn.Parameter(torch.cat([self.B_m.data, B]))
        self.trainable = torch.cat([self.trainable, torch.ones(n_new, dtype=torch.bool, device=self.A_m.device)])
        self._sync_requires_grad()

    @torch.no_grad()
    def _freeze_rows(self, mask: Tensor) -> None:
        self.trainable = self.trainable & ~mask
        self._sync_requires_grad()

    @torch.no_grad()
    def _unfreeze_rows(self, mask: Tensor) -> None:
        self.trainable = self.trainable | mask
        self._sync_requires_grad()

    @torch.no_grad()
    def _keep_rows(self, mask: Tensor) -> None:
        self.A_m = nn.Parameter(self.A_m.data[mask].clone())
        self.B_m = nn.Parameter(self.B_m.data[mask].clone())
        self.trainable = self.trainable[mask]
        self._sync_requires_grad()

    def _sync_requires_grad(self) -> None:
        has = bool(self.trainable.any())
        self.A_m.requires_grad_(has)
        self.B_m.requires_grad_(has)
        frozen = (~self.trainable).nonzero().flatten()
        self._frozen_idx = frozen if frozen.numel() else None
        # a Python flag, not a tensor test in forward: keeps torch.compile free of data-dependent branches
        self._has_frozen = self._frozen_idx is not None

    def frozen_rows(self) -> Iterator[tuple[nn.Parameter, Optional[Tensor]]]:
        """(parameter, frozen row indices or None for all rows), for :mod:`pclr.frozen_rows`."""
        if self._frozen_idx is not None:
            idx = self._frozen_idx.to(self.A_m.device)
            yield self.A_m, idx
            yield self.B_m, idx
        if self.n_shared and not self.A_s.requires_grad:
            yield self.A_s, None
            yield self.B_s, None

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, *, route: Optional[tuple[Tensor, Tensor]] = None,
                sample_of_token: Optional[Tensor] = None) -> Tensor:
        """x: [B, L, d_in], [B, d_in] (one token per sample) or packed [T, d_in] with ``sample_of_token``."""
        if self.merged_route is not None or not self.enabled or (self.n == 0 and self.n_shared == 0):
            return self.base_layer(x)
        if route is None:
            if self.key_pool is None:
                raise RuntimeError("FusedLRPLinear has no key pool: pass route=(idx, val)")
            route = self.key_pool.route()
        idx, val = route
        squeeze = x.dim() == 2 and sample_of_token is None
        if x.dim() == 3 or squeeze:
            idx, val = expand_route(idx, val, x.shape[0])
        xin = x.unsqueeze(1) if squeeze else x
        has_shared = self.n_shared > 0
        y = lrp_linear(
            xin, self.base_layer.weight, self.base_layer.bias, self.A_m, self.B_m, idx, val,
            A_s=self.A_s if has_shared else None, B_s=self.B_s if has_shared else None,
            beta_m=self.beta_m, beta_s=self.beta_s, sample_of_token=sample_of_token,
            trainable=self.trainable if self._has_frozen else None,
            backend=self.config.backend, deterministic=self.config.deterministic,
        )
        return y.squeeze(1) if squeeze else y

    # ----------------------------------------------------------------------------------------------- merge
    def _delta(self, idx: Tensor, val: Tensor) -> Tensor:
        """ΔW [d_out, d_in] of a fixed route: beta_m·Σ_k val_k·B_m[idx_k]ᵀA_m[idx_k] + beta_s·B_sᵀA_s (≥ fp32)."""
        i = idx.long().reshape(-1)
        dt = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        A, B = self.A_m[i].to(dt), self.B_m[i].to(dt)
        delta = self.beta_m * (B.T * val.reshape(-1).to(dt)) @ A
        if self.n_shared:
            delta = delta + self.beta_s * self.B_s.to(dt).T @ self.A_s.to(dt)
        return delta

    def _check_route(self, route: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """idx int [r], val float [r] of ONE route given as idx [r] or [1, r] (val likewise), r in [1, n]."""
        if not isinstance(route, (tuple, list)) or len(route) != 2:
            raise TypeError("route must be a pair (idx, val)")
        idx, val = route
        if not isinstance(idx, Tensor) or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise TypeError(f"route idx must be an integer tensor, got {getattr(idx, 'dtype', type(idx))}")
        if not isinstance(val, Tensor) or not val.dtype.is_floating_point:
            raise TypeError(f"route val must be a floating tensor, got {getattr(val, 'dtype', type(val))}")
        if idx.dim() not in (1, 2) or (idx.dim() == 2 and idx.shape[0] != 1):
            raise ValueError(f"merge folds exactly one route: idx must be [r] or [1, r], got {list(idx.shape)}")
        if val.shape != idx.shape:
            raise ValueError(f"route val must have the shape of idx {list(idx.shape)}, got {list(val.shape)}")
        idx, val = idx.reshape(-1), val.reshape(-1)
        if not 1 <= idx.numel() <= self.n:
            raise ValueError(f"route idx must hold 1 to n={self.n} experts, got {idx.numel()}")
        if int(idx.min()) < 0 or int(idx.max()) >= self.n:
            raise ValueError(f"route idx values must lie in [0, {self.n}), got min {int(idx.min())}, "
                             f"max {int(idx.max())}")
        if not bool(torch.isfinite(val).all()):
            raise ValueError("route val must be finite (a NaN/Inf gate value would poison W)")
        return idx, val

    @torch.no_grad()
    def merge(self, route: tuple[Tensor, Tensor]) -> None:
        """Fold one FIXED route (idx [r] or [1, r], val likewise) into W for single-task serving: the forward is
        then the plain Linear. ``unmerge`` restores W bit for bit (W is kept aside while merged, so merging costs
        one extra copy of W). While merged, ``state_dict()`` holds the unmerged W (a reload never applies the
        delta twice; merge again after loading) and pool operations and loads are refused."""
        self.refuse_if_merged("merge")
        idx, val = self._check_route(route)
        w = self.base_layer.weight
        delta = self._delta(idx, val)
        self._unmerged_weight = w.detach().clone()
        w.copy_((w.to(delta.dtype) + delta).to(w.dtype))
        self.merged_route = (idx.clone(), val.clone())

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("not merged")
        self.base_layer.weight.copy_(self._unmerged_weight)
        self.merged_route = self._unmerged_weight = None

    # ----------------------------------------------------------------------------------------------- state
    def _pool_n_in_state(self, state_dict: dict, prefix: str) -> int:
        """The n the key pool will hold once the current load is done: its stored n for an own pool (a child of
        this layer, in the same state), the n announced by :func:`pclr.inject.check_lrp_state` for a pool that an
        enclosing module loads after this layer, else the pool's current n (a layer loaded on its own)."""
        pool = self.key_pool
        key = f"{prefix}own_key_pool.keys.0"
        if pool is self.own_key_pool and key in state_dict:
            return state_dict[key].shape[0]
        return pool.n if pool.incoming_n is None else pool.incoming_n

    def check_state(self, state_dict: dict, prefix: str = "", pool_n: Optional[int] = None) -> Optional[int]:
        """Check this layer's entries of ``state_dict`` without changing anything; return the stored n (None when
        the state has no pool rows for it). Raises ValueError naming the entry: another width (an adapter for
        another model), inconsistent row counts, an n that differs from the key pool's (``pool_n``: the n the pool
        will hold after this load; default from the pool), or a merged layer."""
        owner = f"FusedLRPLinear({self.in_features} -> {self.out_features})"
        if self.merged and any(k.startswith(prefix) for k in state_dict):
            self.refuse_if_merged("load a state into")
        widths = {"A_m": self.in_features, "B_m": self.out_features}
        n = check_rows(state_dict, prefix, widths, owner)
        check_rows(state_dict, prefix, {"A_s": self.in_features, "B_s": self.out_features}, owner)
        check_vector(state_dict, prefix, "trainable", n, owner)
        if self.key_pool is not None:
            pool_n = self._pool_n_in_state(state_dict, prefix) if pool_n is None else pool_n
            if (self.n if n is None else n) != pool_n:
                raise ValueError(f"cannot load {owner}: the layer would hold {self.n if n is None else n} experts "
                                 f"({prefix}A_m) but its key pool {pool_n}; load the pool and its layers together")
        return n

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], *args: Any, **kwargs: Any) -> None:
        self.check_state(state_dict, prefix)
        resize_from_state(self, state_dict, prefix, ("A_m", "B_m", "A_s", "B_s", "trainable"))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs)
        key = prefix + "shared_trainable"
        if key in state_dict:
            self._set_shared_trainable(bool(self.shared_trainable))
        elif key in missing_keys:  # saved before the flag existed: keep the current setting
            missing_keys.remove(key)
        self._sync_requires_grad()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, n={self.n} "
                f"({int(self.trainable.sum())} trainable), n_shared={self.n_shared}, r={self.config.r}, "
                f"alpha={self.config.alpha}, merged={self.merged}")


def _save_unmerged(module: FusedLRPLinear, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """A merged layer saves the W it had before merge(), so the state never carries the delta twice, and the
    shared ranks' trainability as it is now (a user may have toggled requires_grad directly)."""
    if module._unmerged_weight is not None and prefix + "base_layer.weight" in state_dict:
        state_dict[prefix + "base_layer.weight"] = module._unmerged_weight.clone()
    key = prefix + "shared_trainable"
    if key in state_dict:
        state_dict[key] = torch.tensor(module.A_s.requires_grad, device=module.shared_trainable.device)
