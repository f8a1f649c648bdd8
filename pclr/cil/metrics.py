"""Continual-learning metrics (New.ACC, Avg.ACC, Forgetting, BWT), CoIN-style scorers and the report files
(JSON, heatmap PNG, markdown).

Accuracy matrix a[i][j] = accuracy (0-100) on task j after training task i; NaN where not measured (j > i).
"""
from __future__ import annotations

import json
import math
import os
import re
import string
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

# ------------------------------------------------------------------------------------------------ scorers
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile("[" + re.escape(string.punctuation.replace(".", "")) + "]")


def normalize_answer(s: str) -> str:
    """CoIN / VQA style normalisation: lower case, no punctuation (a decimal point survives), no articles, single
    spaces, no trailing period."""
    s = s.lower().strip()
    s = _PUNCT.sub(" ", s)
    s = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", s)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def score_exact(pred: str, answer: str) -> float:
    """1 if the normalised prediction equals the normalised answer."""
    return float(normalize_answer(pred) == normalize_answer(answer))


_CHOICE = re.compile(r"(?:^|[\s(\[])([A-Z])(?:$|[\s).:\],])")


def extract_choice(text: str) -> Optional[str]:
    """The option letter of a multiple-choice reply: "A", "(B)", "C. blue", "The answer is D." → letter."""
    t = text.strip()
    if len(t) == 1 and t.isalpha():
        return t.upper()
    m = _CHOICE.search(t)
    if m:
        return m.group(1)
    m = re.match(r"^([A-Za-z])(?:$|[\s).:,])", t)
    return m.group(1).upper() if m else None


def score_choice(pred: str, answer: str) -> float:
    """1 if the option letters agree (the answer may be "A" or "A. text")."""
    a, p = extract_choice(answer), extract_choice(pred)
    if a is None:
        return score_exact(pred, answer)
    return float(p == a)


_NUM = re.compile(r"-?\d+(?:\.\d+)?")


def parse_box(text: str) -> Optional[tuple[float, float, float, float]]:
    """The first four numbers of a reply as a box (x1, y1, x2, y2)."""
    nums = [float(x) for x in _NUM.findall(text)]
    if len(nums) < 4:
        return None
    x1, y1, x2, y2 = nums[:4]
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def score_grounding(pred: str, answer: str, threshold: float = 0.5) -> float:
    """1 if IoU(predicted box, reference box) >= threshold (CoIN RefCOCO protocol)."""
    p, a = parse_box(pred), parse_box(answer)
    if p is None or a is None:
        return 0.0
    return float(box_iou(p, a) >= threshold)


SCORERS: dict[str, Callable[[str, str], float]] = {
    "exact": score_exact, "choice": score_choice, "grounding": score_grounding,
}


def get_scorer(scorer: Union[str, Callable[[str, str], float]]) -> Callable[[str, str], float]:
    if callable(scorer):
        return scorer
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; known: {sorted(SCORERS)} or a callable (pred, answer) -> float")
    return SCORERS[scorer]


# ------------------------------------------------------------------------------------------------ metrics
def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def summarize(matrix: Sequence[Sequence[float]]) -> dict[str, float]:
    """New.ACC, Avg.ACC, Forgetting and BWT of an accuracy matrix [T][T] (NaN / None = not measured).

    New.ACC = mean_i a[i][i]; Avg.ACC = mean_j a[T-1][j];
    Forgetting = mean_{j<T-1} (max_{j<=l<T-1} a[l][j] - a[T-1][j]); BWT = mean_{j<T-1} (a[T-1][j] - a[j][j]).
    """
    T = len(matrix)
    if T == 0:
        return {"new_acc": float("nan"), "avg_acc": float("nan"), "forgetting": float("nan"), "bwt": float("nan")}
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    diag = [matrix[i][i] for i in range(T) if not _nan(matrix[i][i])]
    last = [matrix[T - 1][j] for j in range(T) if not _nan(matrix[T - 1][j])]
    forg, bwt = [], []
    for j in range(T - 1):
        final = matrix[T - 1][j]
        seen = [matrix[i][j] for i in range(j, T - 1) if not _nan(matrix[i][j])]
        if _nan(final) or not seen:
            continue
        forg.append(max(seen) - final)
        if not _nan(matrix[j][j]):
            bwt.append(final - matrix[j][j])
    return {"new_acc": mean(diag), "avg_acc": mean(last), "forgetting": mean(forg), "bwt": mean(bwt)}


