"""The benchmark harness on CPU: it runs, writes its outputs, labels every row as no performance figure, and every
provider says why it has no measurement where it has none."""
from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from torch import Tensor

from pclr import bench, lrp_gate, lrp_linear
from pclr.bench import providers as providers_mod
from pclr.bench.providers import ONE_PASS_UNAVAILABLE, triton_forward_variant
from pclr.bench.shapes import TARGET
from pclr.cli import main as pclr_main
from pclr.functional import forward_variant

KERNEL_MODES = ("gate", "fwd", "fwdbwd", "decode", "layer")


def _read(out: Path) -> tuple[list[str], list[dict], dict]:
    with open(out / "bench.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = list(reader.fieldnames or [])
    return header, rows, json.loads((out / "bench.json").read_text())


def test_smoke_kernel_modes(tmp_path: Path) -> None:
    providers = ("base,pclr-reference,pclr-triton,pclr-triton-fused,pclr-triton-epilogue,pclr-triton-onepass,"
                 "pclr-cuda,paper,dense,punica")
    rc = bench.main(["--preset", "smoke", "--device", "cpu", "--modes", ",".join(KERNEL_MODES), "--providers",
                     providers, "--out", str(tmp_path), "--strict"])
    assert rc == 0
    header, rows, data = _read(tmp_path)
    assert header == list(bench.COLUMNS)
    assert data["columns"] == list(bench.COLUMNS) and len(data["rows"]) == len(rows)
    meta = data["meta"]
    for key in ("device", "torch", "triton", "cuda", "command", "timestamp", "preset", "label", "git_commit"):
        assert key in meta, key
    assert meta["label"] == bench.CPU_LABEL and meta["preset"] == "smoke"
    assert all(r["label"] == bench.CPU_LABEL for r in rows)
    assert {r["mode"] for r in rows} == set(KERNEL_MODES)
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["provider"] for r in ok} >= {"base", "pclr-reference", "paper", "dense"}
    for r in ok:
        assert float(r["median_ms"]) > 0 and float(r["p20_ms"]) <= float(r["p80_ms"])
        if r["mode"] != "gate":
            assert float(r["ratio_to_base"]) > 0
    base = [r for r in ok if r["provider"] == "base"]
    assert base and all(float(r["ratio_to_base"]) == 1.0 for r in base)
    skipped = [r for r in rows if r["status"] == "skipped"]
    # fused backends never run on CPU without --interpreter, and every skip says why
    assert {r["provider"] for r in skipped} >= {"pclr-triton-fused", "pclr-cuda", "punica", "pclr-triton-onepass"}
    assert all(r["note"] for r in skipped)
    if ONE_PASS_UNAVAILABLE is not None:
        assert all(r["note"] == ONE_PASS_UNAVAILABLE for r in rows if r["provider"] == "pclr-triton-onepass"
                   and r["mode"] in ("fwd", "decode", "layer"))
    for mode in KERNEL_MODES:
        assert (tmp_path / f"{mode}.png").stat().st_size > 0
    md = (tmp_path / "bench.md").read_text()
    assert bench.CPU_LABEL in md and all(f"## {mode}" in md for mode in KERNEL_MODES)


def test_unsupported_mode_is_a_declared_skip(tmp_path: Path) -> None:
    """A provider asked for a mode it does not declare gets one skipped row per point, its declared reason as note."""
    rc = bench.main(["--preset", "smoke", "--device", "cpu", "--modes", "gate,fwdbwd", "--providers",
                     "base,pclr-triton-split,pclr-triton-onepass,punica", "--out", str(tmp_path), "--no-plots"])
    assert rc == 0
    _, rows, _ = _read(tmp_path)
    expected = {
        ("gate", "base"), ("gate", "pclr-triton-split"), ("fwdbwd", "pclr-triton-onepass"), ("gate", "punica"),
        ("fwdbwd", "punica"), ("gate", "pclr-triton-onepass"),
    }
    for mode, name in expected:
        mine = [r for r in rows if r["mode"] == mode and r["provider"] == name]
        assert mine, (mode, name)
        reason = bench.PROVIDERS[name].mode_reason(mode)
        assert reason and all(r["status"] == "skipped" and r["note"] == reason for r in mine), (mode, name)
    assert not list(tmp_path.glob("*.png"))


