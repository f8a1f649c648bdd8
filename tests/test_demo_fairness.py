"""The fair-comparison plumbing of `pclr run` without training: the statistics over seeds (t-test p-values against
known values), the summary report, the parameter counts against a hand count, the joint reference's step budget and
the equal-steps check."""
import json
import math
from pathlib import Path

import pytest
from torch import nn

import pclr
from pclr.cil.config import CILConfig, Task
from pclr.cil.records import RunRecords, stored_lrp_params, trainable_lrp_params
from pclr.demo.joint import joint_config, union_task
from pclr.demo.report import steps_cell
from pclr.demo.rundir import seed_runs
from pclr.demo.stats import mean_std, paired_t_test, t_two_sided_p, verdict
from pclr.demo.steps import check_equal_steps, learn_steps, steps_of
from pclr.demo.summary import write_summary
from pclr.inject import lrp_pools


# two-sided critical values of Student's t at p = 0.05 / 0.01 (any t table) and t = 1 with df = 1 (p = 0.5: the
# Cauchy distribution, exactly)
@pytest.mark.parametrize("t, df, p", [(12.706, 1, 0.05), (4.303, 2, 0.05), (2.776, 4, 0.05), (2.228, 10, 0.05),
                                      (3.169, 10, 0.01), (63.657, 1, 0.01), (1.0, 1, 0.5), (0.0, 3, 1.0),
                                      (-2.776, 4, 0.05)])
def test_t_p_value_against_known_values(t, df, p):
    assert t_two_sided_p(t, df) == pytest.approx(p, abs=2e-4)


def test_paired_t_test_and_its_reading():
    # differences 1, 2, 3, 2: mean 2, sample sd sqrt(2/3), t = 2 / (sd / 2) = 4.899, df 3
    r = paired_t_test([11.0, 12.0, 13.0, 12.0], [10.0, 10.0, 10.0, 10.0])
    assert r["n"] == 4 and r["df"] == 3 and r["mean_diff"] == 2.0
    assert r["t"] == pytest.approx(2.0 / (math.sqrt(2 / 3) / 2))
    assert r["p"] == pytest.approx(0.01628, abs=1e-4) and r["signs"] == ["+", "+", "+", "+"]
    assert verdict(r) == "wins"
    assert verdict(paired_t_test([10.0, 10.0, 10.0, 10.0], [11.0, 12.0, 13.0, 12.0])) == "loses"
    noisy = paired_t_test([10.0, 20.0, 5.0], [12.0, 15.0, 6.0])
    assert noisy["p"] > 0.05 and noisy["signs"] == ["-", "+", "-"] and verdict(noisy) == "no significant difference"
    one = paired_t_test([10.0], [5.0])
    assert one["p"] is None and one["t"] is None and verdict(one) == "n/a"
    assert verdict(paired_t_test([3.0, 4.0], [3.0, 4.0])) == "ties"
    constant = paired_t_test([3.0, 4.0], [2.0, 3.0])  # the same difference twice: t undefined, no claim
    assert constant["p"] is None and verdict(constant) == "no significant difference"
    assert paired_t_test([1.0] * 6, [0.0, 0.5] * 3)["signs"] is None  # more than five seeds: no signs
    with pytest.raises(ValueError, match="a and b"):
        paired_t_test([1.0], [1.0, 2.0])


def test_mean_std_is_the_sample_std():
    s = mean_std([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])
    assert s["mean"] == 5.0 and s["std"] == pytest.approx(math.sqrt(32 / 7)) and s["n"] == 8
    assert mean_std([3.0])["std"] is None and mean_std([None, None])["mean"] is None


def _seed_metrics(seed, pclr_acc, lora_acc):
    row = lambda label, acc, forg: {"label": label, "avg_acc": acc, "forgetting": forg, "new_acc": acc + forg,  # noqa: E731
                                   "trainable_params_per_task": 10, "stored_lrp_params": 20,
                                   "learn_steps_per_task": [4, 4]}
    return {"run": {"seed": seed}, "methods": {"lora": row("LoRA", lora_acc, 9.0), "pclr": row("PCLR", pclr_acc, 1.0)},
            "references": {}}


def test_summary_over_seeds(tmp_path):
    ident = {"preset": "tiny", "tasks": ["A", "B"], "seed": 0, "seeds": 3}
    per_seed = [_seed_metrics(s, p, q) for s, p, q in [(0, 50.0, 40.0), (1, 52.0, 41.0), (2, 51.0, 43.0)]]
    assert write_summary(tmp_path, ident, per_seed) == ["summary.md", "summary.json"]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["n_seeds"] == 3 and s["seeds"] == [0, 1, 2]
    assert s["rows"]["pclr"]["avg_acc"]["mean"] == 51.0 and s["rows"]["pclr"]["avg_acc"]["std"] == 1.0
    test = s["pclr_vs"]["lora"]
    assert test["signs"] == ["+", "+", "+"] and test["mean_diff"] == pytest.approx(29 / 3) and test["p"] < 0.05
    assert test["verdict"] == "wins" and "pclr" not in s["pclr_vs"]
    md = (tmp_path / "summary.md").read_text()
    assert "Number of seeds: 3" in md and "51.00 ± 1.00" in md and "PCLR: wins against LoRA" in md
    # one seed: no std, no test
    write_summary(tmp_path, {**ident, "seeds": 1}, per_seed[:1])
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["rows"]["pclr"]["avg_acc"]["std"] is None and s["pclr_vs"]["lora"]["p"] is None
    assert s["pclr_vs"]["lora"]["verdict"] == "n/a"
    md = (tmp_path / "summary.md").read_text()
    assert "(± n/a)" in md and "n/a" in md and "Number of seeds: 1" in md and "wins" not in md.split("Reading")[0]


