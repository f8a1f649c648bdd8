"""`pclr run --seeds 2` on the tiny preset, shrunk (8 train / 4 test samples per task, no single-task phase: the
other tiny runs cover it): both seed directories, the summary with mean ± std and the paired test, equal optimizer
steps recorded for every method, and a resume that skips the finished seed."""
import argparse
import dataclasses
import json

import pytest

import pclr.demo.runner as runner
from pclr.demo.data.coin_mini import train_size
from pclr.demo.experiment import add_run_arguments, run_main
from pclr.demo.settings import PRESETS

ARGV = ["--preset", "tiny", "--tasks", "ScienceQA,VQAv2", "--methods", "lora,pclr,joint", "--seeds", "2",
        "--no-progress"]


def _args(*argv):
    p = argparse.ArgumentParser()
    add_run_arguments(p)
    return p.parse_args(list(argv))


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PCLR_CACHE", str(root / "cache"))
        mp.setitem(PRESETS, "tiny", dataclasses.replace(PRESETS["tiny"], n_train=8, n_test=4, single_task=False))
        out = root / "run"
        assert run_main(_args(*ARGV, "--output", str(out))) == 0
        yield out, mp


def test_two_seeds_write_both_runs_and_a_summary(two_seeds):
    out, _ = two_seeds
    assert json.loads((out / "run.json").read_text())["seeds"] == 2
    for seed in (0, 1):
        d = out / f"seed-{seed}"
        assert (d / "report.md").is_file() and json.loads((d / "run.json").read_text())["seed"] == seed
        assert "seeds" not in json.loads((d / "run.json").read_text())  # a seed's run is a one-seed run
    s = json.loads((out / "summary.json").read_text())
    assert s["n_seeds"] == 2 and s["seeds"] == [0, 1] and set(s["rows"]) == {"lora", "pclr", "joint"}
    for key in ("lora", "pclr", "joint"):
        acc = s["rows"][key]["avg_acc"]
        assert acc["n"] == 2 and acc["std"] is not None and acc["std"] >= 0
    assert s["rows"]["joint"]["forgetting"]["mean"] is None  # no sequence, nothing to forget
    assert set(s["pclr_vs"]) == {"lora", "joint"}
    for test in s["pclr_vs"].values():
        assert len(test["signs"]) == 2 and test["n"] == 2
        assert test["verdict"] in ("wins", "loses", "ties", "no significant difference")
    md = (out / "summary.md").read_text()
    assert "Number of seeds: 2" in md and "±" in md and "paired t-test" in md and "| Joint (ceiling) |" in md


def test_equal_optimizer_steps_are_recorded(two_seeds):
    out, _ = two_seeds
    for seed in (0, 1):
        m = json.loads((out / f"seed-{seed}" / "metrics.json").read_text())
        lora, pclr, joint = (m["methods"][k] for k in ("lora", "pclr", "joint"))
        # n_train 8 scaled per task (ScienceQA 16, VQAv2 8), batch 8, 2 epochs: 4 and 2 learning steps, the same for
        # every sequential method; the joint reference takes their sum
        assert [train_size(t, 8) for t in ("ScienceQA", "VQAv2")] == [16, 8]
        assert lora["learn_steps_per_task"] == pclr["learn_steps_per_task"] == [4, 2]
        assert joint["learn_steps"] == 6 and m["optimizer_steps"]["joint_learn_steps"] == 6
        assert m["optimizer_steps"]["learn_steps_per_task"] == [4, 2]
        assert lora["stored_lrp_params"] == joint["stored_lrp_params"] < pclr["stored_lrp_params"]
        assert "4/2" in (out / f"seed-{seed}" / "report.md").read_text()


def test_resume_skips_finished_seeds(two_seeds, monkeypatch):
    out, _ = two_seeds
    before = json.loads((out / "summary.json").read_text())
    (out / "seed-1" / "metrics.json").unlink()  # seed 1 as if interrupted before its report
    (out / "summary.json").unlink()
    ran = []
    real = runner.run_seed

    def run_seed(args, ident, seed_out, device, resume):
        ran.append((ident["seed"], resume))
        return real(args, ident, seed_out, device, resume)

    monkeypatch.setattr(runner, "run_seed", run_seed)
    assert run_main(_args(*ARGV, "--output", str(out), "--resume")) == 0
    assert ran == [(1, True)]
    after = json.loads((out / "summary.json").read_text())
    assert after["rows"] == before["rows"] and after["pclr_vs"] == before["pclr_vs"]
