"""The comparison report of ``pclr run``: the table, report.md, metrics.json and the figures."""
from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pclr.cil.metrics import pyplot_or_none
from pclr.demo.data.coin_mini import difference_halfwidth, wilson_interval

EVAL_NOTES = {
    "forced": "one teacher-forced forward per batch; a sample is correct iff the argmax at every answer position "
              "(end token included) is the gold token, i.e. iff greedy decoding returns the gold answer verbatim. "
              "This is greedy exact match (a lower bound of CoIN's normalised matching); Grounding counts exact "
              "boxes only (a lower bound of IoU >= 0.5).",
    "forced_generate": "teacher-forced greedy exact match; Grounding samples that fail it are generated and scored "
                       "by IoU >= 0.5.",
    "generate": "greedy generation, CoIN scoring (normalised exact match, option letter, IoU >= 0.5).",
}


def machine(device: str) -> dict:
    """Where the run ran (for the report)."""
    d = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
         "device": device, "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    if device == "cuda":
        d["gpu"] = torch.cuda.get_device_name(0)
    return d


def jsonable(x: Any) -> Any:
    """``x`` as JSON would give it back (tuples become lists, unknown objects their str)."""
    return json.loads(json.dumps(x, default=str))


def _interval(metrics: dict, m: dict) -> str:
    n = metrics["run"]["sizes"]["n_test"] * len(metrics["tasks"])
    lo, hi = wilson_interval(m["avg_acc"] / 100 * n, n)
    return f"[{lo:.1f}, {hi:.1f}]"


