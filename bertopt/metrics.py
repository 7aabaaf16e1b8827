"""Task metrics (scikit-learn / scipy) and the choice of the metric that selects the best epoch,
gates quantized variants and ranks the recommendation.

Defaults follow the GLUE convention: Pearson for regression, micro-F1 for multi-label, F1 (of the
positive class) for an imbalanced binary pair task (MRPC-like), Matthews correlation for an
imbalanced binary single-text task (CoLA-like), accuracy otherwise (SST-2, K-class)."""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import numpy as np

from . import tasks
from .tasks import aggregate  # noqa: F401  (chunk windows -> texts; used here and by callers)
from .errors import ConfigError

METRICS = {tasks.CLASSIFICATION: ("accuracy", "f1", "macro_f1", "mcc"),
           tasks.MULTI_LABEL: ("micro_f1", "macro_f1", "subset_accuracy"),
           tasks.REGRESSION: ("pearson", "spearman", "neg_mse")}
IMBALANCE = 0.6  # majority-class share from which accuracy stops being the default
THRESHOLDS = np.round(np.arange(0.05, 0.96, 0.05), 2)


def default_metric(task: str, train_labels: Sequence, num_labels: int, is_pair: bool) -> tuple[str, str]:
    """(metric, why) for a task by the GLUE convention."""
    if task == tasks.REGRESSION:
        return "pearson", "regression"
    if task == tasks.MULTI_LABEL:
        return "micro_f1", "multi-label"
    if num_labels == 2 and len(train_labels):
        share = float(np.mean(np.asarray(train_labels) == 1))
        majority = max(share, 1 - share)
        if majority >= IMBALANCE:
            kind = "pair" if is_pair else "single-text"
            return ("f1" if is_pair else "mcc"), (f"imbalanced binary {kind} task "
                                                  f"({100 * majority:.0f}% majority class)")
        return "accuracy", f"balanced binary task ({100 * majority:.0f}% majority class)"
    return "accuracy", f"{num_labels}-class task"


def resolve_metric(requested: Optional[str], task: str, train_labels, num_labels: int, is_pair: bool):
    if requested:
        if requested not in METRICS[task]:
            raise ConfigError(f"--metric {requested} does not apply to a {task} task; "
                              f"use one of {', '.join(METRICS[task])}")
        return requested, "--metric"
    return default_metric(task, train_labels, num_labels, is_pair)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def classification(y_true, logits, label_names) -> dict:
    from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score, matthews_corrcoef,
                                 precision_recall_fscore_support)

    y_true = np.asarray(y_true)
    pred = np.asarray(logits).argmax(-1)
    labels = list(range(len(label_names)))
    p, r, f, s = precision_recall_fscore_support(y_true, pred, labels=labels, zero_division=0)
    out = {"accuracy": float(accuracy_score(y_true, pred)),
           "macro_f1": float(f1_score(y_true, pred, labels=labels, average="macro", zero_division=0)),
           "mcc": float(matthews_corrcoef(y_true, pred)),
           "per_class": {n: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                             "support": int(s[i])} for i, n in enumerate(label_names)},
           "confusion_matrix": confusion_matrix(y_true, pred, labels=labels).tolist(),
           "predictions": pred.tolist()}
    if len(label_names) == 2:
        out["f1"] = float(f[1])
    return out


