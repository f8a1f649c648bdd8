"""The functional API: ``lrp_gate``, ``lrp_linear`` and ``lrp_gate_linear``, the one entry point to every backend.

Each validates its inputs, normalises them to the packed layout and hands them to :func:`pclr.dispatch.select`;
``lrp_gate_linear`` reuses the validation of the other two.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from pclr import dispatch
from pclr.backends.base import Backend, GateInputs, GateLinearInputs, LinearInputs
from pclr.options import (
    FORWARD_VARIANTS,
    GATE_MODES,
    GATE_SCOPES,
    BackendName,
    ForwardVariant,
    GateMode,
    GateScope,
    check_choice,
)
from pclr.padded_batch import padded_sample_of_token
from pclr.scoring import chosen_scores
from pclr.validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_finite,
    check_tensor,
    validation_enabled,
    warn_frozen_base,
)

Parts = Tensor | Sequence[Tensor]

# The process-wide default of ``lrp_linear(variant=None)``: PCLR_TRITON_FWD, read once here (not on every call),
# until set_forward_variant() replaces it. Validated where it is used, so a bad value names the variable.
_ENV_VARIANT = os.environ.get("PCLR_TRITON_FWD", "").strip().lower() or "auto"
_variant: str | None = None


def set_forward_variant(variant: ForwardVariant | None) -> None:
    """Set the triton forward variant ``lrp_linear`` uses when called without ``variant=`` ("auto" | "fused" |
    "epilogue" | "split"); None restores the default (``PCLR_TRITON_FWD`` as it was at import, else "auto")."""
    global _variant
    if variant is not None:
        check_choice("variant", variant, FORWARD_VARIANTS)
    _variant = variant


def forward_variant() -> ForwardVariant:
    """The forward variant ``lrp_linear`` uses when called without ``variant=``."""
    if _variant is not None:
        return _variant
    check_choice("PCLR_TRITON_FWD", _ENV_VARIANT, FORWARD_VARIANTS)
    return _ENV_VARIANT


def _as_parts(name: str, x: Parts) -> tuple[Tensor, ...]:
    if isinstance(x, Tensor):
        return (x,)
    if isinstance(x, (tuple, list)) and len(x) > 0:
        return tuple(x)
    raise TypeError(f"{name} must be a tensor or a non-empty tuple of tensors, got {type(x).__name__}")


def lrp_gate(
    query: Parts,
    keys: Parts,
    r: int,
    *,
    weights: Sequence[float] | None = None,
    candidates: Tensor | None = None,
    scope: GateScope = "sample",
    mode: GateMode = "hard",
    backend: BackendName | None = None,
) -> tuple[Tensor, Tensor]:
    """Choose the top-``r`` experts per sample by weighted multi-part cosine similarity.

    Args:
        query: [B, d_q] or a tuple of parts ([B, d_t], [B, d_v], ...). An all-zero row of a part (e.g. no image)
            contributes 0 to that sample's score.
        keys: [n, d_q] or the matching tuple of [n, d_p].
        r: experts to choose (≤ number of candidates).
        weights: per-part weights (default 1 each; PCLR uses (1.0, 0.25)). score = Σ_p w_p·cos(q_p, K_p).
        candidates: bool [n] or [B, n]: experts that may be chosen (default all).
        scope: "sample" ranks each sample's own score; "batch" ranks the batch-summed score (same experts for all).
        mode: "hard" → val = 1; "soft" → val = the sample's score (differentiable w.r.t. query and keys).
        backend: force "reference" | "triton" | "cuda" (default: dispatch, or env PCLR_BACKEND).

    Returns:
        idx: int32 [B, r], descending score, ties → lower index.
        val: float32 [B, r].
    """
    inputs = _gate_inputs(query, keys, r, weights, candidates, scope, mode)
    return _run_gate(dispatch.select("lrp_gate", inputs, backend), inputs)


def _gate_inputs(query: Parts, keys: Parts, r: int, weights: Sequence[float] | None,
                 candidates: Tensor | None, scope: str, mode: str) -> GateInputs:
    """Validated :class:`GateInputs` (errors name the offending argument)."""
    q, k = _as_parts("query", query), _as_parts("keys", keys)
    if len(q) != len(k):
        raise ValueError(f"query has {len(q)} parts but keys has {len(k)}; they must match")
    w = tuple(1.0 for _ in q) if weights is None else tuple(float(v) for v in weights)
    if len(w) != len(q):
        raise ValueError(f"weights has {len(w)} entries but query has {len(q)} parts")
    device = k[0].device
    B, n = q[0].shape[0] if q[0].dim() == 2 else -1, k[0].shape[0] if k[0].dim() == 2 else -1
    for p, (qp, kp) in enumerate(zip(q, k)):
        d = kp.shape[-1] if kp.dim() == 2 else None
        check_tensor(f"keys[{p}]", kp, shape=(n, None), device=device, expected="[n, d_p]")
        check_tensor(f"query[{p}]", qp, shape=(B, d), device=device, expected=f"[B, {d}] (d of keys[{p}])")
    check_choice("scope", scope, GATE_SCOPES)
    check_choice("mode", mode, GATE_MODES)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if r > n:
        raise ValueError(f"r ({r}) exceeds the number of experts n ({n})")
    if candidates is not None:
        if candidates.dim() == 1:
            check_tensor("candidates", candidates, shape=(n,), dtypes=(torch.bool,), device=device, expected="[n]")
        else:
            check_tensor("candidates", candidates, shape=(B, n), dtypes=(torch.bool,), device=device,
                         expected="[n] or [B, n]")
    if validation_enabled(device):
        if candidates is not None:
            fewest = int(candidates.sum(-1).min()) if B > 0 or candidates.dim() == 1 else n
            if r > fewest:
                raise ValueError(f"r ({r}) exceeds the number of candidates ({fewest}) in candidates")
            if scope == "batch" and candidates.dim() == 2 and B > 0:
                common = int(candidates.all(0).sum())
                if r > common:
                    raise ValueError(f"scope='batch' picks the same experts for every sample, from the experts "
                                     f"that are candidates of every row of candidates [B, n]; only {common} are, "
                                     f"fewer than r ({r})")
        for p, qp in enumerate(q):
            check_finite(f"query[{p}]", qp, "the gate would route arbitrarily")
        for p, kp in enumerate(k):
            check_finite(f"keys[{p}]", kp, "the gate would route arbitrarily")
        bad_w = [v for v in w if not math.isfinite(v)]
        if bad_w:
            raise ValueError(f"weights holds NaN or Inf ({bad_w}): every score would be NaN, the route arbitrary")
    return GateInputs(query=q, keys=k, weights=w, r=r, candidates=candidates, scope=scope, mode=mode)


def _run_gate(be: Backend, inputs: GateInputs) -> tuple[Tensor, Tensor]:
    """The gate on ``be``; soft values get their autograd here, once for every backend: the kernels' val carries
    none, so the chosen scores are recomputed in torch (B·r·d, cheap) when the query or keys need gradients."""
    idx, val = be.lrp_gate(inputs)
    if inputs.mode == "soft" and torch.is_grad_enabled() and any(
            t.requires_grad for t in (*inputs.query, *inputs.keys)):
        val = chosen_scores(inputs.query, inputs.keys, inputs.weights, idx)
        val = val if val.dtype == torch.float64 else val.float()
    return idx, val


def lrp_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A_m: Tensor,
    B_m: Tensor,
    idx: Tensor,
    val: Tensor,
    *,
    A_s: Tensor | None = None,
    B_s: Tensor | None = None,
    beta_m: float = 1.0,
    beta_s: float = 1.0,
    sample_of_token: Tensor | None = None,
    trainable: Tensor | None = None,
    backend: BackendName | None = None,
    deterministic: bool = False,
    variant: ForwardVariant | None = None,
) -> Tensor:
    """Frozen linear plus the gated LoRA rank pool, per sample.

    y = x·Wᵀ + b + beta_s·(x·A_sᵀ)·B_s + beta_m·Σ_k val[b,k]·(x·A_m[idx[b,k]]ᵀ)·B_m[idx[b,k]]

    Args:
        x: [B, L, d_in] (padded batch) or [T, d_in] (packed tokens, then ``sample_of_token`` is required).
        weight: [d_out, d_in], frozen. bias: [d_out] or None, frozen.
        A_m: [n, d_in], B_m: [n, d_out]: the pool, rank-major (row j = expert j).
        idx: int32/int64 [B, r] chosen experts per sample; val: float [B, r] gate values.
        A_s: [n_s, d_in], B_s: [n_s, d_out]: shared ranks (both or neither).
        sample_of_token: int [T], sample of each packed token (any order, varlen).
        trainable: bool [n]; rows outside it get exactly zero gradient.
        backend: force "reference" | "triton" | "cuda".
        deterministic: fused backends reduce pool gradients without atomics (bit-reproducible).
        variant: the triton forward ("auto" | "fused" | "epilogue" | "split": same result, different passes over
            memory); None: :func:`forward_variant`. Other backends have one forward and ignore it.

    Returns:
        y with the shape of x but last dim d_out, dtype of x.
    """
    inputs = _linear_inputs(x, weight, bias, A_m, B_m, idx, val, None, A_s, B_s, beta_m, beta_s, sample_of_token,
                            trainable, deterministic, variant)
    y = dispatch.select("lrp_linear", inputs, backend).lrp_linear(inputs)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def lrp_gate_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A_m: Tensor,
    B_m: Tensor,
    query: Parts,
    keys: Parts,
    r: int,
    *,
    weights: Sequence[float] | None = None,
    candidates: Tensor | None = None,
    mode: GateMode = "hard",
    A_s: Tensor | None = None,
    B_s: Tensor | None = None,
    beta_m: float = 1.0,
    beta_s: float = 1.0,
    sample_of_token: Tensor | None = None,
    trainable: Tensor | None = None,
    deterministic: bool = False,
    backend: BackendName | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The per-sample gate and the gated linear together: ``lrp_gate`` (scope "sample") then ``lrp_linear``.

    The triton backend runs both in one launch (a gate phase, one program per sample, then the fused linear);
    other backends, and triton on inputs its one-launch kernel does not take (more than two query parts, float64,
    more than 1024 experts), run the gate, then the linear. The result is the same either way.

    Args:
        x, weight, bias, A_m, B_m, A_s, B_s, beta_m, beta_s, sample_of_token, trainable, deterministic:
            as :func:`lrp_linear`; the batch B of x (or of the packed samples) is the batch of the query.
        query, keys, r, weights, candidates, mode: as :func:`lrp_gate`.
        backend: force "reference" | "triton" | "cuda".

    Returns:
        y: the shape of x but last dim d_out, dtype of x.
        idx: int32 [B, r]; val: float32 [B, r] (the route, for reuse by other linears of the same key pool).
    """
    gate = _gate_inputs(query, keys, r, weights, candidates, "sample", mode)
    B = gate.query[0].shape[0]
    linear = _linear_inputs(x, weight, bias, A_m, B_m, None, None, (B, r), A_s, B_s, beta_m, beta_s,
                            sample_of_token, trainable, deterministic, None)
    n = linear.A_m.shape[0]
    if gate.keys[0].shape[0] != n:
        raise ValueError(f"keys has {gate.keys[0].shape[0]} rows but the pool A_m has n = {n}: one key per expert")
    if gate.device != linear.device:
        raise ValueError(f"keys are on {gate.device} but x is on {linear.device}; move them to {linear.device}")
    inputs = GateLinearInputs(gate=gate, linear=linear)
    be = dispatch.select("lrp_gate_linear", inputs, backend)
    fused = be.lrp_gate_linear(inputs)
    if fused is not None:
        y, idx, val = fused
    else:
        idx, val = _run_gate(be, gate)
        y = be.lrp_linear(inputs.routed(idx, val))
    return y.reshape(*x.shape[:-1], weight.shape[0]), idx, val


