"""Done-means test: on 3 conflicting synthetic tasks, sequential LoRA forgets and PCLR forgets measurably less.

Margins come from seeds 0-4 (tiny LLaMA, r=4, 20 epochs, lr 3e-2, budget 12 = 3 tasks x 4 experts):
LoRA forgetting 50.0 / 43.8 / 81.2 / 81.2 / 93.8, Avg.ACC 29.2 / 12.5 / 41.7 / 16.7 / 20.8;
PCLR forgetting 0 on all five, Avg.ACC 79.2 / 91.7 / 95.8 / 100 / 100. The test runs seeds 0 and 1.
"""
import pytest
from cil_helpers import small_config, synthetic_tasks

from pclr.cil import CILTrainer
from pclr.models.tiny import tiny_causal_lm


@pytest.mark.parametrize("seed", [0, 1])
def test_pclr_forgets_less_than_sequential_lora(tmp_path, seed):
    tasks = synthetic_tasks(3, seed=seed)
    summaries = {}
    for method in ("lora", "pclr"):
        tr = CILTrainer(tiny_causal_lm(seed=seed), small_config(method, seed=seed), tasks,
                        output_dir=str(tmp_path / method))
        summaries[method] = tr.run().summary
    lora, pclr = summaries["lora"], summaries["pclr"]
    assert lora["forgetting"] >= 25.0, lora  # the setting does make sequential LoRA forget
    assert pclr["forgetting"] <= lora["forgetting"] - 25.0, (pclr, lora)
    assert pclr["avg_acc"] >= lora["avg_acc"] + 25.0, (pclr, lora)
    assert pclr["new_acc"] >= 60.0, pclr  # PCLR still learns each task
