"""Pinned launch configs: the table lookup, `pclr tune`, and the real-compile prune of the autotuned kernels.

The compiles run in worker subprocesses (the test session runs Triton through the interpreter) with the ptxas that
ships with Triton; tests that compile are skipped where it is not usable.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import triton

from pclr.backends.triton import configs, pinned, prefill
from pclr.backends.triton.compile_stats import SMEM_LIMIT, LaunchSpec, compile_rows, ptxas_reason, violation
from pclr.backends.triton.pinned import KERNELS, KernelConfig
from pclr.cli import main as pclr_main
from pclr.tune import block_m, candidates, fastest, launch_spec, pick_by_compile, preference

needs_ptxas = pytest.mark.skipif(bool(ptxas_reason()), reason=ptxas_reason() or "ptxas available")


def _table(entries: list[tuple[str, int, int, int]]) -> dict:
    """A table file's content with one arch whose entries are (kernel, d, t, block_n) plus one entry per kernel."""
    rows = [pinned.entry_dict(k, d, t, KernelConfig(block_n=bn)) for k, d, t, bn in entries]
    rows += [pinned.entry_dict(k, 1, 1, KernelConfig(block_n=1)) for k in KERNELS if k != "gemm"]
    return pinned.table_dict({"sm_80": {"method": "test", "entries": rows}})


# ---------------------------------------------------------------------------------------------------------------
# Table lookup
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cap, arch", [((9, 0), "sm_90"), ((8, 0), "sm_80"), ((8, 6), "sm_80"), ((8, 9), "sm_80")])
def test_capability_picks_the_table(cap: tuple[int, int], arch: str) -> None:
    got, why = pinned.arch_for_capability(cap)
    assert got == arch and f"{cap[0]}.{cap[1]}" in why


@pytest.mark.parametrize("cap", [(7, 5), (10, 0), (12, 0), None])
def test_unknown_capability_falls_back_to_sm80_with_a_reason(cap: tuple[int, int] | None) -> None:
    arch, why = pinned.arch_for_capability(cap)
    assert arch == "sm_80"
    assert "sm_80 table" in why and (cap is None or "no table of its own" in why)


def test_lookup_exact_then_nearest_bucket_deterministically() -> None:
    table = pinned.parse_table(_table([("gemm", 2048, 1024, 11), ("gemm", 4096, 4096, 22), ("gemm", 4096, 16384, 33),
                                       ("gemm", 8192, 4096, 44)]))["sm_80"]
    assert table.lookup("gemm", 4096, 4096) == (KernelConfig(block_n=22), (4096, 4096))
    assert table.lookup("gemm") == (KernelConfig(block_n=22), (4096, 4096))  # no shape: the target point
    assert table.lookup("gemm", 4096, 3000)[1] == (4096, 4096)  # t rounds up to its power of two
    assert table.lookup("gemm", 4096, 9000)[1] == (4096, 16384)
    assert table.lookup("gemm", 5120, 4096)[1] == (4096, 4096)  # nearest d in log distance
    assert table.lookup("gemm", 2500, 1024)[1] == (2048, 1024)
    assert table.lookup("gemm", 3000, 1024)[1] == (4096, 4096)  # d decides first: 4096 is nearer to 3000
    assert table.lookup("gemm", 4096, 1024)[1] == (4096, 4096)  # then t among the d = 4096 buckets
    # exact ties in d go to the smaller bucket
    tie = pinned.parse_table(_table([("gemm", 2048, 4096, 1), ("gemm", 8192, 4096, 2)]))["sm_80"]
    assert tie.lookup("gemm", 4096, 4096) == (KernelConfig(block_n=1), (2048, 4096))
    assert all(tie.lookup("gemm", 4096, 4096)[1] == (2048, 4096) for _ in range(3))


def test_lookup_and_parse_errors_name_the_field() -> None:
    table = pinned.parse_table(_table([("gemm", 4096, 4096, 1)]))["sm_80"]
    with pytest.raises(ValueError, match="kernel must be one of"):
        table.lookup("gemv")
    bad = _table([("gemm", 4096, 4096, 1)])
    bad["archs"]["sm_80"]["entries"][0]["config"]["num_warps"] = 0
    with pytest.raises(ValueError, match=r"entries\[0\]\.config"):
        pinned.parse_table(bad)
    with pytest.raises(ValueError, match="format must be"):
        pinned.parse_table({**bad, "format": "other/1"})
    missing = pinned.table_dict({"sm_80": {"entries": [pinned.entry_dict("gemm", 4096, 4096, KernelConfig())]}})
    with pytest.raises(ValueError, match="no entry for kernels"):
        pinned.parse_table(missing)
    with pytest.raises(ValueError, match="arch must be one of"):
        pinned.parse_table({"format": pinned.FORMAT, "archs": {"sm_70": {"entries": []}}})


