"""Run a sweep: every provider at every point on the same inputs, one row each, never stopping at a failure.

What is measured at a point is a :class:`Measure` looked up by name in :data:`MEASURES`; ``time`` (wall time, peak
memory and the rates against the ideal cost) is the one the CLI runs. Another kind of measurement of the same
built callables plugs in there without touching the sweep.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from pclr import BackendUnavailableError
from pclr.bench.models import run_serve, run_train
from pclr.bench.problems import make_problem
from pclr.bench.provider import Built, Provider, RunOptions, Skip
from pclr.bench.results import Row, fill_kernel_ratio, kernel_row
from pclr.bench.shapes import Preset, Shape, sweep_shapes
from pclr.bench.timing import peak_memory_mb, synchronize, time_fn

Measure = Callable[[Shape, Provider, Built, torch.device, Preset, str, Optional[dict[str, Any]]], Row]
"""(point, provider, its built callable already run once, device, preset, label, datasheet peaks) -> an ``ok`` row."""


def measure_time(shape: Shape, provider: Provider, built: Built, device: torch.device, preset: Preset, label: str,
                 peaks: Optional[dict[str, Any]]) -> Row:
    """Peak memory of one call, then the timing of ``preset.warmup`` / ``preset.rep`` (see :func:`time_fn`)."""
    for t in built.grads:
        t.grad = None  # so the peak counts the gradients this call allocates
    mem = peak_memory_mb(built.fn, device)
    timing = time_fn(built.fn, device, preset.warmup, preset.rep, built.grads)
    return kernel_row(shape, provider, "ok", label, timing=timing, mem=mem, peaks=peaks)


MEASURES: dict[str, Measure] = {"time": measure_time}


@dataclass
class SweepConfig:
    """Everything one run needs besides the providers: the device, the preset (warm-up/rep already applied), the
    modes and dtypes asked for, the row label (the CPU label on CPU, empty on GPU) and the datasheet peaks."""

    device: torch.device
    preset: Preset
    modes: Sequence[str]
    dtypes: Sequence[str]
    label: str
    peaks: Optional[dict[str, Any]]
    opts: RunOptions
    measure: str = "time"


def run_kernel_point(shape: Shape, providers: Sequence[Provider], cfg: SweepConfig) -> list[Row]:
    """Every provider at one point on the same inputs; ratio_to_base filled from the base row.

    A provider without this mode, unavailable here, or ruled out by the inputs gets a ``skipped`` row whose note says
    why; a failure while running gets an ``error`` / ``oom`` row, and the sweep goes on.
    """
    device, measure = cfg.device, MEASURES[cfg.measure]
    rows: list[Row] = []
    p = None
    for provider in providers:
        why = provider.mode_reason(shape.mode) or provider.unavailable()
        if why:
            rows.append(kernel_row(shape, provider, "skipped", cfg.label, note=why))
            continue
        built = None
        try:
            p = p or make_problem(shape, device)
            with provider.context():
                built = provider.build(p, cfg.opts)
                built.fn()  # compile/autotune outside the measurement; a failure here is the provider's error
                synchronize(device)
                rows.append(measure(shape, provider, built, device, cfg.preset, cfg.label, cfg.peaks))
        except (Skip, BackendUnavailableError) as exc:
            rows.append(kernel_row(shape, provider, "skipped", cfg.label, note=str(exc)))
        except torch.cuda.OutOfMemoryError as exc:
            rows.append(kernel_row(shape, provider, "oom", cfg.label, note=str(exc).splitlines()[0][:200]))
        except Exception as exc:  # one broken provider must not end the sweep; its row says what happened
            rows.append(kernel_row(shape, provider, "error", cfg.label, note=f"{type(exc).__name__}: {exc}"[:300]))
        finally:
            for t in built.grads if built is not None else []:
                t.grad = None  # free the gradients before the next provider allocates
            built = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    fill_kernel_ratio(rows)
    return rows


def run_sweep(providers: Sequence[Provider], cfg: SweepConfig,
              progress: Optional[Callable[[str], None]] = None) -> list[Row]:
    """The kernel-level points of the preset for the asked modes, then the model-level modes (in the first dtype)."""
    rows: list[Row] = []
    shapes = sweep_shapes(cfg.preset, cfg.modes, cfg.dtypes)
    for i, shape in enumerate(shapes):
        if progress is not None:
            progress(f"[{i + 1}/{len(shapes)}] {shape.mode} {shape.dtype} d={shape.d_in} T={shape.T} B={shape.B} "
                     f"n={shape.n} r={shape.r} n_s={shape.n_s}")
        rows += run_kernel_point(shape, providers, cfg)
    runners = {"train": run_train, "serve": run_serve}
    for mode, runner in runners.items():
        model_cfg = cfg.preset.model_config(mode)
        if mode in cfg.modes and model_cfg is not None and providers:
            if progress is not None:
                progress(f"{mode}: {len(providers)} providers")
            rows += runner(model_cfg, providers, cfg.device, cfg.dtypes[0], cfg.label, cfg.opts)
    return rows
