"""Executed work of the default Triton paths, counted through the interpreter, against the floor of the same call.

The counts come from :func:`pclr.bench.work.measure_work` (what ``pclr bench --work`` runs for each provider and
point), on the points of the ``work`` preset: the scaled target point (fp32, d = 1024, T = 1024 in 8 samples, n = 64,
r = 24, n_s = 8, so R = 32) and decode B = 8 and 64 one-token samples. The path under test is the triton backend
with its shape-chosen forward ("auto": extended for prefill / training, decode for at most 64 tokens). The counts
are exact integers that depend on the code path and the shapes only (not on the machine or the summation order).
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

import pclr
from pclr.bench.problems import make_problem
from pclr.bench.provider import LINEAR, RunOptions
from pclr.bench.providers import PclrBackend
from pclr.bench.shapes import PRESETS, WORK_LABEL, sweep_shapes
from pclr.bench.work import WorkCounter, measure_work
from pclr.functional import lrp_linear
from pclr.kernels import lrp_fwd
from pclr.validation import set_validation

AUTO = PclrBackend("pclr-triton-auto", "triton", LINEAR, {}, "the triton backend, forward chosen by shape",
                   variant="auto")
CPU = torch.device("cpu")
PRESET = PRESETS["work"]


def _row(mode: str, B: int | None = None) -> dict[str, Any]:
    """The ``--work`` row of the auto path at the preset's ``mode`` point (decode: the one with ``B`` samples).

    The sweep calls each provider once before measuring (compile / autotune on a GPU); under the interpreter that
    call does nothing the measured one does not, so the row is measured on the first call (the run time halves; the
    FLOPs and Triton launches are the same: building the segment map on a first call adds torch ops only).
    """
    shapes = [s for s in sweep_shapes(PRESET, [mode], ["fp32"]) if B is None or s.B == B]
    assert len(shapes) == 1, [str(s) for s in shapes]
    problem = make_problem(shapes[0], CPU)
    with AUTO.context():
        built = AUTO.build(problem, RunOptions(interpreter=True))
        return measure_work(shapes[0], AUTO, built, CPU, PRESET, WORK_LABEL, None, problem)


def _triton_launches(row: dict[str, Any]) -> int:
    """Triton kernel launches of a measured call (its note lists "name x count" per kernel and torch op; the torch
    ops of a CPU call include the value checks that a GPU call skips)."""
    counts = dict(item.rsplit("x", 1) for item in row["note"].split())
    return sum(int(v) for k, v in counts.items() if not k.startswith("torch."))


# fwdbwd executes about three times the forward's interpreted program steps (≈ 75 s of CPU time against ≈ 25 s)
@pytest.mark.parametrize("mode", ["fwd", pytest.param("fwdbwd", marks=pytest.mark.slow)])
def test_prefill_flops_at_the_floor(mode: str) -> None:
    row = _row(mode)
    # extended path: S once per token (rank chunk 32 = R), one K-extended GEMM; the backward from the saved S
    assert abs(row["flops_vs_floor"] - 1.0) <= 0.01, row
    # forward: shrink, its split-K sum, the GEMM; backward: the same for dS and dX, rank grads, row reduction
    assert _triton_launches(row) <= (3 if mode == "fwd" else 8), row


@pytest.mark.parametrize("B", [8, 64])
def test_decode_bytes_near_the_floor(B: int) -> None:
    """Decode moves W once, each used pool row once, x and y: compared as compulsory traffic (each address once per
    launch). The raw executed bytes also count x re-read by every output tile of the fused GEMV, which a GPU serves
    from L2; they are reported in the row (``bytes_vs_floor``) but not the target.

    One launch (shrink phase, then base + expand phase): x, read by both phases, is one launch's working set, so
    what remains above the floor is the gated S the expand phase reads back and the usage bitmap."""
    row = _row("decode", B)
    assert row["unique_vs_floor"] <= 1.05, row
    assert row["bytes_vs_floor"] >= row["unique_vs_floor"], row
    assert _triton_launches(row) == 1, row


def _no_validation_counts(fn):
    """(WorkCounter of ``fn()``, its result) with the value checks off: they run by default on CPU only (a host
    sync each), never on a GPU, and are not the path's work."""
    set_validation(False)
    try:
        with WorkCounter() as wc:
            out = fn()
    finally:
        set_validation(None)
    return wc, out


def _split_counts(wc: WorkCounter) -> tuple[dict[str, int], dict[str, int]]:
    """(Triton kernel launches, torch op launches) by name; allocations (empty, empty_like) are not launches."""
    by = wc.work.by_kernel
    return ({k: v for k, v in by.items() if not k.startswith("torch.")},
            {k: v for k, v in by.items() if k.startswith("torch.")})