def test_shipped_table_covers_every_kernel_and_bucket_of_both_archs() -> None:
    tables = pinned.read_table(pinned.TABLE_FILE)
    assert set(tables) == set(pinned.ARCHS)
    for arch, table in tables.items():
        assert table.method, arch
        for kernel in KERNELS:
            for d, t in pinned.iter_buckets():
                cfg, bucket = table.lookup(kernel, d, t)
                assert bucket == (d, t), (arch, kernel, d, t)
                assert cfg in candidates(kernel), (arch, kernel, cfg)


def test_shipped_table_is_package_data() -> None:
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert '"pclr.backends.triton" = ["pinned_configs.json"]' in text
    assert pinned.TABLE_FILE.parent == Path(prefill.__file__).parent


def test_config_under_the_interpreter_and_override() -> None:
    assert prefill.config("gemm_dx") == prefill.config("gemm")
    with pytest.raises(ValueError, match="kind must be one of"):
        prefill.config("gemv")
    cfg = KernelConfig(block_n=32, block_k=32, num_warps=2, num_stages=2)
    with pinned.override({"gemm_dx": cfg}):
        assert pinned.launch_config("gemm_dx", 4096, 4096) == cfg
        assert pinned.launch_config("gemm", 4096, 4096) != cfg
    assert pinned.launch_config("gemm_dx") != cfg
    with pytest.raises(ValueError, match="unknown kernels"):
        with pinned.override({"gemv": cfg}):
            pass


# ---------------------------------------------------------------------------------------------------------------
# pclr tune
# ---------------------------------------------------------------------------------------------------------------


def test_candidates_are_in_preference_order() -> None:
    for kernel in KERNELS:
        c = candidates(kernel)
        assert c == sorted(c, key=preference) and len(set(c)) == len(c)
    g = candidates("gemm")
    assert (g[0].block_n, g[0].block_k) == (128, 64) and g[0].num_stages == 4
    assert block_m(4096) == 128 and block_m(256) == 32 and block_m(16) == 16


def _fake_compile(bad: set[tuple[int, int, int]], calls: list[int]):
    """A compile function whose rows spill for configs (block_n or block, warps, stages) in ``bad``."""

    def compile_fn(jobs: list[tuple]) -> list[dict]:
        calls.append(len(jobs))
        rows = []
        for _, meta, warps, stages, arch in jobs:
            key = (meta.get("BLOCK_N", meta.get("BLOCK", 0)), warps, stages)
            rows.append({"kernel": "k", "config": str(key), "arch": arch, "regs": 255 if key in bad else 64,
                         "spills": 96 if key in bad else 0, "smem": 1024})
        return rows

    return compile_fn


def test_pick_by_compile_takes_the_first_clean_candidate() -> None:
    calls: list[int] = []
    cfg, row, rows = pick_by_compile("reduce", 128, 80, _fake_compile({(512, 8, 1), (512, 4, 1)}, calls), wave=2)
    assert cfg == KernelConfig(block_n=256, num_warps=8, num_stages=1)
    assert calls == [2, 2] and [violation(r) != "" for r in rows] == [True, True, False, False]
    everything = {(c.block_n, c.num_warps, c.num_stages) for c in candidates("reduce")}
    with pytest.raises(RuntimeError, match="no candidate of reduce compiles clean"):
        pick_by_compile("reduce", 128, 80, _fake_compile(everything, []), wave=4)


def test_fastest_breaks_ties_by_preference() -> None:
    a, b, c = candidates("split_sum")[:3]
    assert fastest([(c, 1.0), (b, 1.0), (a, 2.0)]) == (b, 1.0)
    assert fastest([(c, 0.5), (a, 1.0)]) == (c, 0.5)


