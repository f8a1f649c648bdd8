"""What the trainer needs from data parallelism: sums over processes, gradient sync and rank-0 logging.

Only the LRP tensors train and they are small, so gradients are summed with one flat all-reduce per step instead of
wrapping the model in DDP (pools change shape between phases, and some pools, e.g. the projector's on text-only
batches, get no gradient in a step). Losses are normalised by GLOBAL token/sample counts, so N processes compute
the same update as one.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn


class Distributed:
    """The process-group view of an ``accelerate.Accelerator``: world size, rank, and the reductions.

    With one process every reduction is the identity, so single-process runs never touch ``torch.distributed``.
    """

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator
        self.device = accelerator.device
        self.world: int = accelerator.num_processes
        self.rank: int = accelerator.process_index
        self.is_main: bool = accelerator.is_main_process

    def all_sum(self, x: Tensor) -> Tensor:
        """``x`` summed over processes (a new tensor; ``x`` itself is left as it is)."""
        if self.world == 1:
            return x
        y = x.clone()
        dist.all_reduce(y)
        return y

    def sync_grads(self, params: list[nn.Parameter]) -> None:
        """Sum gradients over processes in one flat fp32 all-reduce (losses are already divided by global counts);
        a parameter without a gradient on this process contributes zeros."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        off = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[off: off + n].view_as(p).to(p.dtype)
            off += n

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


class RunLog:
    """``log.jsonl`` (one JSON record per line, appended) and, when installed and asked for, TensorBoard scalars.

    Only the main process writes; on the others every method is a no-op.
    """

    def __init__(self, output_dir: str, is_main: bool, tensorboard: bool):
        self.output_dir, self.is_main, self.tensorboard = output_dir, is_main, tensorboard
        self._file = None
        self._tb: Optional[Any] = None

    def open(self) -> None:
        if not self.is_main:
            return
        self._file = open(os.path.join(self.output_dir, "log.jsonl"), "a", encoding="utf-8")
        if self.tensorboard:
            try:  # tensorboard is optional: JSONL only without it
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(self.output_dir, "tb"))
            except Exception:  # noqa: BLE001 - any failure to start TensorBoard leaves the JSONL log
                self._tb = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def log(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps({"time": time.time(), **record}) + "\n")
            self._file.flush()

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._tb is not None:
            self._tb.add_scalar(tag, value, step)
