"""Wall time and peak memory of one call.

GPU: ``triton.testing.do_bench`` (warm-up, a buffer larger than L2 zeroed before every repetition, median and
p20/p80), CUDA events with the same flush when triton is missing. CPU: ``time.perf_counter`` over a few calls; those
numbers are a smoke of the code paths, never a performance figure.
"""
from __future__ import annotations

import importlib
import importlib.util
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

# triton is optional (CUDA events replace its do_bench) and is NOT imported here: importing it fixes TRITON_INTERPRET
# for triton's own @jit library functions, and `--interpreter` sets that variable only after this module is loaded.
HAS_TRITON = importlib.util.find_spec("triton") is not None

L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than the L2 of every GPU in meta.DEVICE_PEAKS


@dataclass
class Timing:
    """Time per call in ms: the median and the 20th / 80th percentiles."""

    median_ms: float
    p20_ms: float
    p80_ms: float


def quantiles(times_ms: Sequence[float]) -> Timing:
    """Median, p20 and p80 of per-call times (ms)."""
    t = torch.tensor(list(times_ms), dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return Timing(*q)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int, rep: int,
            grad_to_none: Optional[Sequence[Tensor]] = None) -> Timing:
    """Median and p20/p80 wall time of ``fn`` in ms.

    CUDA: ``triton.testing.do_bench`` (``warmup``/``rep`` in ms; it zeroes a buffer larger than L2 before every call,
    so each repetition starts with a cold cache, as a layer inside a model does), CUDA events if triton is missing.
    CPU: ``warmup`` + ``rep`` calls timed with ``perf_counter``. ``grad_to_none``: tensors whose ``.grad`` is reset
    before every repetition (a fwd+bwd call must not accumulate into the previous gradient).
    """
    if device.type == "cuda":
        if not HAS_TRITON:
            return _cuda_events_bench(fn, warmup, rep, grad_to_none)
        do_bench = importlib.import_module("triton.testing").do_bench
        q = do_bench(fn, warmup=warmup, rep=rep, grad_to_none=list(grad_to_none or []), quantiles=[0.5, 0.2, 0.8])
        return Timing(*q)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(rep, 1)):
        for t in grad_to_none or []:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return quantiles(times)


def _cuda_events_bench(fn: Callable[[], Any], warmup_ms: int, rep_ms: int,
                       grad_to_none: Optional[Sequence[Tensor]]) -> Timing:
    """CUDA-event timing with an L2 flush before each call (used when triton is not installed)."""
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    times = []
    for _ in range(max(1, int(rep_ms / est))):
        for t in grad_to_none or []:
            t.grad = None
        flush.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return quantiles(times)


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> Optional[float]:
    """Peak memory one call allocates on top of what is already resident (inputs, weights), in MiB. CUDA only."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def timed_steps(step: Callable[[], Any], device: torch.device, warmup: int,
                steps: int) -> tuple[list[float], Optional[float]]:
    """Per-step wall times in ms (synchronised) and the peak memory allocated during them (CUDA, MiB, total)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return times, mem
