"""The cuda backend (pclr._C).

CPU (always): it reports why it cannot run instead of failing to import; forcing it raises BackendUnavailableError
listing the reasons; and its Python wrapper (argument order, autograd plumbing, soft-gate gradients) is exercised
against CPU stand-ins of the C++ ops registered with the very schemas parsed from csrc/ops.cpp.

GPU (marked ``gpu``, needs the built extension): the correctness matrix of every backend (odd shapes, T = 1, 17, 333,
r = 1, n_s = 0, B = 1 and B > T/2, a sample with no tokens, packed and padded, every gradient, frozen rows exactly
zero), fp32 against the reference and bf16/fp16 by the rule kernel error <= 2 x same-dtype torch error + atol, the
gate, determinism, torch.compile, and CUDA-graph capture + replay of gate + forward with changing queries.
"""
from __future__ import annotations

import os
import re

import pytest
import torch
from lrp_cases import (
    GRAD_NAMES,
    Case,
    assert_matches_reference,
    dense_lrp,
    make_case,
    run_case,
    with_,
)

import pclr
from pclr import dispatch
from pclr.backends import cuda as cuda_backend
from pclr.backends import reference
from pclr.backends.base import (
    BackendUnavailableError,
    GateInputs,
    LinearInputs,
    LinearNeeds,
)
from pclr.scoring import gate_scores

OPS_CPP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "ops.cpp")

# name -> make_case kwargs. T > 64 takes the tiled kernels, T <= 64 the single-launch decode kernel (forward).
CASES = {
    "padded_small": {"B": 3, "L": 5, "d_in": 16, "d_out": 12, "n": 10, "r": 4, "n_s": 2},
    "T1": {"B": 1, "L": 1, "d_in": 33, "d_out": 17, "n": 8, "r": 3, "n_s": 2},
    "T17_empty_sample": {"B": 3, "lens": [5, 0, 12], "d_in": 33, "d_out": 47, "n": 12, "r": 5, "n_s": 2},
    "T333_empty_sample": {"B": 4, "lens": [100, 0, 133, 100], "d_in": 100, "d_out": 72, "n": 40, "r": 7, "n_s": 3},
    "r1_ns0": {"B": 2, "lens": [9, 8], "d_in": 24, "d_out": 20, "n": 6, "r": 1, "n_s": 0},
    "r1_ns0_tiled": {"B": 2, "lens": [90, 8], "d_in": 24, "d_out": 20, "n": 6, "r": 1, "n_s": 0},
    "B_gt_half_T_decode": {"B": 12, "lens": [2, 1, 1, 0, 1, 3, 1, 1, 0, 1, 2, 1], "d_in": 40, "d_out": 36, "n": 16, "r": 4, "n_s": 2},
    "B_gt_half_T_tiled": {"B": 100, "lens": [i % 3 for i in range(100)], "d_in": 48, "d_out": 40, "n": 30, "r": 3, "n_s": 2},
    "padded_tiled": {"B": 2, "L": 70, "d_in": 64, "d_out": 64, "n": 20, "r": 6, "n_s": 4},
    "R_over_tile": {"B": 2, "lens": [70, 3], "d_in": 96, "d_out": 80, "n": 64, "r": 40, "n_s": 32},
    "frozen_rows": {"B": 3, "lens": [30, 50, 20], "d_in": 32, "d_out": 32, "n": 12, "r": 4, "n_s": 2, "frozen": (0, 1, 2, 3, 4, 5)},
    "no_bias": {"B": 2, "L": 3, "d_in": 8, "d_out": 8, "n": 5, "r": 2, "n_s": 1, "bias": False},
}


# ---------------------------------------------------------------------------------------------------------------
# CPU: reasons
# ---------------------------------------------------------------------------------------------------------------
def test_module_imports_and_registers_backend():
    assert cuda_backend.BACKEND.name == "cuda"
    assert dispatch.get_backend("cuda") is cuda_backend.BACKEND
    assert hasattr(torch.ops.pclr, "cuda_lrp_linear")  # the autograd custom op exists even without pclr._C


