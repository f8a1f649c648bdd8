"""The benchmark script in smoke mode on CPU: it runs, writes its outputs and labels every row as no performance figure."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pclr import bench

KERNEL_MODES = ("gate", "fwd", "fwdbwd", "decode", "layer")


def _read(out: Path) -> tuple[list[str], list[dict], dict]:
    with open(out / "bench.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = list(reader.fieldnames or [])
    return header, rows, json.loads((out / "bench.json").read_text())


def test_smoke_kernel_modes(tmp_path: Path) -> None:
    providers = "base,pclr-reference,pclr-triton,pclr-triton-fused,pclr-triton-epilogue,pclr-cuda,paper,dense,punica"
    rc = bench.main(["--preset", "smoke", "--device", "cpu", "--modes", ",".join(KERNEL_MODES), "--providers",
                     providers, "--out", str(tmp_path), "--strict"])
    assert rc == 0
    header, rows, data = _read(tmp_path)
    assert header == list(bench.COLUMNS)
    assert data["columns"] == list(bench.COLUMNS) and len(data["rows"]) == len(rows)
    meta = data["meta"]
    for key in ("device", "torch", "triton", "cuda", "command", "timestamp", "preset", "label"):
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
    assert {r["provider"] for r in skipped} >= {"pclr-triton-fused", "pclr-cuda", "punica"}
    assert all(r["note"] for r in skipped)
    for mode in KERNEL_MODES:
        assert (tmp_path / f"{mode}.png").stat().st_size > 0


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
    from pclr.cli import main

    rc = main(["bench", "--preset", "smoke", "--device", "cpu", "--modes", "gate", "--providers", "pclr-reference",
               "--out", str(tmp_path), "--no-plots"])
    assert rc == 0 and (tmp_path / "bench.csv").exists()


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
    flops, bytes_ = bench.ideal_cost(target, "pclr-reference")
    base_flops, _ = bench.ideal_cost(target, "base")
    assert flops == base_flops + 2 * 4096 * 96 * (4096 + 4096) and bytes_ > 0
