"""The joint multi-task reference (the ceiling of a continual learner): one LoRA of the baselines' rank trained on
the union of every task's training set, with as many optimizer steps in total as a sequential method takes over the
whole sequence, then evaluated on every task."""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from pclr.cil.config import CILConfig, Task
from pclr.cil.data import load_coin_json
from pclr.demo.steps import learn_steps

JOINT_TASK = "joint"


def _absolute(sample: dict, image_root: str | None) -> dict:
    """``sample`` with its image path made absolute, so it loads whatever task it is batched with."""
    img = sample.get("image")
    if image_root and isinstance(img, str) and not os.path.isabs(img):
        return {**sample, "image": os.path.join(image_root, img)}
    return sample


def union_task(tasks: Sequence[Task]) -> Task:
    """One task whose training and test sets are the union of ``tasks``' (in task order; the trainer shuffles the
    training set every epoch, so batches mix the tasks). Its own test score is one accuracy over all test samples;
    the per-task accuracies come from evaluating the trained model on each of ``tasks``."""
    if not tasks:
        raise ValueError("tasks: no tasks to join")
    train = [_absolute(s, t.image_root) for t in tasks for s in load_coin_json(t.train)]
    test = [_absolute(s, t.image_root) for t in tasks for s in load_coin_json(t.test)]
    return Task(JOINT_TASK, train=train, test=test, image_root=None, scorer="exact")


def joint_config(config: CILConfig, tasks: Sequence[Task]) -> CILConfig:
    """``config`` (the LoRA baseline's) with its epochs set so that one learning phase on the union of ``tasks``
    takes exactly the sum of the per-task learning steps of a sequential method."""
    sizes = [len(load_coin_json(t.train)) for t in tasks]
    total = sum(learn_steps(config, n) for n in sizes)
    per_epoch = max(1, -(-sum(sizes) // config.batch_size))
    # the trainer takes ceil(epochs * per_epoch) steps: half a step below the target keeps float rounding off it
    return dataclasses.replace(config, epochs=(total - 0.5) / per_epoch)
