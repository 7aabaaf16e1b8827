"""The schema of ``reports/results.json``: its version, the keys every file and every variant row
holds, validation, loading and (atomic) saving. compare writes it; the report, summary/CSV
writers, aws packaging and the deploy read it through here, and :func:`get` is the one nested-key
getter they share.

Version history: 1 = the original layout; 2 adds ``protocol.name`` (full | fast | quick), the
protocol's adaptive-repeat facts, ``variants[].registry`` (the bertopt.variants entry) and
``recommendation.registry``; 3 adds ``task`` (task, metric, label_names, pairs, long_text) and
``variants[].task_metrics`` (per-class metrics and the confusion matrix, or the multi-label /
regression figures); from 3 on every ``accuracy`` / ``accuracy_delta`` / ``baseline_accuracy`` figure
holds ``task.metric`` (accuracy for a plain classifier, as before). Versions 1 and 2 still load (the
new keys are optional to readers: :func:`metric_name` says "accuracy" for them). Optional keys
added within 3: ``hardware.cpu_matmul_peaks`` (the CPU's matmul peak per non-fp32 compute type,
which that type's rows' ``fraction_of_peak`` divides by; a type measured slower than fp32 holds
``rows_measured_against: "fp32"`` and its rows divide by the fp32 peak) and ``variants[].first_use`` (a row's first
pass over the eval set and first sight of each request, against the warm figures, with ``note``),
``variants[].throughput.mode`` (``mode``: "one call" at a time or "streams", ``streams``: N, both
modes' median pass seconds and ``same_predictions``) and ``protocol.streams`` (N, how it was chosen,
the rows with a throughput mode and why the others have none),
``reference_model`` (which model is the FP32 reference: ``name``, ``trained_here``; for a ``--trained``
model fine-tuned elsewhere also ``kind``, ``path``, ``revision``, ``files``) and, on the reference rows of
such a model, ``variants[].reference_model`` / ``trained_elsewhere``, and ``compression_search``
(prune.py --auto's search.json: ``split``, ``metric``, ``unpruned_search_metric``, ``budget``, ``unpruned`` {shape, forward_ms, parameters}, ``tried`` =
[{shape, layers, heads, ffn, parameters, forward_ms, speedup, metric, drop, within_budget, time_s}],
``chosen`` (a shape label or null), ``search_time_s``; the metric is on the search split carved from
train, not the eval split the variants' figures use; speeds are one forward on the host that ran the
search).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from .errors import MissingArtifact, PipelineError

SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
FILE_NAME = "results.json"

TOP_LEVEL = {
    "schema_version": int, "created": str, "config": dict, "environment": dict, "protocol": dict,
    "data": dict, "hardware": dict, "variants": list, "recommendation_message": str, "targets": list,
}
ROW = {"name": str, "status": str, "backend": str, "precision": str, "source": str, "device": str}
STATUSES = ("ok", "skipped", "rejected", "failed", "missing")
RECOMMENDATION = ("variant", "backend", "precision", "source", "device", "path", "model_dir", "onnx_variant",
                  "reason")


class ResultsError(PipelineError):
    """results.json exists but does not follow the schema (the message lists what is wrong)."""


def get(d: Any, *keys, default=None):
    """``d[k1][k2]...`` or ``default`` where a level is missing, None or not a mapping."""
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return default
        d = d[k]
    return d


def metric_name(results: dict) -> str:
    """What the accuracy columns hold: the task metric (accuracy before schema 3)."""
    return get(results, "task", "metric", default="accuracy")


def problems(results: Any) -> list[str]:
    """Everything that does not follow the schema (empty = valid)."""
    if not isinstance(results, dict):
        return ["the top level is not a JSON object"]
    out = []
    version = results.get("schema_version")
    if version not in READABLE_VERSIONS:
        out.append(f"schema_version {version!r} is not one this checkout reads ({', '.join(map(str, READABLE_VERSIONS))})")
    for key, kind in TOP_LEVEL.items():
        if not isinstance(results.get(key), kind):
            out.append(f"{key}: expected {kind.__name__}, got {type(results.get(key)).__name__}")
    for i, row in enumerate(results.get("variants") or []):
        if not isinstance(row, dict):
            out.append(f"variants[{i}]: not an object")
            continue
        for key, kind in ROW.items():
            if not isinstance(row.get(key), kind):
                out.append(f"variants[{i}].{key}: expected {kind.__name__}")
        if row.get("status") not in STATUSES:
            out.append(f"variants[{i}].status {row.get('status')!r} is not one of {', '.join(STATUSES)}")
    search = results.get("compression_search")
    if search is not None and not (isinstance(search, dict) and isinstance(search.get("tried"), list)
                                   and all(isinstance(t, dict) and {"shape", "forward_ms", "metric"} <= set(t)
                                           for t in search["tried"])):
        out.append("compression_search: expected an object whose tried list holds {shape, forward_ms, metric}")
    rec = results.get("recommendation")
    if rec is not None:
        missing = [k for k in RECOMMENDATION if k not in (rec if isinstance(rec, dict) else {})]
        if missing:
            out.append(f"recommendation lacks {', '.join(missing)}")
        elif rec["variant"] not in {r.get("name") for r in results.get("variants") or [] if isinstance(r, dict)}:
            out.append(f"recommendation names {rec['variant']!r}, which is not a variant row")
    return out


def validate(results: Any, where: str = FILE_NAME) -> dict:
    found = problems(results)
    if found:
        raise ResultsError(f"{where} does not follow the results schema: {'; '.join(found[:5])}"
                           + (f" (+{len(found) - 5} more)" if len(found) > 5 else "")
                           + " (re-create it with `python compare.py --force`)")
    return results


def path_in(reports_dir: str | os.PathLike) -> Path:
    return Path(reports_dir) / FILE_NAME


def load(path: str | os.PathLike, command: str = "python compare.py") -> dict:
    """The validated content of a results.json; MissingArtifact (naming ``command``) when absent."""
    path = Path(path)
    if not path.is_file():
        raise MissingArtifact(path, command)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ResultsError(f"cannot read {path}: {exc} (re-create it with `python compare.py --force`)") from None
    return validate(data, str(path))


def save(path: str | os.PathLike, results: dict) -> None:
    """Validate, then write atomically (temp file + rename)."""
    from . import artifacts

    artifacts.atomic_write_json(path, validate(results, str(path)))


def row(results: dict, name: str) -> Optional[dict]:
    return next((r for r in results.get("variants") or [] if r.get("name") == name), None)


def recommended_row(results: dict) -> Optional[dict]:
    rec = results.get("recommendation")
    return row(results, rec["variant"]) if rec else None
