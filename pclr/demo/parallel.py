"""The units of one ``pclr run`` seed (each single-task LoRA, each method) in worker processes: ``--jobs``.

Why: on a small CPU one torch process keeps only part of its cores busy (a 135M LM's matmuls are small and Python
runs between them; on 2 cores about 1.2 of them), while single-threaded workers each keep one core busy. Every
trainer seeds each of its phases itself, so a unit in a worker takes the same steps on the same batches as in the main
process and reports the same parameter counts (``tests/test_demo_parallel.py``); only the thread count of its
matmuls changes, which changes float summation order (adapter weights differ by about 1e-6) and can, rarely, flip a
verdict.

The frozen bottom of the language model is computed once, here, for every sample of every task (the prefix cache
of :mod:`pclr.demo.models.prefix_cache`), written to one file and loaded by each worker, so no worker recomputes it.
Workers are spawned (not forked: the parent's OpenMP runtime is not fork-safe) and build the model from the cache.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from pclr.cil.data import CoINCollator, CoINDataset
from pclr.cil.evaluation import split_to

# One worker process per this many cores; a worker's torch uses that many threads.
CORES_PER_JOB = 1
WARM_BATCH = 32  # samples per forward of the prefix warm-up


def resolve_jobs(jobs: Optional[int], device: str) -> int:
    """Worker processes for ``--jobs`` (None: automatic): on a GPU one (the device is the shared resource); on a
    CPU as many as cores / CORES_PER_JOB, at most 2 (a 2-job run gains most of what more would give, and each worker
    holds its own copy of the model)."""
    if jobs is not None:
        return max(1, jobs)
    if device != "cpu":
        return 1
    return max(1, min(2, (os.cpu_count() or 1) // CORES_PER_JOB))


def _prefix_cache(bundle: Any) -> Optional[dict]:
    lm = getattr(getattr(bundle.model, "model", None), "language_model", None)
    return getattr(lm, "_prefix_cache", None)


@torch.no_grad()
def warm_prefix(bundle: Any, tasks: list, device: str, progress: bool = False) -> int:
    """Run every train and test sample of ``tasks`` through the model once, so that the prefix cache holds the
    frozen bottom of each; returns the number of cached rows (0 when the model has no prefix cache)."""
    cache = _prefix_cache(bundle)
    if cache is None:
        return 0
    collate = CoINCollator(bundle, mode="train")
    bundle.model.eval()
    samples = [s for task in tasks for source in (task.train, task.test)
               for s in CoINDataset(source, task.image_root)]
    with tqdm(total=len(samples), desc="frozen bottom, once per example", unit="ex", disable=not progress,
              leave=False) as bar:
        for i in range(0, len(samples), WARM_BATCH):
            batch = samples[i: i + WARM_BATCH]
            model_in, _ = split_to(collate(batch), device)
            bundle.model(**model_in, logits_to_keep=1)
            bar.update(len(batch))
    return len(cache)


# ------------------------------------------------------------------------------------------------- in a worker
_WORKER: dict = {}


def _worker_init(args: argparse.Namespace, ident: dict, device: str, prefix_file: Optional[str]) -> None:
    from pclr.demo import runner  # the worker's own import (spawned: nothing is inherited)

    torch.set_num_threads(CORES_PER_JOB)
    bundle = runner._build(ident, args, device)
    if prefix_file:
        cache = _prefix_cache(bundle)
        if cache is not None:
            cache.update(torch.load(prefix_file, weights_only=True))
    tasks, _ = runner._tasks(ident, runner._data_root(args, ident))
    _WORKER.update(args=args, ident=ident, device=device, bundle=bundle, tasks=tasks)


def _run(kind: str, key: Any, out: str, resume: bool, overwrite: bool) -> dict:
    from pclr.demo import runner

    w = _WORKER
    if kind == "single":
        return runner.single_task_unit(w["bundle"], w["ident"], Path(out), False, w["tasks"][key], w["device"],
                                       resume, overwrite)
    return runner.method_unit(w["bundle"], w["ident"], key, Path(out), False, w["tasks"], w["device"], resume,
                              overwrite)


# --------------------------------------------------------------------------------------------------- the parent
def run_units(args: argparse.Namespace, ident: dict, out: Path, device: str, resume: bool, bundle: Any, tasks: list,
              single_units: list[int], methods: list[str], jobs: int,
              on_single: Callable[[dict], None], on_method: Callable[[dict], None]) -> tuple[list, list]:
    """Run the single-task units (task indices) and the methods in ``jobs`` workers; returns (single-task results in
    task order, method results in ``methods`` order). The methods go first (the longest units first keeps the
    workers evenly loaded), each printed as it finishes."""
    overwrite = getattr(args, "overwrite", False)
    n = warm_prefix(bundle, tasks, device, progress=not args.no_progress)
    print(f"== {len(methods)} method(s) and {len(single_units)} single-task LoRA(s) in {jobs} worker processes "
          f"({CORES_PER_JOB} thread each; frozen bottom of {n} samples computed once) ==", flush=True)
    with tempfile.TemporaryDirectory(prefix="pclr-prefix-") as tmp:
        prefix_file = None
        cache = _prefix_cache(bundle)
        if cache:
            prefix_file = str(Path(tmp) / "prefix.pt")
            torch.save(dict(cache), prefix_file)
        ctx = multiprocessing.get_context("spawn")
        pending: dict[Future, tuple[str, Any]] = {}
        singles: dict[int, dict] = {}
        done_methods: dict[str, dict] = {}
        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init,
                                   initargs=(args, ident, device, prefix_file))
        try:
            for m in methods:
                pending[pool.submit(_run, "method", m, str(out), resume, overwrite)] = ("method", m)
            for k in single_units:
                pending[pool.submit(_run, "single", k, str(out), resume, overwrite)] = ("single", k)
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    kind, key = pending.pop(fut)
                    result = fut.result()
                    if kind == "single":
                        singles[key] = result
                        on_single(result)
                    else:
                        done_methods[key] = result
                        on_method(result)
        except BaseException:
            # Ctrl-C or a failed unit: the units not started yet are dropped instead of run to the end (each
            # started unit's trainer has saved its last finished phase; --resume continues from there)
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
    return [singles[k] for k in single_units], [done_methods[m] for m in methods]
