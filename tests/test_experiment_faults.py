"""`pclr run` / `pclr eval` / `pclr bench` under bad options and faults: errors come before any work, one line,
exit 2; an interrupted (SIGINT, SIGKILL) or damaged run resumes to the same report as an uninterrupted one."""
import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pclr.demo.experiment as experiment
from pclr.bench import cli as bench
from pclr.cil.trainer import CILTrainer
from pclr.demo.experiment import add_eval_arguments, add_run_arguments, eval_main, run_main

TINY = ["--preset", "tiny", "--tasks", "ScienceQA,VQAv2", "--methods", "lora,pclr", "--no-progress", "--jobs", "1"]
# the figures of the report that do not depend on the clock or the machine
FIGURES = ("matrix", "new_acc", "avg_acc", "forgetting", "bwt", "trainable_params_per_task", "stored_lrp_params",
           "experts")


def _args(*argv):
    p = argparse.ArgumentParser()
    add_run_arguments(p)
    return p.parse_args(list(argv))


def _eval_args(*argv):
    p = argparse.ArgumentParser()
    add_eval_arguments(p)
    return p.parse_args(list(argv))


def _figures(out: Path) -> dict:
    m = json.loads((out / "metrics.json").read_text())
    return {name: {k: r[k] for k in FIGURES} for name, r in m["methods"].items()}


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("pclr-cache")


@pytest.fixture
def cache(tmp_path, monkeypatch, shared_cache):
    monkeypatch.setenv("PCLR_CACHE", str(shared_cache))  # the data and the tiny model are built once
    return tmp_path


