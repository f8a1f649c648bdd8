"""Row bookkeeping shared by :class:`pclr.KeyPool` and :class:`pclr.FusedLRPLinear`: row selections, argument
checks of the pool operations, and state-dict entries checked and resized before a load changes anything."""
from __future__ import annotations

import operator
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

Rows = Union[Tensor, Sequence[int], None]
"""A selection of rows: None (all), a bool mask [n] or a sequence / tensor of indices."""


def row_mask(rows: Rows, n: int, device: Union[torch.device, str, None], name: str = "rows") -> Tensor:
    """bool [n] from None (all rows), a bool mask [n] or a sequence/tensor of indices in [-n, n)."""
    if rows is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    t = torch.as_tensor(rows, device=device)
    if t.dtype == torch.bool:
        if t.shape != (n,):
            raise ValueError(f"{name}: a row mask must be bool [{n}], got shape {tuple(t.shape)}")
        return t
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name}: row indices must be integers, got dtype {t.dtype}")
    t = t.long().reshape(-1)
    if t.numel() and (int(t.min()) < -n or int(t.max()) >= n):
        raise ValueError(f"{name}: row indices must lie in [0, {n}), got min {int(t.min())}, max {int(t.max())}")
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[t] = True
    return mask


def count_arg(value: object, name: str) -> int:
    """``value`` as a non-negative int (Python, NumPy or 0-d tensor integer); a clear error naming ``name``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a non-negative integer, got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a non-negative integer, got {value!r} ({type(value).__name__})") from None
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    return n


def source_rows(copy_from: Rows, n_new: int, n: int, device: Union[torch.device, str, None]) -> Optional[Tensor]:
    """int64 [n_new] indices of the existing rows that new rows copy, or None; checks length and range."""
    if copy_from is None:
        return None
    t = torch.as_tensor(copy_from, device=device)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"copy_from must hold integer row indices, got dtype {t.dtype}")
    t = t.long().reshape(-1)
    if t.numel() != n_new:
        raise ValueError(f"copy_from must name one source row per new expert: n_new={n_new}, got {t.numel()} rows")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
        raise ValueError(f"copy_from: row indices must lie in [0, {n}), got min {int(t.min())}, max {int(t.max())}")
    return t


def stored_shape(state_dict: dict, key: str) -> Optional[tuple[int, ...]]:
    """Shape of ``state_dict[key]``, or None when the key is absent."""
    t = state_dict.get(key)
    return None if t is None else tuple(t.shape)


def check_rows(state_dict: dict, prefix: str, widths: dict[str, int], owner: str) -> Optional[int]:
    """Check that the 2-D entries ``prefix + name`` present in ``state_dict`` are [n, widths[name]] with one common
    n, and return that n (None when none is present). ``owner`` names the module in the error."""
    n = None
    for name, width in widths.items():
        shape = stored_shape(state_dict, prefix + name)
        if shape is None:
            continue
        if len(shape) != 2 or shape[1] != width:
            raise ValueError(f"cannot load {owner}: {prefix + name} has shape {list(shape)}, expected [n, {width}] "
                             f"(the state was saved for a model of another width)")
        if n is not None and shape[0] != n:
            raise ValueError(f"cannot load {owner}: {prefix + name} has {shape[0]} rows, other entries have {n}")
        n = shape[0]
    return n


def check_vector(state_dict: dict, prefix: str, name: str, n: Optional[int], owner: str) -> None:
    """Check that ``prefix + name`` (if present) is a vector of ``n`` entries (any length when n is None)."""
    shape = stored_shape(state_dict, prefix + name)
    if shape is None:
        return
    if len(shape) != 1 or (n is not None and shape[0] != n):
        raise ValueError(f"cannot load {owner}: {prefix + name} has shape {list(shape)}, expected [{n}]")


def resize_from_state(module: nn.Module, state_dict: dict, prefix: str, names: Sequence[str]) -> None:
    """Before loading, give parameters/buffers the shapes found in the state dict (pool size changes over tasks).
    Call only after the state was checked: a resize cannot be undone."""
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
