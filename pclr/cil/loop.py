"""The optimisation loop of one phase: AdamW, linear warmup + cosine decay, gradient accumulation, clipping, the
cross-process gradient sum, a progress bar and the step log."""
from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pclr.cil.config import CILConfig
from pclr.cil.distributed import Distributed, RunLog

LossFn = Callable[[dict], tuple[Tensor, dict]]
"""``loss_fn(batch) -> (loss, {name: value to log})``."""


def cosine_with_warmup(steps: int, warm: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup over ``warm`` steps, then cosine decay to 0 at ``steps``."""

    def lr_at(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        prog = (step - warm) / max(1, steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, prog)))

    return lr_at


def local_batches(data: Sequence[dict], batch_size: int, collate: Callable[[list[dict]], dict], seed: int,
                  rank: int = 0, world: int = 1) -> Iterator[dict]:
    """Endless batches of this process: a seeded permutation per epoch, global batches of ``batch_size`` samples,
    this process's share = every ``world``-th sample of each global batch (a tail smaller than ``world`` is
    skipped, which never happens with one process)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(data), generator=gen).tolist()
        for i in range(0, len(order), batch_size):
            chunk = order[i: i + batch_size]
            if len(chunk) < world:
                continue
            yield collate([data[k] for k in chunk[rank::world]])


def train_steps(params: list[nn.Parameter], loss_fn: LossFn, batches: Iterator[dict], steps: int, lr: float,
                config: CILConfig, dist: Distributed, log: RunLog, *, task: int, phase: str, desc: str,
                on_step: Optional[Callable[[int], None]] = None) -> None:
    """Run ``steps`` optimizer steps of ``loss_fn`` over ``batches`` on the parameters that require grad.

    Each step accumulates ``config.gradient_accumulation_steps`` micro-batches, sums gradients over processes,
    clips to ``config.max_grad_norm`` and logs every ``config.log_every`` steps. ``on_step(step)`` runs after each.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    # weight_decay=0: rows with zero gradient (frozen experts) stay bit-identical under AdamW
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, int(config.warmup_ratio * steps)) if config.warmup_ratio > 0 else 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(steps, warm))
    bar = tqdm(total=steps, desc=desc, disable=not (dist.is_main and config.progress), leave=False,
               dynamic_ncols=True)
    G = config.gradient_accumulation_steps
    try:
        for step in range(steps):
            info_acc: dict[str, float] = {}
            loss_total = 0.0
            for _ in range(G):
                loss, info = loss_fn(next(batches))
                loss_val = float(loss.detach())
                (loss / G).backward()
                loss_total += loss_val / G
                for k, v in info.items():  # floats are averaged over micro-batches, the rest logged as is
                    info_acc[k] = info_acc.get(k, 0.0) + v / G if isinstance(v, float) else v
            dist.sync_grads(params)
            if config.max_grad_norm and config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss_global = float(dist.all_sum(torch.tensor(loss_total, dtype=torch.float64, device=dist.device)))
            bar.update(1)
            bar.set_postfix(loss=f"{loss_global:.4f}", phase=phase)
            if step % config.log_every == 0 or step == steps - 1:
                log.log({"event": "step", "task": task, "phase": phase, "step": step, "loss": loss_global,
                         "lr": sched.get_last_lr()[0], **info_acc})
                log.scalar(f"{phase}/loss/task{task}", loss_global, step)
            if on_step is not None:
                on_step(step)
    finally:
        bar.close()
        opt.zero_grad(set_to_none=True)
