"""One dispatch point: forcing a backend, env override, reasons, and `pclr info`."""
import subprocess
import sys

import pytest
import torch

import pclr
from pclr import dispatch
from lrp_cases import make_case, run_case


def test_cpu_inputs_pick_reference(monkeypatch):
    monkeypatch.delenv("PCLR_BACKEND", raising=False)
    c = make_case()
    x2 = c.x.reshape(-1, c.x.shape[-1])
    inputs = dispatch.LinearInputs(x2, c.weight, c.bias, c.A_m, c.B_m, c.idx, c.val, None, None, 1.0, 1.0,
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
    monkeypatch.setitem(dispatch._MODULES, "cuda", "pclr.backends.does_not_exist")
    monkeypatch.setattr(dispatch, "_loaded", {})
    monkeypatch.setattr(dispatch, "_import_errors", {})
    why = dispatch.reasons("cuda", "info", None)
    assert why and "cannot import" in why[0]


def test_backends_report_is_a_dict_of_reasons():
    report = pclr.backends()
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
    as_inputs = lambda c: dispatch.LinearInputs(  # noqa: E731
        c.x.reshape(-1, c.x.shape[-1]), c.weight, c.bias, c.A_m, c.B_m, c.idx, c.val, None, None, 1.0, 1.0,
        torch.zeros(c.x.shape[0] * c.x.shape[1], dtype=torch.int32), None)
    assert dispatch.priority("lrp_linear", as_inputs(small))[0] == "cuda"
    assert dispatch.priority("lrp_linear", as_inputs(big))[0] == "triton"
    assert dispatch.priority("lrp_gate", None)[0] == "triton"
    assert all(p[-1] == "reference" for p in (dispatch.priority("lrp_linear", as_inputs(big)),))
