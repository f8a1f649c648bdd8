"""Statistics over the seeds of a ``pclr run``: mean ± sample std, and the paired t-test of PCLR against a baseline.

The t distribution comes from scipy, which the ``[demo]`` extra already installs (scikit-learn depends on it).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from scipy.stats import t as student_t

ALPHA = 0.05  # a difference is called a win or a loss only below this two-sided p-value
SIGNS_UP_TO = 5  # with this many seeds or fewer the sign of every paired difference is reported too


def mean_std(values: Sequence[Optional[float]]) -> dict:
    """{"mean", "std", "n", "values"} over the values that are not None / NaN; std is the sample std (n - 1), None
    below two values; mean None without any value."""
    xs = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(xs)
    mean = sum(xs) / n if n else None
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n >= 2 else None
    return {"mean": mean, "std": std, "n": n, "values": list(values)}


def t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p-value of Student's t statistic ``t`` with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    return float(min(1.0, 2.0 * student_t.sf(abs(t), df)))


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Paired t-test of ``a`` against ``b`` (one pair per seed, same seed order).

    Returns {"n", "mean_diff", "t", "df", "p", "signs"}: mean of a - b, the t statistic mean / (sd / sqrt(n)) with
    n - 1 degrees of freedom and its two-sided p-value (None with fewer than two pairs, or when every difference is
    the same, where the statistic is undefined), and "signs": "+", "-" or "0" per pair (for n <= 5, else None)."""
    if len(a) != len(b):
        raise ValueError(f"a and b: one value per seed in each, got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    out: dict = {"n": n, "mean_diff": sum(d) / n if n else None, "t": None, "df": n - 1 if n >= 2 else None,
                 "p": None, "signs": ["+" if x > 0 else "-" if x < 0 else "0" for x in d] if n <= SIGNS_UP_TO else None}
    if n < 2:
        return out
    sd = mean_std(d)["std"]
    if sd == 0.0:
        return out
    out["t"] = out["mean_diff"] / (sd / math.sqrt(n))
    out["p"] = t_two_sided_p(out["t"], n - 1)
    return out


def verdict(test: dict) -> str:
    """The plain reading of a paired test of PCLR against a baseline: "n/a" with fewer than two seeds; "wins" /
    "loses" only when p < 0.05; "ties" when every paired difference is zero; else "no significant difference" (also
    when every difference is the same non-zero value: the t statistic is undefined then)."""
    if test["n"] < 2:
        return "n/a"
    if test["t"] is None and test["mean_diff"] == 0.0:
        return "ties"
    if test["p"] is None or test["p"] >= ALPHA:
        return "no significant difference"
    return "wins" if test["mean_diff"] > 0 else "loses"
