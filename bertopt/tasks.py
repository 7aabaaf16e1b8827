"""Task types and labels: detection of single-label classification, multi-label and regression from
the raw label values (overridable with ``--task``), and the mapping of raw labels to model targets.

Targets per task: classification -> class ids 0..K-1; multi-label -> multi-hot 0/1 lists of length K;
regression -> floats. ``PROBLEM_TYPES`` gives the matching transformers ``problem_type``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .errors import DataError

CLASSIFICATION = "classification"
MULTI_LABEL = "multi-label"
REGRESSION = "regression"
TASKS = (CLASSIFICATION, MULTI_LABEL, REGRESSION)
PROBLEM_TYPES = {CLASSIFICATION: "single_label_classification", MULTI_LABEL: "multi_label_classification",
                 REGRESSION: "regression"}
KNOWN_LABEL_ORDERS = (("negative", "positive"), ("neg", "pos"), ("false", "true"), ("no", "yes"))


def as_int(v):
    if isinstance(v, (bool, np.bool_)):
        return None
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)) and not math.isnan(v) and float(v).is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v.strip())
    return None


def as_float(v):
    if isinstance(v, (bool, np.bool_)):
        return None
    if isinstance(v, (int, float, np.integer, np.floating)):
        return None if math.isnan(float(v)) else float(v)
    if isinstance(v, str):
        try:
            f = float(v.strip())
        except ValueError:
            return None
        return None if math.isnan(f) or math.isinf(f) else f
    return None


def as_list(v):
    """A list label (JSON list, numpy array, or a string holding a JSON list), else None."""
    if isinstance(v, (list, tuple, np.ndarray)):
        return list(v)
    if isinstance(v, str) and v.strip().startswith("["):
        try:
            parsed = json.loads(v)
        except ValueError:
            return None
        return parsed if isinstance(parsed, list) else None
    return None


def _kind(v) -> str:
    if as_list(v) is not None:
        return "list"
    if as_int(v) is not None:
        return "integer"
    if as_float(v) is not None:
        return "number"
    if isinstance(v, str) and v.strip():
        return "text"
    return "empty"


def detect_task(values: list, where: str) -> str:
    """The task the raw label values imply; mixed kinds are a DataError naming two examples."""
    kinds: dict[str, object] = {}
    for v in values:
        kinds.setdefault(_kind(v), v)
    if "empty" in kinds:
        n = sum(_kind(v) == "empty" for v in values)
        raise DataError(f"{where}: {n} label(s) are empty or missing; every row needs a label")
    if "list" in kinds:
        if len(kinds) > 1:
            other = next(k for k in kinds if k != "list")
            raise DataError(f"{where}: the label column mixes lists and single values "
                            f"(e.g. {kinds['list']!r} and {kinds[other]!r}); use one form")
        return MULTI_LABEL
    if "text" in kinds and len(kinds) > 1:
        other = next(k for k in kinds if k != "text")
        raise DataError(f"{where}: the label column has mixed types: {other} {kinds[other]!r} and "
                        f"text {kinds['text']!r}; make every label a class name or every label a number")
    if "number" in kinds:
        return REGRESSION
    return CLASSIFICATION


def map_labels(split_labels: dict[str, list], where: str, task: Optional[str] = None,
               names: Optional[list[str]] = None) -> tuple[dict[str, list], list[str], str]:
    """Map raw labels of every split to model targets; returns (targets per split, label names, task).

    ``names`` (several 0/1 label columns) fixes the multi-label names in column order."""
    all_values = [v for labels in split_labels.values() for v in labels]
    if not all_values:
        raise DataError(f"{where}: no labels")
    detected = detect_task(all_values, where)
    task = task or detected
    if task == REGRESSION:
        return _regression(split_labels, where), ["score"], task
    if task == MULTI_LABEL:
        ids, names = _multi_label(split_labels, where, names)
        return ids, names, task
    if detected == MULTI_LABEL:
        raise DataError(f"{where}: the labels are lists, so the task is multi-label (not --task {task})")
    if detected == REGRESSION:
        bad = next(v for v in all_values if _kind(v) == "number")
        raise DataError(f"{where}: --task classification needs integer or named labels; found {bad!r} "
                        "(real-valued labels mean --task regression)")
    ids, names = _single_label(split_labels, where)
    return ids, names, task


def _regression(split_labels, where) -> dict[str, list[float]]:
    out = {}
    for split, labels in split_labels.items():
        values = [as_float(v) for v in labels]
        if any(v is None for v in values):
            bad = next(v for v, f in zip(labels, values) if f is None)
            raise DataError(f"{where}: regression labels must be numbers; cannot read {bad!r} in {split}")
        out[split] = values
    return out


def _multi_label(split_labels, where, names) -> tuple[dict[str, list[list[int]]], list[str]]:
    """Multi-hot vectors from equal-length 0/1 lists, or from lists of label names/ids."""
    lists = {s: [as_list(v) if as_list(v) is not None else [v] for v in labels]
             for s, labels in split_labels.items()}
    flat = [row for rows in lists.values() for row in rows]
    widths = {len(r) for r in flat}
    multi_hot = names is not None or (len(widths) == 1 and all(as_int(x) in (0, 1) for r in flat for x in r)
                                      and widths.pop() > 2)
    if multi_hot:
        width = len(names) if names is not None else len(flat[0])
        out = {}
        for split, rows in lists.items():
            for i, r in enumerate(rows):
                if len(r) != width or any(as_int(x) not in (0, 1) for x in r):
                    raise DataError(f"{where}: {split} row {i + 1}: multi-hot label {r!r} is not {width} "
                                    "values of 0/1 like the others")
            out[split] = [[as_int(x) for x in r] for r in rows]
        return out, list(names) if names is not None else [str(i) for i in range(width)]
    train_names = sorted({str(x).strip() for r in lists["train"] for x in r}, key=str.lower)
    index = {n: i for i, n in enumerate(train_names)}
    out = {}
    for split, rows in lists.items():
        vectors = []
        for i, r in enumerate(rows):
            unknown = [str(x).strip() for x in r if str(x).strip() not in index]
            if unknown:
                raise DataError(f"{where}: {split} row {i + 1} has label {unknown[0]!r}, which no train row has "
                                f"(train labels: {', '.join(train_names[:20])})")
            vec = [0] * len(train_names)
            for x in r:
                vec[index[str(x).strip()]] = 1
            vectors.append(vec)
        out[split] = vectors
    if len(train_names) < 2:
        raise DataError(f"{where}: multi-label data needs at least two labels; found {train_names}")
    return out, train_names


def _single_label(split_labels: dict[str, list], where: str) -> tuple[dict[str, list[int]], list[str]]:
    """Class ids 0..K-1 from integers or class names (names in a known or alphabetical order)."""
    all_values = [v for labels in split_labels.values() for v in labels]
    ints = [as_int(v) for v in all_values]
    if all(i is not None for i in ints):
        values = sorted(set(ints))
        if values[0] < 0:
            raise DataError(f"{where}: labels must be integers 0..K-1; found {values[0]} "
                            "(unlabelled rows such as GLUE test sets use -1: drop them)")
        k = values[-1] + 1
        missing = sorted(set(range(k)) - set(values))
        if missing and len(values) < 2:
            raise DataError(f"{where}: only one label value ({values[0]}) found; need at least two classes")
        if missing:
            raise DataError(f"{where}: labels must be integers 0..K-1 with every class present; "
                            f"missing {missing} among 0..{k - 1}")
        names = [str(i) for i in range(k)]
        if k == 2:
            names = ["negative", "positive"]
        return {s: [as_int(v) for v in labels] for s, labels in split_labels.items()}, names
    bad = [v for v in all_values if not isinstance(v, str) or not v.strip()]
    if bad:
        raise DataError(f"{where}: labels must be integers 0..K-1 or class names; "
                        f"cannot map {bad[0]!r} ({len(bad)} such value(s))")
    names = sorted({v.strip() for v in all_values}, key=str.lower)
    lowered = [n.lower() for n in names]
    for order in KNOWN_LABEL_ORDERS:
        if sorted(lowered) == sorted(order):
            names = [names[lowered.index(o)] for o in order]
            break
    if len(names) < 2:
        raise DataError(f"{where}: only one label value ({names[0]!r}) found; need at least two classes")
    index = {n: i for i, n in enumerate(names)}
    return {s: [index[v.strip()] for v in labels] for s, labels in split_labels.items()}, names


@dataclass
class TaskSpec:
    """What training and evaluation need to know about the task (stored in the manifest)."""

    task: str = CLASSIFICATION
    label_names: list = field(default_factory=list)
    metric: str = "accuracy"
    threshold: Optional[float] = None  # multi-label; None = tuned on the eval split
    class_weights: Optional[list] = None  # cross-entropy weights per class
    why: str = ""  # why this metric (printed at start; not stored)

    @property
    def plain(self) -> bool:
        """Single-label classification scored by accuracy without class weights: today's path."""
        return self.task == CLASSIFICATION and self.metric == "accuracy" and not self.class_weights

    def to_dict(self) -> dict:
        return {"task": self.task, "label_names": list(self.label_names), "metric": self.metric,
                "threshold": self.threshold, "class_weights": self.class_weights}


