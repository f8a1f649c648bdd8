"""The layout of a ``pclr run`` directory: its run.json, the seed directories of a multi-seed run, and the checks that
keep one run from mixing with another.

    <run dir>/run.json                     what was asked (``--seeds N`` > 1 adds "seeds": N)
    <run dir>/summary.md, summary.json     the aggregate over seeds (also for one seed)
    <run dir>/seed-<s>/                    one complete run per seed s = S, S+1, ..., S+N-1 (N > 1)

With one seed the run directory is that seed's run directory (report.md, metrics.json, one sub-directory per
method), as a seed directory is: ``pclr eval`` works on either. Light to import (no torch).
"""
from __future__ import annotations

import json
from pathlib import Path

from pclr.demo.settings import UsageError
from pclr.writable import unwritable_reason

# what `pclr run` writes at the top of a run directory (removed by --overwrite; the method directories are
# cleared by their trainers, the seed directories by their own --overwrite)
REPORT_FILES = ("run.json", "report.md", "metrics.json", "accuracy_matrices.png", "forgetting.png", "summary.md",
                "summary.json")


def n_seeds(ident: dict) -> int:
    """How many seeds the run ``ident`` (run.json's content) asks for."""
    return int(ident.get("seeds", 1))


def seed_runs(ident: dict, out: Path) -> list[tuple[dict, Path]]:
    """(the run of one seed, its directory) for every seed of ``ident``, in seed order. A seed's run is ``ident``
    with its own seed and no "seeds": the run.json a one-seed ``pclr run --seed s`` would write."""
    base = {k: v for k, v in ident.items() if k != "seeds"}
    if n_seeds(ident) == 1:
        return [(base, out)]
    return [({**base, "seed": ident["seed"] + k}, out / f"seed-{ident['seed'] + k}") for k in range(n_seeds(ident))]


def finished(out: Path) -> bool:
    """True when the run in ``out`` wrote its report (metrics.json comes last, atomically)."""
    return (out / "metrics.json").is_file()


def prepare_dir(out: Path, ident: dict, resume: bool, overwrite: bool = False) -> None:
    """Make ``out`` the directory of the run ``ident``, or raise UsageError (nothing written then).

    An existing run.json must hold ``ident`` and be resumed (``resume``) or started over (``overwrite``: the report
    files go); a directory without one must be empty or absent, and is not resumed."""
    problem = unwritable_reason(out)
    if problem:
        raise UsageError(f"--output: {problem}")
    rj = out / "run.json"
    if rj.is_file():
        try:
            old = json.loads(rj.read_text())
        except (OSError, ValueError):
            if not overwrite:
                raise UsageError(f"{rj} is unreadable; not touching {out} (--overwrite starts over)") from None
            old = None
        if overwrite:
            for name in REPORT_FILES:
                (out / name).unlink(missing_ok=True)
        elif old != ident:
            diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
            raise UsageError(f"{out} holds a different run (differs in: {', '.join(diff)}); choose another "
                             "--output, repeat the original settings with --resume, or start over with --overwrite")
        elif not resume:
            raise UsageError(f"{out} already holds this run; add --resume to continue it, --overwrite to start it "
                             "over, or choose another --output")
    elif out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not a pclr run directory; choose another --output")
    elif resume:
        raise UsageError(f"--resume: {out} holds no run to resume")
    out.mkdir(parents=True, exist_ok=True)
    if not rj.is_file():
        rj.write_text(json.dumps(ident, indent=1))
