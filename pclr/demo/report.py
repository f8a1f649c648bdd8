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
              "This is greedy exact match (a lower bound of CoIN's normalised matching); CoIN-mini's Grounding "
              "answers a 3x3-grid cell, so exact match is its natural score (a task scored by box IoU would count "
              "exact boxes only, a lower bound of IoU >= 0.5).",
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


def _num(x: Any, fmt: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def rows(metrics: dict) -> list[dict]:
    """Every row of the comparison: the methods, then the reference rows (per-task LoRA with the oracle task id)."""
    return list(metrics["methods"].values()) + list((metrics.get("references") or {}).values())


def final_accuracies(m: dict) -> list:
    """A row's accuracy on each task at the end (the last row of its matrix, or its own list for reference rows)."""
    return m["final"] if m.get("final") is not None else m["matrix"][-1]


def steps_cell(m: dict) -> str:
    """Optimizer steps of a row: per task (sequential methods and per-task references; PCLR's integration steps
    apart) or in total (the joint reference)."""
    if m.get("learn_steps") is not None:
        return f"{m['learn_steps']} total"
    per = m.get("learn_steps_per_task")
    if not per:
        return "n/a"
    cell = f"{per[0]}/task" if len(set(per)) == 1 else "/".join(map(str, per))
    return cell + (f" + {m['integration_steps']} integration steps" if m.get("integration_steps") else "")


def table(metrics: dict) -> str:
    """The comparison table (markdown)."""
    out = ["| Method | New.ACC | Avg.ACC (95% CI) | Forgetting | BWT | Optimizer steps | Trainable/task | "
           "Stored params | Peak mem (MB) | Wall (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m in rows(metrics):
        trainable = m.get("trainable_params_per_task")
        out.append(f"| {m['label']} | {_num(m['new_acc'])} | {_num(m['avg_acc'])} {_interval(metrics, m)} | "
                   f"{_num(m['forgetting'])} | {_num(m['bwt'])} | {steps_cell(m)} | "
                   f"{_num(trainable, ',') if trainable else 'n/a'} | {_num(m['stored_lrp_params'], ',')} | "
                   f"{_num(m['peak_memory_mb'], '.0f')} | {_num(m['wall_seconds'], '.0f')} |")
    return "\n".join(out)


def task_table(metrics: dict) -> str:
    """Per task: chance, blind (text-only prior), single-task LoRA and each method's final accuracy (markdown)."""
    per = metrics.get("per_task") or {}
    if not per:
        return ""
    methods = list(metrics["methods"].values())
    f = lambda x: _num(x, ".1f")  # noqa: E731
    out = ["| Task | Chance | Blind | Single-task LoRA | " + " | ".join(f"{m['label']} final" for m in methods) + " |",
           "|---" * (4 + len(methods)) + "|"]
    for j, name in enumerate(metrics["tasks"]):
        p = per.get(name, {})
        out.append(f"| {name} | {f(p.get('chance'))} | {f(p.get('blind'))} | {f(p.get('single_task_lora'))} | "
                   + " | ".join(f(final_accuracies(m)[j]) for m in methods) + " |")
    return "\n".join(out)


def steps_note(metrics: dict) -> str:
    """One line on the optimizer steps every row took (checked equal when the run was written)."""
    st = metrics.get("optimizer_steps")
    if not st or not st.get("learn_steps_per_task"):
        return ""
    per = st["learn_steps_per_task"]
    line = (f"Equal optimizer steps: every sequential method and every per-task reference took {per} learning "
            f"step(s) on the tasks in order (checked from the trainers' records)")
    if st.get("joint_learn_steps") is not None:
        line += f"; the joint reference {st['joint_learn_steps']} in total, their sum"
    extra = {k: v for k, v in (st.get("integration_steps") or {}).items() if v}
    if extra:
        line += "; integration (QKLD) steps on top: " + ", ".join(f"{k} + {v}" for k, v in extra.items())
    return line + "."


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
             "## Fair comparison", "", steps_note(metrics), "",
             "Trainable/task: LRP parameters trained while learning one task (PCLR: its new experts and their keys). "
             "Stored params: what must be kept to serve every task (PCLR: the pool, shared ranks and keys; LoRA, "
             "LoRA+LwF and the joint reference: one adapter; the per-task references: one adapter per task), "
             "counted from the trained modules. Per-task LoRA (oracle task id): each task served by its own adapter, "
             "evaluated on its own task (isolation: nothing is forgotten by construction). Joint (ceiling): one "
             "adapter of the same rank trained on the union of every task's training set, no sequence.", "",
             "## Accuracy matrices (row: after training task i; column: task j)", ""]
    if plotted:
        lines += ["![accuracy matrices](accuracy_matrices.png)", "", "![forgetting](forgetting.png)", ""]
    for m in metrics["methods"].values():
        if m.get("matrix") is None:
            continue
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
    methods = [m for m in metrics["methods"].values() if m.get("matrix") is not None]  # the sequences
    if not methods:
        return False
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