def test_absent_extension_is_a_reason_with_build_command(monkeypatch):
    monkeypatch.setattr(cuda_backend, "extension_reason",
                        lambda: "the CUDA extension pclr._C is not available (ImportError: x); " + cuda_backend.BUILD_HINT)
    why = dispatch.reasons("cuda", "info", None)
    assert any("PCLR_FORCE_CUDA_BUILD=1 pip install --no-build-isolation -e ." in w for w in why), why


@pytest.mark.skipif(cuda_backend.extension_reason() is None, reason="pclr._C is built here")
def test_real_extension_absent_reason():
    why = dispatch.available_backends()["cuda"]
    assert why and "pclr._C" in why[0] and "PCLR_FORCE_CUDA_BUILD=1" in why[0]


def test_cpu_tensors_are_a_reason_and_forcing_raises():
    c = make_case()
    with pytest.raises(BackendUnavailableError) as err:
        pclr.lrp_linear(c.x, c.weight, c.bias, c.A_m, c.B_m, c.idx, c.val, A_s=c.A_s, B_s=c.B_s, backend="cuda")
    msg = str(err.value)
    assert "'cuda'" in msg and "CUDA tensors only" in msg
    if cuda_backend.extension_reason() is not None:
        assert "PCLR_FORCE_CUDA_BUILD=1" in msg
    with pytest.raises(BackendUnavailableError, match="CUDA tensors only"):
        pclr.lrp_gate(torch.randn(2, 8), torch.randn(10, 8), 3, backend="cuda")


def test_env_forcing_raises(monkeypatch):
    monkeypatch.setenv("PCLR_BACKEND", "cuda")
    c = make_case()
    with pytest.raises(BackendUnavailableError, match="cuda"):
        pclr.lrp_linear(c.x, c.weight, c.bias, c.A_m, c.B_m, c.idx, c.val)