def test_every_provider_declares_its_modes() -> None:
    assert list(bench.PROVIDERS)[0] == "base"
    for name, provider in bench.PROVIDERS.items():
        assert provider.name == name and provider.summary
        assert provider.modes and set(provider.modes) <= set(bench.MODES), name
        assert provider.cost in ("base", "lrp", "lora")
        for mode in bench.MODES:
            why = provider.mode_reason(mode)
            assert (why is None) == (mode in provider.modes), (name, mode)
            if why is not None:
                assert isinstance(why, str) and why, (name, mode)
        assert provider.unavailable() is None or provider.unavailable()  # a reason is never an empty string
    # every mode has at least one provider that measures it, and the base Linear is the floor of every linear mode
    for mode in bench.MODES:
        assert any(mode in p.modes for p in bench.PROVIDERS.values()), mode
    assert bench.PROVIDERS["base"].modes >= {"fwd", "fwdbwd", "decode", "layer"}
    assert bench.PROVIDERS["pclr-triton-onepass"].unavailable() == ONE_PASS_UNAVAILABLE


def test_triton_forward_variant_is_scoped() -> None:
    before = forward_variant()
    with triton_forward_variant("split"):
        assert forward_variant() == "split"
        with bench.PROVIDERS["pclr-triton-fused"].context():
            assert forward_variant() == "fused"
        assert forward_variant() == "split"
    assert forward_variant() == before


def _gate_then_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A_m: Tensor, B_m: Tensor, query: Any,
                      keys: Any, r: int, *, weights: Any = None, candidates: Optional[Tensor] = None,
                      mode: str = "hard", A_s: Optional[Tensor] = None, B_s: Optional[Tensor] = None,
                      beta_m: float = 1.0, beta_s: float = 1.0, sample_of_token: Optional[Tensor] = None,
                      trainable: Optional[Tensor] = None, deterministic: bool = False,
                      backend: Optional[str] = None) -> tuple[Tensor, Tensor, Tensor]:
    """The declared signature of pclr.lrp_gate_linear, computed as gate then linear on the reference backend."""
    idx, val = lrp_gate(query, keys, r, weights=weights, candidates=candidates, mode=mode, backend="reference")
    y = lrp_linear(x, weight, bias, A_m, B_m, idx, val, A_s=A_s, B_s=B_s, beta_m=beta_m, beta_s=beta_s,
                   sample_of_token=sample_of_token, trainable=trainable, backend="reference")
    return y, idx, val


@pytest.mark.parametrize("mode", ["fwd", "decode", "layer"])
def test_one_pass_provider_calls_the_declared_signature(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """With pclr.lrp_gate_linear present, the one-pass provider runs it and matches gate-then-linear."""
    monkeypatch.setattr(providers_mod, "lrp_gate_linear", _gate_then_linear)
    monkeypatch.setattr(providers_mod, "ONE_PASS_UNAVAILABLE", None)
    one_pass = copy.copy(bench.PROVIDERS["pclr-triton-onepass"])
    one_pass._checked = False  # the copy asks again, against the patched module
    assert one_pass.unavailable() is None and one_pass.mode_reason(mode) is None
    T, B = (4, 4) if mode == "decode" else (16, 2)
    p = bench.make_problem(bench.Shape(mode, "fp32", 32, 32, T, B, 8, 2, 2), torch.device("cpu"))
    got = one_pass.build(p, bench.RunOptions(interpreter=True)).fn()
    want = bench.PROVIDERS["pclr-reference"].build(p, bench.RunOptions()).fn()
    assert got.shape == want.shape == (B, T // B, p.layers[-1]["d_out"])
    torch.testing.assert_close(got, want)


def test_importing_the_harness_leaves_triton_alone() -> None:
    """--interpreter sets TRITON_INTERPRET after the harness is imported, so the harness must not import triton."""
    code = "import sys, pclr.bench; assert 'triton' not in sys.modules, 'pclr.bench imported triton'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": ""})


