"""``CILTrainer``: Compression → Integration → Learning per task, evaluation after each, resumable.

    trainer = CILTrainer(bundle, CILConfig(method="pclr"), tasks, output_dir="runs/pclr")
    results = trainer.run(resume=True)

Phases of task t (each ends with an atomic checkpoint, so ``run(resume=True)`` restarts at the first unfinished one):
    "compress"  (PCLR, when the schedule's keep < 1): snapshot the pool as the QKLD teacher, prune every key pool to
                the scheduled size with the chosen rule, create the shared ranks if the schedule says so.
    "integrate" (after a compression, unless disabled): QKLD on the current task's data; experts + shared ranks
                train, keys frozen.
    "learn":    PCLR: freeze everything, add the task's experts (trainable) and route among the candidates;
                loss = CE(answer tokens) + lambda_qk·L_qk (+ LwF for pclr_lwf inside a group).
                LoRA baselines: one pool of r experts, always all chosen, all trainable (+ LwF for lora_lwf).
    "eval":     score every task seen so far; fill row t of the accuracy matrix.
Every phase reseeds torch/python/numpy from (seed, task, phase), so a resumed run equals an uninterrupted one.
Each checkpoint also holds the run's fingerprint (settings, data, model: a resume of another run is refused, naming
what differs), its records (wall time and trainable parameters of every finished phase, so reports after a resume
are complete) and a sha256 beside it (a damaged checkpoint is refused, never loaded). A fresh run refuses a
non-empty output_dir unless ``overwrite=True``.
Beside this phase loop: evaluation, checkpointing, distributed (sums over processes, rank-0 logs), loop (the
optimizer steps), learning (pool set-up, L_qk) and prototypes (routing by task prototypes), all in pclr.cil.
"""
from __future__ import annotations

import math
import os
import random
import time
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn

from pclr.cil.checkpointing import (
    RunState,
    check_fingerprint,
    checkpoint_path,
    claim_output_dir,
    load_checkpoint,
    save_checkpoint,
)
from pclr.cil.compression import compress_pool, kept_count
from pclr.cil.config import CILConfig, Task
from pclr.cil.data import CoINCollator, check_samples, load_coin_json
from pclr.cil.distributed import Distributed, RunLog
from pclr.cil.evaluation import CollatorFactory, Evaluator, answer_logits, split_to
from pclr.cil.fingerprint import model_digest, run_fingerprint
from pclr.cil.integration import TaskSampler, close_integration, open_for_integration, topk_sqrt_kl
from pclr.cil.learning import open_task_experts, prepare_lora, qk_loss, set_inference_candidates
from pclr.cil.loop import LossFn, local_batches, train_steps
from pclr.cil.lwf import is_group_start, lwf_loss
from pclr.cil.metrics import CILResults, get_scorer
from pclr.cil.prototypes import batch_query, prefill_prototype_routes, prototype_route, task_prototype
from pclr.cil.records import RunRecords, trainable_lrp_params
from pclr.cil.schedule import pool_plan
from pclr.cil.teacher import LRPSnapshot
from pclr.inject import inject_lrp, lrp_layers, lrp_pools
from pclr.models.bundle import ModelBundle
from pclr.query import QueryExtractor

PHASES = ("compress", "integrate", "learn", "eval")
# what a run writes into its output_dir (removed by run(overwrite=True), nothing else is)