def table(metrics: dict) -> str:
    """The comparison table (markdown)."""
    rows = ["| Method | New.ACC | Avg.ACC (95% CI) | Forgetting | BWT | Peak mem (MB) | Trainable/task | "
            "LRP params stored | Wall (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for m in metrics["methods"].values():
        f = lambda x: "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"  # noqa: E731
        rows.append(f"| {m['label']} | {f(m['new_acc'])} | {f(m['avg_acc'])} {_interval(metrics, m)} | "
                    f"{f(m['forgetting'])} | {f(m['bwt'])} | {m['peak_memory_mb']:.0f} | "
                    f"{m['trainable_params_per_task'] or 0:,} | {m['stored_lrp_params']:,} | {m['wall_seconds']:.0f} |")
    return "\n".join(rows)


def task_table(metrics: dict) -> str:
    """Per task: chance, blind (text-only prior), single-task LoRA and each method's final accuracy (markdown)."""
    per = metrics.get("per_task") or {}
    if not per:
        return ""
    methods = list(metrics["methods"].values())
    f = lambda x: "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"  # noqa: E731
    rows = ["| Task | Chance | Blind | Single-task LoRA | " + " | ".join(f"{m['label']} final" for m in methods) + " |",
            "|---" * (4 + len(methods)) + "|"]
    for j, name in enumerate(metrics["tasks"]):
        p = per.get(name, {})
        rows.append(f"| {name} | {f(p.get('chance'))} | {f(p.get('blind'))} | {f(p.get('single_task_lora'))} | "
                    + " | ".join(f(m["matrix"][-1][j]) for m in methods) + " |")
    return "\n".join(rows)


def write_report(out: Path, metrics: dict) -> list[str]:
    """metrics.json, report.md, accuracy_matrices.png, forgetting.png (each written atomically; the figures only
    when matplotlib is installed). Returns the names of the files written."""
    atomic_write(out / "metrics.json", json.dumps(jsonable(metrics), indent=1))
    plotted = _plots(out, metrics)
    n = metrics["run"]["sizes"]["n_test"]
    T = len(metrics["tasks"])
    half = difference_halfwidth(50, 50, n * T)
    lines = [f"# pclr run: CoIN-mini, preset `{metrics['run']['preset']}`", "",
             table(metrics), "",
             f"Accuracies in %. Avg.ACC 95% Wilson interval over {n * T} test answers; a difference of two Avg.ACC "
             f"values above about {half:.1f} points (95%, worst case p = 0.5) is above sampling noise; per task "
             f"({n} answers) about {difference_halfwidth(50, 50, n):.1f} points.", "",
             "## Per task", "", task_table(metrics), "",
             "Chance: uniform guess among the answers the question's template admits. Blind: each question "
             "template's most frequent training answer (a text-only prior). Single-task LoRA: the task learnt alone "
             "by a fresh LoRA of the same rank, steps and data (also the per-task-adapter reference with an oracle "
             "task id). Final: each method after the whole sequence.", "",
             "## Accuracy matrices (row: after training task i; column: task j)", ""]
    if plotted:
        lines += ["![accuracy matrices](accuracy_matrices.png)", "", "![forgetting](forgetting.png)", ""]
    for m in metrics["methods"].values():
        lines += [f"### {m['label']}", "", "| after \\ on | " + " | ".join(metrics["tasks"]) + " |",
                  "|---" * (T + 1) + "|"]
        for i, row in enumerate(m["matrix"]):
            cells = ["" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}" for x in row]
            lines.append(f"| {metrics['tasks'][i]} | " + " | ".join(cells) + " |")
        lines.append("")
    info = metrics.get("model", {})
    lines += ["## Setup", "", f"- Model: {info.get('name')} — {info.get('language_model')}; LRP in decoder layers "
              f"{info.get('lrp_layers')}; vision alignment: {info.get('alignment')}.",
              f"- Evaluation: {EVAL_NOTES.get(metrics['run']['sizes'].get('eval_mode'), '')}",
              f"- Machine: {metrics['machine']}.", f"- Total wall time: {metrics['total_wall_seconds']:.0f} s.",
              f"- Settings: `{json.dumps(metrics['run'])}`", ""]
    atomic_write(out / "report.md", "\n".join(lines))
    return ["report.md", "metrics.json"] + (["accuracy_matrices.png", "forgetting.png"] if plotted else [])


def _plots(out: Path, metrics: dict) -> bool:
    """accuracy_matrices.png and forgetting.png; False (after one line on stderr) when matplotlib is absent."""
    plt = pyplot_or_none("accuracy_matrices.png and forgetting.png")
    if plt is None:
        return False
    methods = list(metrics["methods"].values())
    names = metrics["tasks"]
    T = len(names)
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 4), squeeze=False)
    for ax, m in zip(axes[0], methods):
        a = np.array([[np.nan if x is None else x for x in r] for r in m["matrix"]], dtype=float)
        im = ax.imshow(a, vmin=0, vmax=100, cmap="viridis")
        ax.set_title(f"{m['label']}: Avg {m['avg_acc']:.1f}, Forg {m['forgetting']:.1f}", fontsize=9)
        ax.set_xticks(range(T), names, rotation=60, fontsize=7)
        ax.set_yticks(range(T), names, fontsize=7)
        for i in range(T):
            for j in range(T):
                if not np.isnan(a[i, j]):
                    ax.text(j, i, f"{a[i, j]:.0f}", ha="center", va="center", fontsize=6,
                            color="w" if a[i, j] < 60 else "k")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy (%)")
    _savefig(fig, out / "accuracy_matrices.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(5, 0.9 * T + 2), 3.5))
    w = 0.8 / max(1, len(methods))
    for k, m in enumerate(methods):
        drops = []
        for j in range(T - 1):
            col = [m["matrix"][i][j] for i in range(j, T - 1)]
            col = [x for x in col if x is not None and not (isinstance(x, float) and math.isnan(x))]
            final = m["matrix"][T - 1][j]
            drops.append(max(col) - final if col and final is not None else np.nan)
        ax.bar(np.arange(T - 1) + k * w, drops, width=w, label=f"{m['label']} (mean {m['forgetting']:.1f})")
    ax.set_xticks(np.arange(T - 1) + w * (len(methods) - 1) / 2, names[:-1], rotation=30, fontsize=8)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("forgetting (points)")
    ax.set_title("Accuracy lost on each task by the end of the sequence", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _savefig(fig, out / "forgetting.png")
    plt.close(fig)
    return True


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _savefig(fig, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
