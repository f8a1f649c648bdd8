"""``KeyPool``: the keys of the experts of one decoder layer, the gate over them, and the pool size.

A KeyPool owns the pool *size*: its n keys correspond one-to-one with rows of A_m/B_m in every FusedLRPLinear
attached to it, so ``grow``/``prune``/``freeze`` on the pool apply to all of them at once and n never diverges.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pclr import frozen_rows
from pclr.config import LRPConfig
from pclr.functional import lrp_gate
from pclr.pool_rows import Rows, check_rows, check_vector, count_arg, resize_from_state, row_mask, source_rows
from pclr.routing import current_routing
from pclr.scoring import gate_scores

if TYPE_CHECKING:  # the layers import this module; the pool only calls their row hooks
    from pclr.modules import FusedLRPLinear


class KeyPool(nn.Module):
    """Keys of the experts of one decoder layer, one tensor per query part, and the gate over them.

    Args:
        query_dims: size of each query part, e.g. (d_text, d_vision).
        config: gate settings (r, query_weights, gate_scope, gate_mode, backend).
        n: experts to create at once (random normalised keys).

    Buffers: ``trainable`` bool [n] (rows whose keys learn), ``task_of_expert`` int64 [n] (task that created each).
    Frozen key rows stay bit-identical under any ``torch.optim`` optimizer (:mod:`pclr.frozen_rows`).
    """

    def __init__(self, query_dims: Sequence[int], config: Optional[LRPConfig] = None, n: int = 0) -> None:
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
        self._frozen_idx: Optional[Tensor] = None  # int64 [n_frozen], None when every row trains
        # n this pool receives in a load under way (set by pclr.inject.check_lrp_state before anything changes):
        # the layers load before their pool, and each sees only its own entries of the state
        self.incoming_n: Optional[int] = None
        frozen_rows.track(self)
        if n:
            self.grow(n)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        frozen_rows.track(self)  # deepcopy / pickling bypass __init__

    # ----------------------------------------------------------------------------------------------- pool ops
    @property
    def n(self) -> int:
        return self.keys[0].shape[0]

    def attach(self, layer: FusedLRPLinear) -> None:
        if layer.n != self.n:
            raise ValueError(f"layer has n={layer.n} experts but the key pool has {self.n}")
        if all(layer is not other for other in self._layers):
            self._layers.append(layer)

    @property
    def layers(self) -> list[FusedLRPLinear]:
        return list(self._layers)

    def _refuse_if_merged(self, action: str) -> None:
        for layer in self._layers:
            layer.refuse_if_merged(action)

    @torch.no_grad()
    def grow(self, n_new: int, *, keys: Optional[Sequence[Tensor]] = None, copy_from: Rows = None,
             task: int = -1) -> None:
        """Append ``n_new`` trainable experts to the pool and to every attached layer.

        keys: per part, [n_new, d_p] or [d_p] (e.g. the task's mean query); default random, L2-normalised.
        copy_from: int [n_new]: initialise the new A/B rows (and keys, if ``keys`` is None) as copies of these
            existing experts (nearest-similarity init); default A ~ N(0, 1/sqrt(d_in)), B = 0.
        """
        n_new = count_arg(n_new, "n_new")
        self._refuse_if_merged("grow")
        src = source_rows(copy_from, n_new, self.n, self.trainable.device)
        if n_new == 0:
            return
        if keys is not None and len(keys) != len(self.keys):
            raise ValueError(f"keys has {len(keys)} parts but the key pool has {len(self.keys)}")
        new_keys = []
        for p, (param, d) in enumerate(zip(self.keys, self.query_dims)):
            if keys is not None:
                k = torch.as_tensor(keys[p], dtype=param.dtype, device=param.device)
                k = k.expand(n_new, d) if k.dim() == 1 else k
                if k.shape != (n_new, d):
                    raise ValueError(f"keys[{p}] must be [{n_new}, {d}] or [{d}], got {tuple(k.shape)}")
            elif src is not None:
                k = param.data[src.to(param.device)]
            else:
                k = torch.randn(n_new, d, dtype=param.dtype, device=param.device)
            new_keys.append(F.normalize(k.float(), dim=-1).to(param.dtype))
        for p, k in enumerate(new_keys):
            self.keys[p] = nn.Parameter(torch.cat([self.keys[p].data, k]), requires_grad=True)
        dev = self.trainable.device
        self.trainable = torch.cat([self.trainable, torch.ones(n_new, dtype=torch.bool, device=dev)])
        self.task_of_expert = torch.cat([self.task_of_expert, torch.full((n_new,), task, device=dev)])
        for layer in self._layers:
            layer._grow_rows(n_new, src)
        self.candidates = self.always = None
        self._sync_requires_grad()

    @torch.no_grad()
    def freeze(self, rows: Rows = None) -> None:
        """Freeze experts (all by default): keys and A/B rows stop learning, bit-identical from now on."""
        self._refuse_if_merged("freeze")
        mask = row_mask(rows, self.n, self.trainable.device)
        self.trainable = self.trainable & ~mask
        for layer in self._layers:
            layer._freeze_rows(mask)
        self._sync_requires_grad()

    @torch.no_grad()
    def unfreeze(self, rows: Rows = None) -> None:
        self._refuse_if_merged("unfreeze")
        mask = row_mask(rows, self.n, self.trainable.device)
        self.trainable = self.trainable | mask
        for layer in self._layers:
            layer._unfreeze_rows(mask)
        self._sync_requires_grad()

    @torch.no_grad()
    def prune(self, keep: Rows) -> None:
        """Keep only the experts in ``keep`` (bool [n] or indices), in their current order, in pool and layers."""
        self._refuse_if_merged("prune")
        mask = row_mask(keep, self.n, self.trainable.device, name="keep")
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
        frozen = (~self.trainable).nonzero().flatten()
        self._frozen_idx = frozen if frozen.numel() else None

    def frozen_rows(self) -> Iterator[tuple[nn.Parameter, Optional[Tensor]]]:
        """(key parameter, int64 frozen row indices) per query part, for :mod:`pclr.frozen_rows`."""
        if self._frozen_idx is not None:
            for p in self.keys:
                yield p, self._frozen_idx.to(p.device)

    # ----------------------------------------------------------------------------------------------- gating
    def effective_keys(self) -> tuple[Tensor, ...]:
        """Keys with frozen rows detached, so only trainable keys receive gradient (soft gate, L_qk)."""
        m = self.trainable.unsqueeze(1)
        return tuple(torch.where(m, k, k.detach()) for k in self.keys)

    def set_candidates(self, candidates: Optional[Tensor] = None, always: Optional[Tensor] = None) -> None:
        """Restrict the gate: ``candidates`` bool [n] may be chosen; ``always`` (indices) are chosen for every
        sample and the remaining r - len(always) slots go to the best candidates, so experts being learnt for a
        new task are trained on every sample of that task."""
        dev = self.trainable.device
        self.candidates = None if candidates is None else row_mask(candidates, self.n, dev, name="candidates")
        self.always = None if always is None else torch.as_tensor(always, device=dev).long()

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

    # ----------------------------------------------------------------------------------------------- state
    def check_state(self, state_dict: dict, prefix: str = "") -> Optional[int]:
        """Check this pool's entries of ``state_dict`` without changing anything; return the stored n (None when
        the state has no keys for it). Raises ValueError naming the entry (e.g. keys saved for other query dims)."""
        parts = len(self.query_dims)
        if f"{prefix}keys.{parts}" in state_dict:
            raise ValueError(f"cannot load the key pool: {prefix}keys.{parts} exists but the pool has {parts} query "
                             f"part(s) (dims {self.query_dims})")
        widths = {f"keys.{p}": d for p, d in enumerate(self.query_dims)}
        n = check_rows(state_dict, prefix, widths, f"the key pool (query dims {self.query_dims})")
        for name in ("trainable", "task_of_expert"):
            check_vector(state_dict, prefix, name, n, "the key pool")
        if n is not None:
            self._refuse_if_merged("load a state into")
        return n

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        n = self.check_state(state_dict, prefix)
        if n is not None:
            stale = [layer for layer in self._layers if layer.n != n]
            if stale:  # layers load before their pool in module order; a pool alone cannot change their size
                raise ValueError(f"cannot load the key pool: it stores n={n} experts but {len(stale)} attached "
                                 f"layer(s) hold {stale[0].n}; load the layers' state together with the pool")
        for p in range(len(self.keys)):
            key = f"{prefix}keys.{p}"
            if key in state_dict and state_dict[key].shape != self.keys[p].shape:
                self.keys[p] = nn.Parameter(torch.empty_like(state_dict[key], device=self.keys[p].device))
        resize_from_state(self, state_dict, prefix, ("trainable", "task_of_expert"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.incoming_n = None
        self._sync_requires_grad()

    def extra_repr(self) -> str:
        return (f"query_dims={self.query_dims}, n={self.n} ({int(self.trainable.sum())} trainable), r={self.config.r}, "
                f"weights={self.config.query_weights}, scope={self.config.gate_scope}, mode={self.config.gate_mode}")