def test_seed_directories():
    ident = {"seed": 3, "seeds": 2, "methods": ["pclr"]}
    tmp = Path("/r")
    runs = seed_runs(ident, tmp)
    assert [(i["seed"], str(d)) for i, d in runs] == [(3, "/r/seed-3"), (4, "/r/seed-4")]
    assert all("seeds" not in i for i, _ in runs)
    assert seed_runs({"seed": 3, "methods": ["pclr"]}, tmp) == [({"seed": 3, "methods": ["pclr"]}, tmp)]


class _Holder(nn.Module):
    """Like a decoder layer after inject_lrp: the linears and the key pool they share."""

    def __init__(self, pool, *layers):
        super().__init__()
        self.pool = pool
        self.layers = nn.ModuleList(layers)


def test_parameter_counts_against_a_hand_count():
    """Two linears 6 -> 5 and 6 -> 3 sharing one key pool (query parts 3 and 2), 4 experts + 2 shared ranks."""
    cfg = pclr.LRPConfig(r=2, alpha=4, n_shared=2, budget=8)
    pool = pclr.KeyPool((3, 2))
    a = pclr.FusedLRPLinear.from_linear(nn.Linear(6, 5), cfg, key_pool=pool)
    b = pclr.FusedLRPLinear.from_linear(nn.Linear(6, 3), cfg, key_pool=pool)
    model = _Holder(pool, a, b)
    pool.grow(4)
    a.add_shared(2)
    b.add_shared(2)
    assert len(lrp_pools(model)) == 1
    rows = 4 * (6 + 5) + 4 * (6 + 3)  # A_m and B_m rows of both layers
    shared = 2 * (6 + 5) + 2 * (6 + 3)
    keys = 4 * (3 + 2)
    assert stored_lrp_params(model) == rows + shared + keys == 140
    assert stored_lrp_params(model, keys=False) == rows + shared == 120
    assert trainable_lrp_params([pool], lora=True) == rows == 80  # LoRA trains every row, no key
    pool.freeze()
    pool.grow(2)  # a new task's experts: only they (and their keys) train under PCLR
    assert trainable_lrp_params([pool], lora=False) == 2 * (6 + 5) + 2 * (6 + 3) + 2 * (3 + 2) == 50


def _task(name, n, tmp_path):
    samples = [{"id": f"{name}-{i}", "image": f"img/{i}.png",
                "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}
               for i in range(n)]
    return Task(name, train=samples, test=samples[:2], image_root=str(tmp_path / name))


@pytest.mark.parametrize("sizes, epochs", [((16, 9), 2.0), ((16, 16, 16), 2.0), ((5, 7, 3), 1.0), ((80,) * 8, 2.0),
                                           ((24,) * 8, 2.0), ((13, 8), 0.5)])
def test_joint_reference_takes_the_sum_of_the_sequential_steps(tmp_path, sizes, epochs):
    tasks = [_task(f"T{i}", n, tmp_path) for i, n in enumerate(sizes)]
    cfg = CILConfig(method="lora", epochs=epochs, batch_size=8)
    joint = union_task(tasks)
    assert len(joint.train) == sum(sizes) and len(joint.test) == 2 * len(sizes)
    assert joint.train[0]["image"] == str(tmp_path / "T0" / "img/0.png")  # loads whatever it is batched with
    assert learn_steps(joint_config(cfg, tasks), len(joint.train)) == sum(learn_steps(cfg, n) for n in sizes)


def test_equal_steps_check_reads_the_records():
    rec = RunRecords()
    for t in range(2):
        for _ in range(3):
            rec.count_step(t, "learn")
        rec.add(t, "learn", 0.1, 10)
        rec.add(t, "eval", 0.1)
    assert steps_of(rec, 2) == {"learn": [3, 3], "integrate": [0, 0]}
    assert RunRecords.from_list(rec.to_list()).steps_per_task("learn") == {0: 3, 1: 3}  # kept with the checkpoint
    pclr_steps = {"learn": [3, 3], "integrate": [0, 2]}
    out = check_equal_steps({"lora": steps_of(rec, 2), "pclr": pclr_steps}, joint=6, expected=[3, 3])
    assert out == {"learn_steps_per_task": [3, 3], "joint_learn_steps": 6, "integration_steps": {"lora": 0, "pclr": 2}}
    with pytest.raises(RuntimeError, match="unequal optimizer steps"):
        check_equal_steps({"lora": steps_of(rec, 2), "pclr": {"learn": [3, 2], "integrate": [0, 0]}})
    with pytest.raises(RuntimeError, match="joint reference took 5"):
        check_equal_steps({"lora": steps_of(rec, 2)}, joint=5)


def test_steps_cell_reports_integration_steps_apart():
    assert steps_cell({"learn_steps_per_task": [2, 2], "integration_steps": 0}) == "2/task"
    assert steps_cell({"learn_steps_per_task": [2, 2, 2], "integration_steps": 6}) == "2/task + 6 integration steps"
    assert steps_cell({"learn_steps_per_task": [3, 2]}) == "3/2"
    assert steps_cell({"learn_steps": 8}) == "8 total" and steps_cell({}) == "n/a"
