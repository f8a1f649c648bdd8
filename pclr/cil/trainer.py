"""``CILTrainer``: Compression → Integration → Learning per task, evaluation after each, resumable (SPEC §2–4).

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
    "eval":     generate on every task seen so far; fill row t of the accuracy matrix.
Every phase reseeds torch/python/numpy from (seed, task, phase), so a resumed run equals an uninterrupted one.

Distributed: run under ``accelerate launch`` (DDP-style data parallelism). Only the LRP tensors train and they are
small, so gradients are summed with one flat all-reduce per step instead of wrapping the model in DDP (pools change
shape between phases, and some pools, e.g. the projector's on text-only batches, get no gradient in a step).
Losses are normalised by GLOBAL token/sample counts, so N processes compute the same update as one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pclr.cil.compression import compress_pool, kept_count
from pclr.cil.config import CILConfig, Task, TaskPlan
from pclr.cil.integration import TaskSampler, prefill_prototype_routes, task_prototype, topk_sqrt_kl
from pclr.cil.lwf import is_group_start, lwf_loss
from pclr.cil.metrics import CILResults, get_scorer
from pclr.cil.schedule import resolve_schedule
from pclr.cil.teacher import LRPSnapshot
from pclr.data.coin import CoINCollator, load_coin_json, split_batch
from pclr.inject import inject_lrp, load_lrp_state_dict, lrp_layers, lrp_pools, lrp_state_dict
from pclr.models.bundle import ModelBundle
from pclr.query import QueryExtractor
from pclr.scoring import gate_scores

PHASES = ("compress", "integrate", "learn", "eval")
CKPT_NAME = "checkpoint.safetensors"


class CILTrainer:
    """Continual instruction tuning of one model over a task sequence (see module docstring).

    Args:
        bundle: :class:`pclr.models.ModelBundle` (model + tokenizer + image settings). A bare model needs
            ``tokenizer=``.
        config: :class:`pclr.cil.CILConfig`.
        tasks: the task sequence, in training order.
        output_dir: results, logs and checkpoints go here.
        accelerator: an ``accelerate.Accelerator`` (default: one built from ``config.mixed_precision``).

    Raises ValueError before any training for an invalid setup: schedule over budget, unknown target modules,
    unknown scorer, empty task data.
    """

    def __init__(self, bundle: Union[ModelBundle, nn.Module], config: CILConfig, tasks: Sequence[Task],
                 output_dir: str = "pclr_run", accelerator: Any = None, tokenizer: Any = None):
        if not isinstance(bundle, ModelBundle):
            if tokenizer is None:
                raise ValueError("pass a ModelBundle, or a model together with tokenizer=")
            bundle = ModelBundle(model=bundle, tokenizer=tokenizer)
        if not tasks:
            raise ValueError("no tasks given")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        self.bundle, self.config, self.tasks = bundle, config, list(tasks)
        self.output_dir = output_dir
        self.scorers = [get_scorer(t.scorer) for t in self.tasks]
        self.train_data = [load_coin_json(t.train)[: config.max_train_samples] for t in self.tasks]
        self.test_data = [load_coin_json(t.test)[: config.max_eval_samples] for t in self.tasks]
        for t, tr, te in zip(self.tasks, self.train_data, self.test_data):
            if not tr or not te:
                raise ValueError(f"task {t.name!r} has no training or no test samples")

        # ---- the pool plan (validated before the model is touched)
        cfg = config
        T = len(self.tasks)
        self.lora = not cfg.uses_pool
        if self.lora:
            rank = cfg.lora_rank or cfg.lrp.r
            self.lrp_config = dataclasses.replace(cfg.lrp, r=rank, budget=max(rank, cfg.lrp.budget))
            self.plans: list[Optional[TaskPlan]] = [None] * T
        else:
            self.lrp_config = cfg.lrp
            starts = [t for t in range(T) if cfg.method != "pclr_lwf" or is_group_start(t, cfg.lwf_group_size)]
            plans = resolve_schedule(cfg.schedule, len(starts), cfg.lrp, cfg.compression)
            self.plans = [None] * T
            for t, p in zip(starts, plans):
                self.plans[t] = p

        # ---- model
        self.model = bundle.model
        if not lrp_pools(self.model):
            inject_lrp(self.model, self.lrp_config)
        self.pools = list(lrp_pools(self.model).values())
        self.query = QueryExtractor(self.model, image_token_id=bundle.image_token_id)
        if accelerator is None:
            from accelerate import Accelerator

            accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
        self.accelerator = accelerator
        self.device = accelerator.device
        self.model.to(self.device)
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.is_main = accelerator.is_main_process

        # ---- run state (all of it goes into checkpoints)
        self.matrix = [[float("nan")] * T for _ in range(T)]
        self.done: list[tuple[int, str]] = []
        self.prototypes: dict[int, list] = {}  # expert-task id -> [Prototype | None per pool]
        self.kl_values: dict[int, float] = {}
        self.teacher: Optional[LRPSnapshot] = None  # pre-compression pool of the current task
        self._log_file = None
        self._tb = None

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

    def run(self, resume: bool = False) -> CILResults:
        """Train on every task in order (continuing from ``output_dir`` when ``resume``); returns the results."""
        os.makedirs(self.output_dir, exist_ok=True)
        if resume and os.path.exists(self._ckpt_path()):
            self.load_checkpoint()
        self._open_logs()
        try:
            for t in range(len(self.tasks)):
                for phase in self.phases(t):
                    if (t, phase) in self.done:
                        continue
                    self._seed(t, phase)
                    self._log({"event": "phase_start", "task": t, "phase": phase})
                    getattr(self, f"_phase_{phase}")(t)
                    self.done.append((t, phase))
                    self.save_checkpoint()
        finally:
            self._close_logs()
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
        model = self.model
        was_training = model.training
        model.eval()
        self._set_inference_routing()
        out = {}
        for j in task_ids:
            samples = self.test_data[j][self.rank:: self.world]
            if self.config.eval_mode in ("forced", "forced_generate"):
                scores = self._forced_scores(j, samples)
            else:
                scores = self._generated_scores(j, samples)
            total = torch.tensor([sum(scores), len(scores)], dtype=torch.float64, device=self.device)
            total = self._all_sum(total)
            out[j] = float(100.0 * total[0] / total[1].clamp_min(1))
        model.train(was_training)
        return out

    def _generated_scores(self, j: int, samples: list[dict]) -> list[float]:
        """Greedy generation + the task's scorer, per sample."""
        collate = CoINCollator(self.bundle, mode="generate")
        tok = self.bundle.tokenizer
        scores = []
        for i in range(0, len(samples), self.config.eval_batch_size):
            batch = collate([self._with_root(s, j) for s in samples[i: i + self.config.eval_batch_size]])
            model_in, rest = split_batch(batch)
            model_in = {k: v.to(self.device) for k, v in model_in.items()}
            with self._route(model_in, rest, inference=True), self.accelerator.autocast():
                gen = self.model.generate(**model_in, max_new_tokens=self.config.max_new_tokens, do_sample=False,
                                          pad_token_id=collate.pad_id, eos_token_id=tok.eos_token_id)
            new = gen[:, model_in["input_ids"].shape[1]:]
            preds = tok.batch_decode(new, skip_special_tokens=True)
            scores += [self.scorers[j](p.strip(), a) for p, a in zip(preds, rest["answers"])]
        return scores

    def _forced_scores(self, j: int, samples: list[dict]) -> list[float]:
        """1 for a sample whose gold answer (and end token) is the argmax at every answer position of one
        teacher-forced forward: exactly the samples on which greedy decoding returns the gold answer verbatim.
        Failing samples score 0; under ``eval_mode="forced_generate"`` failing samples of grounding tasks (IoU
        scoring) are generated instead."""
        collate = CoINCollator(self.bundle, mode="train", max_length=self.config.max_length)
        scores = []
        for i in range(0, len(samples), self.config.eval_batch_size):
            batch = collate([self._with_root(s, j) for s in samples[i: i + self.config.eval_batch_size]])
            model_in, rest = self._split(batch)
            with self._route(model_in, rest, inference=True), self.accelerator.autocast():
                logits, labels, mask = self._answer_logits(model_in, rest["labels"])
            ok = ((logits.argmax(-1) == labels) | ~mask).all(1) & mask.any(1)
            scores += [float(v) for v in ok.tolist()]
        if self.config.eval_mode == "forced_generate" and self.tasks[j].scorer == "grounding":
            failed = [k for k, v in enumerate(scores) if v < 1.0]
            if failed:
                for k, v in zip(failed, self._generated_scores(j, [samples[k] for k in failed])):
                    scores[k] = v
        return scores

    def _answer_logits(self, model_in: dict, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Next-token logits only at the columns that predict an answer token in some row (the 49k-word LM head
        over every position would cost as much as several decoder layers). Returns (logits [B, K, V], the
        predicted labels [B, K], mask [B, K])."""
        target = labels[:, 1:]
        cols = (target != -100).any(0).nonzero().flatten()
        try:
            logits = self.model(**model_in, logits_to_keep=cols).logits
        except TypeError:  # a model without logits_to_keep: full logits, then the same columns
            logits = self.model(**model_in).logits[:, cols]
        lab = target[:, cols]
        return logits, lab, lab != -100

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
        self._log({"event": "compressed", "task": t, "n_before": n_before, "n_after": n_keep,
                   "rule": self.config.compression})

    def _phase_integrate(self, t: int) -> None:
        cfg = self.config
        if self.teacher is None:
            raise RuntimeError("integration needs the pre-compression teacher (compress phase missing)")
        learned = sorted(k for k in self.prototypes)
        if not learned:
            return
        for pool in self.pools:
            pool.unfreeze()
            pool.set_candidates(None, None)
            for k in pool.keys:
                k.requires_grad_(False)  # keys stay frozen in integration
        shared = []
        for layer in lrp_layers(self.model).values():
            if layer.n_shared:
                layer.A_s.requires_grad_(True)
                layer.B_s.requires_grad_(True)
                shared += [layer.A_s, layer.B_s]
        params = [p for l in lrp_layers(self.model).values() for p in (l.A_m, l.B_m) if l.n] + shared
        sampler = TaskSampler(learned, cfg.kl_floor, self.kl_values)
        gen = torch.Generator().manual_seed(self._phase_seed(t, "integrate") + 1)
        teacher = self.teacher.to(self.device)

        def loss_fn(batch: dict) -> tuple[Tensor, dict]:
            task = sampler.sample(gen)
            protos = self.prototypes[task]
            model_in, rest = self._split(batch)
            labels = rest["labels"]
            mask = labels[:, 1:] != -100
            den = self._all_sum(mask.sum().to(torch.float64)).to(torch.float32)
            with torch.no_grad(), teacher.swapped_in(self.model):
                with self._route(model_in, rest) as st, self.accelerator.autocast():
                    prefill_prototype_routes(st, self.pools, protos)
                    t_logits, _, mask = self._answer_logits(model_in, labels)
            with self._route(model_in, rest) as st, self.accelerator.autocast():
                prefill_prototype_routes(st, self.pools, protos)
                s_logits, _, _ = self._answer_logits(model_in, labels)
            loss = topk_sqrt_kl(s_logits, t_logits, mask, cfg.kl_topk, normalizer=den)
            kl = float(self._all_sum(loss.detach().to(torch.float64)))
            sampler.update(task, kl)
            return loss, {"kl": kl, "sampled_task": task}

        steps = cfg.integration_steps or self._steps_per_epoch(t)
        self._train(t, "integrate", params, loss_fn, steps, cfg.integration_lr or cfg.lr)
        self.kl_values = dict(sampler.values)
        for layer in lrp_layers(self.model).values():
            layer.A_s.requires_grad_(False)
            layer.B_s.requires_grad_(False)
        for pool in self.pools:
            pool.freeze()
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
            self._prepare_lora()
        else:
            self._prepare_pclr_learning(t)
        layers = [l for l in lrp_layers(self.model).values() if l.n]
        params = [p for l in layers for p in (l.A_m, l.B_m)]
        use_qk = not self.lora and cfg.lambda_qk > 0
        if not self.lora and (use_qk or self.lrp_config.gate_mode == "soft"):  # soft gates: CE reaches the keys
            params += [k for pool in self.pools for k in pool.keys]

        def loss_fn(batch: dict) -> tuple[Tensor, dict]:
            model_in, rest = self._split(batch)
            with self._route(model_in, rest) as st, self.accelerator.autocast():
                logits, labels, mask = self._answer_logits(model_in, rest["labels"])
                query = st.query
            den = self._all_sum(mask.sum().to(torch.float64)).to(torch.float32)
            ce = F.cross_entropy(logits[mask].float(), labels[mask], reduction="sum") / den.clamp_min(1)
            loss, info = ce, {"ce": float(ce.detach())}
            if use_qk:
                qk = self._qk_loss(query, rest["has_image"].to(self.device))
                loss = loss + cfg.lambda_qk * qk
                info["qk"] = float(qk.detach())
            if lwf_teacher is not None:
                with torch.no_grad(), lwf_teacher.swapped_in(self.model):
                    with self._route(model_in, rest, inference=True), self.accelerator.autocast():
                        t_logits, _, _ = self._answer_logits(model_in, rest["labels"])
                lw = lwf_loss(logits, t_logits, mask, cfg.lwf_temperature, normalizer=den)
                loss = loss + cfg.lwf_lambda * lw
                info["lwf"] = float(lw.detach())
            return loss, info

        steps = max(1, math.ceil(cfg.epochs * self._steps_per_epoch(t)))
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
        self._log({"event": "eval", "task": t, "accuracy": {self.tasks[j].name: a for j, a in acc.items()}})

    # =========================================================================================== learning setup
    def _expert_task(self, t: int) -> int:
        """Id stored in task_of_expert for task t (pclr_lwf: the group's first task)."""
        if self.config.method == "pclr_lwf":
            return t - t % self.config.lwf_group_size
        return t

    def _prepare_lora(self) -> None:
        r = self.lrp_config.r
        for pool in self.pools:
            if pool.n == 0:
                pool.grow(r, task=0)
            pool.unfreeze()
            pool.set_candidates(None, always=torch.arange(pool.n, device=pool.trainable.device))
            for k in pool.keys:
                k.requires_grad_(False)  # the LoRA baselines do not route: keys unused

    def _prepare_pclr_learning(self, t: int) -> None:
        cfg, plan = self.config, self.plans[t]
        tid = self._expert_task(t)
        for pool in self.pools:
            pool.freeze()
        if plan is not None:  # a growth event: add this task's experts
            copy_from = None
            if cfg.nearest_init_from_task is not None and t >= cfg.nearest_init_from_task:
                copy_from = self._nearest_experts(t, plan.n_new)
            keys = None
            if cfg.key_init == "task_query" and copy_from is None:
                q = self._task_mean_query(t)
                gen = torch.Generator().manual_seed(self._phase_seed(t, "learn") + 7)
                # a little noise keeps the task's experts distinguishable when r < n_new
                keys = [F.normalize(p[None].cpu() + 0.1 * F.normalize(torch.randn(plan.n_new, p.numel(),
                                                                                   generator=gen), dim=-1), dim=-1)
                        for p in q]
            for i, pool in enumerate(self.pools):
                pool.grow(plan.n_new, task=tid, copy_from=None if copy_from is None else copy_from[i], keys=keys)
        else:  # pclr_lwf inside a group: keep training the group's experts
            for pool in self.pools:
                pool.unfreeze(pool.task_of_expert == tid)
        for pool in self.pools:
            new = pool.trainable.clone()
            n_new = int(new.sum())
            if self.lrp_config.r <= n_new or n_new == pool.n:
                pool.set_candidates(new, None)
            else:  # all new experts always, the remaining slots among the best old ones
                pool.set_candidates(~new, always=new.nonzero().flatten())

    @torch.no_grad()
    def _nearest_experts(self, t: int, n_new: int) -> Optional[list]:
        """Per pool, the n_new old experts whose keys are most similar to the task's mean query (or None)."""
        q = self._task_mean_query(t)
        out = []
        for pool in self.pools:
            if pool.n < n_new:
                return None
            score = gate_scores(tuple(p.unsqueeze(0) for p in q), tuple(pool.keys),
                                self.lrp_config.query_weights[: len(q)])[0]
            out.append(torch.sort(score, descending=True, stable=True).indices[:n_new])
        return out

    @torch.no_grad()
    def _task_mean_query(self, t: int, max_samples: int = 64) -> tuple[Tensor, ...]:
        """Normalised mean query of (up to ``max_samples``) training samples of task t; the vision part comes from
        running the vision tower alone (once, at expert creation)."""
        collate = CoINCollator(self.bundle, mode="train", max_length=self.config.max_length)
        batch = collate([self._with_root(s, t) for s in self.train_data[t][:max_samples]])
        model_in, rest = self._split(batch)
        q_text = self.query.text_query(model_in["input_ids"], model_in["attention_mask"], rest["instruction_mask"])
        parts = [q_text]
        if len(self.query.query_dims) > 1:
            has = rest["has_image"].to(self.device)
            self.query._features = []
            if "pixel_values" in model_in and self.query.tower is not None:
                self.query.tower(model_in["pixel_values"], output_hidden_states=False)
            parts.append(self.query.vision_query(q_text.shape[0], has, self.device))
        return tuple(F.normalize(p.float().mean(0), dim=-1) for p in parts)

    def _qk_loss(self, query: tuple[Tensor, ...], has_image: Tensor) -> Tensor:
        """L_qk averaged over key pools with new keys.

        'cos': mean over samples b and new keys j of (1 - cos(q_p[b], K_p[j])), summed over parts (vision part only
        over samples with an image). 'paper': ||1_r - top_r(score)||_1 / r over new keys (weighted parts)."""
        B = query[0].shape[0]
        counts = [self._all_sum(torch.tensor(float(B), device=self.device))]
        if len(query) > 1:
            counts.append(self._all_sum(has_image.sum().to(torch.float32)))
        total, n_pools = query[0].new_zeros(()), 0
        for pool in self.pools:
            new = pool.trainable
            if not bool(new.any()):
                continue
            n_pools += 1
            if self.config.qk_loss == "cos":
                for p, (q, k) in enumerate(zip(query, pool.keys)):
                    cos = F.normalize(q.float(), dim=-1) @ F.normalize(k[new].float(), dim=-1).T  # [B, n_new]
                    per_sample = (1.0 - cos).mean(1)
                    valid = torch.ones_like(per_sample, dtype=torch.bool) if p == 0 else has_image
                    total = total + per_sample[valid].sum() / counts[min(p, len(counts) - 1)].clamp_min(1)
            else:
                w = self.lrp_config.query_weights
                score = sum(w[p] * (F.normalize(q.float(), dim=-1) @ F.normalize(k[new].float(), dim=-1).T)
                            for p, (q, k) in enumerate(zip(query, pool.keys)))
                r = min(self.lrp_config.r, int(new.sum()))
                top = score.topk(r, dim=-1).values
                total = total + (1.0 - top).abs().sum(1).div(r).sum() / counts[0].clamp_min(1)
        return total / max(n_pools, 1)

    # =========================================================================================== routing
    def _route(self, model_in: dict, rest: dict, inference: bool = False):
        """Routing context of a batch: the query from the prompt (+ vision hook); 'prototype' inference routing
        replaces each sample's query by its nearest task prototype, per pool."""
        ctx = self.query.route(model_in["input_ids"], model_in.get("attention_mask"),
                               rest.get("instruction_mask"), rest.get("has_image"))
        if not (inference and self.config.inference_routing == "prototype" and self.prototypes and not self.lora):
            return ctx
        return _PrototypeRouting(self, ctx, rest.get("has_image"))

    def _set_inference_routing(self) -> None:
        for pool in self.pools:
            if self.lora:
                pool.set_candidates(None, always=torch.arange(pool.n, device=pool.trainable.device))
            else:
                pool.set_candidates(None, None)

    # =========================================================================================== training loop
    def _steps_per_epoch(self, t: int) -> int:
        return max(1, math.ceil(len(self.train_data[t]) / self.config.batch_size))

    def _batches(self, t: int, seed: int):
        """Endless local batches of task t: a per-epoch permutation (seeded), global batches of batch_size, this
        process's share = every world-th sample of the global batch."""
        data, bs = self.train_data[t], self.config.batch_size
        collate = CoINCollator(self.bundle, mode="train", max_length=self.config.max_length)
        gen = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(data), generator=gen).tolist()
            for i in range(0, len(order), bs):
                chunk = order[i: i + bs]
                if len(chunk) < self.world:  # a tail smaller than the process count is skipped (never with 1)
                    continue
                yield collate([self._with_root(data[k], t) for k in chunk[self.rank:: self.world]])

    def _train(self, t: int, phase: str, params: list[nn.Parameter], loss_fn: Callable, steps: int,
               lr: float) -> None:
        from tqdm.auto import tqdm

        cfg = self.config
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        # weight_decay=0: rows with zero gradient (frozen experts) stay bit-identical under AdamW
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        warm = max(1, int(cfg.warmup_ratio * steps)) if cfg.warmup_ratio > 0 else 0

        def lr_at(step: int) -> float:
            if warm and step < warm:
                return (step + 1) / warm
            prog = (step - warm) / max(1, steps - warm)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, prog)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        batches = self._batches(t, self._phase_seed(t, phase))
        self.model.train()
        bar = tqdm(total=steps, desc=f"task {t + 1}/{len(self.tasks)} {self.tasks[t].name} [{phase}]",
                   disable=not (self.is_main and cfg.progress), leave=False, dynamic_ncols=True)
        G = cfg.gradient_accumulation_steps
        try:
            for step in range(steps):
                info_acc: dict[str, float] = {}
                loss_total = 0.0
                for _ in range(G):
                    batch = next(batches)
                    loss, info = loss_fn(batch)
                    loss_val = float(loss.detach())
                    (loss / G).backward()
                    loss_total += loss_val / G
                    for k, v in info.items():  # floats are averaged over micro-batches, the rest logged as is
                        info_acc[k] = info_acc.get(k, 0.0) + v / G if isinstance(v, float) else v
                self._sync_grads(params)
                if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                loss_global = float(self._all_sum(torch.tensor(loss_total, dtype=torch.float64, device=self.device)))
                bar.update(1)
                bar.set_postfix(loss=f"{loss_global:.4f}", phase=phase)
                if step % cfg.log_every == 0 or step == steps - 1:
                    self._log({"event": "step", "task": t, "phase": phase, "step": step, "loss": loss_global,
                               "lr": sched.get_last_lr()[0], **{k: v for k, v in info_acc.items()}})
                    self._tb_scalar(f"{phase}/loss/task{t}", loss_global, step)
                if cfg.on_step is not None:
                    cfg.on_step(self, t, phase, step)
        finally:
            bar.close()
            opt.zero_grad(set_to_none=True)

    def _split(self, batch: dict) -> tuple[dict, dict]:
        model_in, rest = split_batch(batch)
        model_in = {k: v.to(self.device) for k, v in model_in.items()}
        rest = {k: (v.to(self.device) if isinstance(v, Tensor) else v) for k, v in rest.items()}
        return model_in, rest

    # =========================================================================================== distributed
    def _all_sum(self, x: Tensor) -> Tensor:
        if self.world == 1:
            return x
        import torch.distributed as dist

        y = x.clone()
        dist.all_reduce(y)
        return y

    def _sync_grads(self, params: list[nn.Parameter]) -> None:
        """Sum gradients over processes (losses are already divided by global counts)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        off = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[off: off + n].view_as(p).to(p.dtype)
            off += n

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

    # =========================================================================================== checkpoints
    def _ckpt_path(self) -> str:
        return os.path.join(self.output_dir, "ckpt", CKPT_NAME)

    def save_checkpoint(self) -> None:
        """One safetensors file (LRP tensors, QKLD teacher, prototypes) with the run state as metadata, written to a
        temp file and renamed: a crash leaves either the previous or the new checkpoint, never a mix."""
        if self.is_main:
            from safetensors.torch import save_file

            tensors = {f"lrp.{k}": v.detach().cpu().contiguous() for k, v in lrp_state_dict(self.model).items()}
            if self.teacher is not None:
                tensors.update({f"teacher.{k}": v.detach().cpu().contiguous() for k, v in self.teacher.state.items()})
            for tid, protos in self.prototypes.items():
                for i, proto in enumerate(protos):
                    if proto is not None:
                        for p, v in enumerate(proto):
                            tensors[f"proto.{tid}.{i}.{p}"] = v.detach().cpu().float().contiguous()
            state = {"done": self.done, "matrix": [[None if math.isnan(x) else x for x in r] for r in self.matrix],
                     "kl_values": {str(k): v for k, v in self.kl_values.items()},
                     "prototype_tasks": sorted(self.prototypes), "n_pools": len(self.pools),
                     "tasks": [t.name for t in self.tasks], "config": _jsonable(self.config.to_dict())}
            path = self._ckpt_path()
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = path + ".tmp"
            save_file(tensors, tmp, metadata={"pclr_state": json.dumps(state)})
            os.replace(tmp, path)
            info = os.path.join(os.path.dirname(path), "state.json")
            with open(info + ".tmp", "w") as f:
                json.dump(state, f, indent=1)
            os.replace(info + ".tmp", info)
        self.accelerator.wait_for_everyone()

    def load_checkpoint(self) -> None:
        from safetensors import safe_open

        path = self._ckpt_path()
        with safe_open(path, framework="pt", device="cpu") as f:
            state = json.loads(f.metadata()["pclr_state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if state["tasks"] != [t.name for t in self.tasks]:
            raise ValueError(f"checkpoint {path} was written for tasks {state['tasks']}, not this run's tasks")
        lrp = {k[4:]: v for k, v in tensors.items() if k.startswith("lrp.")}
        load_lrp_state_dict(self.model, {k: v.to(self.device) for k, v in lrp.items()})
        teacher = {k[8:]: v for k, v in tensors.items() if k.startswith("teacher.")}
        self.teacher = LRPSnapshot(teacher) if teacher else None
        self.prototypes = {}
        for tid in state["prototype_tasks"]:
            protos = []
            for i in range(state["n_pools"]):
                parts, p = [], 0
                while f"proto.{tid}.{i}.{p}" in tensors:
                    parts.append(tensors[f"proto.{tid}.{i}.{p}"].to(self.device))
                    p += 1
                protos.append(tuple(parts) if parts else None)
            self.prototypes[int(tid)] = protos
        self.done = [tuple(x) for x in state["done"]]
        self.matrix = [[float("nan") if x is None else x for x in r] for r in state["matrix"]]
        self.kl_values = {int(k): v for k, v in state["kl_values"].items()}

    # =========================================================================================== logging
    def _open_logs(self) -> None:
        if not self.is_main:
            return
        self._log_file = open(os.path.join(self.output_dir, "log.jsonl"), "a", encoding="utf-8")
        if self.config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(self.output_dir, "tb"))
            except Exception:  # tensorboard not installed: JSONL only
                self._tb = None

    def _close_logs(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _log(self, record: dict) -> None:
        if self._log_file is not None:
            self._log_file.write(json.dumps({"time": time.time(), **record}) + "\n")
            self._log_file.flush()

    def _tb_scalar(self, tag: str, value: float, step: int) -> None:
        if self._tb is not None:
            self._tb.add_scalar(tag, value, step)


class _PrototypeRouting:
    """Context: the batch's routing state with every pool's route replaced by the route of the sample's nearest
    task prototype (by the pool's own gate score)."""

    def __init__(self, trainer: CILTrainer, ctx, has_image: Optional[Tensor]):
        self.trainer, self.ctx, self.has_image = trainer, ctx, has_image

    def __enter__(self):
        state = self.ctx.__enter__()
        tr = self.trainer
        tids = sorted(tr.prototypes)

        def lazy_fill(pool):
            q = state.query
            protos = [tr.prototypes[t][tr.pools.index(pool)] for t in tids]
            valid = [i for i, p in enumerate(protos) if p is not None]
            if not valid:
                return pool.gate(q)
            P = [torch.stack([protos[i][p] for i in valid]).to(q[p].dtype) for p in range(len(q))]
            s = gate_scores(q, tuple(P), pool.config.query_weights[: len(q)])  # [B, n_tasks]
            best = s.argmax(1)
            return pool.gate(tuple(Pp[best] for Pp in P))

        # resolve lazily: the vision part is known once the vision tower ran
        orig_gate = {}
        for pool in tr.pools:
            orig_gate[pool] = pool.gate

            def routed(query, _pool=pool, _orig=pool.gate):
                pool_gate = _pool.gate
                _pool.gate = _orig
                try:
                    idx, val = lazy_fill(_pool)
                finally:
                    _pool.gate = pool_gate
                return idx, val

            pool.gate = routed
        self._orig = orig_gate
        return state

    def __exit__(self, *exc):
        for pool, g in self._orig.items():
            pool.gate = g
        return self.ctx.__exit__(*exc)


def _jsonable(x: Any) -> Any:
    try:
        json.dumps(x)
        return x
    except TypeError:
        if isinstance(x, dict):
            return {k: _jsonable(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [_jsonable(v) for v in x]
        return repr(x)
