"""The issue's four performance targets, computed from results.json content only."""
from __future__ import annotations

from .config import BASELINE_ROW, EFFICIENCY_CELL, LATENCY_CELL, REFERENCE
from .recommend import recommend


def evaluate_targets(results: dict) -> list[dict]:
    """The issue's four performance targets, computed from results.json content."""
    rows = {r["name"]: r for r in results.get("variants", [])}

    def cell(name, b, s):
        for c in (rows.get(name) or {}).get("sweep") or []:
            if c["batch"] == b and c["seq"] == s:
                return c
        return None

    out = []
    rec = results.get("recommendation")
    ref = rows.get(REFERENCE)
    t = {"id": "e2e_speedup", "description": "recommended CPU variant, end-to-end eval-set throughput vs "
         "torch-fp32-padded, within 1 accuracy point of the FP32 baseline", "threshold": 8.0, "measured": None,
         "met": None}
    cpu_rec = rows.get(rec["variant"]) if rec and rec.get("device") == "cpu" else None
    if cpu_rec is None:  # recommendation was for another target: use the best CPU variant in budget
        pick, _, _ = recommend(list(rows.values()), results.get("baseline_accuracy"), target="cpu",
                               accuracy_budget=0.01)
        cpu_rec = pick
    if cpu_rec and ref and ref.get("throughput") and cpu_rec.get("throughput"):
        sp = cpu_rec["throughput"]["samples_per_s"]["median"] / ref["throughput"]["samples_per_s"]["median"]
        delta = cpu_rec.get("accuracy_delta")
        t.update(measured=sp, variant=cpu_rec["name"], accuracy_delta=delta,
                 met=bool(sp >= 8.0 and delta is not None and delta >= -0.01 - 1e-9))
    out.append(t)

    t = {"id": "ort_fp32_latency", "description": "best ONNX Runtime FP32 variant, p50 model latency at batch 1 x "
         "128 tokens, as a fraction of PyTorch eager (target <= 1/3)", "threshold": 1 / 3, "measured": None,
         "met": None}
    eager = cell(BASELINE_ROW, *LATENCY_CELL)
    ort = [(c["p50_ms"], n) for n in ("ort-fp32", "ort-opt") if (c := cell(n, *LATENCY_CELL))]
    if eager and ort:
        best_ms, best_name = min(ort)
        t.update(measured=best_ms / eager["p50_ms"], variant=best_name, eager_p50_ms=eager["p50_ms"],
                 variant_p50_ms=best_ms, candidates={n: ms for ms, n in ort},
                 met=bool(best_ms / eager["p50_ms"] <= 1 / 3))
    out.append(t)

    t = {"id": "int8_speedup", "description": "ort-int8 throughput vs ort-opt at batch 32 x 128 tokens",
         "threshold": 1.2, "measured": None, "met": None}
    a, b = cell("ort-int8", *EFFICIENCY_CELL), cell("ort-opt", *EFFICIENCY_CELL)
    if a and b:
        r = a["samples_per_s"]["median"] / b["samples_per_s"]["median"]
        t.update(measured=r, met=bool(r >= 1.2))
    out.append(t)

    t = {"id": "opt_efficiency", "description": "ort-opt at batch 32 x 128 tokens: achieved FLOP/s as a "
         "fraction of this machine's measured FP32 matmul peak", "threshold": 0.70, "measured": None, "met": None}
    c = cell("ort-opt", *EFFICIENCY_CELL)
    if c and c.get("fraction_of_peak") is not None:
        t.update(measured=c["fraction_of_peak"], gflops=c["gflops"], met=bool(c["fraction_of_peak"] >= 0.70))
    out.append(t)
    return out
