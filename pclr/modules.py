"""``FusedLRPLinear`` (a frozen Linear + a LoRA rank pool) and ``KeyPool`` (the keys of one decoder layer).

A KeyPool owns the pool *size*: its n keys correspond one-to-one with rows of A_m/B_m in every FusedLRPLinear
attached to it, so ``grow``/``prune``/``freeze`` on the pool apply to all of them at once and n never diverges.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pclr.config import LRPConfig
from pclr.functional import lrp_gate, lrp_linear
from pclr.routing import current_routing, expand_route
from pclr.scoring import gate_scores

Rows = Union[Tensor, Sequence[int], None]


def _row_mask(rows: Rows, n: int, device) -> Tensor:
    """bool [n] from None (all rows), a bool mask [n] or a sequence/tensor of indices."""
    if rows is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    t = torch.as_tensor(rows, device=device)
    if t.dtype == torch.bool:
        if t.shape != (n,):
            raise ValueError(f"row mask must be bool [{n}], got shape {tuple(t.shape)}")
        return t
    t = t.long().reshape(-1)
    if t.numel() and (int(t.min()) < -n or int(t.max()) >= n):
        raise ValueError(f"row indices must lie in [0, {n}), got min {int(t.min())}, max {int(t.max())}")
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[t] = True
    return mask


def _resize_from_state(module: nn.Module, state_dict: dict, prefix: str, names: Sequence[str]) -> None:
    """Before loading, give parameters/buffers the shapes found in the state dict (pool size changes over tasks)."""
    for name in names:
        key = prefix + name
        cur = getattr(module, name, None)
        if key not in state_dict or cur is None or state_dict[key].shape == cur.shape:
            continue
        new = torch.empty(state_dict[key].shape, dtype=cur.dtype, device=cur.device)
        if isinstance(cur, nn.Parameter):
            setattr(module, name, nn.Parameter(new, requires_grad=cur.requires_grad))
        else:
            setattr(module, name, new)


class KeyPool(nn.Module):
    """Keys of the experts of one decoder layer, one tensor per query part, and the gate over them.

    Args:
        query_dims: size of each query part, e.g. (d_text, d_vision).
        config: gate settings (r, query_weights, gate_scope, gate_mode, backend).
        n: experts to create at once (random normalised keys).

    Buffers: ``trainable`` bool [n] (rows whose keys learn), ``task_of_expert`` int64 [n] (task that created each).
    """

    def __init__(self, query_dims: Sequence[int], config: Optional[LRPConfig] = None, n: int = 0):
        super().__init__()
        self.config = config or LRPConfig()
        self.query_dims = tuple(int(d) for d in query_dims)
        if len(self.config.query_weights) < len(self.query_dims):
            raise ValueError(f"config.query_weights has {len(self.config.query_weights)} entries for "
                             f"{len(self.query_dims)} query parts")
        self.keys = nn.ParameterList([nn.Parameter(torch.empty(0, d)) for d in self.query_dims])
        self.register_buffer("trainable", torch.zeros(0, dtype=torch.bool))
        self.register_buffer("task_of_expert", torch.zeros(0, dtype=torch.long))
        self.candidates: Optional[Tensor] = None  # bool [n]: experts the gate may choose (None = all)
        self.always: Optional[Tensor] = None  # int64 [k]: experts chosen for every sample (learning new experts)
        self._layers: list = []  # FusedLRPLinear sharing this pool (plain list: deepcopy-safe)
        if n:
            self.grow(n)

    # ----------------------------------------------------------------------------------------------- pool ops
    @property
    def n(self) -> int:
        return self.keys[0].shape[0]

    def attach(self, layer: "FusedLRPLinear") -> None:
        if layer.n != self.n:
            raise ValueError(f"layer has n={layer.n} experts but the key pool has {self.n}")
        if all(layer is not l for l in self._layers):
            self._layers.append(layer)

    @property
    def layers(self) -> list:
        return list(self._layers)

    @torch.no_grad()
    def grow(self, n_new: int, *, keys: Optional[Sequence[Tensor]] = None, copy_from: Optional[Tensor] = None,
             task: int = -1) -> None:
        """Append ``n_new`` trainable experts to the pool and to every attached layer.

        keys: per part, [n_new, d_p] or [d_p] (e.g. the task's mean query); default random, L2-normalised.
        copy_from: int [n_new]: initialise the new A/B rows (and keys, if ``keys`` is None) as copies of these
            existing experts (nearest-similarity init); default A ~ N(0, 1/sqrt(d_in)), B = 0.
        """
        if n_new <= 0:
            return
        new_keys = []
        for p, (param, d) in enumerate(zip(self.keys, self.query_dims)):
            if keys is not None:
                k = torch.as_tensor(keys[p], dtype=param.dtype, device=param.device)
                k = k.expand(n_new, d) if k.dim() == 1 else k
                if k.shape != (n_new, d):
                    raise ValueError(f"keys[{p}] must be [{n_new}, {d}] or [{d}], got {tuple(k.shape)}")
            elif copy_from is not None:
                k = param.data[torch.as_tensor(copy_from, device=param.device).long()]
            else:
                k = torch.randn(n_new, d, dtype=param.dtype, device=param.device)
            new_keys.append(F.normalize(k.float(), dim=-1).to(param.dtype))
        for p, k in enumerate(new_keys):
            self.keys[p] = nn.Parameter(torch.cat([self.keys[p].data, k]), requires_grad=True)
        dev = self.trainable.device
        self.trainable = torch.cat([self.trainable, torch.ones(n_new, dtype=torch.bool, device=dev)])
        self.task_of_expert = torch.cat([self.task_of_expert, torch.full((n_new,), task, device=dev)])
        for layer in self._layers:
            layer._grow_rows(n_new, copy_from)
        self.candidates = self.always = None

    @torch.no_grad()
    def freeze(self, rows: Rows = None) -> None:
        """Freeze experts (all by default): keys and A/B rows stop learning, bit-identical from now on."""
        mask = _row_mask(rows, self.n, self.trainable.device)
        self.trainable = self.trainable & ~mask
        for layer in self._layers:
            layer._freeze_rows(mask)
        self._sync_requires_grad()

    @torch.no_grad()
    def unfreeze(self, rows: Rows = None) -> None:
        mask = _row_mask(rows, self.n, self.trainable.device)
        self.trainable = self.trainable | mask
        for layer in self._layers:
            layer._unfreeze_rows(mask)
        self._sync_requires_grad()

    @torch.no_grad()
    def prune(self, keep: Rows) -> None:
        """Keep only the experts in ``keep`` (bool [n] or indices), in their current order, in pool and layers."""
        mask = _row_mask(keep, self.n, self.trainable.device)
        for p in range(len(self.keys)):
            self.keys[p] = nn.Parameter(self.keys[p].data[mask].clone(), requires_grad=self.keys[p].requires_grad)
        self.trainable = self.trainable[mask]
        self.task_of_expert = self.task_of_expert[mask]
        for layer in self._layers:
            layer._keep_rows(mask)
        self.candidates = self.always = None
        self._sync_requires_grad()

    def _sync_requires_grad(self) -> None:
        has = bool(self.trainable.any())
        for p in self.keys:
            p.requires_grad_(has)

    # ----------------------------------------------------------------------------------------------- gating
    def effective_keys(self) -> tuple[Tensor, ...]:
        """Keys with frozen rows detached, so only trainable keys receive gradient (soft gate, L_qk)."""
        m = self.trainable.unsqueeze(1)
        return tuple(torch.where(m, k, k.detach()) for k in self.keys)

    def set_candidates(self, candidates: Optional[Tensor] = None, always: Optional[Tensor] = None) -> None:
        """Restrict the gate: ``candidates`` bool [n] may be chosen; ``always`` (indices) are chosen for every
        sample, the remaining r - len(always) slots go to the best candidates (SPEC §1, learning phase)."""
        self.candidates = None if candidates is None else _row_mask(candidates, self.n, self.trainable.device)
        self.always = None if always is None else torch.as_tensor(always, device=self.trainable.device).long()

    def gate(self, query: Union[Tensor, Sequence[Tensor]]) -> tuple[Tensor, Tensor]:
        """Route each sample: idx int32 [B, r_eff], val fp32 [B, r_eff] with r_eff = min(r, n)."""
        q = (query,) if isinstance(query, Tensor) else tuple(query)
        if len(q) != len(self.keys):
            raise ValueError(f"query has {len(q)} parts but the key pool has {len(self.keys)} (dims {self.query_dims})")
        cfg, n, B = self.config, self.n, q[0].shape[0]
        r = min(cfg.r, n)
        dev = self.keys[0].device
        if r == 0:
            return torch.zeros(B, 0, dtype=torch.int32, device=dev), torch.zeros(B, 0, device=dev)
        keys, w = self.effective_keys(), cfg.query_weights[: len(self.keys)]
        kw = dict(weights=w, scope=cfg.gate_scope, mode=cfg.gate_mode, backend=cfg.backend)
        if self.always is None or len(self.always) == 0:
            return lrp_gate(q, keys, r, candidates=self.candidates, **kw)
        k_always = min(len(self.always), r)
        forced = self.always[:k_always]
        idx_f = forced.to(torch.int32).unsqueeze(0).expand(B, -1)
        if cfg.gate_mode == "soft":
            val_f = gate_scores(q, tuple(k[forced] for k in keys), w).float()
        else:
            val_f = torch.ones(B, k_always, device=dev)
        if r == k_always:
            return idx_f.contiguous(), val_f
        cand = torch.ones(n, dtype=torch.bool, device=dev) if self.candidates is None else self.candidates.clone()
        cand[forced] = False
        idx_r, val_r = lrp_gate(q, keys, r - k_always, candidates=cand, **kw)
        return torch.cat([idx_f, idx_r], 1).contiguous(), torch.cat([val_f, val_r], 1)

    def route(self) -> tuple[Tensor, Tensor]:
        """The gate of the current ``pclr.routing`` context, computed once per context and reused."""
        state = current_routing()
        if state is None:
            raise RuntimeError("an LRP layer ran without a route: wrap the forward in `with pclr.routing(query):` "
                               "or pass route=(idx, val)")
        key = id(self)
        if key not in state.cache:
            state.cache[key] = self.gate(state.query)
        return state.cache[key]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for p in range(len(self.keys)):
            key = f"{prefix}keys.{p}"
            if key in state_dict and state_dict[key].shape != self.keys[p].shape:
                self.keys[p] = nn.Parameter(torch.empty_like(state_dict[key], device=self.keys[p].device))
        _resize_from_state(self, state_dict, prefix, ("trainable", "task_of_expert"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sync_requires_grad()

    def extra_repr(self) -> str:
        return (f"query_dims={self.query_dims}, n={self.n} ({int(self.trainable.sum())} trainable), r={self.config.r}, "
                f"weights={self.config.query_weights}, scope={self.config.gate_scope}, mode={self.config.gate_mode}")


class FusedLRPLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a LoRA Rank Pool routed per sample (SPEC §1).

    y = x·Wᵀ + b + beta_s·(x·A_sᵀ)·B_s + beta_m·Σ_k val[b,k]·(x·A_m[idx[b,k]]ᵀ)·B_m[idx[b,k]]

    Parameters: ``A_m`` [n, d_in], ``B_m`` [n, d_out] (row j = expert j), ``A_s`` [n_s, d_in], ``B_s`` [n_s, d_out].
    Buffers: ``trainable`` bool [n]. The wrapped Linear is ``base_layer`` (weight shared, frozen, not copied).

    Routing, in order: ``forward(x, route=(idx, val))``; else the ``key_pool``'s gate under ``pclr.routing(query)``.
    """

    def __init__(self, base_layer: nn.Linear, config: Optional[LRPConfig] = None,
                 key_pool: Optional[KeyPool] = None, query_dims: Optional[Sequence[int]] = None):
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
        self._has_frozen = False
        self.merged_route: Optional[tuple[Tensor, Tensor]] = None
        self.own_key_pool: Optional[KeyPool] = None
        if key_pool is None and query_dims is not None:
            self.own_key_pool = KeyPool(query_dims, self.config).to(w.device)
            key_pool = self.own_key_pool
        object.__setattr__(self, "_key_pool", key_pool)  # shared pools are not submodules (no duplicate state)
        if key_pool is not None:
            if key_pool.n:
                self._grow_rows(key_pool.n)
            key_pool.attach(self)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Optional[LRPConfig] = None, key_pool: Optional[KeyPool] = None,
                    query_dims: Optional[Sequence[int]] = None) -> "FusedLRPLinear":
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

    # ----------------------------------------------------------------------------------------------- pool ops
    def grow(self, n_new: int, **kwargs) -> None:
        """Add ``n_new`` trainable experts (through the key pool when there is one, so all its layers grow)."""
        if self.key_pool is not None:
            self.key_pool.grow(n_new, **kwargs)
        else:
            self._grow_rows(n_new, kwargs.get("copy_from"))

    def freeze(self, rows: Rows = None) -> None:
        """Freeze experts (default all) and the shared ranks."""
        if self.key_pool is not None:
            self.key_pool.freeze(rows)
        else:
            self._freeze_rows(_row_mask(rows, self.n, self.trainable.device))
        if rows is None:
            self.A_s.requires_grad_(False)
            self.B_s.requires_grad_(False)

    def prune(self, keep: Rows) -> None:
        """Keep only the experts in ``keep`` (bool [n] or indices)."""
        if self.key_pool is not None:
            self.key_pool.prune(keep)
        else:
            self._keep_rows(_row_mask(keep, self.n, self.trainable.device))

    @torch.no_grad()
    def add_shared(self, n_s: Optional[int] = None, *, trainable: bool = True) -> None:
        """Create ``n_s`` (default config.n_shared) shared ranks: A ~ N(0, 1/sqrt(d_in)), B = 0."""
        n_s = self.config.n_shared if n_s is None else n_s
        if n_s <= 0:
            return
        A = self._new_A(n_s)
        self.A_s = nn.Parameter(torch.cat([self.A_s.data, A]), requires_grad=trainable)
        self.B_s = nn.Parameter(torch.cat([self.B_s.data, self.B_s.new_zeros(n_s, self.out_features)]),
                                requires_grad=trainable)

    def _new_A(self, n_new: int) -> Tensor:
        std = self.config.init_std or 1.0 / math.sqrt(self.in_features)
        w = self.base_layer.weight
        return torch.randn(n_new, self.in_features, device=w.device, dtype=torch.float32).mul_(std).to(w.dtype)

    @torch.no_grad()
    def _grow_rows(self, n_new: int, copy_from: Optional[Tensor] = None) -> None:
        if copy_from is not None:
            src = torch.as_tensor(copy_from, device=self.A_m.device).long()
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
        # a Python flag, not a tensor test in forward: keeps torch.compile free of data-dependent branches
        self._has_frozen = not bool(self.trainable.all())

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, *, route: Optional[tuple[Tensor, Tensor]] = None,
                sample_of_token: Optional[Tensor] = None) -> Tensor:
        """x: [B, L, d_in], [B, d_in] (one token per sample) or packed [T, d_in] with ``sample_of_token``."""
        if self.merged_route is not None or (self.n == 0 and self.n_shared == 0):
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

    @torch.no_grad()
    def merge(self, route: tuple[Tensor, Tensor]) -> None:
        """Fold one FIXED route (idx [r] or [1, r], val likewise) into W for single-task serving: the forward is
        then the plain Linear. ``unmerge`` subtracts it again (exact in fp32/fp64, rounding in half precision)."""
        if self.merged_route is not None:
            raise RuntimeError("already merged: call unmerge() first")
        idx, val = route[0].reshape(-1), route[1].reshape(-1)
        w = self.base_layer.weight
        delta = self._delta(idx, val)
        w.copy_((w.to(delta.dtype) + delta).to(w.dtype))
        self.merged_route = (idx.clone(), val.clone())

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged_route is None:
            raise RuntimeError("not merged")
        w = self.base_layer.weight
        delta = self._delta(*self.merged_route)
        w.copy_((w.to(delta.dtype) - delta).to(w.dtype))
        self.merged_route = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _resize_from_state(self, state_dict, prefix, ("A_m", "B_m", "A_s", "B_s", "trainable"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sync_requires_grad()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, n={self.n} "
                f"({int(self.trainable.sum())} trainable), n_shared={self.n_shared}, r={self.config.r}, "
                f"alpha={self.config.alpha}, merged={self.merged_route is not None}")
