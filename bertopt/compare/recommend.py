"""Choosing the recommended variant from measured rows: eligibility (measured, on the target,
within the accuracy budget) with a reason per row, ties within TIE_TOLERANCE broken by accuracy,
size and name; the contract entry aws_deploy reads; re-choosing from an existing results.json."""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Optional

from .config import TIE_TOLERANCE

if TYPE_CHECKING:  # pragma: no cover
    from .config import CompareConfig

log = logging.getLogger("bertopt.compare")


def _score(row: dict, optimize_for: str) -> Optional[float]:
    """Higher is better: samples/s, or minus the end-to-end p50 latency."""
    try:
        if optimize_for == "throughput":
            return float(row["throughput"]["samples_per_s"]["median"])
        return -float(row["latency"]["e2e_ms"]["p50"])
    except (KeyError, TypeError):
        return None


def recommend(rows: list[dict], baseline_accuracy: Optional[float], *, optimize_for: str = "throughput",
              target: str = "cpu", accuracy_budget: float = 0.01) -> tuple[Optional[dict], str, list[dict]]:
    """Pick the fastest variant within ``accuracy_budget`` of the FP32 baseline that runs on
    ``target``. Scores within TIE_TOLERANCE of the best count as a tie, broken by higher
    accuracy, then smaller file, then name. Returns (chosen row or None, message, eligibility
    list with a reason per row)."""
    device = "cuda" if target == "gpu" else "cpu"
    verdicts, eligible = [], []
    for row in rows:
        why = None
        if row.get("status") != "ok":
            why = f"not measured ({row.get('status')}: {row.get('reason') or 'no reason given'})"
        elif row.get("device") != device:
            why = f"runs on {row.get('device')}, target is {target}"
        elif _score(row, optimize_for) is None:
            why = f"no {optimize_for} measurement"
        elif row.get("accuracy") is None or baseline_accuracy is None:
            why = "no accuracy measurement"
        elif baseline_accuracy - row["accuracy"] > accuracy_budget + 1e-9:
            why = (f"accuracy {row['accuracy']:.4f} is {100 * (baseline_accuracy - row['accuracy']):.2f} points "
                   f"below the FP32 baseline (budget {100 * accuracy_budget:.2f})")
        verdicts.append({"variant": row["name"], "eligible": why is None, "reason": why})
        if why is None:
            eligible.append(row)
    if not eligible:
        measured = [r for r in rows if r.get("status") == "ok"]
        on_target = [r for r in measured if r.get("device") == device]
        if not measured:
            detail = "no variant could be measured"
        elif not on_target:
            detail = (f"none of the {len(measured)} measured variants runs on {target}"
                      + (" (this machine has no usable CUDA device)" if target == "gpu" else ""))
        else:
            detail = (f"all {len(on_target)} {target} variants are more than {100 * accuracy_budget:.2f} accuracy "
                      "points below the FP32 baseline or lack measurements")
        msg = (f"no variant is eligible for --target {target} within --accuracy-budget {accuracy_budget}: {detail}. "
               f"Raise --accuracy-budget, pick another --target, or run compare.py where the target hardware is.")
        return None, msg, verdicts
    best = max(_score(r, optimize_for) for r in eligible)
    tol = abs(best) * TIE_TOLERANCE
    tied = [r for r in eligible if _score(r, optimize_for) >= best - tol]
    tied.sort(key=lambda r: (-(r.get("accuracy") or 0.0), r.get("size_bytes") or math.inf, r["name"]))
    chosen = tied[0]
    if optimize_for == "throughput":
        what = f"{chosen['throughput']['samples_per_s']['median']:.1f} samples/s end to end"
    else:
        what = f"p50 latency {chosen['latency']['e2e_ms']['p50']:.2f} ms end to end"
    delta = chosen["accuracy"] - baseline_accuracy
    msg = (f"{chosen['name']}: the {'fastest' if optimize_for == 'throughput' else 'lowest-latency'} of "
           f"{len(eligible)} eligible {target} variant(s) ({what}), accuracy {100 * delta:+.2f} points vs the FP32 "
           f"baseline (budget {100 * accuracy_budget:.2f} points)")
    if len(tied) > 1:
        msg += (f"; tied within {100 * TIE_TOLERANCE:.0f}% with {', '.join(r['name'] for r in tied[1:])}, "
                "chosen by accuracy, then size")
    return chosen, msg, verdicts


def recommendation_entry(row: dict, message: str) -> dict:
    """The contract shape aws_deploy reads from results.json."""
    return {"variant": row["name"], "backend": row["backend"], "precision": row["precision"],
            "source": row["source"], "device": row["device"], "path": row.get("path"),
            "model_dir": row.get("model_dir"), "onnx_variant": row.get("variant"), "registry": row.get("registry"),
            "reason": message}


RECOMMENDATION_KEYS = ("optimize_for", "target", "accuracy_budget")


def reevaluate(results: dict, cfg: CompareConfig) -> bool:
    """--report-only with other --optimize-for/--target/--accuracy-budget values: choose again
    from the measurements already in results.json (nothing is re-measured). True if changed."""
    old = {k: (results.get("config") or {}).get(k) for k in RECOMMENDATION_KEYS}
    new = {k: getattr(cfg, k) for k in RECOMMENDATION_KEYS}
    if old == new:
        return False
    chosen, message, verdicts = recommend(results["variants"], results.get("baseline_accuracy"),
                                          optimize_for=cfg.optimize_for, target=cfg.target,
                                          accuracy_budget=cfg.accuracy_budget)
    results.setdefault("config", {}).update(new)
    results["recommendation"] = recommendation_entry(chosen, message) if chosen else None
    results["recommendation_message"] = message
    results["eligibility"] = verdicts
    from .targets import evaluate_targets

    results["targets"] = evaluate_targets(results)
    log.info("recommendation re-evaluated from the existing measurements (%s): %s",
             ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in new.items()), message)
    if chosen is None:
        log.warning("%s", message)
    return True
