"""Frozen rows stay bit-identical whatever optimizer holds their Parameter.

A frozen expert's rows get an exact-zero gradient from every backend, but that alone does not keep them fixed:
AdamW's decoupled weight decay (torch's default is 0.01) shrinks every element it is handed, and an optimizer kept
across ``freeze()`` still carries momentum for rows that trained before. So the modules that own rows
(:class:`pclr.KeyPool`, :class:`pclr.FusedLRPLinear`) register here, and two global ``torch.optim`` step hooks copy
the frozen rows of the parameters that the stepping optimizer holds before ``step()`` and write them back after it.
This covers every ``torch.optim.Optimizer`` subclass, including users' own; an optimizer that does not subclass it
(or one that steps flattened copies of the parameters, e.g. ZeRO/FSDP flat buffers) is not covered.

A module reports its frozen rows through ``frozen_rows()``: an iterable of ``(parameter, rows)`` where ``rows`` is an
int64 index tensor of the frozen rows, or None when the whole parameter is frozen.
"""
from __future__ import annotations

import weakref
from typing import Any, Iterable, Optional, Protocol

import torch
from torch import Tensor, nn
from torch.optim.optimizer import Optimizer, register_optimizer_step_post_hook, register_optimizer_step_pre_hook


class HasFrozenRows(Protocol):
    def frozen_rows(self) -> Iterable[tuple[nn.Parameter, Optional[Tensor]]]: ...


_OWNERS: "weakref.WeakSet[Any]" = weakref.WeakSet()
_SAVED: dict[int, list[tuple[nn.Parameter, Optional[Tensor], Tensor]]] = {}
_HOOKS: list = []


def track(module: HasFrozenRows) -> None:
    """Keep ``module``'s frozen rows fixed across every optimizer step from now on (weakly referenced)."""
    if not _HOOKS:
        _HOOKS.append(register_optimizer_step_pre_hook(_save_frozen))
        _HOOKS.append(register_optimizer_step_post_hook(_restore_frozen))
    _OWNERS.add(module)


@torch.no_grad()
def _save_frozen(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    saved = []
    for owner in list(_OWNERS):
        for param, rows in owner.frozen_rows():
            if id(param) in held:
                data = param.detach()
                saved.append((param, rows, data.clone() if rows is None else data.index_select(0, rows)))
    _SAVED[id(optimizer)] = saved


@torch.no_grad()
def _restore_frozen(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    for param, rows, values in _SAVED.pop(id(optimizer), ()):
        data = param.detach()
        if rows is None:
            data.copy_(values)
        else:
            data.index_copy_(0, rows, values)
