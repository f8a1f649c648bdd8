"""The triton LRP linear (forward variants, backward, deterministic mode, one pass) against the reference.

CPU runs through TRITON_INTERPRET=1 in float32; shapes stay small so the interpreter finishes quickly.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from lrp_cases import assert_matches_reference, make_case, run_case, with_

import pclr
from pclr import dispatch
from pclr.backends.base import LinearInputs
from pclr.backends.reference import effective_rows

triton_backend = pytest.importorskip("pclr.backends.triton")
if triton_backend.IMPORT_ERROR is None:
    from pclr.backends.triton import configs, linear, one_pass, segments
pytestmark = pytest.mark.skipif(bool(dispatch.reasons("triton", "info", None)),
                                reason="triton backend unavailable here")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VARIANTS = ("fused", "epilogue", "split")
ERRORS: dict = {}  # largest abs error vs reference per (variant, quantity), printed at the end of the session


@pytest.fixture
def variant(request):
    pclr.set_forward_variant(request.param)
    yield request.param
    pclr.set_forward_variant(None)


def _record(tag, errs):
    for name, e in errs.items():
        ERRORS[(tag, name)] = max(ERRORS.get((tag, name), 0.0), e)


# T = B·L (padded) or Σ lens (packed). Decode-sized batches (T ≤ 64, few samples) take the single-launch path of the
# fused and epilogue variants; the others go through the token tile map.
CASES = {
    "T1": {"B": 1, "L": 1, "d_in": 16, "d_out": 12},
    "T17_padded": {"B": 1, "L": 17, "d_in": 21, "d_out": 19, "n": 9, "r": 3},
    "T17_packed_zero_sample": {"lens": [5, 0, 12], "d_in": 37, "d_out": 29, "frozen": (0, 4)},
    "r1_ns0": {"B": 2, "L": 9, "n": 6, "r": 1, "n_s": 0, "d_in": 18, "d_out": 23},
    "B_gt_half_T": {"lens": [2, 1, 1, 3, 1, 0, 2, 1, 1, 1, 2, 1, 2, 1, 1, 2, 1, 2, 1, 1, 2, 1, 1, 2, 1, 1, 2, 1, 2, 1,
                             2, 1, 2, 1, 1, 1, 1, 2, 1, 1], "d_in": 20, "d_out": 24, "n": 12, "r": 3, "soft": True},
    "T333_varlen": {"lens": [150, 0, 1, 182], "d_in": 45, "d_out": 70, "n": 17, "r": 5, "n_s": 3, "frozen": (1, 2, 3, 5, 8), "soft": True},
    "padded_tiles_nobias": {"B": 3, "L": 70, "d_in": 33, "d_out": 66, "n": 8, "r": 4, "bias": False},
}


@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
@pytest.mark.parametrize("name", list(CASES))
def test_linear_matches_reference(variant, name):
    c = make_case(**CASES[name], device=DEVICE, seed=hash(name) % 1000)
    _record(variant, assert_matches_reference(c, "triton", atol=1e-4, rtol=1e-4))


@pytest.mark.parametrize("variant", ["fused", "epilogue"], indirect=True)
def test_decode_and_tile_paths_agree(variant, monkeypatch):
    # same tokens, once small enough for the single-launch decode path, once forced through the tile map
    c = make_case(lens=[1, 1, 1, 1, 1, 1, 1, 1], d_in=40, d_out=24, device=DEVICE, seed=11, soft=True)
    assert segments.decode_block_m(8, 8) > 0
    y_dec, _ = run_case(c, "triton")
    monkeypatch.setattr(segments, "DECODE_MAX_TOKENS", 0)
    assert segments.decode_block_m(8, 8) == 0
    y_tile, _ = run_case(c, "triton")
    y_ref, _ = run_case(c, "reference")
    torch.testing.assert_close(y_dec, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_tile, y_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(DEVICE != "cpu", reason="float64 runs only through the CPU interpreter")
@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
def test_float64_interpreter(variant):
    c = make_case(lens=[4, 0, 9], d_in=20, d_out=14, frozen=(3,), soft=True, dtype=torch.float64, seed=31)
    _record(variant + "_fp64", assert_matches_reference(c, "triton", atol=1e-12, rtol=1e-10))


def test_frozen_rows_get_exact_zero_and_shared_grads():
    c = make_case(lens=[9, 4, 11], d_in=24, d_out=20, n=10, r=4, frozen=tuple(range(0, 10, 2)), device=DEVICE, seed=5)
    _, g = run_case(c, "triton")
    assert torch.count_nonzero(g["A_m"][~c.trainable]) == 0 and torch.count_nonzero(g["B_m"][~c.trainable]) == 0
    assert bool(g["A_s"].abs().sum() > 0) and bool(g["B_s"].abs().sum() > 0)


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_mode(deterministic):
    # many samples sharing experts (n = 6, r = 4) so pool rows are reduced over several samples
    c = make_case(lens=[7, 3, 0, 12, 5, 9], d_in=26, d_out=22, n=6, r=4, frozen=(2,), soft=True, device=DEVICE,
                  seed=7)
    runs = []
    for _ in range(2):
        leaves = {k: getattr(c, k).detach().clone().requires_grad_(True) for k in ("x", "A_m", "B_m", "val", "A_s",
                                                                                      "B_s")}
        y = pclr.lrp_linear(leaves["x"], c.weight, c.bias, leaves["A_m"], leaves["B_m"], c.idx, leaves["val"],
                            A_s=leaves["A_s"], B_s=leaves["B_s"], beta_m=c.beta_m, beta_s=c.beta_s,
                            sample_of_token=c.sot, trainable=c.trainable, backend="triton",
                            deterministic=deterministic)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y))  # run_case's dY
        runs.append({k: t.grad.clone() for k, t in leaves.items()})
    if deterministic:
        for k in runs[0]:
            assert torch.equal(runs[0][k], runs[1][k]), f"grad {k} differs between two deterministic runs"
    _, g_ref = run_case(c, "reference")
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k], g_ref[k], atol=1e-4, rtol=1e-4)


def test_only_some_grads_requested():
    # frozen pool (no A_m/B_m grad), only x and shared ranks: the backward skips the pool reduction
    c = make_case(lens=[6, 10], d_in=20, d_out=18, device=DEVICE, seed=9)
    x = c.x.clone().requires_grad_(True)
    A_s, B_s = c.A_s.clone().requires_grad_(True), c.B_s.clone().requires_grad_(True)
    outs = {}
    for be in ("reference", "triton"):
        for t in (x, A_s, B_s):
            t.grad = None
        y = pclr.lrp_linear(x, c.weight, c.bias, c.A_m, c.B_m, c.idx, c.val, A_s=A_s, B_s=B_s, beta_m=2.0,
                            beta_s=0.5, sample_of_token=c.sot, backend=be)
        y.square().sum().backward()
        outs[be] = (y.detach(), x.grad.clone(), A_s.grad.clone(), B_s.grad.clone())
    for a, b in zip(outs["triton"], outs["reference"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_compile_fullgraph_through_triton_ops():
    c = make_case(lens=[4, 7], d_in=16, d_out=12, device=DEVICE, seed=13, soft=True)

    def f(x, A_m, B_m, val):
        return pclr.lrp_linear(x, c.weight, c.bias, A_m, B_m, c.idx, val, A_s=c.A_s, B_s=c.B_s, beta_m=2.0,
                               beta_s=0.5, sample_of_token=c.sot, backend="triton")

    cf = torch.compile(f, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    leaves = [t.clone().requires_grad_(True) for t in (c.x, c.A_m, c.B_m, c.val)]
    y = cf(*leaves)
    y.sum().backward()
    leaves_ref = [t.clone().requires_grad_(True) for t in (c.x, c.A_m, c.B_m, c.val)]
    y_ref = f(*leaves_ref)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(leaves, leaves_ref):
        torch.testing.assert_close(a.grad, b.grad)


def test_variant_is_validated_and_auto_picks_by_shape():
    with pytest.raises(ValueError, match="variant must be one of"):
        linear.forward_variant(10, 16, "bogus")
    assert linear.forward_variant(8, 4096, "auto") == "decode"
    assert linear.forward_variant(64, 4096, "auto") == "decode"
    assert linear.forward_variant(65, 4096, "auto") == "extended"
    assert linear.forward_variant(4096, 4096, "auto") == "extended"
    assert linear.forward_variant(4096, 4096, "split") == "split"


def test_variant_option_selects_the_variant(monkeypatch):
    # the explicit option reaches the triton forward, with no environment variable involved
    monkeypatch.delenv("PCLR_TRITON_FWD", raising=False)
    ran = []
    real = linear.forward_variant
    monkeypatch.setattr(linear, "forward_variant", lambda T, d_out, requested: ran.append(real(T, d_out, requested))
                        or ran[-1])
    c = make_case(lens=[3, 5], d_in=16, d_out=12, device=DEVICE, seed=2)
    args = (c.x, c.weight, c.bias, c.A_m, c.B_m, c.idx, c.val)
    kw = {"sample_of_token": c.sot, "backend": "triton"}
    ys = [pclr.lrp_linear(*args, variant=v, **kw) for v in ("split", "epilogue", "fused")]
    assert ran == ["split", "epilogue", "fused"]
    for y in ys[1:]:
        torch.testing.assert_close(y, ys[0], atol=1e-5, rtol=1e-5)


def test_segment_tokens_covers_each_token_once():
    g = torch.Generator().manual_seed(0)
    lens = [0, 5, 33, 1, 0, 16, 17]
    sot = torch.cat([torch.full((c,), b, dtype=torch.int32) for b, c in enumerate(lens)])
    sot = sot[torch.randperm(sot.numel(), generator=g)]
    tiles = segments.segment_tokens(sot, len(lens), 0, 16)
    seen = torch.zeros(sot.numel(), dtype=torch.int64)
    for s, a, e in zip(tiles.tile_sample.tolist(), tiles.tile_start.tolist(), tiles.tile_end.tolist()):
        assert e - a <= 16
        toks = tiles.tok[a:e].long()
        assert bool((sot[toks] == s).all())
        seen[toks] += 1
    assert bool((seen == 1).all())


def test_not_supported_reasons_linear(monkeypatch):
    be = triton_backend.BACKEND
    c = make_case(packed=True, seed=1)
    inputs = LinearInputs(x=c.x, weight=c.weight, bias=c.bias, A_m=c.A_m, B_m=c.B_m, idx=c.idx, val=c.val,
                                   A_s=c.A_s, B_s=c.B_s, beta_m=1.0, beta_s=1.0, sample_of_token=c.sot,
                                   trainable=None)
    monkeypatch.setattr(configs, "INTERPRET", False)
    assert be.not_supported_reasons("lrp_linear", inputs) == [
        "triton needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"]
    monkeypatch.setattr(configs, "INTERPRET", True)
    assert be.not_supported_reasons("lrp_linear", inputs) == []
    inputs.x = c.x.double()
    assert be.not_supported_reasons("lrp_linear", inputs) == []  # the interpreter computes fp64 (numpy)
    inputs.x = c.x.bfloat16()
    assert any("interpreter" in w for w in be.not_supported_reasons("lrp_linear", inputs))


# ------------------------------------------------------------------------------------------------------------------
# GPU only: half precision (rule: kernel error ≤ 2 × same-dtype torch error + atol), dispatch, bigger shapes
# ------------------------------------------------------------------------------------------------------------------


def _torch_same_dtype(c):
    """The unfused torch formulation computed in the case's own dtype (the error budget for half precision)."""
    i = c.idx.long()
    y = c.x @ c.weight.T + (c.bias if c.bias is not None else 0)
    A_eff, B_eff, scale, _ = effective_rows(c.A_m, c.B_m, c.idx, c.val, c.A_s, c.B_s, c.beta_m, c.beta_s, c.x.dtype)
    del i
    if c.sot is None:
        s = torch.bmm(c.x, A_eff.transpose(1, 2)) * scale.unsqueeze(1)
        return y + torch.bmm(s, B_eff)
    out = y.clone()
    for b in range(c.num_samples):
        m = c.sot == b
        out[m] = y[m] + ((c.x[m] @ A_eff[b].T) * scale[b]) @ B_eff[b]
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [{"B": 4, "L": 300, "d_in": 512, "d_out": 384, "n": 64, "r": 16, "n_s": 8},
                                   {"lens": [1] * 8, "d_in": 1024, "d_out": 1024, "n": 256, "r": 64, "n_s": 32},
                                   {"lens": [700, 0, 3, 325], "d_in": 768, "d_out": 1000, "n": 100, "r": 20, "n_s": 4,
                                        "frozen": tuple(range(50)), "soft": True}])
