"""Benchmarks of the LRP layer against what users would otherwise write (``pclr bench`` / ``python -m benchmarks.run``).

Every provider runs on identical inputs in one process, so the only claims are ratios measured side by side:

* ``base``                 x·Wᵀ (+ b) with ``F.linear`` (cuBLAS on GPU): the floor;
* ``pclr-reference``       ``lrp_linear(backend="reference")`` (gathered torch);
* ``pclr-triton-fused`` / ``-epilogue`` / ``-split``  the triton backend, forward variant forced by PCLR_TRITON_FWD
  (``pclr-triton`` in gate mode: the triton gate kernel);
* ``pclr-triton-onepass``  the gate and the LRP in one launch (when the backend exposes it);
* ``pclr-cuda``            the compiled CUDA backend;
* ``paper``                the PCLR authors' formulation: gate scores recomputed in every linear, one route per batch,
  ``torch.matmul((x @ A[:, idx]) * mask, B[idx])``;
* ``dense``                every one of the n experts computed, then multiplied by a dense masked gate;
* ``peft-lora``            a PEFT LoRA layer with the same active rank R = n_s + r (one adapter, no routing);
* ``punica``               vLLM's multi-LoRA (punica bgmv) kernels on the per-sample gathered adapters, if importable.

Modes: ``gate``, ``fwd``, ``fwdbwd``, ``decode`` (one token per sample), ``layer`` (7 linears of a decoder layer sharing
one gate), ``train`` (tokens/s of a small LLaMA-shaped model with LRP in all linears) and ``serve`` (latency per decoded
token for a batch whose samples route to different experts).

GPU timing uses ``triton.testing.do_bench`` (warm-up, L2 flushed before every repetition, median and p20/p80). On CPU
the run is a smoke test of the code paths: every CPU row is labelled "CPU, not a performance figure".
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CPU_LABEL = "CPU, not a performance figure"
MODES = ("gate", "fwd", "fwdbwd", "decode", "layer", "train", "serve")
COLUMNS = (
    "mode", "provider", "status", "dtype", "d_in", "d_out", "T", "B", "n", "r", "n_s", "R",
    "median_ms", "p20_ms", "p80_ms", "ratio_to_base", "tflops", "pct_peak_tflops", "gbps", "pct_peak_gbps",
    "peak_mem_mb", "tokens_per_s", "note", "label",
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# LLaMA-family FFN widths for the hidden sizes of the sweep (7B: 4096 -> 11008, 13B: 5120 -> 13824).
_FFN = {2048: 5632, 4096: 11008, 5120: 13824}
VISION_DIM = 1024  # CLIP ViT-L penultimate width: the vision part of the query
VISION_WEIGHT = 0.25  # SPEC §1

# ------------------------------------------------------------------------------------------------------ device peaks
# Dense (no sparsity) vendor datasheet peaks: TFLOP/s per dtype and HBM GB/s. Matched by substring of the device
# name, most specific first. fp32 is the non-tensor-core rate (torch keeps TF32 off for matmul by default).
DEVICE_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9, "gbps": 4800.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0, "gbps": 3900.0}),
    ("H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "fp32": 51.2, "gbps": 2000.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9, "gbps": 3350.0}),
    ("A100 80GB PCIe", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5, "gbps": 1935.0}),
    ("A100-SXM4-80GB", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5, "gbps": 2039.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5, "gbps": 1555.0}),
)


def device_peaks(name: str) -> Optional[dict[str, float]]:
    """Datasheet peaks for a device name (``torch.cuda.get_device_name``), or None when unknown (and on CPU)."""
    for key, peaks in DEVICE_PEAKS:
        if key.lower() in name.lower():
            return dict(peaks, matched=key)  # type: ignore[arg-type]
    return None


# ------------------------------------------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class Shape:
    """One benchmark point. T tokens in B samples (T // B each, decode: T == B); R = n_s + r active ranks."""

    mode: str
    dtype: str
    d_in: int
    d_out: int
    T: int
    B: int
    n: int
    r: int
    n_s: int

    @property
    def L(self) -> int:
        return self.T // self.B

    @property
    def R(self) -> int:
        return self.n_s + self.r

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class Preset:
    """A sweep: a centre point and the values each axis takes while the others stay at the centre (``full`` takes the
    cartesian product instead). ``tokens`` pairs are (T, B)."""

    d: Sequence[int]
    tokens: Sequence[tuple[int, int]]
    n: Sequence[int]
    r: Sequence[int]
    n_s: Sequence[int]
    dtypes: Sequence[str]
    decode_B: Sequence[int]
    gate_B: Sequence[int]
    layer_tokens: Sequence[tuple[int, int]]
    product: bool = False
    warmup: int = 25  # GPU: ms of warm-up for do_bench; CPU: calls
    rep: int = 100  # GPU: ms of repetitions for do_bench; CPU: calls
    train: dict = field(default_factory=dict)
    serve: dict = field(default_factory=dict)


_TRAIN_GPU = dict(hidden=2048, layers=4, heads=16, ffn=5632, vocab=32000, seq=1024, batch=8, steps=5, n=256, r=64,
                  n_s=32)
_SERVE_GPU = dict(hidden=2048, layers=4, heads=16, ffn=5632, vocab=32000, prompt=128, steps=16, batch=(1, 8, 64),
                  n=256, r=64, n_s=32)

PRESETS: dict[str, Preset] = {
    # A few seconds on a CPU: exercises every code path, measures nothing.
    "smoke": Preset(d=(64,), tokens=((16, 2), (64, 4)), n=(16,), r=(4,), n_s=(4, 0), dtypes=("fp32",),
                    decode_B=(1, 4), gate_B=(4,), layer_tokens=((16, 2),), warmup=1, rep=3,
                    train=dict(hidden=64, layers=2, heads=4, ffn=128, vocab=256, seq=16, batch=2, steps=2, n=16, r=4,
                               n_s=4),
                    serve=dict(hidden=64, layers=2, heads=4, ffn=128, vocab=256, prompt=8, steps=3, batch=(2,), n=16,
                               r=4, n_s=4)),
    # A few minutes on one H100: the target point (d=4096, T=4096 in 8 samples, n=256, r=64, n_s=32, bf16)
    # and one axis at a time around it.
    "default": Preset(d=(4096, 2048, 5120), tokens=((4096, 8), (128, 8), (1024, 8), (16384, 16)), n=(256, 64, 1024),
                      r=(64, 8, 32), n_s=(32, 0), dtypes=("bf16", "fp16"), decode_B=(1, 8, 64, 256),
                      gate_B=(8, 64, 256), layer_tokens=((4096, 8), (8, 8)), train=_TRAIN_GPU, serve=_SERVE_GPU),
    # Under a few minutes on one H100/H200: the target point only (bf16), the decode sweep and a decoder layer;
    # what benchmarks/gpu_check.sh runs (with --modes gate,fwd,fwdbwd,decode,layer).
    "gpu-check": Preset(d=(4096,), tokens=((4096, 8),), n=(256,), r=(64,), n_s=(32,), dtypes=("bf16",),
                        decode_B=(1, 8, 64), gate_B=(8,), layer_tokens=((4096, 8), (8, 8))),
    # The whole grid of the issue (an hour or more on one GPU; restrict with --modes / --providers).
    "full": Preset(d=(2048, 4096, 5120), tokens=((1, 1), (16, 16), (256, 8), (1024, 8), (4096, 8), (16384, 16)),
                   n=(64, 256, 1024), r=(8, 32, 64), n_s=(0, 32), dtypes=("bf16", "fp16"), decode_B=(1, 8, 32, 64, 128,
                   256), gate_B=(1, 8, 64, 256), layer_tokens=((4096, 8), (1024, 8), (8, 8)), product=True,
                   train=_TRAIN_GPU, serve=_SERVE_GPU),
}


def _axes_points(axes: dict[str, Sequence], product: bool) -> list[dict]:
    """The cartesian product of the axes, or the centre (first values) plus one axis varied at a time."""
    names = list(axes)
    if product:
        return [dict(zip(names, vals)) for vals in itertools.product(*(axes[k] for k in names))]
    centre = {k: axes[k][0] for k in names}
    points = [centre]
    for k in names:
        for v in axes[k][1:]:
            points.append(dict(centre, **{k: v}))
    return points


def sweep_shapes(preset: Preset, modes: Sequence[str], dtypes: Sequence[str]) -> list[Shape]:
    """Every kernel-level benchmark point of ``preset`` for ``modes`` (train/serve are model-level, not listed)."""
    shapes: list[Shape] = []
    for mode in modes:
        if mode in ("fwd", "fwdbwd"):
            axes = dict(d=preset.d, tokens=preset.tokens, n=preset.n, r=preset.r, n_s=preset.n_s, dtype=dtypes)
        elif mode == "decode":
            axes = dict(d=preset.d, tokens=[(b, b) for b in preset.decode_B], n=preset.n, r=preset.r,
                        n_s=preset.n_s[:1], dtype=dtypes)
        elif mode == "gate":
            axes = dict(d=preset.d, tokens=[(b, b) for b in preset.gate_B], n=preset.n, r=preset.r, n_s=(0,),
                        dtype=dtypes[:1])
        elif mode == "layer":
            axes = dict(d=preset.d[:1], tokens=preset.layer_tokens, n=preset.n[:1], r=preset.r[:1],
                        n_s=preset.n_s[:1], dtype=dtypes[:1])
        else:
            continue
        for p in _axes_points(axes, preset.product):
            T, B = p["tokens"]
            B = min(B, T)
            if p["r"] > p["n"]:
                continue
            shapes.append(Shape(mode, p["dtype"], p["d"], p["d"], T - T % B, B, p["n"], p["r"], p["n_s"]))
    return list(dict.fromkeys(shapes))  # the one-axis-at-a-time points repeat the centre


# ------------------------------------------------------------------------------------------------------ timing
@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def _quantiles(times_ms: Sequence[float]) -> Timing:
    t = torch.tensor(list(times_ms), dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return Timing(*q)


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int, rep: int,
            grad_to_none: Optional[Sequence[Tensor]] = None) -> Timing:
    """Median and p20/p80 wall time of ``fn`` in ms.

    CUDA: ``triton.testing.do_bench`` (``warmup``/``rep`` in ms; it zeroes a buffer larger than L2 before every call,
    so each repetition starts with a cold cache, as a layer inside a model does), CUDA events if triton is missing.
    CPU: ``warmup`` + ``rep`` calls timed with ``perf_counter``.
    """
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            return _cuda_events_bench(fn, warmup, rep, grad_to_none)
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
    return _quantiles(times)


def _cuda_events_bench(fn: Callable[[], Any], warmup_ms: int, rep_ms: int,
                       grad_to_none: Optional[Sequence[Tensor]]) -> Timing:
    """CUDA-event timing with an L2 flush before each call (used when triton is not installed)."""
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
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
    return _quantiles(times)


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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def env_vars(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of a provider's build and timing, then restore them."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------------------------------ inputs
@dataclass
class Problem:
    """Identical inputs for every provider at one shape; each layer of ``mode == "layer"`` gets its own weights."""

    shape: Shape
    x: Tensor  # [B, L, d_in]
    query: tuple[Tensor, Tensor]  # text [B, d_in], vision [B, d_v] (fp32)
    keys: tuple[Tensor, Tensor]  # [n, d_in], [n, d_v] (fp32)
    idx: Tensor  # int32 [B, r], per-sample route (samples route to different experts)
    val: Tensor  # fp32 [B, r]
    layers: list[dict[str, Any]]  # per linear: weight, bias, A_m, B_m, A_s, B_s, d_in, d_out
    beta_m: float
    beta_s: float


def _layer_dims(shape: Shape) -> list[tuple[int, int]]:
    """(d_in, d_out) of each linear: one for kernel modes, LLaMA's 7 for ``layer``."""
    if shape.mode != "layer":
        return [(shape.d_in, shape.d_out)]
    d = shape.d_in
    ffn = _FFN.get(d, 256 * math.ceil(8 * d / 3 / 256))
    return [(d, d)] * 4 + [(d, ffn), (d, ffn), (ffn, d)]


def make_problem(shape: Shape, device: torch.device, seed: int = 0) -> Problem:
    """Random inputs; B_m is non-zero (a trained pool), every sample's query is different (mixed tasks)."""
    g = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: a 5120x13824 weight is instant
    dt = shape.torch_dtype

    def rnd(*size: int, scale: float = 1.0, dtype: torch.dtype = dt) -> Tensor:
        return (torch.randn(*size, generator=g, device=device) * scale).to(dtype)

    d_v = min(VISION_DIM, shape.d_in)
    query = (rnd(shape.B, shape.d_in, dtype=torch.float32), rnd(shape.B, d_v, dtype=torch.float32))
    keys = (rnd(shape.n, shape.d_in, dtype=torch.float32), rnd(shape.n, d_v, dtype=torch.float32))
    from pclr.backends.reference import gate_scores

    score = gate_scores(query, keys, (1.0, VISION_WEIGHT))
    idx = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, : shape.r].to(torch.int32).contiguous()
    val = torch.ones(shape.B, shape.r, dtype=torch.float32, device=device)
    layers = []
    for d_in, d_out in _layer_dims(shape):
        s = 1.0 / math.sqrt(d_in)
        layers.append(dict(
            d_in=d_in, d_out=d_out, weight=rnd(d_out, d_in, scale=s), bias=None,  # LLaMA linears have no bias
            A_m=rnd(shape.n, d_in, scale=s), B_m=rnd(shape.n, d_out, scale=0.01),
            A_s=rnd(shape.n_s, d_in, scale=s) if shape.n_s else None,
            B_s=rnd(shape.n_s, d_out, scale=0.01) if shape.n_s else None,
        ))
    x = rnd(shape.B, shape.L, layers[0]["d_in"])
    alpha = 128.0
    return Problem(shape, x, query, keys, idx, val, layers, alpha / shape.r, alpha / shape.n_s if shape.n_s else 0.0)


# ------------------------------------------------------------------------------------------------------ cost model
def ideal_cost(shape: Shape, provider: str) -> tuple[float, float]:
    """(useful FLOPs, ideal bytes moved) of the operation the provider computes, the same for every LRP provider so
    TFLOP/s compare the work that had to be done, not the work a formulation chose to do. ``base`` counts x·Wᵀ only."""
    es = torch.finfo(shape.torch_dtype).bits // 8
    d_q = shape.d_in + min(VISION_DIM, shape.d_in)
    gate_f, gate_b = 2.0 * shape.B * shape.n * d_q, 4.0 * (shape.B + shape.n) * d_q + 8.0 * shape.B * shape.r
    if shape.mode == "gate":
        return gate_f, gate_b
    R = 0 if provider == "base" else shape.R
    rows = 0 if provider == "base" else (R if provider == "peft-lora" else shape.n_s + min(shape.n, shape.B * shape.r))
    T = shape.T
    flops = bytes_ = 0.0
    for d_in, d_out in _layer_dims(shape):
        base_f, lrp_f = 2.0 * T * d_in * d_out, 2.0 * T * R * (d_in + d_out)
        fwd_b = es * (T * d_in + d_in * d_out + T * d_out + rows * (d_in + d_out))
        if shape.mode == "fwdbwd":
            # bwd: dX = dY·W (+ dS·A_eff), dS = dY·B_effᵀ, dA, dB: one more base GEMM, two more LRP-sized products
            flops += 2 * base_f + 3 * lrp_f
            bytes_ += fwd_b + es * (T * d_out + d_in * d_out + 2 * T * d_in + 2 * rows * (d_in + d_out))
        else:
            flops += base_f + lrp_f
            bytes_ += fwd_b
    if shape.mode == "layer" and provider != "base":
        flops, bytes_ = flops + gate_f, bytes_ + gate_b
    return flops, bytes_


# ------------------------------------------------------------------------------------------------------ providers
@dataclass
class Built:
    """A provider ready to time: ``fn`` runs one call; ``grads`` are reset between fwd+bwd repetitions."""

    fn: Callable[[], Any]
    grads: list[Tensor] = field(default_factory=list)


class Skip(Exception):
    """A provider cannot run here; the message is the stated reason."""


def _linear_inputs(p: Problem, layer: dict):
    from pclr.dispatch import LinearInputs

    x2 = p.x.reshape(-1, layer["d_in"]) if layer["d_in"] == p.x.shape[-1] else torch.empty(
        p.shape.T, layer["d_in"], dtype=p.x.dtype, device=p.x.device)
    sot = torch.arange(p.shape.B, device=p.x.device, dtype=torch.int32).repeat_interleave(p.shape.L)
    return LinearInputs(x=x2, weight=layer["weight"], bias=layer["bias"], A_m=layer["A_m"], B_m=layer["B_m"],
                        idx=p.idx, val=p.val, A_s=layer["A_s"], B_s=layer["B_s"], beta_m=p.beta_m, beta_s=p.beta_s,
                        sample_of_token=sot, trainable=None, padded_len=p.shape.L)


def _gate_inputs(p: Problem):
    from pclr.dispatch import GateInputs

    return GateInputs(query=p.query, keys=p.keys, weights=(1.0, VISION_WEIGHT), r=p.shape.r, candidates=None,
                      scope="sample", mode="hard")


def _require_backend(name: str, p: Problem, interpreter: bool) -> None:
    """Raise Skip with the backend's own reasons (or the CPU policy) when ``name`` cannot run ``p``."""
    from pclr import dispatch

    op, inputs = ("lrp_gate", _gate_inputs(p)) if p.shape.mode == "gate" else ("lrp_linear", _linear_inputs(p, p.layers[0]))
    why = dispatch.reasons(name, op, inputs)
    if why:
        raise Skip("; ".join(why))
    if p.x.device.type != "cuda" and name != "reference" and not interpreter:
        raise Skip(f"{name} on CPU would run through the Triton interpreter (a debugging tool): pass --interpreter "
                   "to include it")


def _make_fn(p: Problem, forward: Callable[[Tensor], Tensor], grads: list[Tensor], x: Tensor) -> Built:
    if p.shape.mode != "fwdbwd":
        def run() -> Any:
            with torch.no_grad():
                return forward(x)
        return Built(run)
    dy = torch.randn(*x.shape[:-1], p.layers[-1]["d_out"], dtype=x.dtype, device=x.device)

    def run_bwd() -> Any:
        forward(x).backward(dy)
    return Built(run_bwd, grads)


def build_base(p: Problem, opts: dict) -> Built:
    if p.shape.mode == "gate":
        raise Skip("no gate: the base Linear is the floor of the linear modes only")
    x = p.x.detach().requires_grad_(p.shape.mode == "fwdbwd")
    forward = _layer_chain(p, lambda inp, layer, _: F.linear(inp, layer["weight"], layer["bias"]), lambda: None)
    return _make_fn(p, forward, [x] if p.shape.mode == "fwdbwd" else [], x)


def _layer_chain(p: Problem, linear: Callable[[Tensor, dict, Any], Tensor], route: Callable[[], Any]) -> Callable:
    """Apply each linear of the problem in a decoder layer's data flow: q/k/v/gate/up read the hidden state x,
    o_proj reads v_proj's output (attention left out) and down_proj reads up_proj's. One linear: y = linear(x)."""
    def forward(x: Tensor) -> Tensor:
        r = route()
        y = x
        for i, layer in enumerate(p.layers):
            y = linear(y if LAYER_LINEARS[i] in ("o_proj", "down_proj") else x, layer, r)
        return y
    return forward


ONE_PASS_SIGNATURE = ("lrp_linear_one_pass(x, weight, bias, A_m, B_m, query, keys, r, *, weights, A_s, B_s, beta_m, "
                      "beta_s) in pclr.backends.triton, or pclr.functional.lrp_gate_linear (same arguments)")


def _one_pass_entry(backend: str) -> Callable[..., Tensor]:
    """The one-launch gate + LRP function of a backend, or Skip naming the entry point this benchmark looks for."""
    import functools
    import importlib

    fn = getattr(importlib.import_module(f"pclr.backends.{backend}"), "lrp_linear_one_pass", None)
    if fn is not None:
        return fn
    import pclr.functional as functional

    fn = getattr(functional, "lrp_gate_linear", None)
    if fn is not None:
        return functools.partial(fn, backend=backend)
    raise Skip(f"the {backend} backend exposes no one-pass gate+LRP entry point; looked for {ONE_PASS_SIGNATURE}")


def _pclr_builder(backend: str, env: Optional[dict[str, str]] = None, onepass: bool = False) -> Callable:
    def build(p: Problem, opts: dict) -> Built:
        _require_backend(backend, p, opts.get("interpreter", False))
        from pclr.functional import lrp_gate, lrp_linear

        if p.shape.mode == "gate":
            return Built(lambda: lrp_gate(p.query, p.keys, p.shape.r, weights=(1.0, VISION_WEIGHT), backend=backend))
        if onepass:
            one = _one_pass_entry(backend)
        fwdbwd = p.shape.mode == "fwdbwd"
        grads: list[Tensor] = []
        x = p.x.detach().requires_grad_(fwdbwd)
        params = []
        for layer in p.layers:
            A_m, B_m = (t.detach().requires_grad_(fwdbwd) for t in (layer["A_m"], layer["B_m"]))
            params.append(dict(layer, A_m=A_m, B_m=B_m))
            grads += [A_m, B_m] if fwdbwd else []
        q = replace(p, layers=params)

        def linear(inp: Tensor, layer: dict, route: Any) -> Tensor:
            if onepass:
                return one(inp, layer["weight"], layer["bias"], layer["A_m"], layer["B_m"], p.query, p.keys,
                           p.shape.r, weights=(1.0, VISION_WEIGHT), A_s=layer["A_s"], B_s=layer["B_s"],
                           beta_m=p.beta_m, beta_s=p.beta_s)
            idx, val = route
            return lrp_linear(inp, layer["weight"], layer["bias"], layer["A_m"], layer["B_m"], idx, val,
                              A_s=layer["A_s"], B_s=layer["B_s"], beta_m=p.beta_m, beta_s=p.beta_s, backend=backend)

        if p.shape.mode == "layer" and not onepass:
            # one gate per decoder layer, shared by its 7 linears: the amortisation this mode shows
            def route() -> Any:
                return lrp_gate(p.query, p.keys, p.shape.r, weights=(1.0, VISION_WEIGHT), backend=backend)
        else:
            def route() -> Any:
                return p.idx, p.val
        return _make_fn(q, _layer_chain(q, linear, route), ([x] if fwdbwd else []) + grads, x)
    build.env = env or {}  # type: ignore[attr-defined]
    return build


def paper_gate(query: Sequence[Tensor], keys: Sequence[Tensor], r: int) -> tuple[Tensor, Tensor]:
    """The authors' gate: cosine of every sample's query with every key (vision part weighted 0.25), summed over the
    batch, top-r; a hard mask. Returns one route for the whole batch: idx int64 [r], mask [r]."""
    sim = 0
    for part, (q, k) in enumerate(zip(query, keys)):
        sim = sim + (1.0 if part == 0 else VISION_WEIGHT) * (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).t())
    idx = sim.sum(0).topk(r).indices
    mask = torch.ones(r, device=idx.device)
    return idx, mask


