"""`pclr run --jobs`: the units of a run in worker processes give the same run (the same steps, parameter counts
and report rows) as one process; the prefix warm-up caches every sample once; bad --jobs is refused."""
import argparse
import json

from pclr.demo import parallel
from pclr.demo.experiment import add_run_arguments, run_main

COMMON = ["--preset", "tiny", "--tasks", "ScienceQA,VQAv2", "--methods", "lora,pclr,joint", "--no-progress"]


def _args(*argv):
    p = argparse.ArgumentParser()
    add_run_arguments(p)
    return p.parse_args(list(argv))


def test_resolve_jobs(monkeypatch):
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 2)
    assert parallel.resolve_jobs(None, "cpu") == 2 and parallel.resolve_jobs(None, "cuda") == 1
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 1)
    assert parallel.resolve_jobs(None, "cpu") == 1
    assert parallel.resolve_jobs(3, "cpu") == 3 and parallel.resolve_jobs(1, "cuda") == 1


def test_bad_jobs_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PCLR_CACHE", str(tmp_path / "cache"))
    assert run_main(_args(*COMMON, "--output", str(tmp_path / "r"), "--jobs", "0")) == 2
    assert "--jobs" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_two_workers_give_the_same_run_as_one_process(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PCLR_CACHE", str(tmp_path / "cache"))
    runs = {}
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs{jobs}"
        assert run_main(_args(*COMMON, "--output", str(out), "--jobs", jobs)) == 0
        runs[jobs] = json.loads((out / "metrics.json").read_text())
    assert "in 2 worker processes" in capsys.readouterr().out
    one, two = runs["1"], runs["2"]
    assert one["optimizer_steps"] == two["optimizer_steps"]
    assert set(one["methods"]) == set(two["methods"]) == {"lora", "pclr", "joint"}
    for m in one["methods"]:
        a, b = one["methods"][m], two["methods"][m]
        for k in ("trainable_params_per_task", "stored_lrp_params", "experts", "label"):
            assert a[k] == b[k], (m, k)
        assert (a["matrix"] is None) == (b["matrix"] is None)
    ref1, ref2 = one["references"]["per_task_lora"], two["references"]["per_task_lora"]
    assert ref1["learn_steps_per_task"] == ref2["learn_steps_per_task"] and len(ref2["final"]) == 2
    assert {t: set(v) for t, v in one["per_task"].items()} == {t: set(v) for t, v in two["per_task"].items()}
    # a unit that fails in a worker (a corrupt checkpoint on resume) stops the run with its error, exit 2
    ckpt = next((tmp_path / "jobs2" / "lora").rglob("*.safetensors"))
    ckpt.write_bytes(b"not a checkpoint")
    assert run_main(_args(*COMMON, "--output", str(tmp_path / "jobs2"), "--jobs", "2", "--resume")) == 2
    assert "corrupt" in capsys.readouterr().err


def test_warm_prefix_caches_every_sample_once(tmp_path):
    from pclr.demo import runner

    args = argparse.Namespace(data_dir=str(tmp_path), cache_dir=str(tmp_path), no_progress=True)
    ident = {"seed": 0, "tasks": ["ScienceQA", "VQAv2"],
             "sizes": {"n_train": 6, "n_test": 3, "model": "tiny", "lrp_layers": 2}}
    tasks, data = runner._tasks(ident, runner._data_root(args, ident))
    bundle = runner._build(ident, args, "cpu")
    n = parallel.warm_prefix(bundle, tasks, "cpu")
    assert n == sum(f.n_train + f.n_test for f in data.tasks.values())
    assert parallel.warm_prefix(bundle, tasks, "cpu") == n  # a second pass adds nothing
