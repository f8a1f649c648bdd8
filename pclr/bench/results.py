"""The result row: one per (mode, provider, point), the same columns in the table, bench.csv and bench.json.

``status`` is ``ok``, ``skipped`` (``note`` says why), ``error`` or ``oom``; derived rates use the ideal cost of the
operation (:func:`pclr.bench.problems.ideal_cost`), so every LRP provider is credited with the same useful work.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from pclr.bench.problems import ideal_cost
from pclr.bench.provider import Provider
from pclr.bench.shapes import Shape
from pclr.bench.timing import Timing, quantiles

COLUMNS: tuple[str, ...] = (
    "mode", "provider", "status", "dtype", "d_in", "d_out", "T", "B", "n", "r", "n_s", "R",
    "median_ms", "p20_ms", "p80_ms", "ratio_to_base", "tflops", "pct_peak_tflops", "gbps", "pct_peak_gbps",
    "peak_mem_mb", "tokens_per_s", "work_flops", "work_bytes", "work_launches", "flops_vs_floor", "bytes_vs_floor",
    "unique_bytes", "unique_vs_floor",
    "note", "label",
)
STATUSES: tuple[str, ...] = ("ok", "skipped", "error", "oom")

Row = dict[str, Any]


def kernel_row(shape: Shape, provider: Provider, status: str, label: str, note: str = "",
               timing: Optional[Timing] = None, mem: Optional[float] = None,
               peaks: Optional[dict[str, Any]] = None) -> Row:
    """A row of a kernel-level point; with ``timing``, the rates against the ideal cost (and the datasheet peaks)."""
    row: Row = {c: "" for c in COLUMNS}
    row.update(mode=shape.mode, provider=provider.name, status=status, dtype=shape.dtype, d_in=shape.d_in,
               d_out=shape.d_out, T=shape.T, B=shape.B, n=shape.n, r=shape.r, n_s=shape.n_s,
               R=0 if provider.cost == "base" else shape.R, note=note, label=label)
    if timing is not None:
        row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms)
        flops, bytes_ = ideal_cost(shape, provider.cost)
        sec = timing.median_ms / 1e3
        row["tflops"] = flops / sec / 1e12
        row["gbps"] = bytes_ / sec / 1e9
        row["tokens_per_s"] = shape.T / sec if shape.mode != "gate" else ""
        if peaks:
            pk = peaks.get("fp32" if shape.mode == "gate" else shape.dtype)  # the gate runs in fp32
            if pk:
                row["pct_peak_tflops"] = 100 * row["tflops"] / pk
            row["pct_peak_gbps"] = 100 * row["gbps"] / peaks["gbps"]
    if mem is not None:
        row["peak_mem_mb"] = mem
    return row


def model_row(mode: str, provider: Provider, cfg: dict[str, Any], dtype: str, tokens: int, batch: int, status: str,
              label: str, note: str = "", times: Optional[Sequence[float]] = None,
              mem: Optional[float] = None) -> Row:
    """A row of a model-level run (``train`` / ``serve``): d is the hidden size; times are per step (ms)."""
    shape = Shape(mode, dtype, cfg["hidden"], cfg["hidden"], tokens, batch, cfg["n"], cfg["r"], cfg["n_s"])
    row = kernel_row(shape, provider, status, label, note=note)
    row["R"] = provider.model_ranks(cfg)
    if times:
        t = quantiles(times)
        row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, tokens_per_s=tokens / (t.median_ms / 1e3))
    if mem is not None:
        row["peak_mem_mb"] = mem
    return row


def fill_kernel_ratio(rows: list[Row]) -> None:
    """ratio_to_base for the rows of one kernel-level point: against its ``base`` row."""
    base = next((r for r in rows if r["provider"] == "base" and r["status"] == "ok"
                 and isinstance(r["median_ms"], float)), None)
    for r in rows:
        if base is not None and r["status"] == "ok" and isinstance(r["median_ms"], float):
            r["ratio_to_base"] = r["median_ms"] / base["median_ms"]


def fill_model_ratio(rows: list[Row]) -> None:
    """ratio_to_base for model rows: against the ``base`` row of the same batch size."""
    base = {r["B"]: r["median_ms"] for r in rows if r["provider"] == "base" and r["status"] == "ok"}
    for r in rows:
        if r["status"] == "ok" and r["B"] in base:
            r["ratio_to_base"] = r["median_ms"] / base[r["B"]]


def status_counts(rows: Sequence[Row]) -> dict[str, int]:
    """How many rows have each status."""
    return {s: sum(r["status"] == s for r in rows) for s in STATUSES}