def paper_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, A_s: Optional[Tensor],
                 B_s: Optional[Tensor], query: Sequence[Tensor], keys: Sequence[Tensor], r: int, beta_m: float,
                 beta_s: float) -> Tensor:
    """The PCLR authors' formulation, as their code writes it. A is stored [d_in, n] (column j = expert j), B [n, d_out];
    the gate scores are recomputed in every linear and route the whole batch as one task."""
    idx, mask = paper_gate(query, keys, r)
    result = F.linear(x, weight, bias)
    result = result + torch.matmul((x @ A[:, idx]) * mask.to(x.dtype), B[idx]) * beta_m
    if A_s is not None:
        result = result + (x @ A_s) @ B_s * beta_s
    return result


def build_paper(p: Problem, opts: dict) -> Built:
    if p.shape.mode == "gate":
        return Built(lambda: paper_gate(p.query, p.keys, p.shape.r))
    fwdbwd = p.shape.mode == "fwdbwd"
    x = p.x.detach().requires_grad_(fwdbwd)
    grads: list[Tensor] = [x] if fwdbwd else []
    params = []
    for layer in p.layers:  # the authors' layout, converted once outside the timed region
        A = layer["A_m"].t().contiguous().requires_grad_(fwdbwd)
        B = layer["B_m"].detach().clone().requires_grad_(fwdbwd)
        A_s = None if layer["A_s"] is None else layer["A_s"].t().contiguous()
        params.append(dict(layer, A=A, B=B, A_s_cols=A_s))
        grads += [A, B] if fwdbwd else []

    def linear(inp: Tensor, layer: dict, route: Any) -> Tensor:
        return paper_linear(inp, layer["weight"], layer["bias"], layer["A"], layer["B"], layer["A_s_cols"],
                            layer["B_s"], p.query, p.keys, p.shape.r, p.beta_m, p.beta_s)
    q = replace(p, layers=params)
    return _make_fn(q, _layer_chain(q, linear, lambda: None), grads, x)


