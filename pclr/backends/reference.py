"""Pure-PyTorch reference backend: runs on any device and dtype; the definition of correct for every other backend.

It gathers only the chosen rows (R = n_s + r per sample) and never forms a dense n-wide product. Tokens are
regrouped into a padded [B, L, d] view so each sample's low-rank update is one batched matmul; half-precision
inputs are upcast to fp32 for the arithmetic (the same accumulation precision the fused kernels use).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pclr.backends.base import (
    GateInputs,
    GateLinearInputs,
    LinearGrads,
    LinearInputs,
    LinearNeeds,
    RecomputingKernels,
)
from pclr.backends.custom_op import make_lrp_linear_op
from pclr.options import BackendName
from pclr.scoring import gate_scores


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype: fp32 for half types, the input dtype otherwise (fp32/fp64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class Packing:
    """Maps packed tokens [T, ...] (any sample order) to a zero-padded [B, L, ...] view and back."""

    def __init__(self, sample_of_token: Tensor, num_samples: int, padded_len: int) -> None:
        self.B, self.T = num_samples, sample_of_token.shape[0]
        if padded_len:  # already [B, L] contiguous: a view, no copy
            self.L, self.slot = padded_len, None
            return
        sot = sample_of_token.long()
        counts = torch.bincount(sot, minlength=num_samples)
        self.L = int(counts.max()) if self.T else 0
        order = torch.argsort(sot, stable=True)
        starts = counts.cumsum(0) - counts
        sorted_s = sot[order]
        pos = torch.arange(self.T, device=sot.device) - starts[sorted_s]
        self.slot = torch.empty_like(sot)
        self.slot[order] = sorted_s * self.L + pos  # slot[t] = row of token t in the flattened [B*L] view

    def pad(self, t: Tensor) -> Tensor:
        if self.slot is None:
            return t.reshape(self.B, self.L, t.shape[-1])
        out = t.new_zeros(self.B * self.L, t.shape[-1])
        out[self.slot] = t
        return out.view(self.B, self.L, t.shape[-1])

    def unpad(self, p: Tensor) -> Tensor:
        flat = p.reshape(self.B * self.L, p.shape[-1])
        return flat if self.slot is None else flat[self.slot]


def effective_rows(A_m: Tensor, B_m: Tensor, idx: Tensor, val: Tensor, A_s: Tensor | None,
                   B_s: Tensor | None, beta_m: float, beta_s: float,
                   dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, int]:
    """Per-sample active rows: A_eff [B, R, d_in], B_eff [B, R, d_out], scale [B, R] (shared rows first)."""
    i = idx.long()
    A_eff, B_eff = A_m[i].to(dtype), B_m[i].to(dtype)
    scale = val.to(dtype) * beta_m
    n_s = 0 if A_s is None else A_s.shape[0]
    if n_s:
        b = idx.shape[0]
        A_eff = torch.cat([A_s.to(dtype).unsqueeze(0).expand(b, -1, -1), A_eff], 1)
        B_eff = torch.cat([B_s.to(dtype).unsqueeze(0).expand(b, -1, -1), B_eff], 1)
        scale = torch.cat([scale.new_full((b, n_s), beta_s), scale], 1)
    return A_eff, B_eff, scale, n_s


def linear_forward(inputs: LinearInputs) -> Tensor:
    """y [T, d_out] = x·Wᵀ + b + the gated low-rank term, computed in :func:`compute_dtype`, returned in x's dtype."""
    i = inputs
    cdt = compute_dtype(i.x.dtype)
    pack = Packing(i.sample_of_token, i.idx.shape[0], i.padded_len)
    xc = i.x.to(cdt)
    y = F.linear(xc, i.weight.to(cdt), None if i.bias is None else i.bias.to(cdt))
    A_eff, B_eff, scale, _ = effective_rows(i.A_m, i.B_m, i.idx, i.val, i.A_s, i.B_s, i.beta_m, i.beta_s, cdt)
    s = torch.bmm(pack.pad(xc), A_eff.transpose(1, 2)) * scale.unsqueeze(1)  # [B, L, R], the small intermediate
    y = y + pack.unpad(torch.bmm(s, B_eff))
    return y.to(i.x.dtype)


