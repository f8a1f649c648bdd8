"""Synthetic continual-learning tasks for the CIL tests (tiny, offline, conflicting across tasks).

Task k asks a task-specific instruction about a letter x and answers perm_k(x): the same input letter has a
different answer in every task, so sequential fine-tuning of one LoRA overwrites the earlier tasks.
"""
from __future__ import annotations

import random
import string
from typing import Optional

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
