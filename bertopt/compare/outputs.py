"""The files compare writes besides results.json: results.csv, summary.md (the headline table
also printed to the terminal) and, through :mod:`bertopt.report`, the HTML report."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from .. import artifacts
from ..results import get as _get
from ..results import metric_name
from .config import EFFICIENCY_CELL

CSV_COLUMNS = [
    "name", "status", "reason", "backend", "precision", "source", "device", "threads", "batching",
    "e2e_batch_size", "e2e_mode", "e2e_streams", "size_bytes", "accuracy", "accuracy_delta", "e2e_samples_per_s", "e2e_samples_per_s_min",
    "e2e_samples_per_s_max", "speedup_vs_padded", "latency_e2e_p50_ms", "latency_e2e_p90_ms", "latency_e2e_p99_ms",
    "latency_e2e_mean_ms", "latency_model_p50_ms", "latency_model_p90_ms", "latency_model_p99_ms",
    "latency_model_mean_ms", "peak_rss_mb", "load_time_s", "cuda_max_allocated_mb", "e2e_gflops",
    "e2e_fraction_of_peak", "sweep_32x128_samples_per_s", "sweep_32x128_fraction_of_peak",
    "first_pass_vs_warm", "first_request_mean_vs_warm", "first_request_p99_vs_warm",
]


def csv_rows(results: dict) -> list[dict]:
    out = []
    for r in results.get("variants", []):
        c = next((c for c in r.get("sweep") or [] if (c["batch"], c["seq"]) == EFFICIENCY_CELL), None)
        out.append({
            "name": r["name"], "status": r["status"], "reason": r.get("reason") or "", "backend": r["backend"],
            "precision": r["precision"], "source": r["source"], "device": r["device"], "threads": r.get("threads"),
            "batching": r.get("batching"), "e2e_batch_size": _get(r, "throughput", "batch_size"),
            "e2e_mode": _get(r, "throughput", "mode", "mode"), "e2e_streams": _get(r, "throughput", "mode", "streams"),
            "size_bytes": r.get("size_bytes"), "accuracy": r.get("accuracy"), "accuracy_delta": r.get("accuracy_delta"),
            "e2e_samples_per_s": _get(r, "throughput", "samples_per_s", "median"),
            "e2e_samples_per_s_min": _get(r, "throughput", "samples_per_s", "min"),
            "e2e_samples_per_s_max": _get(r, "throughput", "samples_per_s", "max"),
            "speedup_vs_padded": r.get("speedup_vs_padded"),
            **{f"latency_{kind}_{q}_ms": _get(r, "latency", f"{kind}_ms", q)
               for kind in ("e2e", "model") for q in ("p50", "p90", "p99", "mean")},
            "peak_rss_mb": _get(r, "memory", "peak_rss_mb"), "load_time_s": _get(r, "memory", "load_time_s"),
            "cuda_max_allocated_mb": _get(r, "memory", "cuda_max_allocated_mb"),
            "e2e_gflops": _get(r, "efficiency", "e2e", "gflops"),
            "e2e_fraction_of_peak": _get(r, "efficiency", "e2e", "fraction_of_peak"),
            "sweep_32x128_samples_per_s": _get(c, "samples_per_s", "median"),
            "sweep_32x128_fraction_of_peak": _get(c, "fraction_of_peak"),
            "first_pass_vs_warm": _get(r, "first_use", "e2e_vs_warm"),
            "first_request_mean_vs_warm": _get(r, "first_use", "request_mean_vs_warm"),
            "first_request_p99_vs_warm": _get(r, "first_use", "request_p99_vs_warm"),
        })
    return out


def write_csv(results: dict, path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in csv_rows(results):
        w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    artifacts.atomic_write_text(path, buf.getvalue())


def _fmt(v, spec=".1f", none="-"):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return format(v, spec)


def _peaks_label(hardware: dict, fp32: dict) -> str:
    """'fp32 428.0, bf16 2714.3, int8 3812.9 GFLOP/s' (the CPU's per-type peaks after FP32)."""
    others = hardware.get("cpu_matmul_peaks") or {}
    parts = [f"fp32 {_fmt(fp32.get('gflops'), '.1f')}"] + [
        f"{t} {_fmt(e.get('gflops'), '.1f')}" + (" (below fp32: its rows against fp32)" if e.get("rows_measured_against") else "")
        for t, e in sorted(others.items())]
    return ", ".join(parts) + " GFLOP/s" + (" (each row against its own compute type)" if others else "")


def _mode_label(mode) -> str:
    """'2 streams' or '1 call' (the end-to-end figure's mode), '-' before schema fields existed."""
    if not mode:
        return "-"
    return f"{mode.get('streams')} streams" if mode.get("mode") == "streams" else "1 call"


def summary_table(results: dict) -> str:
    """The headline table (markdown, readable as plain text in a terminal)."""
    head = ["variant", "backend", "precision", "device", f"{metric_name(results)} % (Δ pts)", "e2e samples/s (min–max)", "e2e mode", "× padded",
            "p50 / p99 ms", "model p50 ms", "size MB", "peak RSS MB", "% peak @32×128"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    rec = (results.get("recommendation") or {}).get("variant")
    for r in results.get("variants", []):
        if r["status"] != "ok":
            continue
        tp = _get(r, "throughput", "samples_per_s")
        c = next((c for c in r.get("sweep") or [] if (c["batch"], c["seq"]) == EFFICIENCY_CELL), None)
        acc = r.get("accuracy")
        accs = "-" if acc is None else f"{100 * acc:.2f}" + (
            f" ({100 * r['accuracy_delta']:+.2f})" if r.get("accuracy_delta") is not None else "")
        name = f"**{r['name']}** ★" if r["name"] == rec else r["name"]
        lines.append("| " + " | ".join([
            name, r["backend"], r["precision"], r["device"], accs,
            "-" if not tp else f"{tp['median']:.1f} ({tp['min']:.1f}–{tp['max']:.1f})",
            _mode_label(_get(r, "throughput", "mode")),
            _fmt(r.get("speedup_vs_padded"), ".2f") + ("×" if r.get("speedup_vs_padded") else ""),
            "-" if not _get(r, "latency", "e2e_ms") else
            f"{r['latency']['e2e_ms']['p50']:.2f} / {r['latency']['e2e_ms']['p99']:.2f}",
            _fmt(_get(r, "latency", "model_ms", "p50"), ".2f"),
            _fmt(r["size_bytes"] / 2**20 if r.get("size_bytes") else None, ".1f"),
            _fmt(_get(r, "memory", "peak_rss_mb"), ".0f"),
            _fmt(100 * c["fraction_of_peak"] if c and c.get("fraction_of_peak") is not None else None, ".0f"),
        ]) + " |")
    return "\n".join(lines)


def _protocol_label(proto: dict) -> str:
    name = proto.get("name") or ("quick" if proto.get("quick") else "full")
    return {"quick": "QUICK (reduced) — ", "fast": "fast (main.py default) — "}.get(name, "full — ")


def _repeats_label(proto: dict) -> str:
    if proto.get("min_repeats"):
        return (f"{proto['min_repeats']}–{proto.get('repeats')} timed repeats (stopping once every variant's "
                f"spread is within {100 * proto['spread_tolerance']:.0f}%)")
    return f"{proto.get('repeats')} timed repeats"


def write_summary(results: dict, path: Path) -> str:
    env = results.get("environment", {})
    proto = results.get("protocol", {})
    rec = results.get("recommendation")
    parts = ["# bertopt performance summary", ""]
    parts.append(f"Recommendation (--optimize-for {results['config']['optimize_for']}, --target "
                 f"{results['config']['target']}, --accuracy-budget {results['config']['accuracy_budget']}): "
                 + (f"**{rec['variant']}** — {rec['reason']}" if rec else f"none — {results.get('recommendation_message')}"))
    refm = results.get("reference_model") or {}
    if refm.get("trained_here") is False:
        parts += ["", f"Reference (FP32 baseline): **{refm.get('name')}**, fine-tuned elsewhere (--trained), "
                      "not by bertopt."]
    parts += ["", summary_table(results), ""]
    not_run = [r for r in results.get("variants", []) if r["status"] != "ok"]
    if not_run:
        parts.append("Not measured here:")
        parts += [f"- {r['name']} ({r['status']}): {r.get('reason') or 'no reason given'}" for r in not_run]
        parts.append("")
    for w in results.get("warnings") or []:
        parts += [f"WARNING: {w}", ""]
    parts.append("Targets:")
    for t in results.get("targets", []):
        mark = {True: "met", False: "MISSED", None: "not measured"}[t.get("met")]
        m = t.get("measured")
        parts.append(f"- {t['description']}: threshold {t['threshold']:.3g}, measured "
                     f"{'-' if m is None else format(m, '.3g')} ({mark})")
    peak = results.get("hardware", {}).get("matmul_peak", {})
    parts += ["", f"Machine: {env.get('cpu')} ({env.get('cpu_count')} logical CPUs, {proto.get('threads')} threads used), "
              f"GPU {env.get('gpu') or 'none'}; torch {env.get('torch')}, onnxruntime {env.get('onnxruntime')}; "
              f"measured matmul peak {_peaks_label(results.get('hardware', {}), peak)}.",
              f"Protocol: {_protocol_label(proto)}{proto.get('warmup')} warm-up round(s), "
              f"{_repeats_label(proto)} interleaved round-robin, medians with min–max; "
              f"{results.get('data', {}).get('eval_rows')} eval texts; {proto.get('latency_requests')} single requests "
              "per variant for latency.", ""]
    text = "\n".join(parts)
    artifacts.atomic_write_text(path, text)
    return text


def _render_outputs(results: dict, reports: Path) -> list[str]:
    from ..report import render_report

    write_csv(results, reports / artifacts.RESULTS_CSV)
    write_summary(results, reports / artifacts.SUMMARY_FILE)
    render_report(artifacts.results_path(reports), reports / artifacts.REPORT_FILE)
    return list(artifacts.REPORT_FILES)