def build_dense(p: Problem, opts: dict) -> Built:
    """All n experts computed for every token, then a dense [B, n] gate zeroes the unchosen ones."""
    n = p.shape.n

    def dense_gate() -> Tensor:
        return torch.zeros(p.shape.B, n, device=p.val.device).scatter_(1, p.idx.long(), p.val) * p.beta_m

    if p.shape.mode == "gate":
        def gate_only() -> Tensor:
            from pclr.backends.reference import gate_scores
            s = gate_scores(p.query, p.keys, (1.0, VISION_WEIGHT))
            idx = s.topk(p.shape.r, dim=-1).indices
            return torch.zeros_like(s).scatter_(1, idx, 1.0)
        return Built(gate_only)
    fwdbwd = p.shape.mode == "fwdbwd"
    x = p.x.detach().requires_grad_(fwdbwd)
    grads: list[Tensor] = [x] if fwdbwd else []
    params = []
    for layer in p.layers:
        A_m, B_m = (t.detach().clone().requires_grad_(fwdbwd) for t in (layer["A_m"], layer["B_m"]))
        params.append(dict(layer, A_m=A_m, B_m=B_m))
        grads += [A_m, B_m] if fwdbwd else []

    def linear(inp: Tensor, layer: dict, g: Tensor) -> Tensor:
        y = F.linear(inp, layer["weight"], layer["bias"])
        s = (inp @ layer["A_m"].t()) * g.to(inp.dtype).unsqueeze(1)  # [B, L, n]: n-wide, mostly zeros
        y = y + s @ layer["B_m"]
        if layer["A_s"] is not None:
            y = y + (inp @ layer["A_s"].t()) @ layer["B_s"] * p.beta_s
        return y
    q = replace(p, layers=params)
    return _make_fn(q, _layer_chain(q, linear, dense_gate), grads, x)