def test_gpu_check_preset_is_the_target_point() -> None:
    preset = bench.PRESETS["gpu-check"]
    assert set(preset.modes) == {"gate", "fwd", "fwdbwd", "decode", "layer"}
    assert preset.model_config("train") is None and preset.model_config("serve") is None
    shapes = bench.sweep_shapes(preset, preset.modes, preset.dtypes)
    d, (T, B), n, r, n_s = TARGET["d"], TARGET["tokens"], TARGET["n"], TARGET["r"], TARGET["n_s"]
    assert (d, T, B, n, r, n_s) == (4096, 4096, 8, 256, 64, 32) and tuple(preset.dtypes) == ("bf16",)
    expected = {
        bench.Shape("gate", "bf16", d, d, B, B, n, r, 0),
        bench.Shape("fwd", "bf16", d, d, T, B, n, r, n_s),
        bench.Shape("fwdbwd", "bf16", d, d, T, B, n, r, n_s),
        bench.Shape("layer", "bf16", d, d, T, B, n, r, n_s),
        *(bench.Shape("decode", "bf16", d, d, b, b, n, r, n_s) for b in (1, 8, 64)),
    }
    assert len(shapes) == len(expected) and set(shapes) == expected


def test_gpu_check_has_no_model_modes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc = bench.main(["--preset", "gpu-check", "--device", "cpu", "--modes", "train", "--out", str(tmp_path)])
    assert rc == 2 and "has no model" in capsys.readouterr().err
    assert not (tmp_path / "bench.csv").exists()


@pytest.mark.slow
def test_smoke_model_modes(tmp_path: Path) -> None:
    rc = bench.main(["--preset", "smoke", "--device", "cpu", "--modes", "train,serve", "--providers",
                     "base,pclr-reference,pclr-triton,paper,peft-lora", "--out", str(tmp_path), "--strict"])
    assert rc == 0
    _, rows, _ = _read(tmp_path)
    assert all(r["label"] == bench.CPU_LABEL for r in rows)
    ok = {(r["mode"], r["provider"]) for r in rows if r["status"] == "ok"}
    for mode in ("train", "serve"):
        assert {(mode, p) for p in ("base", "pclr-reference", "peft-lora")} <= ok
        assert all(float(r["tokens_per_s"]) > 0 for r in rows if r["mode"] == mode and r["status"] == "ok")
    assert ("train", "paper") in ok
    serve_paper = next(r for r in rows if r["mode"] == "serve" and r["provider"] == "paper")
    assert serve_paper["status"] == "skipped" and "mixed-task" in serve_paper["note"]
    assert (tmp_path / "train.png").exists() and (tmp_path / "serve.png").exists()


def test_cli_entry(tmp_path: Path) -> None:
    rc = pclr_main(["bench", "--preset", "smoke", "--device", "cpu", "--modes", "gate", "--providers", "pclr-reference",
               "--out", str(tmp_path), "--no-plots"])
    assert rc == 0 and (tmp_path / "bench.csv").exists()


def test_cli_help_lists_presets_and_providers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        pclr_main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pclr bench")
    for word in ("--preset", "--modes", "--providers", "--out", "--no-plots", "--strict", "examples:", *bench.PRESETS,
                 *bench.PROVIDERS):
        assert word in out, word


def test_device_peaks_and_presets() -> None:
    assert bench.device_peaks("NVIDIA H100 80GB HBM3")["gbps"] == 3350.0
    assert bench.device_peaks("NVIDIA H100 PCIe")["gbps"] == 2000.0
    assert bench.device_peaks("NVIDIA H200")["gbps"] == 4800.0
    assert bench.device_peaks("NVIDIA A100-SXM4-80GB")["bf16"] == 312.0
    assert bench.device_peaks("cpu") is None
    shapes = bench.sweep_shapes(bench.PRESETS["default"], bench.MODES, ["bf16", "fp16"])
    target = bench.Shape("fwd", "bf16", 4096, 4096, 4096, 8, 256, 64, 32)
    assert target in shapes and len(shapes) < 100
    assert all(s.T % s.B == 0 and s.r <= s.n for s in shapes)
    flops, bytes_ = bench.ideal_cost(target, "lrp")
    base_flops, _ = bench.ideal_cost(target, "base")
    assert flops == base_flops + 2 * 4096 * 96 * (4096 + 4096) and bytes_ > 0
