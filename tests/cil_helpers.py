"""Synthetic continual-learning tasks for the CIL tests (tiny, offline, conflicting across tasks).

Task k asks a task-specific instruction about a letter x and answers perm_k(x): the same input letter has a
different answer in every task, so sequential fine-tuning of one LoRA overwrites the earlier tasks.
"""
from __future__ import annotations

import random
import string

import numpy as np

from pclr.cil import Task

TASK_WORDS = (("color", "red", "green"), ("shape", "circle", "square"), ("count", "many", "number"),
              ("word", "top", "bottom"))
LETTERS = tuple(string.ascii_lowercase[:8])


def synthetic_tasks(n_tasks: int = 3, n_train: int = 16, seed: int = 0, with_images: bool = False,
                    letters=LETTERS) -> list[Task]:
    rng = random.Random(seed)
    tasks = []
    for k in range(n_tasks):
        perm = list(letters)
        while any(a == b for a, b in zip(perm, letters)):
            rng.shuffle(perm)
        mapping = dict(zip(letters, perm))
        words = TASK_WORDS[k]

        def sample(i: int, x: str) -> dict:
            s = {"id": f"t{k}-{i}", "conversations": [
                {"from": "human", "value": f"{words[0]} {words[1]} {words[2]} {x} ?"},
                {"from": "gpt", "value": mapping[x]}]}
            if with_images:
                from PIL import Image

                arr = np.full((16, 16, 3), 40 * k + 20, dtype=np.uint8)
                s["image"] = Image.fromarray(arr)
                s["conversations"][0]["value"] = "<image>\n" + s["conversations"][0]["value"]
            return s

        train = [sample(i, letters[i % len(letters)]) for i in range(n_train)]
        test = [sample(100 + i, x) for i, x in enumerate(letters)]
        tasks.append(Task(name=words[0], train=train, test=test, scorer="exact"))
    return tasks


def small_config(method: str = "pclr", seed: int = 0, **kw):
    """A CILConfig sized for the tiny models (fast on CPU)."""
    from pclr import LRPConfig
    from pclr.cil import CILConfig

    base = dict(method=method, lrp=LRPConfig(r=4, alpha=8.0, budget=12, n_shared=2), epochs=20, batch_size=8,
                lr=3e-2, seed=seed, progress=False, max_new_tokens=2, warmup_ratio=0.0)
    base.update(kw)
    return CILConfig(**base)


def ddp_worker(rank: int, world: int, port: int, out_dir: str, result_path: str) -> None:
    """One process of the 2-process CPU (gloo) data-parallel test."""
    import json
    import os

    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from accelerate import Accelerator

    from pclr.cil import CILTrainer
    from pclr.models.tiny import tiny_causal_lm

    acc = Accelerator(cpu=True)
    assert acc.num_processes == world, acc.state
    trainer = CILTrainer(tiny_causal_lm(seed=0), ddp_config(), synthetic_tasks(2, n_train=16), output_dir=out_dir,
                         accelerator=acc)
    res = trainer.run()
    if acc.is_main_process:
        from pclr.inject import lrp_state_dict

        state = {k: v.tolist() for k, v in lrp_state_dict(trainer.model).items() if k.endswith("B_m")}
        with open(result_path, "w") as f:
            json.dump({"matrix": res.to_dict()["matrix"], "B": state}, f)
    acc.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def ddp_config():
    """PCLR with one compression + integration, so every phase runs under data parallelism."""
    return small_config("pclr", epochs=4, schedule=[dict(n_new=4), dict(n_new=4, keep=0.5, add_shared=True)],
                        integration_steps=3)