def _peft_linear(weight: Tensor, bias: Optional[Tensor], R: int, alpha: float) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                                 dtype=weight.dtype)

        def forward(self, x: Tensor) -> Tensor:
            return self.lin(x)

    m = One()
    with torch.no_grad():
        m.lin.weight.copy_(weight)
    m.requires_grad_(False)
    m = inject_adapter_in_model(LoraConfig(r=R, lora_alpha=alpha, lora_dropout=0.0, target_modules=["lin"]), m)
    with torch.no_grad():  # PEFT starts B at zero; a trained adapter is not zero
        for name, t in m.named_parameters():
            if "lora_B" in name:
                t.normal_(0, 0.01)
    return m.to(weight.dtype)


def build_peft(p: Problem, opts: dict) -> Built:
    if p.shape.mode == "gate":
        raise Skip("PEFT LoRA has no gate")
    try:
        import peft  # noqa: F401
    except ImportError as exc:
        raise Skip(f"peft is not installed ({exc})")
    fwdbwd = p.shape.mode == "fwdbwd"
    mods = [_peft_linear(layer["weight"], layer["bias"], p.shape.R, 128.0) for layer in p.layers]
    x = p.x.detach().requires_grad_(fwdbwd)
    grads = [x] + [t for m in mods for t in m.parameters() if t.requires_grad] if fwdbwd else []
    q = replace(p, layers=[dict(layer, mod=m) for layer, m in zip(p.layers, mods)])
    return _make_fn(q, _layer_chain(q, lambda inp, layer, _: layer["mod"](inp), lambda: None), grads, x)


