"""Benchmark points: the modes, one :class:`Shape` per point, the sweep presets and how a preset expands into points.

Notation: T tokens in B samples (T // B = L each; decode and gate: T == B, one token per sample), d_in / d_out the
linear's sizes, n experts in the pool, r chosen per sample, n_s shared ranks, R = n_s + r active ranks.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

CPU_LABEL = "CPU, not a performance figure"

LINEAR_MODES: tuple[str, ...] = ("fwd", "fwdbwd", "decode", "layer")
"""Modes timed on one call of the LRP linear (or a decoder layer's 7 linears) on random inputs."""
KERNEL_MODES: tuple[str, ...] = ("gate", *LINEAR_MODES)
"""The linear modes and the gate alone."""
MODEL_MODES: tuple[str, ...] = ("train", "serve")
"""Modes timed on a whole (small, randomly initialised) model."""
MODES: tuple[str, ...] = KERNEL_MODES + MODEL_MODES

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYER_LINEARS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# LLaMA-family FFN widths for the hidden sizes of the sweep (7B: 4096 -> 11008, 13B: 5120 -> 13824).
_FFN: dict[int, int] = {2048: 5632, 4096: 11008, 5120: 13824}
VISION_DIM = 1024  # CLIP ViT-L penultimate width: the vision part of the query
VISION_WEIGHT = 0.25  # weight of the vision part of the gate score (the text part weighs 1)
GATE_WEIGHTS: tuple[float, float] = (1.0, VISION_WEIGHT)
ALPHA = 128.0  # LoRA alpha of every adapter: beta_m = alpha / r, beta_s = alpha / n_s


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


def layer_dims(shape: Shape) -> list[tuple[int, int]]:
    """(d_in, d_out) of each linear: one for the kernel modes, LLaMA's 7 (q, k, v, o, gate, up, down) for ``layer``."""
    if shape.mode != "layer":
        return [(shape.d_in, shape.d_out)]
    d = shape.d_in
    ffn = _FFN.get(d, 256 * math.ceil(8 * d / 3 / 256))
    return [(d, d)] * 4 + [(d, ffn), (d, ffn), (ffn, d)]


@dataclass
class Preset:
    """A sweep: a centre point and the values each axis takes while the others stay at the centre (``product`` takes
    the cartesian product instead). ``tokens`` and ``layer_tokens`` pairs are (T, B).

    ``modes``: the modes a run of this preset covers when ``--modes`` is not given. ``train`` / ``serve``: the
    small model of the model-level modes (empty: the preset has none, and those modes cannot be asked for).
    """

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
    train: dict[str, Any] = field(default_factory=dict)
    serve: dict[str, Any] = field(default_factory=dict)
    modes: Sequence[str] = MODES
    summary: str = ""

    def model_config(self, mode: str) -> Optional[dict[str, Any]]:
        """The model of a model-level ``mode`` (``train`` / ``serve``), or None when this preset has none."""
        cfg = {"train": self.train, "serve": self.serve}[mode]
        return cfg or None


_TRAIN_GPU = dict(hidden=2048, layers=4, heads=16, ffn=5632, vocab=32000, seq=1024, batch=8, steps=5, n=256, r=64,
                  n_s=32)
_SERVE_GPU = dict(hidden=2048, layers=4, heads=16, ffn=5632, vocab=32000, prompt=128, steps=16, batch=(1, 8, 64),
                  n=256, r=64, n_s=32)

# The target point of the fused kernels: bf16, d_in = d_out = 4096, T = 4096 tokens in 8 samples, n = 256, r = 64,
# n_s = 32 (R = 96).
TARGET = dict(d=4096, tokens=(4096, 8), n=256, r=64, n_s=32, dtype="bf16")

PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        d=(64,), tokens=((16, 2), (64, 4)), n=(16,), r=(4,), n_s=(4, 0), dtypes=("fp32",), decode_B=(1, 4),
        gate_B=(4,), layer_tokens=((16, 2),), warmup=1, rep=3,
        train=dict(hidden=64, layers=2, heads=4, ffn=128, vocab=256, seq=16, batch=2, steps=2, n=16, r=4, n_s=4),
        serve=dict(hidden=64, layers=2, heads=4, ffn=128, vocab=256, prompt=8, steps=3, batch=(2,), n=16, r=4, n_s=4),
        summary="seconds on a CPU: exercises every code path, measures nothing"),
    "gpu-check": Preset(
        d=(TARGET["d"],), tokens=(TARGET["tokens"],), n=(TARGET["n"],), r=(TARGET["r"],), n_s=(TARGET["n_s"],),
        dtypes=(TARGET["dtype"],), decode_B=(1, 8, 64), gate_B=(TARGET["tokens"][1],), layer_tokens=(TARGET["tokens"],),
        modes=("gate", "fwd", "fwdbwd", "decode", "layer"),
        summary="minutes on one GPU: only the target point (bf16, d=4096, T=4096 in 8 samples, n=256, r=64, n_s=32), "
                "decode B=1,8,64, no model-level modes"),
    "default": Preset(
        d=(4096, 2048, 5120), tokens=((4096, 8), (128, 8), (1024, 8), (16384, 16)), n=(256, 64, 1024), r=(64, 8, 32),
        n_s=(32, 0), dtypes=("bf16", "fp16"), decode_B=(1, 8, 64, 256), gate_B=(8, 64, 256),
        layer_tokens=((4096, 8), (8, 8)), train=_TRAIN_GPU, serve=_SERVE_GPU,
        summary="a few minutes on one H100: the target point and one axis at a time around it"),
    "full": Preset(
        d=(2048, 4096, 5120), tokens=((1, 1), (16, 16), (256, 8), (1024, 8), (4096, 8), (16384, 16)), n=(64, 256, 1024),
        r=(8, 32, 64), n_s=(0, 32), dtypes=("bf16", "fp16"), decode_B=(1, 8, 32, 64, 128, 256), gate_B=(1, 8, 64, 256),
        layer_tokens=((4096, 8), (1024, 8), (8, 8)), product=True, train=_TRAIN_GPU, serve=_SERVE_GPU,
        summary="the whole grid (an hour or more on one GPU; restrict with --modes / --providers)"),
}


