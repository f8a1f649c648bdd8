"""The token → sample map of a padded batch, built once per shape.

A padded x [B, L, d] is handed to every backend in the packed layout: T = B·L tokens with ``sample_of_token`` =
[0]·L ++ [1]·L ++ … ++ [B-1]·L. That map depends on (B, L, device) only, so one tensor per shape serves every linear
call of every forward: no op runs to rebuild it, and the caches keyed on the ``sample_of_token`` object (a packed
batch's tile map) keep hitting.
"""
from __future__ import annotations

import torch
from torch import Tensor

_MAX_SHAPES = 16  # distinct (B, L, device) kept; a run that cycles through more rebuilds, never grows memory
_MAPS: dict[tuple[int, int, torch.device], Tensor] = {}


def padded_sample_of_token(num_samples: int, padded_len: int, device: torch.device | str) -> Tensor:
    """int32 [num_samples·padded_len]: token t of the flattened batch belongs to sample t // padded_len.

    The same tensor object for the same (num_samples, padded_len, device); never to be written to. Built fresh and
    not kept while torch.compile traces (a traced tensor must not outlive its graph) or while a CUDA graph is
    being captured (its memory belongs to the graph's pool).
    """
    if num_samples < 0 or padded_len < 0:
        raise ValueError(f"num_samples and padded_len must be >= 0, got {num_samples} and {padded_len}")
    device = torch.device(device)
    if torch.compiler.is_compiling():
        return torch.arange(num_samples, device=device, dtype=torch.int32).repeat_interleave(padded_len)
    key = (num_samples, padded_len, device)
    hit = _MAPS.get(key)
    if hit is not None:
        return hit
    sot = torch.arange(num_samples, device=device, dtype=torch.int32).repeat_interleave(padded_len)
    if not (sot.is_cuda and torch.cuda.is_current_stream_capturing()):
        if len(_MAPS) >= _MAX_SHAPES:
            _MAPS.clear()
        _MAPS[key] = sot
    return sot
