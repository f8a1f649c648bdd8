"""Benchmarks of the LRP layer against what users would otherwise write (``pclr bench`` / ``python -m benchmarks.run``).

Every provider runs on identical inputs in one process, so the only claims are ratios measured side by side. The
providers (:data:`PROVIDERS`, each declaring the modes it runs and why not the others) are the base Linear (the floor),
pclr's backends and triton forward variants, the one-pass gate + LRP, the authors' formulation, a dense masked gate,
PEFT LoRA and vLLM's punica kernels. Modes: ``gate``, ``fwd``, ``fwdbwd``, ``decode`` (one token per sample),
``layer`` (7 linears of a decoder layer sharing one gate), ``train`` and ``serve`` (a small LLaMA-shaped model).
GPU timing uses ``triton.testing.do_bench`` with the L2 flushed before every repetition; on CPU the run is a smoke test
of the code paths and every row is labelled "CPU, not a performance figure".

One concern per module: :mod:`~pclr.bench.shapes` (points and presets), :mod:`~pclr.bench.timing`,
:mod:`~pclr.bench.problems` (inputs and ideal cost), :mod:`~pclr.bench.provider` (what a provider is),
:mod:`~pclr.bench.providers` and :mod:`~pclr.bench.baselines` (the providers), :mod:`~pclr.bench.paper` (the authors'
formulation), :mod:`~pclr.bench.models` (train/serve), :mod:`~pclr.bench.harness` (the sweep),
:mod:`~pclr.bench.results` (the row), :mod:`~pclr.bench.meta`, :mod:`~pclr.bench.report` and :mod:`~pclr.bench.cli`.
"""
from __future__ import annotations

from pclr.bench.cli import add_bench_arguments, bench_main, main
from pclr.bench.harness import MEASURES, SweepConfig, run_kernel_point, run_sweep
from pclr.bench.meta import DEVICE_PEAKS, collect_meta, device_name, device_peaks, device_slug
from pclr.bench.problems import Problem, ideal_cost, make_problem
from pclr.bench.provider import Built, Provider, RunOptions, Skip
from pclr.bench.providers import PROVIDERS, triton_forward_variant
from pclr.bench.results import COLUMNS
from pclr.bench.shapes import CPU_LABEL, DTYPES, KERNEL_MODES, MODEL_MODES, MODES, PRESETS, Preset, Shape, sweep_shapes

__all__ = [
    "add_bench_arguments", "bench_main", "main", "MEASURES", "SweepConfig", "run_kernel_point", "run_sweep",
    "DEVICE_PEAKS", "collect_meta", "device_name", "device_peaks", "device_slug", "Problem", "ideal_cost",
    "make_problem", "Built", "Provider", "RunOptions", "Skip", "PROVIDERS", "triton_forward_variant", "COLUMNS",
    "CPU_LABEL", "DTYPES", "KERNEL_MODES", "MODEL_MODES", "MODES", "PRESETS", "Preset", "Shape", "sweep_shapes",
]