class CILTrainer:
    """Continual instruction tuning of one model over a task sequence (see module docstring).

    Args:
        bundle: :class:`pclr.models.ModelBundle` (model + tokenizer + image settings). A bare model needs
            ``tokenizer=``.
        config: :class:`pclr.cil.CILConfig`.
        tasks: the task sequence, in training order.
        output_dir: results, logs and checkpoints go here.
        accelerator: an ``accelerate.Accelerator`` (default: one built from ``config.mixed_precision``).
        tokenizer: the tokenizer when ``bundle`` is a bare model.
        collator: turns samples into batches: ``collator(bundle, mode="train" | "generate", max_length=None)``
            returns ``collate(samples) -> batch`` (default :class:`pclr.cil.data.CoINCollator`, CoIN / LLaVA
            conversations; see it for the batch keys the trainer reads).

    Raises ValueError before any training for an invalid setup: schedule over budget, unknown target modules,
    unknown scorer, empty task data, a sample without an assistant turn.
    """

    def __init__(self, bundle: Union[ModelBundle, nn.Module], config: CILConfig, tasks: Sequence[Task],
                 output_dir: str = "pclr_run", accelerator: Any = None, tokenizer: Any = None,
                 collator: CollatorFactory = CoINCollator):
        if not isinstance(bundle, ModelBundle):
            if tokenizer is None:
                raise ValueError("bundle: pass a ModelBundle, or a model together with tokenizer=")
            bundle = ModelBundle(model=bundle, tokenizer=tokenizer)
        if not tasks:
            raise ValueError("tasks: no tasks given")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: task names must be unique, got {names}")
        if not callable(collator):
            raise TypeError(f"collator must be callable as collator(bundle, mode=...), got {type(collator).__name__}")
        self.bundle, self.config, self.tasks, self.collator = bundle, config, list(tasks), collator
        self.output_dir = output_dir
        self.scorers = [get_scorer(t.scorer) for t in self.tasks]
        self.train_data = [load_coin_json(t.train)[: config.max_train_samples] for t in self.tasks]
        self.test_data = [load_coin_json(t.test)[: config.max_eval_samples] for t in self.tasks]
        for t, tr, te in zip(self.tasks, self.train_data, self.test_data):
            if not tr or not te:
                raise ValueError(f"tasks: task {t.name!r} has no training or no test samples")
            check_samples(tr, f"task {t.name!r} (train)")
            check_samples(te, f"task {t.name!r} (test)")

        # ---- the pool plan (validated before the model is touched)
        cfg, T = config, len(self.tasks)
        self.lora = not cfg.uses_pool
        self.lrp_config, self.plans = pool_plan(cfg, T)

        # ---- model
        self.model = bundle.model
        self.fingerprint = run_fingerprint(config, self.tasks, self.train_data, self.test_data,
                                           model_digest(self.model))
        if not lrp_pools(self.model):
            inject_lrp(self.model, self.lrp_config)
        self.pools = list(lrp_pools(self.model).values())
        self.query = QueryExtractor(self.model, image_token_id=bundle.image_token_id)
        self.accelerator = accelerator or Accelerator(mixed_precision=cfg.mixed_precision)
        self.dist = Distributed(self.accelerator)
        self.device = self.dist.device
        self.model.to(self.device)
        self.world, self.rank, self.is_main = self.dist.world, self.dist.rank, self.dist.is_main
        self.log = RunLog(output_dir, self.is_main, cfg.tensorboard)
        self.evaluator = Evaluator(self.model, bundle, collator, cfg, self._route, self.accelerator.autocast,
                                   self.device)

        # ---- run state (all of it goes into checkpoints)
        self.matrix = [[float("nan")] * T for _ in range(T)]
        self.done: list[tuple[int, str]] = []
        self.prototypes: dict[int, list] = {}  # expert-task id -> [Prototype | None per pool]
        self.kl_values: dict[int, float] = {}
        self.teacher: Optional[LRPSnapshot] = None  # pre-compression pool of the current task
        self.records = RunRecords()
        self._phase_trainable: Optional[int] = None  # set by a learn phase, recorded when it finishes

    # =========================================================================================== public API
    def phases(self, t: int) -> list[str]:
        """Phases of task ``t`` in order."""
        plan = self.plans[t]
        out = []
        if plan is not None and plan.keep < 1.0 and self.config.compression is not None:
            out.append("compress")
            if self.config.integration:
                out.append("integrate")
        out.append("learn")
        if self.config.eval_every_task or t == len(self.tasks) - 1:
            out.append("eval")
        return out

    def run(self, resume: bool = False, overwrite: bool = False) -> CILResults:
        """Train on every task in order; returns the results.

        resume: continue from ``output_dir``'s checkpoint (when there is one); it must have been written by the same
            run (same settings, data and model), else CheckpointError names the fields that differ.
        overwrite: start over in a non-empty ``output_dir``, removing what an earlier run wrote there. Without it
            (and without ``resume``) a non-empty ``output_dir`` is refused with FileExistsError before any work.
        """
        os.makedirs(self.output_dir, exist_ok=True)
        if resume and os.path.exists(self.checkpoint_path):
            self.load_checkpoint()
        elif not resume:
            claim_output_dir(self.output_dir, overwrite, self.is_main)
        self.dist.barrier()  # every process has checked the directory before the main one writes into it
        self.log.open()
        try:
            for t in range(len(self.tasks)):
                for phase in self.phases(t):
                    if (t, phase) in self.done:
                        continue
                    self._seed(t, phase)
                    self.log.log({"event": "phase_start", "task": t, "phase": phase})
                    self._phase_trainable = None
                    start = time.perf_counter()
                    getattr(self, f"_phase_{phase}")(t)
                    self.records.add(t, phase, time.perf_counter() - start, self._phase_trainable)
                    self.done.append((t, phase))
                    self.save_checkpoint()
        finally:
            self.log.close()
        results = self.results()
        if self.is_main:
            results.save(self.output_dir)
        return results

    def results(self) -> CILResults:
        return CILResults(task_names=[t.name for t in self.tasks], matrix=[list(r) for r in self.matrix],
                          method=self.config.method,
                          extra={"experts": {n: p.n for n, p in lrp_pools(self.model).items()}})

    @torch.no_grad()
    def evaluate(self, task_ids: Sequence[int]) -> dict[int, float]:
        """Accuracy (0-100) on each task's test set with the current model (CoIN scoring; ``config.eval_mode``)."""
        was_training = self.model.training
        self.model.eval()
        self._set_inference_routing()
        out = {}
        for j in task_ids:
            samples = [self._with_root(s, j) for s in self.test_data[j][self.rank:: self.world]]
            scores = self.evaluator.scores(samples, self.scorers[j], grounding=self.tasks[j].scorer == "grounding")
            total = self.dist.all_sum(torch.tensor([sum(scores), len(scores)], dtype=torch.float64,
                                                   device=self.device))
            out[j] = float(100.0 * total[0] / total[1].clamp_min(1))
        self.model.train(was_training)
        return out

    # =========================================================================================== checkpoints
    @property
    def checkpoint_path(self) -> str:
        return checkpoint_path(self.output_dir)

    def save_checkpoint(self) -> None:
        """Checkpoint the LRP tensors and the run state (main process; the others wait)."""
        if self.is_main:
            state = RunState(self.done, self.matrix, self.kl_values, self.prototypes, self.teacher,
                             fingerprint=self.fingerprint, records=self.records.to_list())
            save_checkpoint(self.checkpoint_path, self.model, state, len(self.pools), [t.name for t in self.tasks],
                            self.config.to_dict())
        self.dist.barrier()

    def load_checkpoint(self) -> None:
        """Restore the LRP tensors, the run state and the records from ``output_dir``'s checkpoint.

        Raises CheckpointError (a ValueError) when the checkpoint is damaged or was written by a run with other
        settings, data or model; the message names the fields that differ. Nothing is loaded then."""
        state = load_checkpoint(self.checkpoint_path, self.model, [t.name for t in self.tasks], self.device,
                                check=self._check_fingerprint)
        self.done, self.matrix, self.kl_values = state.done, state.matrix, state.kl_values
        self.prototypes, self.teacher = state.prototypes, state.teacher
        self.records = RunRecords.from_list(state.records)

    def _check_fingerprint(self, stored: dict) -> None:
        check_fingerprint(stored, self.fingerprint, self.checkpoint_path)

    # =========================================================================================== phases
    def _phase_compress(self, t: int) -> None:
        plan = self.plans[t]
        self.teacher = LRPSnapshot.take(self.model)
        n_before = self.pools[0].n
        n_keep = kept_count(n_before, plan.keep)
        for pool in self.pools:
            compress_pool(pool, kept_count(pool.n, plan.keep), self.config.compression)
            pool.freeze()
        if plan.add_shared and self.lrp_config.n_shared > 0:
            for layer in lrp_layers(self.model).values():
                if layer.n_shared == 0:
                    layer.add_shared(self.lrp_config.n_shared, trainable=False)
        self.log.log({"event": "compressed", "task": t, "n_before": n_before, "n_after": n_keep,
                      "rule": self.config.compression})

    def _phase_integrate(self, t: int) -> None:
        cfg = self.config
        if self.teacher is None:
            raise RuntimeError("integration needs the pre-compression teacher (compress phase missing)")
        learned = sorted(k for k in self.prototypes)
        if not learned:
            return
        params = open_for_integration(self.pools, list(lrp_layers(self.model).values()))
        sampler = TaskSampler(learned, cfg.kl_floor, self.kl_values)
        gen = torch.Generator().manual_seed(self._phase_seed(t, "integrate") + 1)
        teacher = self.teacher.to(self.device)

        def loss_fn(batch: dict) -> tuple[Tensor, dict]:
            task = sampler.sample(gen)
            protos = self.prototypes[task]
            model_in, rest = split_to(batch, self.device)
            labels = rest["labels"]
            mask = labels[:, 1:] != -100
            den = self.dist.all_sum(mask.sum().to(torch.float64)).to(torch.float32)
            with torch.no_grad(), teacher.swapped_in(self.model):
                with self._route(model_in, rest) as st, self.accelerator.autocast():
                    prefill_prototype_routes(st, self.pools, protos)
                    t_logits, _, mask = answer_logits(self.model, model_in, labels)
            with self._route(model_in, rest) as st, self.accelerator.autocast():
                prefill_prototype_routes(st, self.pools, protos)
                s_logits, _, _ = answer_logits(self.model, model_in, labels)
            loss = topk_sqrt_kl(s_logits, t_logits, mask, cfg.kl_topk, normalizer=den)
            kl = float(self.dist.all_sum(loss.detach().to(torch.float64)))
            sampler.update(task, kl)
            return loss, {"kl": kl, "sampled_task": task}

        steps = cfg.integration_steps or self._steps_per_epoch(t)
        self._train(t, "integrate", params, loss_fn, steps, cfg.integration_lr or cfg.lr)
        self.kl_values = dict(sampler.values)
        close_integration(self.pools, list(lrp_layers(self.model).values()))
        self.teacher = None

    def _phase_learn(self, t: int) -> None:
        cfg = self.config
        use_lwf = cfg.method == "lora_lwf" and t > 0 or \
            cfg.method == "pclr_lwf" and not is_group_start(t, cfg.lwf_group_size)
        lwf_teacher = LRPSnapshot.take(self.model).to(self.device) if use_lwf else None
        for layer in lrp_layers(self.model).values():
            layer.A_s.requires_grad_(False)
            layer.B_s.requires_grad_(False)
        if self.lora:
            prepare_lora(self.pools, self.lrp_config.r)
        else:
            self._prepare_pclr_learning(t)
        params = [p for lay in lrp_layers(self.model).values() if lay.n for p in (lay.A_m, lay.B_m)]
        use_qk = not self.lora and cfg.lambda_qk > 0
        if not self.lora and (use_qk or self.lrp_config.gate_mode == "soft"):  # soft gates: CE reaches the keys
            params += [k for pool in self.pools for k in pool.keys]

        def loss_fn(batch: dict) -> tuple[Tensor, dict]:
            model_in, rest = split_to(batch, self.device)
            with self._route(model_in, rest) as st, self.accelerator.autocast():
                logits, labels, mask = answer_logits(self.model, model_in, rest["labels"])
                query = st.query
            den = self.dist.all_sum(mask.sum().to(torch.float64)).to(torch.float32)
            ce = F.cross_entropy(logits[mask].float(), labels[mask], reduction="sum") / den.clamp_min(1)
            loss, info = ce, {"ce": float(ce.detach())}
            if use_qk:
                qk = qk_loss(query, rest["has_image"].to(self.device), self.pools, cfg.qk_loss, self.lrp_config,
                             self.dist.all_sum)
                loss = loss + cfg.lambda_qk * qk
                info["qk"] = float(qk.detach())
            if lwf_teacher is not None:
                with torch.no_grad(), lwf_teacher.swapped_in(self.model):
                    with self._route(model_in, rest, inference=True), self.accelerator.autocast():
                        t_logits, _, _ = answer_logits(self.model, model_in, rest["labels"])
                lw = lwf_loss(logits, t_logits, mask, cfg.lwf_temperature, normalizer=den)
                loss = loss + cfg.lwf_lambda * lw
                info["lwf"] = float(lw.detach())
            return loss, info

        steps = max(1, math.ceil(cfg.epochs * self._steps_per_epoch(t)))
        self._phase_trainable = trainable_lrp_params(self.pools, self.lora)
        self._train(t, "learn", params, loss_fn, steps, cfg.lr)
        for pool in self.pools:
            pool.set_candidates(None, None)
        if not self.lora:
            tid = self._expert_task(t)
            self.prototypes[tid] = [task_prototype(pool, tid) for pool in self.pools]

    def _phase_eval(self, t: int) -> None:
        acc = self.evaluate(list(range(t + 1)))
        for j, a in acc.items():
            self.matrix[t][j] = a
        self.log.log({"event": "eval", "task": t, "accuracy": {self.tasks[j].name: a for j, a in acc.items()}})

    # =========================================================================================== learning setup
    def _expert_task(self, t: int) -> int:
        """Id stored in task_of_expert for task t (pclr_lwf: the group's first task)."""
        if self.config.method == "pclr_lwf":
            return t - t % self.config.lwf_group_size
        return t

    def _prepare_pclr_learning(self, t: int) -> None:
        """Freeze the pool, add task t's experts (or reopen its group's under pclr_lwf), route among the new."""
        cfg = self.config
        nearest = cfg.nearest_init_from_task is not None and t >= cfg.nearest_init_from_task
        open_task_experts(self.pools, self.plans[t], self._expert_task(t), self.lrp_config,
                          lambda: self._task_mean_query(t), nearest=nearest, key_init=cfg.key_init,
                          seed=self._phase_seed(t, "learn") + 7)

    @torch.no_grad()
    def _task_mean_query(self, t: int, max_samples: int = 64) -> tuple[Tensor, ...]:
        """Normalised mean query of (up to ``max_samples``) training samples of task t."""
        collate = self.collator(self.bundle, mode="train", max_length=self.config.max_length)
        batch = collate([self._with_root(s, t) for s in self.train_data[t][:max_samples]])
        query = batch_query(self.query, *split_to(batch, self.device))
        return tuple(F.normalize(p.float().mean(0), dim=-1) for p in query)

    # =========================================================================================== routing
    def _route(self, model_in: dict, rest: dict, inference: bool = False):
        """Routing context of a batch: the query from the prompt (+ vision hook); under 'prototype' inference
        routing each sample is routed, per pool, by its nearest task prototype instead."""
        ctx = self.query.route(model_in["input_ids"], model_in.get("attention_mask"),
                               rest.get("instruction_mask"), rest.get("has_image"))
        if not (inference and self.config.inference_routing == "prototype" and self.prototypes and not self.lora):
            return ctx
        return prototype_route(ctx, self.query, self.pools, self.prototypes, model_in, rest, self.device)

    def _set_inference_routing(self) -> None:
        set_inference_candidates(self.pools, self.lora)

    # =========================================================================================== training
    def _steps_per_epoch(self, t: int) -> int:
        return max(1, math.ceil(len(self.train_data[t]) / self.config.batch_size))

    def _train(self, t: int, phase: str, params: list[nn.Parameter], loss_fn: LossFn, steps: int,
               lr: float) -> None:
        self.model.train()
        on_step = None
        if self.config.on_step is not None:
            def on_step(step: int) -> None:
                self.config.on_step(self, t, phase, step)
        collate = self.collator(self.bundle, mode="train", max_length=self.config.max_length)
        batches = local_batches([self._with_root(s, t) for s in self.train_data[t]], self.config.batch_size,
                                collate, self._phase_seed(t, phase), self.rank, self.world)
        train_steps(params, loss_fn, batches, steps, lr, self.config, self.dist, self.log, task=t, phase=phase,
                    desc=f"task {t + 1}/{len(self.tasks)} {self.tasks[t].name} [{phase}]", on_step=on_step)

    # =========================================================================================== seeding
    def _phase_seed(self, t: int, phase: str) -> int:
        return (self.config.seed * 1_000_003 + t * 1009 + PHASES.index(phase) * 101) % (2 ** 31)

    def _seed(self, t: int, phase: str) -> None:
        s = self._phase_seed(t, phase)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)

    def _with_root(self, sample: dict, t: int) -> dict:
        s = dict(sample)
        s["_image_root"] = self.tasks[t].image_root
        return s