@pytest.fixture(scope="module")
def reference(shared_cache, tmp_path_factory):
    """An uninterrupted tiny run: the report every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PCLR_CACHE", str(shared_cache))
        assert run_main(_args(*TINY, "--output", str(out))) == 0
    return _figures(out)


@pytest.fixture
def no_work(monkeypatch):
    """Any attempt to start the work (import the runner) fails the test."""
    monkeypatch.setattr(experiment, "_runner", lambda: pytest.fail("the work started before the options failed"))


@pytest.mark.parametrize("schedule", ["100,100,100", "8", "0,8,8"])
def test_bad_schedule_fails_before_any_training(cache, no_work, capsys, schedule):
    out = cache / "bad"
    assert run_main(_args(*TINY, "--output", str(out), "--schedule", schedule)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pclr run: error: --schedule") and "pclr" in err[0]
    assert not out.exists()


def test_unwritable_output_fails_before_any_work(cache, no_work, capsys):
    a_file = cache / "a-file"
    a_file.write_text("x")
    for out in (a_file, a_file / "below", Path("/proc/self/pclr-run")):
        assert run_main(_args(*TINY, "--output", str(out))) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--output" in err[0], err
    assert run_main(_args(*TINY, "--output", str(cache / "ok"), "--data-dir", str(a_file))) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert run_main(_args(*TINY, "--output", str(cache / "ok"), "--resume", "--overwrite")) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_bench_out_unwritable_fails_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "run_sweep", lambda *a, **k: pytest.fail("the sweep started"))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for out in (a_file, Path("/proc/self/pclr-bench")):
        assert bench.main(["--preset", "smoke", "--device", "cpu", "--out", str(out), "--no-plots"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--out" in err[0], err


def test_resume_command_is_quoted_and_complete(cache, monkeypatch, capsys):
    class Runner:
        @staticmethod
        def run(*a, **k):
            raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "_runner", lambda: Runner)
    out, data = cache / "my runs" / "it's one", cache / "data dir"
    argv = [*TINY, "--output", str(out), "--data-dir", str(data), "--cache-dir", str(cache / "m c"), "--seed", "3",
            "--schedule", "4,4"]
    assert run_main(_args(*argv)) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1].strip()
    cmd = shlex.split(line)
    assert cmd[:2] == ["pclr", "run"] and "--resume" in cmd
    again = _args(*cmd[2:])
    for opt in ("output", "data_dir", "cache_dir", "seed", "schedule", "methods", "tasks", "preset", "no_progress",
                "jobs"):
        assert str(getattr(again, opt)) == str(getattr(_args(*argv), opt)), opt


def test_eval_on_read_only_run_dir_fails_before_any_work(cache, no_work, capsys, monkeypatch):
    out = cache / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"methods": ["lora"], "sizes": {"model": "tiny"}}))
    monkeypatch.setattr(experiment, "unwritable_reason",
                        lambda p, what="directory": f"{p} is not writable (Read-only file system)")
    assert eval_main(_eval_args(str(out))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not writable" in err[0]


def test_interrupt_corrupt_overwrite_and_records(cache, reference, monkeypatch, capsys):
    """In-process: an interrupt inside the second method, a resume, a damaged checkpoint, --overwrite."""
    real_eval = CILTrainer._phase_eval

    def interrupted_eval(self, t):
        if self.config.method == "pclr" and t == 1:
            raise KeyboardInterrupt
        return real_eval(self, t)

    out = cache / "run"
    monkeypatch.setattr(CILTrainer, "_phase_eval", interrupted_eval)
    assert run_main(_args(*TINY, "--output", str(out))) == 130
    monkeypatch.setattr(CILTrainer, "_phase_eval", real_eval)
    assert run_main(_args(*TINY, "--output", str(out), "--resume")) == 0
    assert _figures(out) == reference
    m = json.loads((out / "metrics.json").read_text())
    assert m["total_wall_seconds"] >= sum(r["wall_seconds"] for r in m["methods"].values())
    for method in ("lora", "pclr"):  # the wall time of phases finished before the interrupt is kept, not reset
        records = json.loads((out / method / "ckpt" / "state.json").read_text())["records"]
        assert m["methods"][method]["wall_seconds"] == round(sum(p["wall_seconds"] for p in records), 1) > 0
    assert "| 0 |" not in (out / "report.md").read_text()
    # 1000 bytes of 0xFF in the tensor data: refused by pclr run --resume and by pclr eval, naming the file
    ckpt = out / "pclr" / "ckpt" / "checkpoint.safetensors"
    raw = bytearray(ckpt.read_bytes())
    raw[-1100:-100] = b"\xff" * 1000
    ckpt.write_bytes(bytes(raw))
    capsys.readouterr()
    assert run_main(_args(*TINY, "--output", str(out), "--resume")) == 2
    assert "checkpoint.safetensors is corrupt" in capsys.readouterr().err
    assert eval_main(_eval_args(str(out), "--no-progress")) == 2
    assert "checkpoint.safetensors is corrupt" in capsys.readouterr().err
    # --overwrite starts over: one run in each log, the same figures
    assert run_main(_args(*TINY, "--output", str(out), "--overwrite")) == 0
    assert _figures(out) == reference
    for method in ("lora", "pclr"):
        events = [json.loads(x) for x in (out / method / "log.jsonl").read_text().splitlines()]
        starts = [(e["task"], e["phase"]) for e in events if e["event"] == "phase_start"]
        assert len(starts) == len(set(starts)), method


def _pclr(*argv) -> list[str]:
    return [sys.executable, "-m", "pclr.cli", "run", *argv]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow  # one `pclr run` process: its imports alone take 10-30 s on a busy 2-core machine
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_killed_run_resumes_to_the_same_report(cache, reference, sig):
    """A real process, interrupted after its first checkpoint, then resumed with the printed command (SIGINT) or
    the documented one (SIGKILL)."""
    env = {**os.environ}
    out = cache / "killed"
    # SIGINT back to its default in the child: a test process started in the background by a non-interactive shell
    # inherits SIGINT ignored, and Python then never turns it into KeyboardInterrupt
    proc = subprocess.Popen(_pclr(*TINY, "--output", str(out)), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # the first checkpoint of the run (the single-task phase's first): the most work is left after it, so the
    # signal reaches a running process even on a loaded machine
    _wait_for(out / "single-task" / "ScienceQA" / "lora" / "ckpt" / "checkpoint.safetensors", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        resume = shlex.split(err.strip().splitlines()[-1])
        assert resume[:2] == ["pclr", "run"]
        argv = resume[2:]
    else:
        assert proc.returncode == -signal.SIGKILL
        argv = [*TINY, "--output", str(out), "--resume"]
    assert not (out / "metrics.json").exists()
    assert run_main(_args(*argv)) == 0
    assert _figures(out) == reference