def build_punica(p: Problem, opts: dict) -> Built:
    """vLLM's punica bgmv kernels, each sample's gathered rows as its own adapter (decode-style, one token/sample)."""
    if p.shape.mode == "gate":
        raise Skip("punica has no gate")
    if p.shape.mode == "fwdbwd":
        raise Skip("punica kernels are inference-only (no backward)")
    try:
        try:
            from vllm.lora.ops.triton_ops import bgmv_expand, bgmv_shrink  # type: ignore
        except ImportError:
            from vllm.lora.ops.bgmv_expand import bgmv_expand  # type: ignore
            from vllm.lora.ops.bgmv_shrink import bgmv_shrink  # type: ignore
    except Exception as exc:
        raise Skip(f"vLLM punica (bgmv) kernels not importable: {type(exc).__name__}: {exc}")
    if p.x.device.type != "cuda":
        raise Skip("punica kernels need a CUDA device")
    lora_idx = torch.arange(p.shape.B, device=p.x.device).repeat_interleave(p.shape.L)

    def linear(inp: Tensor, layer: dict, route: Any) -> Tensor:
        idx = p.idx.long()
        A_eff = layer["A_m"][idx]  # [B, r, d_in]: the routing changes per batch, so the gather is part of the work
        B_eff = layer["B_m"][idx]
        if layer["A_s"] is not None:
            A_eff = torch.cat([layer["A_s"].expand(p.shape.B, -1, -1), A_eff], 1)
            B_eff = torch.cat([layer["B_s"].expand(p.shape.B, -1, -1), B_eff], 1)
        x2 = inp.reshape(-1, inp.shape[-1])
        y = F.linear(x2, layer["weight"], layer["bias"])
        s = torch.zeros(x2.shape[0], A_eff.shape[1], dtype=torch.float32, device=x2.device)
        bgmv_shrink(x2, A_eff.contiguous(), s, lora_idx, p.beta_m)
        bgmv_expand(s.to(x2.dtype), B_eff.transpose(1, 2).contiguous(), y, lora_idx, True)
        return y.reshape(*inp.shape[:-1], -1)
    return _make_fn(p, _layer_chain(p, linear, lambda: None), [], p.x)


PROVIDERS: dict[str, Callable[[Problem, dict], Built]] = {
    "base": build_base,
    "pclr-reference": _pclr_builder("reference"),
    "pclr-triton": _pclr_builder("triton"),  # gate mode: the triton gate kernel
    "pclr-triton-fused": _pclr_builder("triton", {"PCLR_TRITON_FWD": "fused"}),
    "pclr-triton-epilogue": _pclr_builder("triton", {"PCLR_TRITON_FWD": "epilogue"}),
    "pclr-triton-split": _pclr_builder("triton", {"PCLR_TRITON_FWD": "split"}),
    "pclr-triton-onepass": _pclr_builder("triton", onepass=True),
    "pclr-cuda": _pclr_builder("cuda"),
    "paper": build_paper,
    "dense": build_dense,
    "peft-lora": build_peft,
    "punica": build_punica,
}


def provider_env(name: str) -> dict[str, str]:
    """Environment a provider runs under (the triton forward variant); apply with :func:`env_vars`."""
    return dict(getattr(PROVIDERS[name], "env", {}))


def not_applicable(name: str, mode: str) -> Optional[str]:
    """Why a provider has no row in a mode at all (None: it has one, possibly skipped with a reason)."""
    if mode == "gate" and name in ("base", "peft-lora", "punica", "pclr-triton-fused", "pclr-triton-epilogue",
                                   "pclr-triton-split", "pclr-triton-onepass"):
        return "no gate"
    if mode != "gate" and name == "pclr-triton":
        return "the linear modes time the two forward variants separately"
    if name == "pclr-triton-onepass" and mode not in ("decode", "layer", "fwd"):
        return "one-pass is an inference path"
    return None


def _row(shape: Shape, provider: str, status: str, label: str, note: str = "", timing: Optional[Timing] = None,
         mem: Optional[float] = None, peaks: Optional[dict] = None) -> dict:
    row = {c: "" for c in COLUMNS}
    row.update(mode=shape.mode, provider=provider, status=status, dtype=shape.dtype, d_in=shape.d_in,
               d_out=shape.d_out, T=shape.T, B=shape.B, n=shape.n, r=shape.r, n_s=shape.n_s,
               R=0 if provider == "base" else shape.R, note=note, label=label)
    if timing is not None:
        row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms)
        flops, bytes_ = ideal_cost(shape, provider)
        sec = timing.median_ms / 1e3
        row["tflops"] = flops / sec / 1e12
        row["gbps"] = bytes_ / sec / 1e9
        row["tokens_per_s"] = shape.T / sec if shape.mode != "gate" else ""
        if peaks:
            pk = peaks.get("fp32" if shape.mode == "gate" else shape.dtype)
            if pk:
                row["pct_peak_tflops"] = 100 * row["tflops"] / pk
            row["pct_peak_gbps"] = 100 * row["gbps"] / peaks["gbps"]
    if mem is not None:
        row["peak_mem_mb"] = mem
    return row


def run_kernel_point(shape: Shape, providers: Sequence[str], device: torch.device, preset: Preset, opts: dict,
                     label: str, peaks: Optional[dict]) -> list[dict]:
    """Time every provider at one shape on the same inputs; ratio_to_base filled from the base row."""
    p = make_problem(shape, device)
    rows = []
    for name in providers:
        if not_applicable(name, shape.mode):
            continue
        builder, built = PROVIDERS[name], None
        try:
            with env_vars(provider_env(name)):
                built = builder(p, opts)
                built.fn()  # compile/autotune outside the timing; a failure here is the provider's error
                _synchronize(device)
                for t_ in built.grads:
                    t_.grad = None  # so the peak counts the gradients this call allocates
                mem = peak_memory_mb(built.fn, device)
                t = time_fn(built.fn, device, preset.warmup, preset.rep, built.grads)
            rows.append(_row(shape, name, "ok", label, timing=t, mem=mem, peaks=peaks))
        except Skip as exc:
            rows.append(_row(shape, name, "skipped", label, note=str(exc)))
        except torch.cuda.OutOfMemoryError as exc:
            rows.append(_row(shape, name, "oom", label, note=str(exc).splitlines()[0][:200]))
        except Exception as exc:  # one broken provider must not end the sweep; its row says what happened
            rows.append(_row(shape, name, "error", label, note=f"{type(exc).__name__}: {exc}"[:300]))
        finally:
            for t_ in built.grads if built is not None else []:
                t_.grad = None  # free the gradients before the next provider allocates
            built = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    base = next((r for r in rows if r["provider"] == "base" and r["status"] == "ok"), None)
    for r in rows:
        if base is not None and r["status"] == "ok":
            r["ratio_to_base"] = r["median_ms"] / base["median_ms"]
    return rows


