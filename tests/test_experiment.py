"""`pclr run` end to end on the tiny preset (data → train → eval → report files) and its bad-input handling."""
import argparse
import importlib.util
import json
import sys

import pytest

from pclr.cil.metrics import CILResults
from pclr.demo.experiment import add_eval_arguments, add_run_arguments, eval_main, run_main
from pclr.demo.report import write_report


def _args(*argv):
    p = argparse.ArgumentParser()
    add_run_arguments(p)
    return p.parse_args(list(argv))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PCLR_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_tiny_run_end_to_end_and_refusals(cache, capsys):
    out = cache / "run"
    common = ["--preset", "tiny", "--tasks", "ScienceQA,VQAv2", "--methods", "lora,pclr", "--no-progress", "--jobs", "1"]
    assert run_main(_args(*common, "--output", str(out))) == 0
    for f in ("report.md", "metrics.json", "accuracy_matrices.png", "forgetting.png", "run.json"):
        assert (out / f).is_file(), f
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["methods"]) == {"lora", "pclr"}
    for r in m["methods"].values():
        assert len(r["matrix"]) == 2 and r["matrix"][1][0] is not None
        assert r["trainable_params_per_task"] > 0
    assert "| PCLR |" in capsys.readouterr().out
    before = (out / "metrics.json").read_bytes()
    # same run again without --resume, and a different run in the same dir: refused, nothing overwritten
    assert run_main(_args(*common, "--output", str(out))) == 2
    assert run_main(_args(*common, "--output", str(out), "--seed", "1", "--resume")) == 2
    assert (out / "metrics.json").read_bytes() == before
    # resuming a finished run redoes nothing and gives the same matrices
    assert run_main(_args(*common, "--output", str(out), "--resume")) == 0
    m2 = json.loads((out / "metrics.json").read_text())
    assert [r["matrix"] for r in m2["methods"].values()] == [r["matrix"] for r in m["methods"].values()]
    # corrupt checkpoint → exit 2
    ckpt = next((out / "lora").rglob("*.safetensors"))
    ckpt.write_bytes(b"not a checkpoint")
    assert run_main(_args(*common, "--output", str(out), "--resume")) == 2
    assert "corrupt" in capsys.readouterr().err
    p = argparse.ArgumentParser()
    add_eval_arguments(p)
    assert eval_main(p.parse_args([str(out), "--report-only"])) == 0


@pytest.mark.parametrize("bad", [["--tasks", "MNIST"], ["--methods", "ewc"], ["--schedule", "x:y"]])
def test_bad_input_exit_2(cache, bad, capsys):
    assert run_main(_args("--preset", "tiny", "--output", str(cache / "bad"), *bad)) == 2
    assert "error" in capsys.readouterr().err
    assert not (cache / "bad").exists()


def test_report_and_results_without_matplotlib(tmp_path, monkeypatch, capsys):
    """Without matplotlib the numbers are still written; each skipped figure is one line on stderr, no traceback."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    row = {"label": "PCLR", "matrix": [[50.0, None], [40.0, 60.0]], "new_acc": 55.0, "avg_acc": 50.0,
           "forgetting": 10.0, "bwt": -10.0, "peak_memory_mb": 1.0, "trainable_params_per_task": 10,
           "stored_lrp_params": 20, "wall_seconds": 1.0}
    metrics = {"run": {"preset": "tiny", "sizes": {"n_test": 8, "eval_mode": "forced"}}, "tasks": ["A", "B"],
               "methods": {"pclr": row}, "model": {}, "machine": {}, "total_wall_seconds": 1.0}
    written = write_report(tmp_path, metrics)
    assert written == ["report.md", "metrics.json"]
    assert not (tmp_path / "accuracy_matrices.png").exists() and not (tmp_path / "forgetting.png").exists()
    assert ".png" not in (tmp_path / "report.md").read_text() and "| PCLR |" in (tmp_path / "report.md").read_text()
    paths = CILResults(task_names=["A", "B"], matrix=[[50.0, float("nan")], [40.0, 60.0]]).save(str(tmp_path / "r"))
    assert "heatmap" not in paths and (tmp_path / "r" / "results.json").is_file()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("matplotlib is not installed" in line for line in err)


def test_missing_model_files_are_reported_before_any_work(cache, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    out = cache / "never"
    assert run_main(_args("--preset", "quick", "--output", str(out), "--no-progress")) == 2
    err = capsys.readouterr().err
    assert "gguf" in err and ".[demo]" in err and not out.exists()
