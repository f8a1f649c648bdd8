"""Launcher side of the phase barrier of :mod:`pclr.kernels.phases`: the counters and the grid layout.

A phased launch needs two int32 counters (FLAG, DONE) that are zero when it starts; the kernel resets them at its
end, so one zeroed buffer serves every phased launch in turn. It is cached per (device, stream): launches on one
stream run one after another and each finds the counters reset by the previous one, while two launches on two
streams may run at the same time and would count each other's producers on a shared buffer.
"""
from __future__ import annotations

import threading

import torch
from torch import Tensor

_COUNTERS: dict[tuple[str, int, int], Tensor] = {}
_LOCK = threading.Lock()


def _stream_id(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.current_stream(device).cuda_stream)
    return 0  # the CPU interpreter runs launches one at a time


def phase_counters(device: torch.device) -> Tensor:
    """The zeroed int32 [2] (FLAG, DONE) buffer of ``device``'s current stream, created once (no fill per call).

    A buffer first made while a CUDA graph captures (the capture runs on its own stream) comes from the graph's
    memory pool, and the graph records its zero fill; replaying that fill is harmless (the counters are zero then).
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # one buffer per physical device
    key = (device.type, device.index if device.index is not None else -1, _stream_id(device))
    buf = _COUNTERS.get(key)
    if buf is None:
        with _LOCK:
            buf = _COUNTERS.get(key)
            if buf is None:
                buf = torch.zeros(2, dtype=torch.int32, device=device)
                _COUNTERS[key] = buf
    return buf


def phase_grid(producers: int, consumers: int) -> tuple[int]:
    """The 1-D grid of a phased launch: producers on the lowest program ids, then the consumers.

    producers ≥ 1 (a consumer waits for at least one) and consumers ≥ 0; a 1-D grid is what keeps every producer
    ahead of every consumer in the hardware's dispatch order.
    """
    if producers < 1:
        raise ValueError(f"producers must be ≥ 1, got {producers}")
    if consumers < 0:
        raise ValueError(f"consumers must be ≥ 0, got {consumers}")
    if producers + consumers >= 2**31:
        raise ValueError(f"producers + consumers = {producers + consumers} programs exceed the int32 counters")
    return (producers + consumers,)
