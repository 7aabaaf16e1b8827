"""The report's task figures: a confusion matrix per variant (classification), so a quantized
model that hurts one class is visible, and the per-class table rows; both from results.json alone
(``variants[].task_metrics``, schema 3)."""
from __future__ import annotations

from typing import Optional

from .plots import Figure, measured, to_svg

MAX_PANELS = 12


def _with_matrix(results: dict) -> list[dict]:
    return [r for r in measured(results) if (r.get("task_metrics") or {}).get("confusion_matrix")]


def confusion_matrices(results: dict) -> Optional[str]:
    """One panel per measured variant: counts, rows = true class, columns = predicted class."""
    rows = _with_matrix(results)[:MAX_PANELS]
    if not rows:
        return None
    names = list((results.get("task") or {}).get("label_names") or (results.get("data") or {}).get("label_names") or [])
    cols = min(4, len(rows))
    n_rows = -(-len(rows) // cols)
    fig = Figure(layout="constrained", figsize=(3.2 * cols, 3.0 * n_rows))
    for i, r in enumerate(rows):
        m = r["task_metrics"]["confusion_matrix"]
        ax = fig.add_subplot(n_rows, cols, i + 1)
        ax.imshow(m, cmap="Blues")
        k = len(m)
        labels = names if len(names) == k else [str(j) for j in range(k)]
        ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(k), labels, fontsize=7)
        top = max(max(row) for row in m) or 1
        for a in range(k):
            for b in range(k):
                ax.text(b, a, str(m[a][b]), ha="center", va="center", fontsize=7,
                        color="white" if m[a][b] > top / 2 else "black")
        ax.set_title(r["name"], fontsize=8)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
    return to_svg(fig, "confusion matrices")


def per_class_rows(results: dict) -> list[dict]:
    """Per variant and class: precision, recall, F1, support (classification and multi-label)."""
    out = []
    for r in measured(results):
        for label, m in ((r.get("task_metrics") or {}).get("per_class") or {}).items():
            out.append({"variant": r["name"], "label": label, **m})
    return out