# ------------------------------------------------------------------------------------------------------ models
MODEL_PROVIDERS = ("base", "peft-lora", "paper", "pclr-reference", "pclr-triton", "pclr-cuda")


class PaperLRPLinear(nn.Module):
    """The authors' LRP linear inside a model: A [d_in, n], B [n, d_out], the layer's keys shared by reference, and the
    gate recomputed from the current routing query in every forward (see :func:`paper_linear`)."""

    def __init__(self, base: nn.Linear, keys: list[Tensor], n: int, r: int, n_s: int, alpha: float = 128.0):
        super().__init__()
        w = base.weight
        self.base, self.keys, self.r = base, keys, r
        self.A = nn.Parameter(torch.randn(base.in_features, n, device=w.device, dtype=w.dtype) / base.in_features**.5)
        self.B = nn.Parameter(torch.zeros(n, base.out_features, device=w.device, dtype=w.dtype))
        self.register_buffer("A_s", torch.randn(base.in_features, n_s, device=w.device, dtype=w.dtype) / 64)
        self.register_buffer("B_s", torch.zeros(n_s, base.out_features, device=w.device, dtype=w.dtype))
        self.beta_m, self.beta_s = alpha / r, (alpha / n_s if n_s else 0.0)

    def forward(self, x: Tensor) -> Tensor:
        from pclr.routing import current_routing

        q = current_routing().query
        return paper_linear(x, self.base.weight, self.base.bias, self.A, self.B, self.A_s if self.A_s.numel() else None,
                            self.B_s, q, self.keys, self.r, self.beta_m, self.beta_s)


def _tiny_llama(cfg: dict, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A randomly initialised LLaMA-shaped causal LM (no weights are downloaded), frozen."""
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(hidden_size=cfg["hidden"], intermediate_size=cfg["ffn"], num_hidden_layers=cfg["layers"],
                       num_attention_heads=cfg["heads"], num_key_value_heads=cfg["heads"], vocab_size=cfg["vocab"],
                       max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(conf).to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model


def _replace_linears(layer: nn.Module, make: Callable[[str, nn.Linear], nn.Module]) -> None:
    for name, mod in list(layer.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in LAYER_LINEARS and isinstance(mod, nn.Linear):
            parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
            setattr(parent, leaf, make(leaf, mod))


def build_model(provider: str, cfg: dict, device: torch.device, dtype: torch.dtype, interpreter: bool) -> nn.Module:
    """The tiny LLaMA with ``provider``'s adapter in all 7 linears of every decoder layer (one key pool per layer)."""
    if provider in ("pclr-triton", "pclr-cuda"):
        from pclr import dispatch

        why = dispatch.reasons(provider.split("-")[1], "info", None)
        if why:
            raise Skip("; ".join(why))
        if device.type != "cuda" and not interpreter:
            raise Skip(f"{provider} on CPU would run through the Triton interpreter: pass --interpreter")
    model = _tiny_llama(cfg, device, dtype)
    d, n, r, n_s = cfg["hidden"], cfg["n"], cfg["r"], cfg["n_s"]
    if provider == "base":
        model.enable_input_require_grads()  # backward to the inputs only: the floor of any adapter's training
        return model
    if provider == "peft-lora":
        from peft import LoraConfig, get_peft_model

        conf = LoraConfig(r=n_s + r, lora_alpha=128, lora_dropout=0.0, target_modules=list(LAYER_LINEARS))
        with warnings.catch_warnings():  # a transformers deprecation raised inside peft, not ours to fix
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, conf, autocast_adapter_dtype=False)  # same dtype as every other provider
    for layer in model.model.layers:
        if provider == "paper":
            keys = [F.normalize(torch.randn(n, d, device=device), dim=-1)]
            _replace_linears(layer, lambda _, lin: PaperLRPLinear(lin, keys, n, r, n_s))
            continue
        from pclr import FusedLRPLinear, KeyPool, LRPConfig

        lcfg = LRPConfig(r=r, n_shared=n_s, budget=max(n, r), backend=provider.split("-", 1)[1])
        pool = KeyPool((d,), lcfg).to(device)
        made: list[FusedLRPLinear] = []

        def make(_: str, lin: nn.Linear) -> nn.Module:
            made.append(FusedLRPLinear.from_linear(lin, lcfg, key_pool=pool))
            return made[-1]
        _replace_linears(layer, make)
        pool.grow(n)
        for m in made:
            m.add_shared(n_s, trainable=False)
        layer.lrp_key_pool = pool  # keep the pool reachable (it is not a submodule of the linears)
    return model


def _model_row(mode: str, provider: str, cfg: dict, dtype: str, tokens: int, batch: int, status: str, label: str,
               note: str = "", times: Optional[list[float]] = None, mem: Optional[float] = None) -> dict:
    shape = Shape(mode, dtype, cfg["hidden"], cfg["hidden"], tokens, batch, cfg["n"], cfg["r"], cfg["n_s"])
    row = _row(shape, provider, status, label, note=note)
    if provider in ("base",):
        row["R"] = 0
    elif provider == "peft-lora":
        row["R"] = cfg["n_s"] + cfg["r"]
    if times:
        t = _quantiles(times)
        row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, tokens_per_s=tokens / (t.median_ms / 1e3))
    if mem is not None:
        row["peak_mem_mb"] = mem
    return row


