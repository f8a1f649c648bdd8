"""The aggregate report of a ``pclr run`` over its seeds: summary.json and summary.md in the run directory.

Per row (each method, and the per-task LoRA reference): Avg.ACC, Forgetting and New.ACC as mean ± sample std over
the seeds; and the paired t-test of PCLR against every other row on Avg.ACC (one pair per seed), read plainly: PCLR
"wins" / "loses" only when p < 0.05, else "no significant difference".
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from pclr.demo.report import atomic_write, jsonable, steps_cell
from pclr.demo.stats import ALPHA, mean_std, paired_t_test, verdict

METRICS = (("avg_acc", "Avg.ACC"), ("forgetting", "Forgetting"), ("new_acc", "New.ACC"))
PCLR = "pclr"


def summarize_seeds(ident: dict, per_seed: list[dict]) -> dict:
    """summary.json's content from the run ``ident`` and each seed's metrics (in seed order)."""
    seeds = [m["run"]["seed"] for m in per_seed]
    keyed: dict[str, list[dict]] = {}
    for m in per_seed:
        for key, row in [*m["methods"].items(), *(m.get("references") or {}).items()]:
            keyed.setdefault(key, []).append(row)
    out_rows = {}
    for key, seed_rows in keyed.items():
        if len(seed_rows) != len(per_seed):
            raise ValueError(f"per_seed: {key!r} is missing from {len(per_seed) - len(seed_rows)} seed(s)")
        r0 = seed_rows[0]
        out_rows[key] = {"label": r0["label"], **{k: mean_std([r[k] for r in seed_rows]) for k, _ in METRICS},
                         "trainable_params_per_task": r0.get("trainable_params_per_task"),
                         "stored_params": r0.get("stored_lrp_params"), "optimizer_steps": steps_cell(r0)}
    tests = {}
    if PCLR in keyed:
        ours = [r["avg_acc"] for r in keyed[PCLR]]
        for key, seed_rows in keyed.items():
            if key != PCLR:
                test = paired_t_test(ours, [r["avg_acc"] for r in seed_rows])
                tests[key] = {"label": seed_rows[0]["label"], **test, "verdict": verdict(test)}
    return jsonable({"preset": ident["preset"], "tasks": ident["tasks"], "n_seeds": len(per_seed), "seeds": seeds,
                     "rows": out_rows, "pclr_vs": tests, "alpha": ALPHA})


def _ms(s: dict) -> str:
    if s["mean"] is None:
        return "n/a"
    return f"{s['mean']:.2f} ± {s['std']:.2f}" if s["std"] is not None else f"{s['mean']:.2f} (± n/a)"


def summary_table(summary: dict) -> str:
    """Mean ± std per row (markdown)."""
    out = ["| Method | " + " | ".join(name for _, name in METRICS) + " | Optimizer steps | Trainable/task | "
           "Stored params |", "|---" * (len(METRICS) + 4) + "|"]
    for r in summary["rows"].values():
        trainable, stored = r["trainable_params_per_task"], r["stored_params"]
        out.append(f"| {r['label']} | " + " | ".join(_ms(r[k]) for k, _ in METRICS) + f" | {r['optimizer_steps']} | "
                   f"{f'{trainable:,}' if trainable else 'n/a'} | {f'{stored:,}' if stored is not None else 'n/a'} |")
    return "\n".join(out)


def _p(p: Optional[float]) -> str:
    return "n/a" if p is None else f"{p:.3g}"


def tests_table(summary: dict) -> str:
    """PCLR against each other row: the paired test on Avg.ACC (markdown)."""
    out = ["| PCLR vs | Mean difference (points) | t | p | Signs per seed | Reading |", "|---|---|---|---|---|---|"]
    for t in summary["pclr_vs"].values():
        diff = "n/a" if t["mean_diff"] is None else f"{t['mean_diff']:+.2f}"
        stat = "n/a" if t["t"] is None else f"{t['t']:.2f}"
        signs = " ".join(t["signs"]) if t["signs"] is not None else "(more than 5 seeds)"
        out.append(f"| {t['label']} | {diff} | {stat} | {_p(t['p'])} | {signs} | {t['verdict']} |")
    return "\n".join(out)


def closing(summary: dict) -> str:
    """The plain reading over seeds: where PCLR wins, ties or loses (p < 0.05), or shows no significant
    difference."""
    n = summary["n_seeds"]
    if not summary["pclr_vs"]:
        return f"{n} seed(s). PCLR was not among the methods: no comparison."
    if n < 2:
        return "1 seed: the paired test needs two or more (n/a); the figures above are one seed's."
    parts = [f"{t['verdict']} against {t['label']} (p = {_p(t['p'])})" for t in summary["pclr_vs"].values()]
    return f"Over {n} seeds, on Avg.ACC (paired t-test, two-sided, alpha {summary['alpha']}), PCLR: " + \
        "; ".join(parts) + "."


def write_summary(out: Path, ident: dict, per_seed: list[dict]) -> list[str]:
    """summary.json and summary.md in ``out`` (atomically); returns their names."""
    summary = summarize_seeds(ident, per_seed)
    atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    seeds = summary["seeds"]
    lines = [f"# pclr run: CoIN-mini, preset `{ident['preset']}`, {summary['n_seeds']} seed(s) "
             f"({', '.join(map(str, seeds))})", "",
             f"Number of seeds: {summary['n_seeds']}. Accuracies in %, mean ± sample std (n - 1) over the seeds; "
             "each seed is a complete run (its own data, initialisation and order of batches) with its report in "
             + ("this directory." if summary["n_seeds"] == 1 else "seed-<s>/."), "",
             summary_table(summary), "",
             "## PCLR against each baseline (paired t-test on Avg.ACC over seeds)", "",
             tests_table(summary) if summary["pclr_vs"] else "PCLR was not run.", "",
             "Reading: wins / loses only when p < 0.05; ties when every paired difference is zero; otherwise no "
             "significant difference. With fewer than two seeds the test is n/a; up to five seeds the sign of every "
             "paired difference (PCLR − baseline) is given.", "",
             closing(summary), ""]
    atomic_write(out / "summary.md", "\n".join(lines))
    return ["summary.md", "summary.json"]
