"""A run killed mid-task resumes at the right task/phase and ends exactly like an uninterrupted run."""
import json

import pytest
import torch
from cil_helpers import small_config, synthetic_tasks

from pclr.cil import CILTrainer, TaskPlan
from pclr.inject import lrp_state_dict
from pclr.models.tiny import tiny_causal_lm


class Crash(RuntimeError):
    pass


def _config(**kw):
    # one compression + integration at task 2, so every phase kind is checkpointed and resumed
    return small_config("pclr", epochs=3, schedule=[TaskPlan(4), TaskPlan(4), TaskPlan(4, keep=0.5, add_shared=True)],
                        integration_steps=3, **kw)


def _crash_at(task, phase, step):
    def hook(trainer, t, p, s):
        if (t, p, s) == (task, phase, step):
            raise Crash(f"killed at task {t} {p} step {s}")
    return hook


@pytest.mark.parametrize("where", [(1, "learn", 2), (2, "integrate", 1)])
def test_resume_after_crash_equals_uninterrupted(tmp_path, where):
    tasks = synthetic_tasks(3, n_train=8)
    ref = CILTrainer(tiny_causal_lm(), _config(), tasks, output_dir=str(tmp_path / "ref"))
    ref_res = ref.run()
    ref_state = lrp_state_dict(ref.model)

    out = str(tmp_path / "crash")
    with pytest.raises(Crash):
        CILTrainer(tiny_causal_lm(), _config(on_step=_crash_at(*where)), tasks, output_dir=out).run()
    state = json.loads((tmp_path / "crash" / "ckpt" / "state.json").read_text())
    done = [tuple(x) for x in state["done"]]
    assert (where[0], where[1]) not in done and done  # checkpoint = the last completed phase

    resumed = CILTrainer(tiny_causal_lm(), _config(), tasks, output_dir=out)
    res = resumed.run(resume=True)
    assert res.to_dict()["matrix"] == ref_res.to_dict()["matrix"]
    got = lrp_state_dict(resumed.model)
    assert got.keys() == ref_state.keys()
    for k in ref_state:
        assert torch.equal(got[k], ref_state[k]), k
