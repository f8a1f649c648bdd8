"""The inputs of one benchmark point, identical for every provider, and the ideal cost of the operation they compute.

Notation as in :mod:`pclr.bench.shapes`: x [B, L, d_in] (T = B·L tokens), W [d_out, d_in], pool A_m [n, d_in],
B_m [n, d_out], shared A_s [n_s, d_in], B_s [n_s, d_out]; the query and keys have a text part (d_in wide) and a vision
part (min(VISION_DIM, d_in) wide).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from pclr.bench.shapes import ALPHA, GATE_WEIGHTS, VISION_DIM, Shape, layer_dims
from pclr.functional import lrp_gate

CostKind = Literal["base", "lrp", "lora"]
"""What a provider's call has to compute, for the ideal FLOPs and bytes: ``base`` x·Wᵀ only; ``lrp`` the base plus
R = n_s + r gathered pool rows per sample; ``lora`` the base plus one rank-R adapter for every sample."""


@dataclass
class Problem:
    """Identical inputs for every provider at one shape; each linear of ``mode == "layer"`` gets its own weights.

    x [B, L, d_in]; query (text [B, d_in], vision [B, d_v]) fp32; keys ([n, d_in], [n, d_v]) fp32;
    idx int32 [B, r] (each sample's own route, computed once by the reference gate); val fp32 [B, r];
    layers: per linear a dict of weight [d_out, d_in], bias (None: LLaMA linears have none), A_m, B_m, A_s, B_s, d_in,
    d_out.
    """

    shape: Shape
    x: Tensor
    query: tuple[Tensor, Tensor]
    keys: tuple[Tensor, Tensor]
    idx: Tensor
    val: Tensor
    layers: list[dict[str, Any]]
    beta_m: float
    beta_s: float

    @property
    def device(self) -> torch.device:
        return self.x.device


def make_problem(shape: Shape, device: torch.device, seed: int = 0) -> Problem:
    """Random inputs; B_m is non-zero (a trained pool), every sample's query is different (mixed tasks)."""
    g = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: a 5120x13824 weight is instant
    dt = shape.torch_dtype

    def rnd(*size: int, scale: float = 1.0, dtype: torch.dtype = dt) -> Tensor:
        return (torch.randn(*size, generator=g, device=device) * scale).to(dtype)

    d_v = min(VISION_DIM, shape.d_in)
    query = (rnd(shape.B, shape.d_in, dtype=torch.float32), rnd(shape.B, d_v, dtype=torch.float32))
    keys = (rnd(shape.n, shape.d_in, dtype=torch.float32), rnd(shape.n, d_v, dtype=torch.float32))
    idx, val = lrp_gate(query, keys, shape.r, weights=GATE_WEIGHTS, backend="reference")
    layers = []
    for d_in, d_out in layer_dims(shape):
        s = 1.0 / math.sqrt(d_in)
        layers.append(dict(
            d_in=d_in, d_out=d_out, weight=rnd(d_out, d_in, scale=s), bias=None,
            A_m=rnd(shape.n, d_in, scale=s), B_m=rnd(shape.n, d_out, scale=0.01),
            A_s=rnd(shape.n_s, d_in, scale=s) if shape.n_s else None,
            B_s=rnd(shape.n_s, d_out, scale=0.01) if shape.n_s else None,
        ))
    x = rnd(shape.B, shape.L, layers[0]["d_in"])
    beta_s = ALPHA / shape.n_s if shape.n_s else 0.0
    return Problem(shape, x, query, keys, idx.contiguous(), val.contiguous(), layers, ALPHA / shape.r, beta_s)


def gate_cost(shape: Shape) -> tuple[float, float]:
    """(FLOPs, bytes) of the gate: cosine of B fp32 queries with n fp32 keys, text and vision parts, top-r out."""
    d_q = shape.d_in + min(VISION_DIM, shape.d_in)
    return 2.0 * shape.B * shape.n * d_q, 4.0 * (shape.B + shape.n) * d_q + 8.0 * shape.B * shape.r


def ideal_cost(shape: Shape, kind: CostKind = "lrp") -> tuple[float, float]:
    """(useful FLOPs, ideal bytes moved) of the operation a provider of ``kind`` computes at ``shape``.

    The same for every LRP provider, so TFLOP/s compare the work that had to be done, not the work a formulation
    chose to do. ``base`` counts x·Wᵀ only; ``lrp`` reads each used pool row once (n_s + min(n, B·r) rows);
    ``lora`` reads its R rows once. ``layer`` adds the gate (computed once for the 7 linears).
    """
    es = torch.finfo(shape.torch_dtype).bits // 8
    gate_f, gate_b = gate_cost(shape)
    if shape.mode == "gate":
        return gate_f, gate_b
    R = 0 if kind == "base" else shape.R
    rows = {"base": 0, "lora": R, "lrp": shape.n_s + min(shape.n, shape.B * shape.r)}[kind]
    T = shape.T
    flops = bytes_ = 0.0
    for d_in, d_out in layer_dims(shape):
        base_f, lrp_f = 2.0 * T * d_in * d_out, 2.0 * T * R * (d_in + d_out)
        fwd_b = es * (T * d_in + d_in * d_out + T * d_out + rows * (d_in + d_out))
        if shape.mode == "fwdbwd":
            # bwd: dX = dY·W (+ dS·A_eff), dS = dY·B_effᵀ, dA, dB: one more base GEMM, two more LRP-sized products
            flops += 2 * base_f + 3 * lrp_f
            bytes_ += fwd_b + es * (T * d_out + d_in * d_out + 2 * T * d_in + 2 * rows * (d_in + d_out))
        else:
            flops += base_f + lrp_f
            bytes_ += fwd_b
    if shape.mode == "layer" and kind != "base":
        flops, bytes_ = flops + gate_f, bytes_ + gate_b
    return flops, bytes_