def _linear_inputs(x: Tensor, weight: Tensor, bias: Tensor | None, A_m: Tensor, B_m: Tensor,
                   idx: Tensor | None, val: Tensor | None, route: tuple[int, int] | None,
                   A_s: Tensor | None, B_s: Tensor | None, beta_m: float, beta_s: float,
                   sample_of_token: Tensor | None, trainable: Tensor | None, deterministic: bool,
                   variant: str | None) -> LinearInputs:
    """Validated :class:`LinearInputs` in the packed layout (errors name the offending argument).

    ``route`` = (B, r) stands in for idx/val when the gate has yet to choose them (``lrp_gate_linear``): idx and
    val are then shape-only meta tensors (see :class:`GateLinearInputs`).
    """
    if variant is None:
        variant = forward_variant()
    check_choice("variant", variant, FORWARD_VARIANTS)
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    device, dtype = x.device, x.dtype
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [B, L, d_in] or packed [T, d_in], got shape {tuple(x.shape)}")
    d_in = x.shape[-1]
    check_tensor("weight", weight, shape=(None, d_in), dtypes=(dtype,), device=device, expected=f"[d_out, {d_in}]")
    d_out = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, shape=(d_out,), dtypes=(dtype,), device=device, expected=f"[{d_out}]")
    warn_frozen_base(weight, bias)
    check_tensor("A_m", A_m, shape=(None, d_in), dtypes=(dtype,), device=device, expected=f"[n, {d_in}]")
    n = A_m.shape[0]
    check_tensor("B_m", B_m, shape=(n, d_out), dtypes=(dtype,), device=device, expected=f"[{n}, {d_out}] (n of A_m)")
    if route is None:
        check_tensor("idx", idx, ndim=2, dtypes=INDEX_DTYPES, device=device, expected="[B, r]")
        num_samples, r = idx.shape
        check_tensor("val", val, shape=(num_samples, r), dtypes=FLOAT_DTYPES, device=device,
                     expected=f"[{num_samples}, {r}] (shape of idx)")
    else:
        num_samples, r = route
        idx = torch.empty(route, dtype=torch.int32, device="meta")
        val = torch.empty(route, dtype=torch.float32, device="meta")
    if (A_s is None) != (B_s is None):
        raise ValueError("A_s and B_s must be given together (shared ranks) or both be None")
    if A_s is not None:
        check_tensor("A_s", A_s, shape=(None, d_in), dtypes=(dtype,), device=device, expected=f"[n_s, {d_in}]")
        check_tensor("B_s", B_s, shape=(A_s.shape[0], d_out), dtypes=(dtype,), device=device,
                     expected=f"[{A_s.shape[0]}, {d_out}] (n_s of A_s)")
        if A_s.shape[0] == 0:
            A_s = B_s = None
    if trainable is not None:
        check_tensor("trainable", trainable, shape=(n,), dtypes=(torch.bool,), device=device, expected=f"[{n}]")
    if r > 0 and n == 0:
        raise ValueError(f"idx selects r={r} experts per sample but the pool A_m is empty")

    padded_len = 0
    if x.dim() == 3:
        if sample_of_token is not None:
            raise ValueError("sample_of_token is only for packed x [T, d_in]; x is [B, L, d_in]")
        if x.shape[0] != num_samples:
            source = "idx" if route is None else "the query"
            raise ValueError(f"x has batch {x.shape[0]} but {source} has {num_samples} rows; it must be [B, ...]")
        L = x.shape[1]
        padded_len = L
        x2 = x.reshape(num_samples * L, d_in)
        sot = padded_sample_of_token(num_samples, L, device)  # one tensor per (B, L, device): no op per call
        if L == 0:
            padded_len = 0
    else:
        if sample_of_token is None:
            raise ValueError("packed x [T, d_in] needs sample_of_token (int [T]: the sample of each token)")
        check_tensor("sample_of_token", sample_of_token, shape=(x.shape[0],), dtypes=INDEX_DTYPES, device=device,
                     expected=f"[{x.shape[0]}] (T of x)")
        x2, sot = x, sample_of_token.to(torch.int32)
    x2 = x2.contiguous()

    if validation_enabled(device):
        if route is None and r > 0 and num_samples > 0 and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"idx holds values outside [0, n={n}): min {int(idx.min())}, max {int(idx.max())}")
        if sot.numel() and (int(sot.min()) < 0 or int(sot.max()) >= num_samples):
            raise ValueError(f"sample_of_token holds values outside [0, B={num_samples}) where B = idx.shape[0] "
                             "(or the query's batch)")

    inputs = LinearInputs(
        x=x2, weight=weight.contiguous(), bias=bias, A_m=A_m.contiguous(), B_m=B_m.contiguous(),
        idx=idx.to(torch.int32).contiguous(), val=val if val.dtype == torch.float64 else val.float().contiguous(),
        A_s=None if A_s is None else A_s.contiguous(), B_s=None if B_s is None else B_s.contiguous(),
        beta_m=float(beta_m), beta_s=float(beta_s), sample_of_token=sot, trainable=trainable,
        padded_len=padded_len, deterministic=bool(deterministic), variant=variant,
    )
    return inputs