def test_dtype_and_size_reasons(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_device_reasons", lambda device: [])
    monkeypatch.setattr(cuda_backend, "extension_reason", lambda: None)
    c = make_case(dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="float64"):
        pclr.lrp_linear(c.x, c.weight, c.bias, c.A_m, c.B_m, c.idx, c.val, backend="cuda")
    q, k = torch.randn(2, 4), torch.randn(cuda_backend.GATE_MAX_EXPERTS + 1, 4)
    why = cuda_backend.BACKEND.not_supported_reasons(
        "lrp_gate", GateInputs((q,), (k,), (1.0,), 3, None, "sample", "hard"))
    assert any("n <= 4096" in w for w in why), why


def test_dispatch_never_tries_cuda_on_cpu():
    c = make_case()
    assert dispatch.select("lrp_linear", _inputs_stub(c.x.reshape(-1, c.x.shape[-1]))).name == "reference"
    y = pclr.lrp_linear(c.x, c.weight, c.bias, c.A_m, c.B_m, c.idx, c.val, A_s=c.A_s, B_s=c.B_s,
                        beta_m=c.beta_m, beta_s=c.beta_s)
    torch.testing.assert_close(y, dense_lrp(c))


class _inputs_stub:
    """What dispatch reads of LinearInputs when choosing: the packed x [T, d_in] and its device."""

    def __init__(self, x):
        self.x, self.device = x, x.device


# ---------------------------------------------------------------------------------------------------------------
# CPU: the Python wrapper against stand-ins of the C++ ops (same schemas, reference arithmetic)
# ---------------------------------------------------------------------------------------------------------------
def cpp_schemas() -> dict[str, str]:
    """name -> schema of every m.def(...) in csrc/ops.cpp (adjacent string literals joined)."""
    with open(OPS_CPP) as f:
        src = f.read()
    out = {}
    for body in re.findall(r"m\.def\((.*?)\);", src, flags=re.DOTALL):
        schema = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', body))
        out[schema.split("(", 1)[0]] = schema
    return out


def test_ops_cpp_declares_the_ops_the_wrapper_calls():
    assert set(cpp_schemas()) == {"cuda_gate", "cuda_lrp_forward", "cuda_lrp_backward"}


@pytest.fixture
def cpu_standin_ops(monkeypatch):
    if cuda_backend.extension_reason() is None:
        pytest.skip("pclr._C is loaded: its real ops own these names")
    lib = torch.library.Library("pclr", "FRAGMENT")
    schemas = cpp_schemas()
    for schema in schemas.values():
        lib.define(schema)

    def fwd(x, weight, bias, A_m, B_m, idx, val, A_s, B_s, sot, beta_m, beta_s, padded_len):
        return reference.linear_forward(LinearInputs(x, weight, bias, A_m, B_m, idx, val, A_s, B_s, beta_m, beta_s,
                                                     sot, None, padded_len))

    def bwd(grad, x, weight, A_m, B_m, idx, val, A_s, B_s, sot, trainable, beta_m, beta_s, padded_len,
            need_x, need_pool, need_val, need_shared, workspace_cap_bytes=0):
        inputs = LinearInputs(x, weight, None, A_m, B_m, idx, val, A_s, B_s, beta_m, beta_s, sot, trainable,
                              padded_len)
        needs = LinearNeeds(x=need_x, A_m=need_pool, B_m=need_pool, val=need_val, A_s=need_shared, B_s=need_shared)
        g = reference.linear_backward(grad, inputs, needs)
        return tuple(x.new_empty(0) if o is None else o for o in (g.x, g.A_m, g.B_m, g.val, g.A_s, g.B_s))

    def gate(query, keys, weights, r, candidates, batch_scope, soft):
        return reference.gate(GateInputs(tuple(query), tuple(keys), tuple(weights), r, candidates,
                                         "batch" if batch_scope else "sample", "soft" if soft else "hard"))

    lib.impl("cuda_lrp_forward", fwd, "CPU")
    lib.impl("cuda_lrp_backward", bwd, "CPU")
    lib.impl("cuda_gate", gate, "CPU")
    monkeypatch.setattr(cuda_backend, "extension_reason", lambda: None)
    monkeypatch.setattr(cuda_backend, "_device_reasons", lambda device: [])
    yield
    lib._destroy()


@pytest.mark.parametrize("name", ["padded_small", "T17_empty_sample", "r1_ns0", "frozen_rows", "no_bias"])
@pytest.mark.parametrize("soft", [False, True])
def test_wrapper_plumbing_on_cpu(cpu_standin_ops, name, soft):
    c = make_case(**CASES[name], soft=soft)
    assert_matches_reference(c, "cuda", soft=soft)


@pytest.mark.parametrize("scope", ["sample", "batch"])
def test_wrapper_gate_soft_gradients_on_cpu(cpu_standin_ops, scope):
    q = (torch.randn(3, 8, requires_grad=True), torch.randn(3, 5, requires_grad=True))
    k = (torch.randn(20, 8, requires_grad=True), torch.randn(20, 5, requires_grad=True))
    out = {}
    for be in ("reference", "cuda"):
        idx, val = pclr.lrp_gate(q, k, 4, weights=(1.0, 0.25), scope=scope, mode="soft", backend=be)
        grads = torch.autograd.grad(val.sum(), (*q, *k))
        out[be] = (idx, val, grads)
    assert torch.equal(out["cuda"][0], out["reference"][0])
    torch.testing.assert_close(out["cuda"][1], out["reference"][1])
    for a, b in zip(out["cuda"][2], out["reference"][2]):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------


def _to(c: Case, device=None, dtype=None) -> Case:
    """Case moved / cast (val stays fp32 unless dtype is fp64; index tensors keep their dtype)."""
    def cv(t, is_float=True):
        if t is None:
            return None
        t = t.to(device) if device is not None else t
        return t.to(dtype) if (dtype is not None and is_float) else t
    val_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return with_(c, x=cv(c.x), weight=cv(c.weight), bias=cv(c.bias), A_m=cv(c.A_m), B_m=cv(c.B_m),
                 A_s=cv(c.A_s), B_s=cv(c.B_s), idx=cv(c.idx, False), sot=cv(c.sot, False),
                 trainable=cv(c.trainable, False), val=cv(c.val, False).to(val_dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("soft", [False, True])
def test_gpu_fp32_matches_reference(ext, name, soft):
    c = _to(make_case(**CASES[name], soft=soft), device="cuda")
    assert_matches_reference(c, "cuda", atol=2e-4, rtol=2e-4, soft=soft)


def _dense_run(c: Case, grad_out: torch.Tensor):
    """The unfused torch formulation in the case's own dtype (the 'same-dtype torch' of the error rule)."""
    leaves = {n: getattr(c, n).detach().clone().requires_grad_(True) for n in GRAD_NAMES if getattr(c, n) is not None}
    y = dense_lrp(with_(c, **leaves))
    y.backward(grad_out)
    grads = {n: t.grad for n, t in leaves.items()}
    if c.trainable is not None:  # the dense formulation has no notion of frozen rows
        for n in ("A_m", "B_m"):
            grads[n] = grads[n] * c.trainable.unsqueeze(1).to(grads[n].dtype)
    return y.detach(), grads


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_half_error_rule(ext, dtype, name):
    c = _to(make_case(**CASES[name], soft=True), device="cuda", dtype=dtype)
    c64 = _to(c, dtype=torch.float64)
    y_shape = (*c.x.shape[:-1], c.weight.shape[0])
    grad_out = torch.randn(y_shape, generator=torch.Generator().manual_seed(3)).to("cuda", dtype)
    y_true, g_true = run_case(c64, "reference", grad_out=grad_out.double())
    y_k, g_k = run_case(c, "cuda", grad_out=grad_out)
    y_t, g_t = _dense_run(c, grad_out)
    atol_rel = {torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    pairs = [("y", y_k, y_t, y_true)] + [(n, g_k[n], g_t[n], g_true[n]) for n in g_true]
    for n, k, t, truth in pairs:
        assert k is not None, f"no gradient for {n}"
        if truth.numel() == 0:
            continue
        err_k = (k.double() - truth).abs().max().item()
        err_t = (t.double() - truth).abs().max().item()
        atol = atol_rel * (1.0 + truth.abs().max().item())
        assert err_k <= 2 * err_t + atol, f"{n}: cuda error {err_k:.3g} > 2 x torch {dtype} error {err_t:.3g} + {atol:.3g}"
    if c.trainable is not None:
        for n in ("A_m", "B_m"):
            assert torch.count_nonzero(g_k[n][~c.trainable]) == 0, f"frozen rows of {n} got gradient"


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["T17_empty_sample", "T333_empty_sample", "B_gt_half_T_tiled"])
def test_gpu_backward_is_deterministic(ext, name):
    c = _to(make_case(**CASES[name], soft=True), device="cuda", dtype=torch.bfloat16)
    _, g1 = run_case(c, "cuda")
    _, g2 = run_case(c, "cuda")
    for n in g1:
        assert torch.equal(g1[n], g2[n]), f"{n} differs between two identical runs"


def _separated_gate_problem(B, n, d, r, device, seed=0):
    """Keys and queries whose top-r scores are far apart (so indices, not only outputs, can be compared)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    q = torch.zeros(B, d)
    for b in range(B):  # a decreasing mix of r distinct keys: score gaps ~0.1
        chosen = torch.randperm(n, generator=g)[:r]
        for rank, j in enumerate(chosen.tolist()):
            q[b] += (1.0 - 0.1 * rank) * keys[j]
    return q.to(device), keys.to(device)


@pytest.mark.gpu
@pytest.mark.parametrize("scope", ["sample", "batch"])
@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,r", [(7, 1), (64, 8), (300, 17), (4096, 64)])
def test_gpu_gate_matches_reference(ext, scope, mode, dtype, n, r):
    d_t, d_v = 256, 48
    q_t, k_t = _separated_gate_problem(5, n, d_t, r, "cuda")
    q_v, k_v = torch.randn(5, d_v, device="cuda"), torch.randn(n, d_v, device="cuda")
    q_v[2] = 0  # a sample without image: its vision part contributes 0
    q, k = (q_t.to(dtype), q_v.to(dtype)), (k_t.to(dtype), k_v.to(dtype))
    cand = torch.rand(5, n, device="cuda") > 0.2
    cand[:, : r + 1] = True
    kw = {"weights": (1.0, 0.25), "scope": scope, "mode": mode}
    for candidates in (None, cand):
        idx_c, val_c = pclr.lrp_gate(q, k, r, candidates=candidates, backend="cuda", **kw)
        idx_r, val_r = pclr.lrp_gate(q, k, r, candidates=candidates, backend="reference", **kw)
        assert idx_c.dtype == torch.int32 and val_c.dtype == torch.float32
        # the chosen experts' reference scores must equal the reference's top-r scores (robust to near ties)
        score = gate_scores(q, k, (1.0, 0.25))
        rank = score if candidates is None else score.masked_fill(~candidates, float("-inf"))
        if scope == "batch":
            rank = rank.sum(0, keepdim=True).expand_as(score)
        torch.testing.assert_close(rank.gather(1, idx_c.long()), rank.gather(1, idx_r.long()), atol=1e-4, rtol=0)
        torch.testing.assert_close(val_c, val_r, atol=1e-4 if dtype == torch.float32 else 2e-2, rtol=0)


@pytest.mark.gpu
def test_gpu_gate_ties_go_to_lower_index(ext):
    keys = torch.ones(50, 8, device="cuda")  # all scores equal
    q = torch.randn(3, 8, device="cuda")
    idx, _ = pclr.lrp_gate(q, keys, 5, backend="cuda")
    assert idx.tolist() == [[0, 1, 2, 3, 4]] * 3
    idx, _ = pclr.lrp_gate(torch.zeros(2, 8, device="cuda"), torch.randn(50, 8, device="cuda"), 3, backend="cuda")
    assert idx.tolist() == [[0, 1, 2]] * 2  # zero query: every score is 0


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph(ext):
    c = _to(make_case(**CASES["T17_empty_sample"], soft=True), device="cuda")

    def f(x, A_m, B_m, val):
        return pclr.lrp_linear(x, c.weight, c.bias, A_m, B_m, c.idx, val, A_s=c.A_s, B_s=c.B_s, beta_m=c.beta_m,
                               beta_s=c.beta_s, sample_of_token=c.sot, backend="cuda")

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(c.x, c.A_m, c.B_m, c.val), f(c.x, c.A_m, c.B_m, c.val))


@pytest.mark.gpu
@pytest.mark.parametrize("lens", [[1] * 8, [70, 0, 40, 90]], ids=["decode", "prefill"])
def test_gpu_cuda_graph_gate_and_forward(ext, lens):
    B, n, d, r, n_s = len(lens), 96, 64, 8, 4
    c = _to(make_case(B=B, lens=lens, d_in=d, d_out=80, n=n, r=r, n_s=n_s), device="cuda", dtype=torch.bfloat16)
    keys = torch.nn.functional.normalize(torch.randn(n, d, device="cuda"), dim=-1)
    q_static = torch.zeros(B, d, device="cuda")

    def step():
        idx, val = pclr.lrp_gate(q_static, keys, r, backend="cuda")
        y = pclr.lrp_linear(c.x, c.weight, c.bias, c.A_m, c.B_m, idx, val, A_s=c.A_s, B_s=c.B_s, beta_m=c.beta_m,
                            beta_s=c.beta_s, sample_of_token=c.sot, backend="cuda")
        return idx, y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (allocator, lazy init)
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        idx_g, y_g = step()
    for seed in range(3):  # new queries each replay: the routing must follow them
        q_static.copy_(torch.randn(B, d, generator=torch.Generator().manual_seed(seed)).to("cuda"))
        graph.replay()
        torch.cuda.synchronize()
        idx_ref, val_ref = pclr.lrp_gate(q_static, keys, r, backend="reference")
        # the graph's experts must be a top-r of the new scores (compared by score: robust to near ties) ...
        score = gate_scores((q_static,), (keys,), (1.0,))
        torch.testing.assert_close(score.gather(1, idx_g.long()), score.gather(1, idx_ref.long()), atol=1e-4, rtol=0)
        # ... and the graph's output the LRP forward with exactly those experts
        y_ref = pclr.lrp_linear(c.x, c.weight, c.bias, c.A_m, c.B_m, idx_g.clone(), val_ref, A_s=c.A_s, B_s=c.B_s,
                                beta_m=c.beta_m, beta_s=c.beta_s, sample_of_token=c.sot, backend="reference")
        torch.testing.assert_close(y_g.float(), y_ref.float(), atol=2e-2, rtol=2e-2)
