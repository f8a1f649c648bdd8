"""Summarise a bench.json as a markdown table of ratios against the performance targets.

    python benchmarks/gpu_summary.py bench.json summary.md

Per mode and shape: each provider's median time, its ratio to ``base`` (x·Wᵀ on cuBLAS, or plain forward+backward),
the target for that ratio, and the speed-up over ``paper`` (the paper's formulation). Rows that did not run keep
their status and reason. On a CPU the table is plumbing only: the bench labels every CPU row as not a figure.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

# Targets for time / base at the target point (bf16, d = 4096, T = 4096 in 8 samples, n = 256, r = 64, n_s = 32):
# the physical floors are 1.047 (fwd), 1.070 (fwd + bwd) and about 1.15 (decode at B = 8).
TARGETS = {"fwd": 1.07, "fwdbwd": 1.10, "decode": 1.20}
MIN_SPEEDUP_OVER_PAPER = 3.0
SHAPE_KEYS = ("dtype", "d_in", "d_out", "T", "B", "n", "r", "n_s")


def _f(v: object) -> float | None:
    return float(v) if isinstance(v, (int, float)) or (isinstance(v, str) and v.replace(".", "", 1).isdigit()) else None


def summarise(bench: dict) -> str:
    rows = bench["rows"]
    meta = bench.get("meta", {})
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["mode"],) + tuple(row.get(k) for k in SHAPE_KEYS)].append(row)
    out = [f"# gpu-check summary: {meta.get('device', '?')}", "",
           f"torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}, commit {meta.get('git_commit', '?')}",
           "", "| mode | shape | provider | median ms | × base | target | × faster than paper | status |",
           "|---|---|---|---|---|---|---|---|"]
    for key, grp in groups.items():
        mode = key[0]
        shape = " ".join(f"{k}={v}" for k, v in zip(SHAPE_KEYS, key[1:]) if v not in ("", None))
        paper = next((_f(r["median_ms"]) for r in grp if r["provider"] == "paper" and r["status"] == "ok"), None)
        for r in grp:
            ms, ratio = _f(r.get("median_ms")), _f(r.get("ratio_to_base"))
            target = TARGETS.get(mode)
            verdict = ""
            if ratio is not None and target is not None and r["provider"].startswith("pclr-"):
                verdict = " ✓" if ratio <= target else " ✗"
            speed = f"{paper / ms:.2f}" if paper and ms and r["provider"] != "paper" else ""
            status = r["status"] if r["status"] == "ok" else f"{r['status']}: {str(r.get('note', ''))[:80]}"
            out.append(f"| {mode} | {shape} | {r['provider']} | {'' if ms is None else f'{ms:.4f}'} | "
                       f"{'' if ratio is None else f'{ratio:.3f}'}{verdict} | {target or ''} | {speed} | {status} |")
    out += ["", f"Targets: time / base ≤ {TARGETS} for the pclr providers, and ≥ {MIN_SPEEDUP_OVER_PAPER}× faster "
            "than the paper's formulation."]
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    try:
        with open(argv[1]) as fh:
            bench = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        print(f"gpu_summary: cannot read {argv[1]}: {exc}", file=sys.stderr)
        return 2
    text = summarise(bench)
    with open(argv[2], "w") as fh:
        fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