def _timed_steps(step: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> tuple[list[float], Optional[float]]:
    """Per-step wall times in ms (synchronised) and the peak memory allocated during them (CUDA, MiB, total)."""
    for _ in range(warmup):
        step()
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return times, mem


def _run_model_provider(mode: str, provider: str, cfg: dict, device: torch.device, dtype: str, label: str,
                        opts: dict, rows: list[dict], run: Callable[[nn.Module], list[dict]]) -> None:
    """Build the model for ``provider`` and append ``run``'s rows, or one skipped/error row saying why not."""
    if mode == "train":
        tokens, batch = cfg["batch"] * cfg["seq"], cfg["batch"]
    else:
        tokens = batch = cfg["batch"][0]
    model = None
    try:
        if mode == "serve" and provider == "paper":
            raise Skip("routes the whole batch as one task: a mixed-task batch cannot be served per sample")
        with env_vars({"PCLR_TRITON_FWD": "auto"} if provider == "pclr-triton" else {}):
            model = build_model(provider, cfg, device, DTYPES[dtype], opts.get("interpreter", False))
            rows.extend(run(model))
    except Skip as exc:
        rows.append(_model_row(mode, provider, cfg, dtype, tokens, batch, "skipped", label, note=str(exc)))
    except torch.cuda.OutOfMemoryError as exc:
        rows.append(_model_row(mode, provider, cfg, dtype, tokens, batch, "oom", label, note=str(exc).splitlines()[0][:200]))
    except Exception as exc:
        rows.append(_model_row(mode, provider, cfg, dtype, tokens, batch, "error", label, note=f"{type(exc).__name__}: {exc}"[:300]))
    finally:
        model = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_train(cfg: dict, providers: Sequence[str], device: torch.device, dtype: str, label: str, opts: dict) -> list[dict]:
    """Training throughput (tokens/s) of the tiny LLaMA: forward, backward and AdamW step on the trainable tensors."""
    from pclr.routing import routing

    rows: list[dict] = []
    B, L = cfg["batch"], cfg["seq"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(cfg["vocab"], (B, L), generator=g).to(device)
    query = torch.randn(B, cfg["hidden"], generator=g).to(device)  # one query per sample: mixed tasks

    def run(model: nn.Module, provider: str) -> list[dict]:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        model.train()

        def step() -> None:
            with routing(query):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        times, mem = _timed_steps(step, device, 1, cfg["steps"])
        note = {"base": "frozen model, backward to the inputs only (no adapter): the floor",
                "peft-lora": f"one LoRA of rank R = {cfg['n_s'] + cfg['r']} for every sample",
                "paper": "one route per batch, gate recomputed in every linear"}.get(provider, "")
        return [_model_row("train", provider, cfg, dtype, B * L, B, "ok", label, note=note, times=times, mem=mem)]

    for provider in providers:
        _run_model_provider("train", provider, cfg, device, dtype, label, opts, rows, lambda m, p=provider: run(m, p))
    _fill_ratio(rows)
    return rows


def run_serve(cfg: dict, providers: Sequence[str], device: torch.device, dtype: str, label: str, opts: dict) -> list[dict]:
    """Latency per decoded token (one decode step of the whole batch, KV cache on) when every sample routes to its own
    experts; the prompt's route is computed once per request and reused by every new token."""
    from pclr.routing import routing

    rows: list[dict] = []

    def run(model: nn.Module, provider: str) -> list[dict]:
        model.eval()
        out_rows = []
        for B in cfg["batch"]:
            g = torch.Generator().manual_seed(B)
            ids = torch.randint(cfg["vocab"], (B, cfg["prompt"]), generator=g).to(device)
            query = torch.randn(B, cfg["hidden"], generator=g).to(device)
            with torch.no_grad(), routing(query):
                t0 = time.perf_counter()
                out = model(input_ids=ids, use_cache=True)
                _synchronize(device)
                prefill_ms = (time.perf_counter() - t0) * 1e3
                state = {"pkv": out.past_key_values, "tok": out.logits[:, -1:].argmax(-1)}

                def step() -> None:
                    o = model(input_ids=state["tok"], past_key_values=state["pkv"], use_cache=True)
                    state["pkv"], state["tok"] = o.past_key_values, o.logits[:, -1:].argmax(-1)
                times, mem = _timed_steps(step, device, 1, cfg["steps"])
            note = f"prefill {cfg['prompt']} tokens: {prefill_ms:.3g} ms"
            if provider == "peft-lora":
                note += "; one adapter for every sample (no per-sample routing)"
            out_rows.append(_model_row("serve", provider, cfg, dtype, B, B, "ok", label, note=note, times=times,
                                       mem=mem))
        return out_rows

    for provider in providers:
        _run_model_provider("serve", provider, cfg, device, dtype, label, opts, rows, lambda m, p=provider: run(m, p))
    _fill_ratio(rows)
    return rows


def _fill_ratio(rows: list[dict]) -> None:
    """ratio_to_base for model rows: against the ``base`` row of the same batch size."""
    base = {r["B"]: r["median_ms"] for r in rows if r["provider"] == "base" and r["status"] == "ok"}
    for r in rows:
        if r["status"] == "ok" and r["B"] in base:
            r["ratio_to_base"] = r["median_ms"] / base[r["B"]]


# ------------------------------------------------------------------------------------------------------ outputs
def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    """Folder name for results: e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu``."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def collect_meta(device: torch.device, args: argparse.Namespace, argv: Sequence[str]) -> dict:
    """Everything needed to reproduce and judge a run: device, versions, command line, time."""
    import pclr

    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except Exception:
        pass
    name = device_name(device)
    return {
        "device": name,
        "device_type": device.type,
        "label": CPU_LABEL if device.type != "cuda" else f"GPU: {name}",
        "peaks": device_peaks(name) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "pclr": pclr.__version__,
        "git_commit": commit,
        "python": platform.python_version(),
        "command": " ".join([_program(), *argv]),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "preset": args.preset,
        "modes": list(args.modes),
        "providers": list(args.providers),
        "backends": {k: v for k, v in _backend_reasons().items()},
        "env": {k: os.environ[k] for k in ("PCLR_BACKEND", "PCLR_TRITON_FWD", "TRITON_INTERPRET") if k in os.environ},
    }


def _program() -> str:
    """How this run was started, for the record: ``pclr``, ``python -m benchmarks.run`` or ``python -m pclr.bench``."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return {"run.py": "python -m benchmarks.run", "bench.py": "python -m pclr.bench"}.get(prog, prog or "pclr.bench")


def _backend_reasons() -> dict[str, list[str]]:
    from pclr.dispatch import available_backends

    return available_backends()


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width text table of the rows (skipped rows show their reason)."""
    cols = ("mode", "provider", "dtype", "d_in", "T", "B", "n", "r", "n_s", "median_ms", "p20_ms", "p80_ms",
            "ratio_to_base", "tflops", "gbps", "peak_mem_mb", "tokens_per_s")
    head = {"median_ms": "ms", "p20_ms": "p20", "p80_ms": "p80", "ratio_to_base": "x base", "tflops": "TFLOP/s",
            "gbps": "GB/s", "peak_mem_mb": "mem MiB", "tokens_per_s": "tok/s", "d_in": "d"}
    cells = [[head.get(c, c) for c in cols] + ["status"]]
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['note']}"
        cells.append([_fmt(r[c]) for c in cols] + [status[:90]])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1] for row in cells]
    return "\n".join(lines)


def write_csv(rows: Sequence[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({c: _fmt(r[c], 6) if isinstance(r[c], float) else r[c] for c in COLUMNS})


def write_json(rows: Sequence[dict], meta: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "columns": list(COLUMNS), "rows": list(rows)}, f, indent=1, default=str)


def write_charts(rows: Sequence[dict], out_dir: str, label: str) -> list[str]:
    """One PNG per mode: ratio to the base Linear (or ms where there is no base) against tokens / batch size, one line
    per provider, one panel per configuration; bar charts of tokens/s for train and serve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    ok = [r for r in rows if r["status"] == "ok"]
    for mode in MODES:
        mrows = [r for r in ok if r["mode"] == mode]
        if not mrows:
            continue
        if mode in ("train", "serve"):
            fig, ax = plt.subplots(figsize=(7, 4))
            keys = sorted({(r["provider"], r["B"]) for r in mrows}, key=lambda k: (k[1], k[0]))
            ax.bar([f"{p}\nB={b}" for p, b in keys],
                   [next(r["tokens_per_s"] for r in mrows if (r["provider"], r["B"]) == k) for k in keys])
            ax.set_ylabel("tokens/s")
            ax.tick_params(axis="x", labelsize=7, rotation=45)
        else:
            xkey = "B" if mode in ("decode", "gate") else "T"
            groups: dict[tuple, list[dict]] = {}
            for r in mrows:
                groups.setdefault((r["dtype"], r["d_in"], r["n"], r["r"], r["n_s"]), []).append(r)
            top = sorted(groups.items(), key=lambda kv: -len({r[xkey] for r in kv[1]}))[:6]
            fig, axes = plt.subplots(1, len(top), figsize=(5 * len(top), 4), squeeze=False)
            use_ratio = any(r["ratio_to_base"] != "" for r in mrows)
            for ax, (g, grows) in zip(axes[0], top):
                for prov in dict.fromkeys(r["provider"] for r in grows):
                    pts = sorted((r[xkey], r["ratio_to_base"] if use_ratio else r["median_ms"]) for r in grows
                                 if r["provider"] == prov and (not use_ratio or r["ratio_to_base"] != ""))
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
                ax.set_xscale("log", base=2)
                ax.set_xlabel(xkey)
                ax.set_ylabel("time / base Linear" if use_ratio else "median ms")
                ax.set_title("{} d={} n={} r={} n_s={}".format(*g), fontsize=9)
                ax.grid(alpha=0.3)
            axes[0][0].legend(fontsize=7)
        fig.suptitle(f"pclr bench: {mode} ({label})", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{mode}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------------ CLI
def _csv_list(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``pclr bench`` / ``python -m benchmarks.run``."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="sweep size: smoke (seconds, CPU), default (minutes, GPU), full (the whole grid); "
                             "default: 'default' on a GPU, 'smoke' on CPU")
    parser.add_argument("--modes", type=_csv_list, default=list(MODES), help=f"comma list of {','.join(MODES)}")
    parser.add_argument("--providers", type=_csv_list, default=None,
                        help=f"comma list of {','.join(PROVIDERS)} (train/serve: {','.join(MODEL_PROVIDERS)})")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--dtypes", type=_csv_list, default=None,
                        help="comma list of fp32,bf16,fp16 (default: the preset's on GPU, fp32 on CPU)")
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>)")
    parser.add_argument("--interpreter", action="store_true",
                        help="CPU: also run the triton backend through TRITON_INTERPRET=1 (slow, a correctness "
                             "smoke only)")
    parser.add_argument("--warmup", type=int, default=None, help="GPU: warm-up ms per point; CPU: calls")
    parser.add_argument("--rep", type=int, default=None, help="GPU: measured ms per point; CPU: calls")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG charts")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any provider errors (skips are fine)")
    return parser


