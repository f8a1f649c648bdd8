"""The teacher-forced evaluation gives greedy generation's exact-match verdict, sample by sample."""
import torch
from cil_helpers import small_config, synthetic_tasks

from pclr.cil import CILTrainer, TaskPlan
from pclr.models.tiny import tiny_llava


def test_forced_eval_matches_greedy_exact_match(tmp_path):
    tasks = synthetic_tasks(2, n_train=16, with_images=True)
    cfg = small_config("pclr", epochs=6, schedule=[TaskPlan(4), TaskPlan(4)], key_init="task_query",
                       max_new_tokens=3)
    tr = CILTrainer(tiny_llava(), cfg, tasks, output_dir=str(tmp_path))
    tr.run()
    tr.model.eval()
    tr._set_inference_routing()
    for j in (0, 1):
        samples = tr.test_data[j]
        forced = tr.evaluator.forced_scores([tr._with_root(s, j) for s in samples], tr.scorers[j])
        generated = tr.evaluator.generated_scores([tr._with_root(s, j) for s in samples], tr.scorers[j])
        assert 0 < sum(forced) and forced == generated  # exact scorer, single-token answers: verdicts agree
    # keys of the task's new experts start at the task's mean query
    q = tr._task_mean_query(0)
    k0 = tr.pools[0].keys[0][tr.pools[0].task_of_expert == 0]
    assert torch.nn.functional.cosine_similarity(k0, q[0][None].to(k0)).min() > 0.5
