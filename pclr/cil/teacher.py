"""A frozen teacher that is only a snapshot of the LRP tensors, run through the SAME model by swapping them in.

QKLD (teacher = the pool before compression) and LwF (teacher = the model before the task) need a frozen copy of
the adapted model; the base weights are shared and frozen, so only the LRP tensors are snapshotted (a few MB instead
of a second copy of the LLM)::

    teacher = LRPSnapshot.take(model)
    with torch.no_grad(), teacher.swapped_in(model):
        logits_t = model(**inputs).logits      # the pool as it was when the snapshot was taken
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import Tensor, nn

from pclr.inject import lrp_pools, lrp_state_dict


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = key.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), attr


class LRPSnapshot:
    """Detached clones of every LRP tensor of a model (pool rows, shared ranks, keys, masks)."""

    def __init__(self, state: dict[str, Tensor]):
        self.state = state

    @classmethod
    def take(cls, model: nn.Module) -> "LRPSnapshot":
        return cls(lrp_state_dict(model))

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """Temporarily replace the model's LRP tensors by the snapshot (shapes may differ: pools are looked up by
        their tensors' shapes). Gate restrictions (candidates / always) are lifted meanwhile: the teacher routes
        like inference."""
        saved: list[tuple[dict, str, object]] = []
        pools = list(lrp_pools(model).values())
        restrictions = [(p.candidates, p.always) for p in pools]
        try:
            for key, value in self.state.items():
                mod, attr = _owner(model, key)
                if attr in mod._parameters:
                    saved.append((mod._parameters, attr, mod._parameters[attr]))
                    mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
                elif attr in mod._buffers:
                    saved.append((mod._buffers, attr, mod._buffers[attr]))
                    mod._buffers[attr] = value
                else:
                    raise KeyError(f"snapshot key {key} is neither a parameter nor a buffer of the model")
            for p in pools:
                p.candidates = p.always = None
            yield
        finally:
            for store, attr, old in reversed(saved):
                store[attr] = old
            for p, (c, a) in zip(pools, restrictions):
                p.candidates, p.always = c, a

    def to(self, device) -> "LRPSnapshot":
        return LRPSnapshot({k: v.to(device) for k, v in self.state.items()})