def test_half_precision_rule_gpu(variant, dtype, shape):
    c32 = make_case(**shape, device="cuda", seed=21)
    c = with_(c32, **{k: (getattr(c32, k).to(dtype) if getattr(c32, k) is not None and k not in ("idx", "sot", "val",
                                                                                              "trainable")
                          else getattr(c32, k))
                      for k in ("x", "weight", "bias", "A_m", "B_m", "A_s", "B_s")})
    y_ref, g_ref = run_case(c32, "reference")
    y, g = run_case(c, "triton")
    y_torch = _torch_same_dtype(c)
    atol = 1e-2
    torch_err = (y_torch.float() - y_ref).abs().max().item()
    err = (y.float() - y_ref).abs().max().item()
    assert err <= 2 * torch_err + atol, f"output error {err} > 2 × torch {torch_err} + {atol}"
    for k in g_ref:
        scale = g_ref[k].abs().max().item() + 1e-6
        gerr = (g[k].float() - g_ref[k]).abs().max().item() / scale
        assert gerr <= 3e-2, f"grad {k}: relative error {gerr}"
    if c.trainable is not None:
        assert torch.count_nonzero(g["A_m"][~c.trainable]) == 0


@pytest.mark.gpu
def test_dispatch_picks_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("PCLR_BACKEND", raising=False)
    c = make_case(lens=[5, 7], device="cuda", seed=2)
    inputs = LinearInputs(x=c.x, weight=c.weight, bias=c.bias, A_m=c.A_m, B_m=c.B_m, idx=c.idx, val=c.val,
                                   A_s=c.A_s, B_s=c.B_s, beta_m=1.0, beta_s=1.0, sample_of_token=c.sot,
                                   trainable=None)
    assert dispatch.select("lrp_linear", inputs).name in ("cuda", "triton")
    assert not dispatch.reasons("triton", "lrp_linear", inputs)