def test_tune_help_reads_like_a_cli(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        pclr_main(["tune", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--shapes", "--out", "--target", "--compile-only", "--kernels", "examples:"):
        assert flag in out
    assert pclr_main(["tune", "--compile-only"]) == 2  # --compile-only needs --target
    assert "needs --target" in capsys.readouterr().err
    assert pclr_main(["tune", "--compile-only", "--target", "sm_80", "--shapes", "2048x1024", "4096x4096"]) == 2
    assert "must form a grid" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pclr_main(["tune", "--shapes", "4096"])
    assert "a shape is DxT" in capsys.readouterr().err


@needs_ptxas
def test_tune_compile_only_writes_a_table_the_package_reads(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pinned.json"
    shutil.copy(pinned.TABLE_FILE, out)  # a partial run replaces its kernels' entries and keeps the rest
    t0 = time.perf_counter()
    rc = pclr_main(["tune", "--compile-only", "--target", "sm_80", "--kernels", "split_sum,reduce",
                    "--shapes", "4096x4096", "--out", str(out), "--workers", "2"])
    assert rc == 0, capsys.readouterr().err
    assert time.perf_counter() - t0 < 120
    written, shipped = json.loads(out.read_text()), json.loads(pinned.TABLE_FILE.read_text())
    assert written["format"] == shipped["format"] and set(written["archs"]) == set(shipped["archs"])
    assert written["archs"]["sm_90"] == shipped["archs"]["sm_90"]  # other archs untouched
    body = written["archs"]["sm_80"]
    assert set(body) == set(shipped["archs"]["sm_80"])
    assert {(e["kernel"], e["d"], e["t"]) for e in body["entries"] if e["kernel"] in ("split_sum", "reduce")} == \
        {("split_sum", 4096, 4096), ("reduce", 4096, 4096)}
    for e in body["entries"]:
        if e["kernel"] in ("split_sum", "reduce"):
            assert e["stats"]["spills"] == 0 and e["stats"]["smem"] <= SMEM_LIMIT[80]
    table = pinned.read_table(out)["sm_80"]
    assert table.lookup("reduce", 2048, 1024)[1] == (4096, 4096)  # the only reduce bucket: nearest for all
    assert table.lookup("gemm", 5120, 16384)[1] == (5120, 16384)  # kept from the shipped table
    assert out.with_suffix(".md").read_text().startswith("# Pinned launch configs")


# ---------------------------------------------------------------------------------------------------------------
# Real-compile prune of the comparison paths' autotuners
# ---------------------------------------------------------------------------------------------------------------


def _spec() -> LaunchSpec:
    return LaunchSpec("k", "lrp_fwd", "lrp_shrink_kernel", {}, {"BLOCK_M": 128, "BLOCK_R": 128})


def test_prune_by_compile_keeps_clean_configs_caches_and_falls_back() -> None:
    cfgs = [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=2) for bn in (32, 64) for w in (4, 8)]
    calls: list[int] = []
    fake = _fake_compile({(64, 4, 2)}, calls)
    kept, why = configs.prune_by_compile(cfgs, _spec(), 80, fake)
    assert [(c.kwargs["BLOCK_N"], c.num_warps) for c in kept] == [(32, 4), (32, 8), (64, 8)]
    assert why["N=64 w4 s2"].startswith("dropped: 255 registers, 96 B spilled")
    assert why["N=32 w8 s2"].startswith("kept: 64 registers, 0 B spilled, 1024 B shared (limit 166912)")
    configs.prune_by_compile(cfgs, _spec(), 80, fake)
    assert calls == [4]  # cached per (kernel, constexprs, config, arch)
    configs.prune_by_compile(cfgs, _spec(), 90, fake)
    assert calls == [4, 4]
    # every config spills: the least-spilling one runs, and the reason says so
    everything = {(c.kwargs["BLOCK_N"], c.num_warps, 2) for c in cfgs}
    spec2 = LaunchSpec("k", "lrp_fwd", "lrp_shrink_kernel", {}, {"BLOCK_M": 64, "BLOCK_R": 128})
    kept, why = configs.prune_by_compile(cfgs, spec2, 80, _fake_compile(everything, []))
    assert len(kept) == 1 and "kept anyway" in why[next(iter(why))]

    def broken(jobs: list[tuple]) -> list[dict]:
        raise FileNotFoundError("ptxas")

    spec3 = LaunchSpec("k", "lrp_fwd", "lrp_shrink_kernel", {}, {"BLOCK_M": 32, "BLOCK_R": 128})
    meta = {"BLOCK_M": 128, "BLOCK_R": 128}
    kept, why = configs.prune_by_compile(cfgs, spec3, 80, broken,
                                         fallback=lambda c: configs.fits(c, meta, SMEM_LIMIT[80], "expand"))
    # the estimate counts both accumulators: [128, BLOCK_N] + S [128, 128] in fp32 needs 8 warps
    assert [(c.kwargs["BLOCK_N"], c.num_warps) for c in kept] == [(32, 8), (64, 8)]
    assert all("estimate (compiling failed: FileNotFoundError" in w for w in why.values())


def test_estimate_counts_the_second_accumulator() -> None:
    cfg = triton.Config({"BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2)
    meta = {"BLOCK_M": 128, "BLOCK_R": 128}
    assert configs.acc_elements("expand", cfg, meta) == 128 * 64 + 128 * 128
    assert not configs.fits(cfg, meta, SMEM_LIMIT[80], "expand")  # 24576 fp32 over 128 threads
    assert configs.fits(cfg, {"BLOCK_M": 128, "BLOCK_R": 16}, SMEM_LIMIT[80], "expand")
    with pytest.raises(ValueError, match="kind must be"):
        configs.acc_elements("gemv", cfg, meta)


@needs_ptxas
@pytest.mark.parametrize("arch", [80, 90])
def test_prune_by_compile_for_a_gpu_target_on_cpu(arch: int, capsys: pytest.CaptureFixture[str]) -> None:
    """The shrink autotuner's configs at the target point (bf16, BLOCK_M = BLOCK_R = 128), compiled for
    GPUTarget("cuda", arch, 32) here: what the prune keeps on that GPU, and why."""
    cfgs = configs.gpu_configs("shrink")
    spec = LaunchSpec("lrp_shrink", "lrp_fwd", "lrp_shrink_kernel",
                      {"X": "*bf16", "DS": "*bf16", "DM": "*bf16", "IDX": "*i32", "SBUF": "*fp32", "TOK": "*i32",
                       "TILE_SAMPLE": "*i32", "TILE_START": "*i32", "TILE_END": "*i32"},
                      {"SORTED": True, "BLOCK_M": 128, "BLOCK_R": 128, "ACC": triton.language.float32})
    kept, why = configs.prune_by_compile(cfgs, spec, arch, lambda jobs: compile_rows(jobs, workers=2))
    with capsys.disabled():
        print("\n" + "\n".join(f"  sm_{arch} lrp_shrink {name}: {w}" for name, w in why.items()))
    assert set(why) == {f"K={c.kwargs['BLOCK_K']} w{c.num_warps} s{c.num_stages}" for c in cfgs}
    assert kept and all(c in cfgs for c in kept)
    clean = [w for w in why.values() if w.startswith("kept:") and "kept anyway" not in w]
    assert len(clean) == len(kept) or (len(kept) == 1 and not clean)
    for w in why.values():
        assert w.startswith(("kept: ", "dropped: ")) and "compiling failed" not in w


def test_launch_spec_mirrors_the_launcher() -> None:
    spec, meta = launch_spec("gemm_dx", 128)
    assert spec.fn == "kext_gemm_kernel" and spec.consts["stride_wn"] == 1 and not spec.consts["HAS_BIAS"]
    assert meta(KernelConfig(block_n=128, block_k=64)) == {"BLOCK_N": 128, "BLOCK_K": 64}
    spec, meta = launch_spec("gemm", 64)
    assert spec.consts["stride_wk"] == 1 and spec.consts["BLOCK_M"] == 64 and spec.consts["RC"] == 32
    assert launch_spec("split_sum", 128)[1](KernelConfig(block_n=1024)) == {"BLOCK": 1024}
    with pytest.raises(ValueError, match="kernel must be one of"):
        launch_spec("gemv", 128)


def test_autotune_prune_reads_the_launch() -> None:
    named = {"X": torch.zeros(4, dtype=torch.bfloat16), "IDX": torch.zeros(2, dtype=torch.int32),
             "SBUF": torch.zeros(2), "K": 4096, "r": 3, "big": 2 ** 33, "beta_m": 0.5}
    spec = configs.launch_spec("shrink", named, {"BLOCK_M": 128})
    assert (spec.module, spec.fn) == ("lrp_fwd", "lrp_shrink_kernel")
    assert spec.ptrs == {"X": "*bf16", "IDX": "*i32", "SBUF": "*fp32"}
    assert spec.floats == ("beta_m",) and spec.extra == {"big": "i64"} and spec.not_div16 == {"r"}
    # off a GPU the autotuner runs one config and compiles nothing; launch options in kwargs are ignored
    cfgs = configs.gpu_configs("shrink")
    assert configs._pruner("shrink")(cfgs, named, BLOCK_M=128, grid=(1,), warmup=False) == cfgs[:1]