def _axes_points(axes: dict[str, Sequence[Any]], product: bool) -> list[dict[str, Any]]:
    """The cartesian product of the axes, or the centre (first values) plus one axis varied at a time."""
    names = list(axes)
    if product:
        return [dict(zip(names, vals, strict=True)) for vals in itertools.product(*(axes[k] for k in names))]
    centre = {k: axes[k][0] for k in names}
    points = [centre]
    for k in names:
        for v in axes[k][1:]:
            points.append(dict(centre, **{k: v}))
    return points


def _mode_axes(preset: Preset, mode: str, dtypes: Sequence[str]) -> Optional[dict[str, Sequence[Any]]]:
    """The axes a kernel mode sweeps (None for the model-level modes)."""
    if mode in ("fwd", "fwdbwd"):
        return dict(d=preset.d, tokens=preset.tokens, n=preset.n, r=preset.r, n_s=preset.n_s, dtype=dtypes)
    if mode == "decode":
        return dict(d=preset.d, tokens=[(b, b) for b in preset.decode_B], n=preset.n, r=preset.r,
                    n_s=preset.n_s[:1], dtype=dtypes)
    if mode == "gate":  # the gate reads fp32 queries and keys only: one dtype, no shared ranks
        return dict(d=preset.d, tokens=[(b, b) for b in preset.gate_B], n=preset.n, r=preset.r, n_s=(0,),
                    dtype=dtypes[:1])
    if mode == "layer":
        return dict(d=preset.d[:1], tokens=preset.layer_tokens, n=preset.n[:1], r=preset.r[:1],
                    n_s=preset.n_s[:1], dtype=dtypes[:1])
    return None


def sweep_shapes(preset: Preset, modes: Sequence[str], dtypes: Sequence[str]) -> list[Shape]:
    """Every kernel-level benchmark point of ``preset`` for ``modes`` (train/serve are model-level, not listed)."""
    shapes: list[Shape] = []
    for mode in modes:
        axes = _mode_axes(preset, mode, dtypes)
        if axes is None:
            continue
        for p in _axes_points(axes, preset.product):
            T, B = p["tokens"]
            B = min(B, T)
            if p["r"] > p["n"]:
                continue
            shapes.append(Shape(mode, p["dtype"], p["d"], p["d"], T - T % B, B, p["n"], p["r"], p["n_s"]))
    return list(dict.fromkeys(shapes))  # the one-axis-at-a-time points repeat the centre