@pytest.mark.gpu
def test_deterministic_bit_identical_gpu():
    c = make_case(lens=[300, 200, 5, 400], d_in=512, d_out=256, n=32, r=16, n_s=8, device="cuda", seed=3)
    grads = []
    for _ in range(2):
        A = c.A_m.clone().requires_grad_(True)
        y = pclr.lrp_linear(c.x, c.weight, c.bias, A, c.B_m, c.idx, c.val, A_s=c.A_s, B_s=c.B_s,
                            sample_of_token=c.sot, backend="triton", deterministic=True)
        y.sum().backward()
        grads.append(A.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.fixture(scope="module", autouse=True)
def _print_errors():
    yield
    if ERRORS and os.environ.get("PCLR_PRINT_ERRORS"):
        worst: dict = {}
        for (tag, name), e in ERRORS.items():
            key = "fp64" if tag.endswith("_fp64") else ("one_pass" if tag == "one_pass" else "fp32")
            worst.setdefault(key, {})
            worst[key][name] = max(worst[key].get(name, 0.0), e)
        for key, errs in worst.items():
            print(f"\nlargest abs errors vs reference [{key}]:", {k: f"{v:.2e}" for k, v in sorted(errs.items())})


# ------------------------------------------------------------------------------------------------------------------
# One pass (a gate phase, then the LRP phase, in one launch) vs gate-then-LRP through the reference
# ------------------------------------------------------------------------------------------------------------------


def _gate_problem(B, n, dims, seed):
    g = torch.Generator().manual_seed(seed)
    q = tuple(torch.randn(B, d, generator=g).to(DEVICE) for d in dims)
    k = tuple(torch.randn(n, d, generator=g).to(DEVICE) for d in dims)
    return q, k


ONE_PASS_CASES = {
    "decode_soft_two_parts": ({"lens": [1, 1, 0, 1], "d_in": 24, "d_out": 20, "n": 14, "r": 4}, (16, 8), "soft", False),
    "packed_tiles_candidates": ({"lens": [40, 0, 77, 3], "d_in": 35, "d_out": 26, "n": 20, "r": 5, "n_s": 3, "frozen": (1, 7)},
                                (12, 6), "hard", True),
    "padded_one_part_r1_ns0": ({"B": 2, "L": 70, "d_in": 19, "d_out": 33, "n": 9, "r": 1, "n_s": 0}, (10,), "soft", False),
}


@pytest.fixture
def one_launches(monkeypatch):
    """Counts the launches of the one-pass kernel."""
    count = []
    real = one_pass.launch_one_pass
    monkeypatch.setattr(one_pass, "launch_one_pass", lambda inputs: count.append(1) or real(inputs))
    return count


@pytest.mark.parametrize("name", list(ONE_PASS_CASES))
def test_one_pass_matches_gate_then_lrp(name, one_launches):
    shape, dims, mode, with_cand = ONE_PASS_CASES[name]
    c = make_case(**shape, device=DEVICE, seed=17)
    n, r, B = c.A_m.shape[0], c.idx.shape[1], c.num_samples
    q0, k0 = _gate_problem(B, n, dims, seed=18)
    w = (1.0, 0.25)[: len(dims)]
    cand = None
    if with_cand:
        cand = torch.rand(B, n, generator=torch.Generator().manual_seed(19)) > 0.5
        cand[:, :r] = True
        cand = cand.to(DEVICE)
    results = {}
    for path in ("one_pass", "reference"):
        leaves = {nm: getattr(c, nm).clone().requires_grad_(True) for nm in ("x", "A_m", "B_m", "A_s", "B_s")
                  if getattr(c, nm) is not None}
        q = tuple(t.clone().requires_grad_(True) for t in q0)
        k = tuple(t.clone().requires_grad_(True) for t in k0)
        kw = {"A_s": leaves.get("A_s"), "B_s": leaves.get("B_s"), "beta_m": c.beta_m, "beta_s": c.beta_s,
                  "sample_of_token": c.sot, "trainable": c.trainable}
        if path == "one_pass":
            y, idx, val = pclr.lrp_gate_linear(
                leaves["x"], c.weight, c.bias, leaves["A_m"], leaves["B_m"], q, k, r, weights=w, candidates=cand,
                mode=mode, backend="triton", **kw)
            assert len(one_launches) == 1
        else:
            idx, val = pclr.lrp_gate(q, k, r, weights=w, candidates=cand, mode=mode, backend="reference")
            y = pclr.lrp_linear(leaves["x"], c.weight, c.bias, leaves["A_m"], leaves["B_m"], idx, val,
                                backend="reference", **kw)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y))
        grads = {nm: t.grad for nm, t in leaves.items()}
        if mode == "soft":
            grads.update({f"q{p}": t.grad for p, t in enumerate(q)}, **{f"k{p}": t.grad for p, t in enumerate(k)})
        results[path] = (y.detach(), idx, val.detach(), grads)
    (y, idx, val, g), (y_r, idx_r, val_r, g_r) = results["one_pass"], results["reference"]
    assert torch.equal(idx, idx_r)
    torch.testing.assert_close(val, val_r, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(y, y_r, atol=1e-4, rtol=1e-4)
    errs = {"y": (y - y_r).abs().max().item()}
    for nm in g_r:
        assert g[nm] is not None and bool(g[nm].abs().sum() > 0), f"one pass: no gradient for {nm}"
        torch.testing.assert_close(g[nm], g_r[nm], atol=1e-4, rtol=1e-4, msg=lambda m, nm=nm: f"grad {nm}: {m}")
        errs[nm] = (g[nm] - g_r[nm]).abs().max().item()
    if c.trainable is not None:
        assert torch.count_nonzero(g["A_m"][~c.trainable]) == 0 and torch.count_nonzero(g["B_m"][~c.trainable]) == 0
    _record("one_pass", errs)


def test_one_pass_bounds_n_and_the_gate_key_tile():
    # a gate program holds n scores and a key tile in registers: beyond MAX_ONE_PASS_N the gate's own kernels run
    def inputs(n):
        gate = SimpleNamespace(query=(torch.zeros(2, 8),), keys=(torch.zeros(n, 8),), scope="sample")
        return SimpleNamespace(gate=gate, linear=SimpleNamespace(x=torch.zeros(3, 8)))

    assert one_pass.one_pass_reasons(inputs(one_pass.MAX_ONE_PASS_N)) == []
    why = one_pass.one_pass_reasons(inputs(one_pass.MAX_ONE_PASS_N + 1))
    assert len(why) == 1 and f"n = {one_pass.MAX_ONE_PASS_N + 1}" in why[0], why
    for n in (1, 16, 100, 256, 1000, one_pass.MAX_ONE_PASS_N):
        bd = one_pass.gate_block_d(n)
        assert bd >= 1 and bd & (bd - 1) == 0 and max(16, configs.next_pow2(n)) * bd <= one_pass.KEY_TILE


def test_one_pass_compiles_fullgraph():
    c = make_case(lens=[3, 6], d_in=16, d_out=12, n=8, r=2, device=DEVICE, seed=23)
    q, k = _gate_problem(2, 8, (12,), seed=24)

    def f(x, qq):
        return pclr.lrp_gate_linear(x, c.weight, c.bias, c.A_m, c.B_m, qq, k[0], 2, A_s=c.A_s, B_s=c.B_s,
                                    sample_of_token=c.sot, mode="soft", backend="triton")

    cf = torch.compile(f, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    x = c.x.clone().requires_grad_(True)
    y, idx, _val = cf(x, q[0])
    y.sum().backward()
    y_r, idx_r, _val_r = f(c.x, q[0])
    assert torch.equal(idx, idx_r)
    torch.testing.assert_close(y, y_r)
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


def test_gate_linear_falls_back_to_gate_then_linear_on_triton(one_launches):
    # three query parts: the one-launch kernel scores at most two, so triton runs its gate, then its linear
    c = make_case(lens=[4, 6], d_in=16, d_out=12, n=10, r=3, device=DEVICE, seed=25)
    q, k = _gate_problem(2, 10, (8, 6, 4), seed=26)
    args = (c.weight, c.bias, c.A_m, c.B_m)
    kw = {"weights": (1.0, 0.25, 0.5), "A_s": c.A_s, "B_s": c.B_s, "sample_of_token": c.sot}
    leaves = [c.x.clone().requires_grad_(True) for _ in range(2)]
    y, idx, val = pclr.lrp_gate_linear(leaves[0], *args, q, k, 3, backend="triton", **kw)
    y_r, idx_r, val_r = pclr.lrp_gate_linear(leaves[1], *args, q, k, 3, backend="reference", **kw)
    assert one_launches == []
    assert torch.equal(idx, idx_r) and torch.equal(val, val_r)
    torch.testing.assert_close(y, y_r, atol=1e-4, rtol=1e-4)
    y.sum().backward()
    y_r.sum().backward()
    torch.testing.assert_close(leaves[0].grad, leaves[1].grad, atol=1e-4, rtol=1e-4)