def linear_backward(grad: Tensor, inputs: LinearInputs, needs: LinearNeeds) -> LinearGrads:
    """The gradients named in ``needs`` (dA_m and dB_m together; frozen rows exactly zero). grad [T, d_out]."""
    i = inputs
    x, A_m, B_m, A_s, B_s, idx, val = i.x, i.A_m, i.B_m, i.A_s, i.B_s, i.idx, i.val
    need_shared = needs.shared and A_s is not None
    cdt = compute_dtype(x.dtype)
    pack = Packing(i.sample_of_token, idx.shape[0], i.padded_len)
    A_eff, B_eff, scale, n_s = effective_rows(A_m, B_m, idx, val, A_s, B_s, i.beta_m, i.beta_s, cdt)
    g = grad.to(cdt)
    gp, xp = pack.pad(g), pack.pad(x.to(cdt))
    ds = torch.bmm(gp, B_eff.transpose(1, 2))  # dY · B_effᵀ, [B, L, R]
    du = ds * scale.unsqueeze(1)
    out = LinearGrads()
    if needs.x:
        out.x = (g @ i.weight.to(cdt) + pack.unpad(torch.bmm(du, A_eff))).to(x.dtype)
    if needs.pool or needs.val or need_shared:
        u = torch.bmm(xp, A_eff.transpose(1, 2))  # unscaled x · A_effᵀ, [B, L, R]
    if needs.pool or need_shared:
        dA_eff = torch.bmm(du.transpose(1, 2), xp)  # [B, R, d_in]
        dB_eff = torch.bmm((u * scale.unsqueeze(1)).transpose(1, 2), gp)  # [B, R, d_out]
        if needs.pool:
            flat = idx.long().reshape(-1)
            dA_rows = dA_eff[:, n_s:].reshape(flat.shape[0], -1)
            dB_rows = dB_eff[:, n_s:].reshape(flat.shape[0], -1)
            if i.trainable is not None:  # frozen rows: exactly zero
                keep = i.trainable[flat].to(cdt).unsqueeze(1)
                dA_rows, dB_rows = dA_rows * keep, dB_rows * keep
            out.A_m = torch.zeros(A_m.shape, dtype=cdt, device=A_m.device).index_add_(0, flat, dA_rows).to(A_m.dtype)
            out.B_m = torch.zeros(B_m.shape, dtype=cdt, device=B_m.device).index_add_(0, flat, dB_rows).to(B_m.dtype)
        if need_shared and n_s:
            out.A_s = dA_eff[:, :n_s].sum(0).to(A_s.dtype)
            out.B_s = dB_eff[:, :n_s].sum(0).to(B_s.dtype)
    if needs.val:
        out.val = ((ds * u).sum(1)[:, n_s:] * i.beta_m).to(val.dtype)
    return out


def rank_order(rank: Tensor, ok: Tensor) -> Tensor:
    """Experts of each row of rank [R, n] in gate order; ok bool [R or 1, n] marks the candidates.

    Order: candidates with a number as score (±inf included) by descending score, then candidates whose score is
    NaN (a NaN ranks below -inf), then non-candidates; ties go to the lower index (stable sorts). Every backend's
    gate follows this order, so no score, NaN or not, can route to an index outside [0, n) or to a non-candidate
    while candidates remain.
    """
    ok = ok.expand_as(rank)
    nan = torch.isnan(rank)
    tier = torch.where(ok, nan.to(torch.int64), 2)
    order = torch.sort(rank.masked_fill(nan | ~ok, float("-inf")), dim=-1, descending=True, stable=True).indices
    by_tier = torch.sort(tier.gather(-1, order), dim=-1, stable=True).indices  # stable: keeps score order in a tier
    return order.gather(-1, by_tier)


def gate(inputs: GateInputs) -> tuple[Tensor, Tensor]:
    """Top-r gate in :func:`rank_order`'s order (ties → lower index). Returns idx int32 [B, r], val fp32 [B, r] (fp64
    soft values when a part is fp64), without autograd."""
    with torch.no_grad():  # the soft value's autograd is attached by functional.lrp_gate
        score = gate_scores(inputs.query, inputs.keys, inputs.weights)  # [B, n]
    rank = score
    ok = torch.ones((1, score.shape[1]), dtype=torch.bool, device=score.device)
    if inputs.candidates is not None:
        ok = inputs.candidates.reshape(-1, score.shape[1])
    if inputs.scope == "batch":
        rank, ok = rank.sum(0, keepdim=True), ok.all(0, keepdim=True)  # the intersection of the candidates
    order = rank_order(rank, ok)[:, : inputs.r]
    idx = order.expand(score.shape[0], -1)
    if inputs.mode == "soft":
        val = score.gather(1, idx)
        val = val if val.dtype == torch.float64 else val.float()
    else:
        val = torch.ones(idx.shape, dtype=torch.float32, device=score.device)
    return idx.to(torch.int32).contiguous(), val


class ReferenceBackend(RecomputingKernels):
    """The pure-torch backend (see the module docstring)."""

    name: BackendName = "reference"

    def __init__(self) -> None:
        self.op = make_lrp_linear_op(self.name, self)

    def not_supported_reasons(self, op: str, inputs: object) -> list[str]:
        return []  # pure torch: every device, every floating dtype

    linear_forward = staticmethod(linear_forward)
    linear_backward = staticmethod(linear_backward)

    def lrp_linear(self, inputs: LinearInputs) -> Tensor:
        return self.op(inputs)

    def lrp_gate(self, inputs: GateInputs) -> tuple[Tensor, Tensor]:
        return gate(inputs)

    def lrp_gate_linear(self, inputs: GateLinearInputs) -> None:
        return None  # no fused path: lrp_gate, then lrp_linear


BACKEND = ReferenceBackend()
