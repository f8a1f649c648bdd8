"""The outputs of a run: the printed table, bench.csv, bench.json (rows + metadata), bench.md (a markdown table per
mode) and one PNG chart per mode."""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Sequence

from pclr.bench.results import COLUMNS, Row
from pclr.bench.shapes import MODES

try:  # charts are optional: without matplotlib a run writes everything else and says so
    import matplotlib
except ImportError:  # pragma: no cover - depends on the installation
    matplotlib = None

CHARTS_UNAVAILABLE = None if matplotlib is not None else "matplotlib is not installed"
TABLE_COLUMNS = ("mode", "provider", "dtype", "d_in", "T", "B", "n", "r", "n_s", "median_ms", "p20_ms", "p80_ms",
                  "ratio_to_base", "tflops", "gbps", "peak_mem_mb", "tokens_per_s")
WORK_TABLE_COLUMNS = ("mode", "provider", "dtype", "d_in", "T", "B", "n", "r", "n_s", "work_flops", "flops_vs_floor",
                      "work_bytes", "bytes_vs_floor", "unique_bytes", "unique_vs_floor", "work_launches")
_HEADINGS = {"work_flops": "FLOPs", "flops_vs_floor": "x floor", "work_bytes": "bytes", "bytes_vs_floor": "x floor(B)",
             "unique_bytes": "unique B", "unique_vs_floor": "x floor(uB)",
             "work_launches": "launches", "median_ms": "ms", "p20_ms": "p20", "p80_ms": "p80",
             "ratio_to_base": "x base", "tflops": "TFLOP/s", "gbps": "GB/s", "peak_mem_mb": "mem MiB",
             "tokens_per_s": "tok/s", "d_in": "d"}


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _status(r: Row, width: int = 90) -> str:
    return (r["status"] if r["status"] == "ok" else f"{r['status']}: {r['note']}")[:width]


def format_table(rows: Sequence[Row], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """A fixed-width text table of the rows (skipped rows show their reason)."""
    cells = [[_HEADINGS.get(c, c) for c in columns] + ["status"]]
    for r in rows:
        cells.append([_fmt(r[c], 4) for c in columns] + [_status(r)])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ("  ".join(c.rjust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1] for row in cells)
    return "\n".join(lines)


def format_markdown(rows: Sequence[Row], meta: dict[str, Any], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """One markdown table per mode (rows as measured, skipped ones with their reason), under the run's device and
    command; every CPU run carries its label in the title."""
    lines = [f"# pclr bench: {meta['label']}", "",
             f"`{meta['command']}` | torch {meta['torch']} | triton {meta['triton']} | CUDA {meta['cuda']} | "
             f"pclr {meta['pclr']} ({meta['git_commit'] or 'no git commit'}) | {meta['timestamp']}", ""]
    for mode in MODES:
        mrows = [r for r in rows if r["mode"] == mode]
        if not mrows:
            continue
        lines += [f"## {mode}", "", "| " + " | ".join(_HEADINGS.get(c, c) for c in columns[1:]) + " | status |",
                  "|" + " --- |" * len(columns)]
        for r in mrows:
            status = _status(r, 200).replace("|", "/")
            lines.append("| " + " | ".join(_fmt(r[c], 4) for c in columns[1:]) + f" | {status} |")
        lines.append("")
    return "\n".join(lines)


def write_csv(rows: Sequence[Row], path: str) -> None:
    """bench.csv: one line per row, :data:`COLUMNS` in order, floats to 6 significant digits."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({c: _fmt(r[c], 6) if isinstance(r[c], float) else r[c] for c in COLUMNS})


def write_json(rows: Sequence[Row], meta: dict[str, Any], path: str) -> None:
    """bench.json: ``{"meta": ..., "columns": [...], "rows": [...]}`` (full precision)."""
    with open(path, "w") as f:
        json.dump({"meta": meta, "columns": list(COLUMNS), "rows": list(rows)}, f, indent=1, default=str)


def write_markdown(rows: Sequence[Row], meta: dict[str, Any], path: str,
                   columns: Sequence[str] = TABLE_COLUMNS) -> None:
    """bench.md: :func:`format_markdown`."""
    with open(path, "w") as f:
        f.write(format_markdown(rows, meta, columns))


def write_charts(rows: Sequence[Row], out_dir: str, label: str) -> list[str]:
    """One PNG per mode: ratio to the base Linear (or ms where there is no base) against tokens / batch size, one line
    per provider, one panel per configuration; bar charts of tokens/s for train and serve. Returns the paths."""
    if matplotlib is None:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the non-interactive backend, as matplotlib requires

    paths = []
    ok = [r for r in rows if r["status"] == "ok"]
    for mode in MODES:
        mrows = [r for r in ok if r["mode"] == mode]
        if not mrows:
            continue
        if mode in ("train", "serve"):
            fig, ax = plt.subplots(figsize=(7, 4))
            keys = sorted({(r["provider"], r["B"]) for r in mrows}, key=lambda k: (k[1], k[0]))
            ax.bar([f"{p}\nB={b}" for p, b in keys],
                   [next(r["tokens_per_s"] for r in mrows if (r["provider"], r["B"]) == k) for k in keys])
            ax.set_ylabel("tokens/s")
            ax.tick_params(axis="x", labelsize=7, rotation=45)
        else:
            xkey = "B" if mode in ("decode", "gate") else "T"
            groups: dict[tuple, list[Row]] = {}
            for r in mrows:
                groups.setdefault((r["dtype"], r["d_in"], r["n"], r["r"], r["n_s"]), []).append(r)
            top = sorted(groups.items(), key=lambda kv: -len({r[xkey] for r in kv[1]}))[:6]
            fig, axes = plt.subplots(1, len(top), figsize=(5 * len(top), 4), squeeze=False)
            use_ratio = any(r["ratio_to_base"] != "" for r in mrows)
            for ax, (g, grows) in zip(axes[0], top, strict=True):
                for prov in dict.fromkeys(r["provider"] for r in grows):
                    pts = sorted((r[xkey], r["ratio_to_base"] if use_ratio else r["median_ms"]) for r in grows
                                 if r["provider"] == prov and (not use_ratio or r["ratio_to_base"] != ""))
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
                ax.set_xscale("log", base=2)
                ax.set_xlabel(xkey)
                ax.set_ylabel("time / base Linear" if use_ratio else "median ms")
                ax.set_title("{} d={} n={} r={} n_s={}".format(*g), fontsize=9)
                ax.grid(alpha=0.3)
            axes[0][0].legend(fontsize=7)
        fig.suptitle(f"pclr bench: {mode} ({label})", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{mode}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