@pytest.mark.parametrize("padded", [False, True])
def test_extended_path_launches_only_triton_kernels(padded: bool) -> None:
    """A packed batch's segment map is cached on sample_of_token, a padded batch's sample_of_token and tile map on
    its shape, the reduction plan of the backward on idx, and an idx outside the pool is masked inside the kernels:
    once the caches are warm, the extended forward launches the shrink (its split-K sum when the grid is short) and
    the K-extended GEMM, and the backward the dS shrink, the dX GEMM, the rank-gradient kernel and the row
    reduction; no torch op runs in either (no arange / repeat_interleave / sort for metadata), only allocations."""
    g = torch.Generator().manual_seed(0)
    T, d, n, r, n_s, B = 256, 64, 16, 6, 2, 4
    x = torch.randn(T, d, generator=g)
    x = (x.reshape(B, T // B, d) if padded else x).requires_grad_()
    w = torch.randn(d, d, generator=g)
    A_m, B_m = torch.randn(n, d, generator=g).requires_grad_(), torch.randn(n, d, generator=g).requires_grad_()
    A_s, B_s = torch.randn(n_s, d, generator=g).requires_grad_(), torch.randn(n_s, d, generator=g).requires_grad_()
    idx = torch.stack([torch.randperm(n, generator=g)[:r] for _ in range(B)]).to(torch.int32)
    val = torch.rand(B, r, generator=g).requires_grad_()
    sot = torch.randint(0, B, (T,), generator=g, dtype=torch.int32)
    trainable = torch.ones(n, dtype=torch.bool)
    trainable[idx[0, 0]] = False
    leaves = (x, A_m, B_m, A_s, B_s, val)

    def call() -> torch.Tensor:
        return lrp_linear(x, w, None, A_m, B_m, idx, val, A_s=A_s, B_s=B_s, sample_of_token=None if padded else sot,
                          trainable=trainable, backend="triton", variant="auto")

    y = call()  # builds and caches the segment map and the reduction plan
    y.backward(torch.ones_like(y))
    wf, y = _no_validation_counts(call)
    grad = torch.ones_like(y)
    for t in leaves:
        t.grad = None  # a second backward would otherwise add into the first one's .grad (torch ops of autograd)
    wb, _ = _no_validation_counts(lambda: y.backward(grad))
    fwd_kernels, fwd_ops = _split_counts(wf)
    assert not fwd_ops, fwd_ops
    assert sum(fwd_kernels.values()) <= 3, fwd_kernels
    assert "kext_gemm_kernel" in fwd_kernels and "shrink_kernel" in fwd_kernels, fwd_kernels
    bwd_kernels, bwd_ops = _split_counts(wb)
    assert not bwd_ops, bwd_ops
    assert {"shrink_kernel", "kext_gemm_kernel", "rank_grad_kernel", "rows_reduce_kernel"} <= set(bwd_kernels)
    assert sum(bwd_kernels.values()) <= 5, bwd_kernels
    assert all(t.grad is not None for t in leaves)


def test_one_pass_computes_each_sample_gate_once() -> None:
    """The one-pass launch evaluates the gate B times (one gate program per sample), not once per LRP program: its
    FLOPs are at most those of the gate kernels plus the same (fused) LRP forward run separately, in one Triton
    launch, with the same result."""
    g = torch.Generator().manual_seed(3)
    B, L, d, n, r, n_s = 4, 40, 64, 32, 4, 2
    T = B * L
    x = torch.randn(T, d, generator=g)
    w, bias = torch.randn(d, d, generator=g) / d**0.5, torch.randn(d, generator=g)
    A_m, B_m = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    A_s, B_s = torch.randn(n_s, d, generator=g), torch.randn(n_s, d, generator=g)
    q = (torch.randn(B, 48, generator=g), torch.randn(B, 16, generator=g))
    k = (torch.randn(n, 48, generator=g), torch.randn(n, 16, generator=g))
    sot = torch.arange(T, dtype=torch.int32) // L
    lin = {"A_s": A_s, "B_s": B_s, "beta_m": 1.5, "beta_s": 0.5, "sample_of_token": sot}
    gate = {"weights": (1.0, 0.25), "mode": "soft"}

    gate_calls = []
    real_gate = lrp_fwd.sample_gate

    def counted_gate(*args: Any, **kwargs: Any) -> Any:
        gate_calls.append(1)
        return real_gate(*args, **kwargs)

    set_validation(False)  # the value checks (a host sync each) run by default on CPU only, never on a GPU
    try:
        with torch.no_grad():
            pclr.lrp_gate_linear(x, w, bias, A_m, B_m, q, k, r, backend="triton", **lin, **gate)  # segment map
            with WorkCounter() as one, pytest.MonkeyPatch.context() as mp:
                mp.setattr(lrp_fwd, "sample_gate", counted_gate)
                y, idx, val = pclr.lrp_gate_linear(x, w, bias, A_m, B_m, q, k, r, backend="triton", **lin, **gate)
            with WorkCounter() as sep_gate:
                idx_g, val_g = pclr.lrp_gate(q, k, r, backend="triton", **gate)
            with WorkCounter() as sep_lrp:
                y_g = pclr.lrp_linear(x, w, bias, A_m, B_m, idx_g, val_g, backend="triton", variant="fused", **lin)
    finally:
        set_validation(None)
    assert len(gate_calls) == B, len(gate_calls)
    kernels = {name: c for name, c in one.work.by_kernel.items() if not name.startswith("torch.")}
    assert kernels == {"lrp_one_pass_kernel": 1}, one.work.by_kernel
    assert one.work.flops <= sep_gate.work.flops + sep_lrp.work.flops, (one.work, sep_gate.work, sep_lrp.work)
    assert torch.equal(idx, idx_g)
    torch.testing.assert_close(val, val_g, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(y, y_g, atol=1e-4, rtol=1e-4)


def test_counter_counts_matmul_class_torch_ops() -> None:
    """Torch matmuls between kernels count by their own FLOPs: ``@`` (composite matmul), F.linear and mm alike
    (the epilogue path's dX = dY·W runs as ``@``)."""
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    with WorkCounter() as wc:
        _ = a @ b
        _ = torch.nn.functional.linear(a, b.t())
        _ = torch.mm(a, b)
        _ = torch.randn(2, 5, 7) @ b
    assert wc.work.flops == 3 * 2 * 5 * 3 * 7 + 2 * 2 * 5 * 3 * 7, wc.work
