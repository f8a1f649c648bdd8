"""The triton gate kernels against the reference gate (CPU through TRITON_INTERPRET=1, float32)."""
from __future__ import annotations

import os

import pytest
import torch

import pclr
from pclr import dispatch
from pclr.backends.base import GateInputs

triton_backend = pytest.importorskip("pclr.backends.triton")
if triton_backend.IMPORT_ERROR is None:
    from pclr.backends.triton import configs
pytestmark = pytest.mark.skipif(bool(dispatch.reasons("triton", "info", None)),
                                reason="triton backend unavailable here")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _problem(B, n, dims, seed=0, zero_rows=(), device=DEVICE, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = tuple(torch.randn(B, d, generator=g).to(device, dtype) for d in dims)
    k = tuple(torch.randn(n, d, generator=g).to(device, dtype) for d in dims)
    for p, b in zero_rows:  # a sample without that part (e.g. no image): contributes 0
        q[p][b] = 0
    return q, k


def _both(q, k, r, **kw):
    got = pclr.lrp_gate(q, k, r, backend="triton", **kw)
    ref = pclr.lrp_gate(q, k, r, backend="reference", **kw)
    return got, ref


@pytest.mark.parametrize("scope", ["sample", "batch"])
@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("B,n,dims,r", [
    (1, 7, (5,), 1),  # B = 1, r = 1, tiny d
    (5, 100, (40, 24), 9),  # two parts (text, vision), n spans several key tiles
    (4, 33, (70, 9, 17), 33),  # three parts (accumulating launch), r = n: the whole ranking
])
def test_gate_matches_reference(scope, mode, B, n, dims, r):
    q, k = _problem(B, n, dims, zero_rows=[(len(dims) - 1, 0)])
    w = tuple([1.0, 0.25, 0.5][: len(dims)])
    (idx, val), (idx_r, val_r) = _both(q, k, r, weights=w, scope=scope, mode=mode)
    assert idx.dtype == torch.int32 and val.dtype == torch.float32 and idx.shape == (B, r)
    assert torch.equal(idx, idx_r)
    torch.testing.assert_close(val, val_r, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("scope", ["sample", "batch"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_gate_candidates(scope, per_sample):
    B, n, r = 3, 40, 5
    q, k = _problem(B, n, (16, 8), seed=1)
    g = torch.Generator().manual_seed(2)
    if per_sample:
        cand = torch.rand(B, n, generator=g) > 0.4
    else:
        cand = torch.rand(n, generator=g) > 0.4
    cand[..., :r] = True  # at least r candidates everywhere (and in the batch-wide intersection)
    cand = cand.to(DEVICE)
    (idx, val), (idx_r, val_r) = _both(q, k, r, weights=(1.0, 0.25), candidates=cand, scope=scope, mode="soft")
    assert torch.equal(idx, idx_r)
    torch.testing.assert_close(val, val_r, atol=1e-6, rtol=1e-5)
    allowed = cand if cand.dim() == 2 else cand.expand(B, n)
    assert bool(allowed.gather(1, idx.long()).all())


def test_gate_ties_go_to_lower_index():
    # Ties must be exact whatever order a backend sums in, so every score is built from exactly representable
    # values: entries in {-1, 0, 1} with exactly 4 non-zeros per row give norms of exactly 2, normalised entries
    # of +-0.5 and dot products that are multiples of 1/4. Distinct keys tie often and experts j and j + 12 are
    # duplicates; the reference's stable sort keeps the lower index first and the kernel must agree.
    r = 10  # of n = 24 experts (12 keys, each twice)
    g = torch.Generator().manual_seed(3)

    def signed_rows(rows, d=20, nnz=4):
        out = torch.zeros(rows, d)
        for i in range(rows):
            cols = torch.randperm(d, generator=g)[:nnz]
            out[i, cols] = torch.randint(0, 2, (nnz,), generator=g).float() * 2 - 1
        return out.to(DEVICE)

    q, k = signed_rows(3), signed_rows(12)
    keys = torch.cat([k, k])  # experts j and j + 12 tie
    for scope in ("sample", "batch"):
        (idx, _), (idx_r, _) = _both(q, (keys,), r, scope=scope)
        assert torch.equal(idx, idx_r)
        for j in range(12):  # a duplicate never comes before its lower-index twin
            row_has = (idx == j + 12).any(1)
            assert bool((idx == j).any(1)[row_has].all())
    # all-zero query: every score is 0, the top-r are simply the r lowest indices
    zq = torch.zeros(2, 20, device=DEVICE)
    idx, val = pclr.lrp_gate(zq, keys, r, backend="triton", mode="soft")
    assert torch.equal(idx.cpu(), torch.arange(r, dtype=torch.int32).expand(2, r))
    assert torch.count_nonzero(val) == 0


def test_gate_soft_gradients_reach_query_and_keys():
    B, n, r = 4, 30, 6
    q0, k0 = _problem(B, n, (24, 10), seed=4)
    grads = {}
    for be in ("reference", "triton"):
        q = tuple(t.clone().requires_grad_(True) for t in q0)
        k = tuple(t.clone().requires_grad_(True) for t in k0)
        _idx, val = pclr.lrp_gate(q, k, r, weights=(1.0, 0.25), mode="soft", backend=be)
        (val * torch.arange(1, r + 1, device=DEVICE)).sum().backward()
        grads[be] = [t.grad for t in q + k]
    for got, ref in zip(grads["triton"], grads["reference"]):
        assert got is not None and bool(got.abs().sum() > 0)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_gate_hard_values_are_constants():
    # keys are parameters in a model: a hard gate must not route a backward into the (non-differentiable) kernel
    q, k = _problem(2, 12, (8,), seed=9)
    kp = k[0].clone().requires_grad_(True)
    _idx, val = pclr.lrp_gate(q[0], kp, 3, backend="triton")
    assert not val.requires_grad and torch.equal(val, torch.ones_like(val))


def test_gate_compiles_fullgraph():
    q, k = _problem(3, 20, (16, 8), seed=5)

    def f(q1, q2, k1, k2):
        return pclr.lrp_gate((q1, q2), (k1, k2), 4, weights=(1.0, 0.25), backend="triton")

    cf = torch.compile(f, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    idx, val = cf(*q, *k)
    idx_r, val_r = f(*q, *k)
    assert torch.equal(idx, idx_r) and torch.equal(val, val_r)


def test_gate_float64_matches_reference():
    q, k = _problem(3, 40, (16, 8), seed=8, dtype=torch.float64)
    q = (q[0], q[1].float())  # mixed parts: the reference scores in fp64 as soon as one part is fp64
    for mode in ("hard", "soft"):
        (idx, val), (idx_r, val_r) = _both(q, k, 6, weights=(1.0, 0.25), mode=mode)
        assert torch.equal(idx, idx_r) and val.dtype == val_r.dtype  # fp64 soft scores; hard gates are fp32 ones
        torch.testing.assert_close(val, val_r, atol=1e-12, rtol=1e-12)


def test_gate_fake_shapes():
    q, k = _problem(3, 20, (16,), seed=6)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq, fk = mode.from_tensor(q[0]), mode.from_tensor(k[0])
        idx, val = torch.ops.pclr.triton_lrp_gate([fq], [fk], [1.0], 5, None, "sample", "hard")
    assert idx.shape == (3, 5) and idx.dtype == torch.int32 and val.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gate_half_inputs_gpu(dtype):
    # the largest supported shapes (n = 4096, d up to 4096), half-precision parts: compare the chosen scores, not indices (near ties)
    q, k = _problem(8, 4096, (4096, 1024), seed=7, dtype=dtype)
    (idx, val), (idx_r, val_r) = _both(q, k, 256, weights=(1.0, 0.25), mode="soft")
    torch.testing.assert_close(val, val_r, atol=1e-3, rtol=1e-3)
    assert torch.equal(idx.sort(1).values, idx_r.sort(1).values) or (val - val_r).abs().max() < 1e-3


def test_not_supported_reasons_are_plain(monkeypatch):
    be = triton_backend.BACKEND
    q, k = _problem(2, 8, (4,), device="cpu")
    inputs = GateInputs(query=q, keys=k, weights=(1.0,), r=2, candidates=None, scope="sample", mode="hard")
    monkeypatch.setattr(configs, "INTERPRET", False)
    why = be.not_supported_reasons("lrp_gate", inputs)
    assert any("triton needs CUDA tensors (or TRITON_INTERPRET=1" in w for w in why)
    monkeypatch.setattr(configs, "INTERPRET", True)
    assert be.not_supported_reasons("lrp_gate", inputs) == []
    assert triton_backend.dtype_reasons("keys[0]", torch.float64, torch.device("cpu")) == []  # interpreter: numpy
    assert any("float64" in w for w in triton_backend.dtype_reasons("keys[0]", torch.float64, torch.device("cuda")))
    assert any("int64" in w for w in triton_backend.dtype_reasons("keys[0]", torch.int64, torch.device("cuda")))
    assert os.environ.get("TRITON_INTERPRET") or torch.cuda.is_available()
