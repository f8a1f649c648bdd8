"""Shared test material for every backend: random LRP problems, an independent dense computation, and a checker
that compares a backend's output and EVERY gradient against the reference backend."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

import pclr


@dataclass
class Case:
    """One lrp_linear problem. x is [B, L, d_in] (padded) or [T, d_in] with sot (packed)."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    A_m: torch.Tensor
    B_m: torch.Tensor
    idx: torch.Tensor
    val: torch.Tensor
    A_s: torch.Tensor | None
    B_s: torch.Tensor | None
    sot: torch.Tensor | None
    trainable: torch.Tensor | None
    beta_m: float = 2.0
    beta_s: float = 0.5

    @property
    def num_samples(self) -> int:
        return self.idx.shape[0]


def make_case(B=3, L=5, d_in=16, d_out=12, n=10, r=4, n_s=2, *, packed=False, lens=None, bias=True,
              dtype=torch.float32, device="cpu", frozen=(), soft=False, seed=0) -> Case:
    """A random problem. ``lens`` (list of B token counts, 0 allowed) gives a packed varlen batch in shuffled
    token order; ``packed`` with no lens packs B*L tokens shuffled. ``frozen``: expert rows that are not trainable."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)

    if lens is not None:
        packed, B = True, len(lens)
    if packed:
        lens = lens if lens is not None else [L] * B
        sot = torch.cat([torch.full((c,), b, dtype=torch.int32) for b, c in enumerate(lens)]) if sum(lens) else \
            torch.zeros(0, dtype=torch.int32)
        sot = sot[torch.randperm(sot.numel(), generator=g)].to(device)
        x = rnd(sot.numel(), d_in)
    else:
        sot, x = None, rnd(B, L, d_in)
    idx = torch.stack([torch.randperm(n, generator=g)[:r] for _ in range(B)]).to(torch.int32).to(device) if B else \
        torch.zeros(0, r, dtype=torch.int32, device=device)
    val = (torch.rand(B, r, generator=g) + 0.5).to(device) if soft else torch.ones(B, r, device=device)
    if dtype == torch.float64:
        val = val.double()
    trainable = None
    if frozen:
        trainable = torch.ones(n, dtype=torch.bool)
        trainable[list(frozen)] = False
        trainable = trainable.to(device)
    return Case(
        x=x, weight=rnd(d_out, d_in, scale=d_in ** -0.5), bias=rnd(d_out) if bias else None,
        A_m=rnd(n, d_in, scale=d_in ** -0.5), B_m=rnd(n, d_out, scale=0.5),
        idx=idx, val=val, A_s=rnd(n_s, d_in, scale=d_in ** -0.5) if n_s else None,
        B_s=rnd(n_s, d_out, scale=0.5) if n_s else None, sot=sot, trainable=trainable,
    )


def dense_lrp(c: Case) -> torch.Tensor:
    """Independent dense computation over all n experts with a per-sample gate matrix (never used by pclr)."""
    g = torch.zeros(c.num_samples, c.A_m.shape[0], dtype=c.val.dtype, device=c.x.device)
    g.scatter_add_(1, c.idx.long(), c.val)  # duplicates in idx add up, as in the gathered sum
    x = c.x
    gate = g[c.sot.long()] if c.sot is not None else g[:, None, :]
    y = x @ c.weight.T
    if c.bias is not None:
        y = y + c.bias
    if c.A_s is not None:
        y = y + c.beta_s * (x @ c.A_s.T) @ c.B_s
    return y + c.beta_m * ((x @ c.A_m.T) * gate.to(x.dtype)) @ c.B_m


GRAD_NAMES = ("x", "A_m", "B_m", "val", "A_s", "B_s")


def run_case(c: Case, backend: str | None, grad_out: torch.Tensor | None = None, soft: bool = True):
    """Forward + backward through ``pclr.lrp_linear``; returns (y, {name: grad})."""
    leaves = {}
    for name in GRAD_NAMES:
        t = getattr(c, name)
        if t is None or (name == "val" and not soft):
            continue
        leaves[name] = t.detach().clone().requires_grad_(True)
    get = lambda n: leaves.get(n, getattr(c, n))
    y = pclr.lrp_linear(get("x"), c.weight, c.bias, get("A_m"), get("B_m"), c.idx, get("val"),
                        A_s=get("A_s"), B_s=get("B_s"), beta_m=c.beta_m, beta_s=c.beta_s, sample_of_token=c.sot,
                        trainable=c.trainable, backend=backend)
    if grad_out is None:
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    y.backward(grad_out)
    return y.detach(), {n: t.grad for n, t in leaves.items()}


def assert_matches_reference(c: Case, backend: str, atol=1e-4, rtol=1e-4, soft=True) -> dict:
    """Output and every gradient of ``backend`` close to the reference; frozen rows exactly zero; trainable
    rows that were chosen non-zero. Returns the max abs errors (for reports)."""
    y_ref, g_ref = run_case(c, "reference", soft=soft)
    y, g = run_case(c, backend, soft=soft)
    errs = {"y": (y - y_ref).abs().max().item() if y.numel() else 0.0}
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol, msg=lambda m: f"[{backend}] output: {m}")
    assert set(g) == set(g_ref)
    for name in g_ref:
        assert g[name] is not None, f"[{backend}] no gradient for {name}"
        torch.testing.assert_close(g[name], g_ref[name], atol=atol, rtol=rtol,
                                   msg=lambda m, n=name: f"[{backend}] grad {n}: {m}")
        errs[name] = (g[name] - g_ref[name]).abs().max().item() if g[name].numel() else 0.0
    chosen = torch.zeros(c.A_m.shape[0], dtype=torch.bool, device=c.A_m.device)
    if c.idx.numel() and c.x.numel():
        # only samples that own tokens can give their experts a gradient
        has_tokens = torch.ones(c.num_samples, dtype=torch.bool, device=c.x.device) if c.sot is None else \
            torch.bincount(c.sot.long(), minlength=c.num_samples) > 0
        chosen[c.idx[has_tokens].long().reshape(-1)] = True
    if c.trainable is not None:
        for name in ("A_m", "B_m"):
            assert torch.count_nonzero(g[name][~c.trainable]) == 0, f"[{backend}] frozen rows of {name} got grad"
        chosen &= c.trainable
    if c.x.numel():
        for name in ("A_m",):  # B_m rows can be legitimately ~0 only if x is 0; A_m grads depend on B rows != 0
            assert bool((g[name][chosen].abs().sum(1) > 0).all()), f"[{backend}] a chosen trainable row of {name} got no grad"
        assert bool((g["B_m"][chosen].abs().sum(1) > 0).all()), f"[{backend}] a chosen trainable row of B_m got no grad"
    return errs


def with_(c: Case, **kw) -> Case:
    return replace(c, **kw)