def spec_from_record(record: Optional[dict], label_names=()) -> TaskSpec:
    """The TaskSpec a training manifest's ``data`` record stores (older manifests: plain accuracy;
    ``label_names`` where the record has none)."""
    r = record or {}
    names = list(r.get("label_names") or label_names)
    return TaskSpec(r.get("task") or CLASSIFICATION, names, r.get("metric") or "accuracy",
                    r.get("threshold"), r.get("class_weights"))


def class_weights(setting, train_labels, num_labels: int, task: str) -> Optional[list]:
    """--class-weights: None (none), inverse class frequency (auto, mean 1), or the given list."""
    text = str(setting).lower()
    if text == "none":
        return None
    if task != CLASSIFICATION:
        raise DataError(f"--class-weights applies to single-label classification, not {task}")
    if text == "auto":
        counts = np.bincount(np.asarray(train_labels), minlength=num_labels).astype(float)
        w = counts.sum() / (num_labels * np.maximum(counts, 1))
        return [round(float(x), 4) for x in w]
    values = [float(v) for v in text.split(",")]
    if len(values) != num_labels:
        raise DataError(f"--class-weights {setting}: {len(values)} weight(s) for {num_labels} classes")
    return values


def task_loss(spec):
    """``loss_fn(logits, labels, inputs)`` for a task: cross-entropy (optionally class-weighted),
    BCE-with-logits for multi-label, MSE for regression. None for the plain path (unweighted CE)."""
    import torch

    if spec is None or (spec.task == CLASSIFICATION and not spec.class_weights):
        return None
    if spec.task == MULTI_LABEL:
        return lambda logits, y, inputs=None: torch.nn.functional.binary_cross_entropy_with_logits(logits, y.float())
    if spec.task == REGRESSION:
        return lambda logits, y, inputs=None: torch.nn.functional.mse_loss(logits.view(-1), y.float().view(-1))
    weight = torch.tensor(spec.class_weights, dtype=torch.float32)
    return lambda logits, y, inputs=None: torch.nn.functional.cross_entropy(logits, y, weight=weight.to(logits.device))


def aggregate(logits: np.ndarray, owners: Optional[list], task: str) -> np.ndarray:
    """One row per text from chunk windows' logits: mean, or max for multi-label."""
    if owners is None:
        return logits
    owners = np.asarray(owners)
    n = int(owners.max()) + 1
    out = np.zeros((n, logits.shape[1]), dtype=np.float64)
    if task == MULTI_LABEL:
        out[:] = -np.inf
        np.maximum.at(out, owners, logits)
        return out
    np.add.at(out, owners, logits)
    return out / np.bincount(owners, minlength=n)[:, None]