@dataclass
class CILResults:
    """Outcome of a run: task names, accuracy matrix (0-100, NaN = not measured) and its summary."""

    task_names: list[str]
    matrix: list[list[float]]
    summary: dict[str, float] = field(default_factory=dict)
    method: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.summary:
            self.summary = summarize(self.matrix)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["matrix"] = [[None if _nan(x) else x for x in row] for row in self.matrix]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CILResults":
        m = [[float("nan") if x is None else float(x) for x in row] for row in d["matrix"]]
        return cls(task_names=list(d["task_names"]), matrix=m, summary=dict(d.get("summary") or {}),
                   method=d.get("method", ""), extra=dict(d.get("extra") or {}))

    def markdown(self) -> str:
        """Accuracy matrix and summary as markdown tables."""
        names = self.task_names
        lines = [f"### {self.method or 'results'}", "", "| after \\ on | " + " | ".join(names) + " |",
                 "|---" * (len(names) + 1) + "|"]
        for i, row in enumerate(self.matrix):
            cells = ["" if _nan(x) else f"{x:.2f}" for x in row]
            lines.append(f"| {names[i]} | " + " | ".join(cells) + " |")
        s = self.summary
        lines += ["", "| New.ACC | Avg.ACC | Forgetting | BWT |", "|---|---|---|---|",
                  f"| {s['new_acc']:.2f} | {s['avg_acc']:.2f} | {s['forgetting']:.2f} | {s['bwt']:.2f} |", ""]
        return "\n".join(lines)

    def save(self, output_dir: str, heatmap: bool = True) -> dict[str, str]:
        """Write results.json, results.md and (matplotlib) accuracy.png; returns their paths."""
        os.makedirs(output_dir, exist_ok=True)
        paths = {"json": os.path.join(output_dir, "results.json"), "markdown": os.path.join(output_dir, "results.md")}
        _atomic_write(paths["json"], json.dumps(self.to_dict(), indent=2))
        _atomic_write(paths["markdown"], self.markdown())
        if heatmap:
            path = os.path.join(output_dir, "accuracy.png")
            if save_heatmap(self.matrix, self.task_names, path, title=self.method):
                paths["heatmap"] = path
        return paths


def save_heatmap(matrix: Sequence[Sequence[float]], names: Sequence[str], path: str, title: str = "") -> bool:
    """Heatmap PNG of the accuracy matrix (rows: after task i; columns: evaluated task j); False when matplotlib
    is not installed (nothing written)."""
    plt = pyplot_or_none(os.path.basename(path))
    if plt is None:
        return False
    m = np.array([[np.nan if _nan(x) else x for x in row] for row in matrix], dtype=float)
    T = len(names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * T, 0.8 + 0.7 * T))
    im = ax.imshow(m, vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(T), names, rotation=45, ha="right")
    ax.set_yticks(range(T), names)
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("after training")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if not np.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if m[i, j] < 60 else "black")
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def pyplot_or_none(what: str) -> Any:
    """``matplotlib.pyplot`` (Agg backend), or None after one line on stderr saying ``what`` is skipped: figures
    are optional (matplotlib comes with the ``[demo]`` extra), the numbers are always written."""
    try:
        import matplotlib
    except ImportError:
        print(f"pclr: matplotlib is not installed, so {what} is not drawn (pip install 'pclr[demo]' or "
              "matplotlib)", file=sys.stderr)
        return None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