def multi_label(y_true, logits, label_names, threshold: Optional[float] = None) -> dict:
    """Micro/macro F1 at ``threshold``; None = the threshold that maximizes micro-F1 on these rows."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    y_true = np.asarray(y_true, dtype=int)
    probs = sigmoid(logits)
    tuned = threshold is None
    if tuned:
        scores = [f1_score(y_true, (probs >= t).astype(int), average="micro", zero_division=0) for t in THRESHOLDS]
        threshold = float(THRESHOLDS[int(np.argmax(scores))])
    pred = (probs >= threshold).astype(int)
    p, r, f, s = precision_recall_fscore_support(y_true, pred, zero_division=0)
    return {"micro_f1": float(f1_score(y_true, pred, average="micro", zero_division=0)),
            "macro_f1": float(f1_score(y_true, pred, average="macro", zero_division=0)),
            "subset_accuracy": float(accuracy_score(y_true, pred)),
            "threshold": threshold, "threshold_tuned": tuned,
            "per_class": {n: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                              "support": int(s[i])} for i, n in enumerate(label_names)},
            "predictions": pred.tolist()}


def regression(y_true, logits) -> dict:
    from scipy.stats import pearsonr, spearmanr

    y_true = np.asarray(y_true, dtype=np.float64)
    pred = np.asarray(logits, dtype=np.float64).reshape(len(y_true), -1)[:, 0]
    constant = np.ptp(pred) == 0 or np.ptp(y_true) == 0
    return {"pearson": float("nan") if constant else float(pearsonr(y_true, pred)[0]),
            "spearman": float("nan") if constant else float(spearmanr(y_true, pred)[0]),
            "neg_mse": -float(np.mean((pred - y_true) ** 2)),
            "predictions": pred.tolist()}


def compute(task: str, y_true, logits, label_names, threshold: Optional[float] = None) -> dict:
    """Every metric of ``task`` for per-text logits (already aggregated over chunk windows)."""
    if task == tasks.REGRESSION:
        return regression(y_true, logits)
    if task == tasks.MULTI_LABEL:
        return multi_label(y_true, logits, label_names, threshold)
    return classification(y_true, logits, label_names)


def score_all(spec, logits: np.ndarray, labels: np.ndarray, owners: Optional[Sequence[int]] = None) -> dict:
    """Every metric of ``spec.task`` for logits in dataset order (chunk windows, named by ``owners``,
    aggregated per text; a text's label is its first window's)."""
    per_text = aggregate(np.asarray(logits), owners, spec.task)
    y = np.asarray(labels)
    if owners is not None:
        first = {}
        for w, o in enumerate(owners):
            first.setdefault(int(o), w)
        y = y[[first[o] for o in range(len(first))]]
    return compute(spec.task, y, per_text, spec.label_names, spec.threshold)


def score(spec, logits: np.ndarray, labels: np.ndarray, owners: Optional[Sequence[int]] = None) -> float:
    """The selected metric (``spec.metric``); a plain spec (or None) is argmax accuracy, as always."""
    if spec is None or (spec.plain and owners is None):
        preds = np.asarray(logits).argmax(-1)
        return float((preds == np.asarray(labels)).mean()) if len(labels) else float("nan")
    return float(score_all(spec, logits, labels, owners)[spec.metric])


def _collect(model, loader, device, plan, desc):
    """Logits, labels and dataset indices of a whole loader (CPU tensors)."""
    import torch

    from .logs import progress
    from .training import _to_device

    model.eval()
    logits, labels, index = [], [], []
    ctx = plan.autocast if plan else contextlib.nullcontext
    with torch.inference_mode():
        for batch in progress(loader, desc=desc, unit="batch"):
            with ctx():
                logits.append(model(**_to_device(batch, device, non_blocking=True)).logits.float().cpu())
            labels.append(batch["labels"])
            index.append(batch["index"])
    return torch.cat(logits), torch.cat(labels), torch.cat(index)


def evaluate_task(model, loader, device, spec, plan=None, desc: str = "eval") -> dict:
    """The task's metrics over a loader (chunk windows aggregated per text); ``metric`` holds the
    selected one. Keys ``accuracy``/``loss``/``n``/``predictions`` as :func:`evaluate`."""
    import torch

    logits, labels, index = _collect(model, loader, device, plan, desc)
    order = torch.argsort(index)
    logits, labels = logits[order], labels[order]
    loss_fn = tasks.task_loss(spec) or (lambda lg, y, inputs=None: torch.nn.functional.cross_entropy(lg, y))
    loss = float(loss_fn(logits, labels)) if len(labels) else float("nan")
    owners = getattr(loader.dataset, "owners", None)
    out = score_all(spec, logits.numpy(), labels.numpy(), owners)
    out.update(loss=loss, n=len(set(owners)) if owners is not None else int(len(labels)), metric=out[spec.metric], metric_name=spec.metric)
    out.setdefault("accuracy", out.get("subset_accuracy"))  # multi-label: exact match; regression: None
    return out
