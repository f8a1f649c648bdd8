"""One dispatch point: forcing a backend, env override, reasons, `pclr info`; the op contract derived from the
input dataclasses; the forward-variant option."""
import dataclasses
import subprocess
import sys

import pytest
import torch
from lrp_cases import make_case, run_case

import pclr
from pclr import dispatch, functional
from pclr.backends import custom_op
from pclr.backends.base import GRAD_FIELDS, LinearGrads, LinearInputs


def test_cpu_inputs_pick_reference(monkeypatch):
    monkeypatch.delenv("PCLR_BACKEND", raising=False)
    c = make_case()
    x2 = c.x.reshape(-1, c.x.shape[-1])
    inputs = LinearInputs(x2, c.weight, c.bias, c.A_m, c.B_m, c.idx, c.val, None, None, 1.0, 1.0,
                                   torch.zeros(x2.shape[0], dtype=torch.int32), None)
    assert dispatch.select("lrp_linear", inputs).name == "reference"


def test_env_forces_backend(monkeypatch):
    monkeypatch.setenv("PCLR_BACKEND", "reference")
    assert dispatch.forced_backend() == "reference"
    run_case(make_case(), None)
    monkeypatch.setenv("PCLR_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="PCLR_BACKEND must be one of"):
        run_case(make_case(), None)


def test_forced_unavailable_backend_lists_reasons(monkeypatch):
    monkeypatch.setattr(dispatch, "reasons", lambda name, op, inputs: [] if name == "reference"
                        else [f"{name} is switched off for this test"])
    with pytest.raises(pclr.BackendUnavailableError, match="cuda is switched off for this test"):
        run_case(make_case(), "cuda")


def test_unimportable_backend_is_a_reason_not_an_error(monkeypatch):
    def broken():
        raise ImportError("no module named pclr.backends.does_not_exist")

    monkeypatch.setitem(dispatch.LOADERS, "cuda", broken)
    monkeypatch.setattr(dispatch, "_loaded", {})
    monkeypatch.setattr(dispatch, "_import_errors", {})
    why = dispatch.reasons("cuda", "info", None)
    assert why and "cannot import" in why[0]


def test_available_backends_is_a_dict_of_reasons():
    report = pclr.available_backends()
    assert set(report) == {"reference", "triton", "cuda"}
    assert report["reference"] == []
    assert all(isinstance(v, list) for v in report.values())


def test_info_cli_lists_every_backend():
    out = subprocess.run([sys.executable, "-m", "pclr", "info"], capture_output=True, text=True, check=True).stdout
    for name in ("backend.reference", "backend.triton", "backend.cuda", "torch", "device"):
        assert name in out
    assert "backend.reference: available" in out


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "pclr", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("info", "run", "eval", "bench"):
        assert cmd in out


def test_priority_prefers_cuda_at_decode_triton_otherwise():
    small, big = make_case(B=4, L=1), make_case(B=4, L=32)
    as_inputs = lambda c: LinearInputs(
        c.x.reshape(-1, c.x.shape[-1]), c.weight, c.bias, c.A_m, c.B_m, c.idx, c.val, None, None, 1.0, 1.0,
        torch.zeros(c.x.shape[0] * c.x.shape[1], dtype=torch.int32), None)
    assert dispatch.priority("lrp_linear", as_inputs(small))[0] == "cuda"
    assert dispatch.priority("lrp_linear", as_inputs(big))[0] == "triton"
    assert dispatch.priority("lrp_gate", None)[0] == "triton"
    assert all(p[-1] == "reference" for p in (dispatch.priority("lrp_linear", as_inputs(big)),))


def test_op_arguments_are_the_linear_inputs_fields():
    names = [f.name for f in dataclasses.fields(LinearInputs)]
    assert list(custom_op.LINEAR_FIELDS) == names
    schema = torch.ops.pclr.reference_lrp_linear.default._schema
    assert [a.name for a in schema.arguments] == names
    backward = torch.ops.pclr.reference_lrp_linear_backward.default._schema
    assert [a.name for a in backward.arguments] == (["grad_y", *names, "saved"]
                                                     + [f"need_{g}" for g in GRAD_FIELDS])
    assert set(GRAD_FIELDS) == {f.name for f in dataclasses.fields(LinearGrads)} <= set(names)


def test_linear_inputs_round_trip_through_the_op_arguments():
    c = make_case(packed=True, seed=3)
    inputs = LinearInputs(c.x, c.weight, c.bias, c.A_m, c.B_m, c.idx, c.val, c.A_s, c.B_s, 2.0, 0.5, c.sot, None,
                          deterministic=True, variant="split")
    back = custom_op.linear_inputs(custom_op.linear_args(inputs))
    for f in dataclasses.fields(LinearInputs):
        assert getattr(back, f.name) is getattr(inputs, f.name) or getattr(back, f.name) == getattr(inputs, f.name)


def test_forward_variant_option_without_env(monkeypatch):
    monkeypatch.setattr(functional, "_ENV_VARIANT", "auto")
    seen = []

    class Spy:
        name = "reference"

        def lrp_linear(self, inputs):
            seen.append(inputs.variant)
            return dispatch.get_backend("reference").lrp_linear(inputs)

    monkeypatch.setattr(dispatch, "select", lambda op, inputs, backend=None: Spy())
    c = make_case(seed=4)
    args = (c.x, c.weight, c.bias, c.A_m, c.B_m, c.idx, c.val)
    pclr.lrp_linear(*args)
    pclr.lrp_linear(*args, variant="split")
    pclr.set_forward_variant("epilogue")
    try:
        pclr.lrp_linear(*args)
        pclr.lrp_linear(*args, variant="fused")
    finally:
        pclr.set_forward_variant(None)
    pclr.lrp_linear(*args)
    assert seen == ["auto", "split", "epilogue", "fused", "auto"]
    with pytest.raises(ValueError, match="variant must be one of"):
        pclr.lrp_linear(*args, variant="bogus")
    with pytest.raises(ValueError, match="variant must be one of"):
        pclr.set_forward_variant("bogus")
    monkeypatch.setattr(functional, "_ENV_VARIANT", "bogus")
    with pytest.raises(ValueError, match="PCLR_TRITON_FWD must be one of"):
        pclr.lrp_linear(*args)


def test_gate_linear_reference_equals_gate_then_linear():
    c = make_case(lens=[5, 0, 7], d_in=12, d_out=10, n=9, r=3, frozen=(2,), seed=6)
    g = torch.Generator().manual_seed(7)
    q0 = (torch.randn(3, 8, generator=g), torch.randn(3, 4, generator=g))
    k0 = (torch.randn(9, 8, generator=g), torch.randn(9, 4, generator=g))
    for mode in ("hard", "soft"):
        out = {}
        for path in ("pair", "one_op"):
            x, A_m, B_m, A_s, B_s = (t.clone().requires_grad_(True) for t in (c.x, c.A_m, c.B_m, c.A_s, c.B_s))
            q = tuple(t.clone().requires_grad_(True) for t in q0)
            k = tuple(t.clone().requires_grad_(True) for t in k0)
            kw = {"A_s": A_s, "B_s": B_s, "beta_m": c.beta_m, "beta_s": c.beta_s, "sample_of_token": c.sot,
                      "trainable": c.trainable, "backend": "reference"}
            if path == "pair":
                idx, val = pclr.lrp_gate(q, k, 3, weights=(1.0, 0.25), mode=mode, backend="reference")
                y = pclr.lrp_linear(x, c.weight, c.bias, A_m, B_m, idx, val, **kw)
            else:
                y, idx, val = pclr.lrp_gate_linear(x, c.weight, c.bias, A_m, B_m, q, k, 3, weights=(1.0, 0.25),
                                                   mode=mode, **kw)
            y.square().sum().backward()
            out[path] = (y, idx, val, [t.grad for t in (x, A_m, B_m, A_s, B_s, *q, *k)])
        (y, idx, val, g1), (y2, idx2, val2, g2) = out["pair"], out["one_op"]
        assert torch.equal(idx, idx2) and torch.equal(y, y2) and torch.equal(val, val2)
        for a, b in zip(g1, g2):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
        assert (g1[5] is not None) == (mode == "soft")  # query gradients only through soft gates


def test_gate_linear_validates_like_its_parts():
    c = make_case(B=2, L=3, d_in=8, d_out=6, n=5, r=2, seed=8)
    q, k = torch.randn(2, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="r \\(6\\) exceeds"):
        pclr.lrp_gate_linear(c.x, c.weight, c.bias, c.A_m, c.B_m, q, k, 6)
    with pytest.raises(ValueError, match="mode"):
        pclr.lrp_gate_linear(c.x, c.weight, c.bias, c.A_m, c.B_m, q, k, 2, mode="gumbel")
    with pytest.raises(ValueError, match="keys has 4 rows"):
        pclr.lrp_gate_linear(c.x, c.weight, c.bias, c.A_m, c.B_m, q, k[:4], 2)
    with pytest.raises(ValueError, match="x has batch 2"):
        pclr.lrp_gate_linear(c.x, c.weight, c.bias, c.A_m, c.B_m, torch.randn(3, 4), k, 2)
    with pytest.raises(TypeError, match="weight"):
        pclr.lrp_gate_linear(c.x, c.weight.double(), c.bias, c.A_m, c.B_m, q, k, 2)