def bench_main(args: argparse.Namespace, argv: Optional[Sequence[str]] = None) -> int:
    """Run the sweep of ``args``; print the table; write bench.csv, bench.json and <mode>.png. Returns an exit code."""
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("pclr bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.interpreter and device.type == "cpu":
        # must be set before pclr's triton kernels are first imported (they are imported lazily by dispatch)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    args.preset = args.preset or ("default" if device.type == "cuda" else "smoke")
    preset = PRESETS[args.preset]
    if args.warmup is not None:
        preset = replace(preset, warmup=args.warmup)
    if args.rep is not None:
        preset = replace(preset, rep=args.rep)
    if device.type == "cpu" and args.preset == "smoke" and args.warmup is None:
        preset = replace(preset, warmup=min(preset.warmup, 1), rep=min(preset.rep, 3))
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        print(f"pclr bench: unknown modes {bad}; choose from {MODES}", file=sys.stderr)
        return 2
    known = set(PROVIDERS) | set(MODEL_PROVIDERS)
    if args.providers is None:
        args.providers = list(dict.fromkeys([*PROVIDERS, *MODEL_PROVIDERS]))
    bad = [p for p in args.providers if p not in known]
    if bad:
        print(f"pclr bench: unknown providers {bad}; choose from {sorted(known)}", file=sys.stderr)
        return 2
    dtypes = args.dtypes or (list(preset.dtypes) if device.type == "cuda" else ["fp32"])
    if any(d not in DTYPES for d in dtypes):
        print(f"pclr bench: dtypes must be among {list(DTYPES)}", file=sys.stderr)
        return 2
    out_dir = args.out or os.path.join("benchmarks", "results", device_slug(device))
    os.makedirs(out_dir, exist_ok=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    meta = collect_meta(device, args, argv)
    label, peaks = meta["label"] if device.type != "cuda" else "", meta["peaks"]
    opts = {"interpreter": args.interpreter}
    print(f"pclr bench: {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | CUDA {meta['cuda']} | "
          f"preset {args.preset}" + (f" | {CPU_LABEL}" if device.type != "cuda" else ""))

    rows: list[dict] = []
    kernel_providers = [p for p in args.providers if p in PROVIDERS]
    for shape in sweep_shapes(preset, args.modes, dtypes):
        rows.extend(run_kernel_point(shape, kernel_providers, device, preset, opts, label, peaks))
    model_providers = [p for p in args.providers if p in MODEL_PROVIDERS]
    model_dtype = dtypes[0]
    if "train" in args.modes and model_providers:
        rows.extend(run_train(preset.train, model_providers, device, model_dtype, label, opts))
    if "serve" in args.modes and model_providers:
        rows.extend(run_serve(preset.serve, model_providers, device, model_dtype, label, opts))

    print(format_table(rows))
    write_csv(rows, os.path.join(out_dir, "bench.csv"))
    write_json(rows, meta, os.path.join(out_dir, "bench.json"))
    charts = [] if args.no_plots else write_charts(rows, out_dir, meta["label"])
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "error", "oom")}
    print(f"pclr bench: {counts} rows -> {out_dir} (bench.csv, bench.json{', ' + str(len(charts)) + ' charts' if charts else ''})")
    if device.type != "cuda":
        print(f"pclr bench: every row above is {CPU_LABEL}.")
    return 1 if args.strict and (counts["error"] or counts["oom"]) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m pclr.bench`` / ``python -m benchmarks.run``."""
    parser = add_bench_arguments(argparse.ArgumentParser(prog="pclr bench", description=__doc__.split("\n")[0]))
    argv = list(sys.argv[1:] if argv is None else argv)
    return bench_main(parser.parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
