"""Turning one measurement's phase results into results.json: the row of every variant (measured or
with its reason), accuracy deltas and speed-ups, the environment, the protocol facts and the
recommendation. Pure assembly: nothing here is timed."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from .. import artifacts
from .. import benchmarking as bm
from .. import gpu_measure as gm
from .. import results as results_mod
from .config import (BASELINE_ROW, EFFICIENCY_CELL, FIRST_USE_RATIO, PADDED_BATCH, PADDED_LENGTH, REFERENCE,
                     usable_cores)
from .discover import reference_model
from .recommend import recommend, recommendation_entry
from .targets import evaluate_targets

if TYPE_CHECKING:  # pragma: no cover
    from .measure import EndToEnd, Opened, Peak, Phases, Setup, Sweep

log = logging.getLogger("bertopt.compare")


def _training_summary(manifests: dict) -> dict:
    out = {}
    for stage in artifacts.TRAINED_STAGES:
        m = manifests.get(stage)
        if m is None:
            continue
        met = m.get("metrics") or {}
        keys = ("precision", "device", "train_time_s", "train_samples", "samples_per_s", "peak_memory_mb",
                "peak_memory_kind", "best_eval_accuracy", "final_eval_accuracy", "best_epoch", "epochs",
                "loss_curve", "train_rows", "eval_rows", "parameters", "trainable_parameters", "skipped_steps",
                "eval_curve", "best_step", "stopped_early", "resumed_from", "trained_here")
        out[stage] = {"status": m.get("status"), "reason": m.get("reason"), **{k: met.get(k) for k in keys}}
    return out


def _loadavg() -> Optional[list]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not available
        return None


BUSY_SHARE = 0.10  # other processes using more than this share of the CPU make timings suspect


def busy_warnings(others_share: Optional[float], cores: int) -> list[str]:
    """A warning when other processes competed for the CPU during the measurement: threads of a
    multi-threaded kernel then wait on descheduled siblings, and the timings say more about the
    neighbours than about the variants."""
    if others_share is not None and others_share > BUSY_SHARE:
        return [f"the machine was busy during the measurement: other processes used {100 * others_share:.0f}% of "
                f"the CPU time of {cores} core(s); timings are inflated and noisier than on an idle machine, "
                "re-run compare.py on an idle machine before quoting them"]
    return []


def _rescale_cpu_efficiency(o: Opened, peak: Peak, sweep: Sweep) -> None:
    """CPU efficiencies against the FP32 peak (fp32 rows, and rows of a type slower than fp32 here)
    taken against the higher of the two FP32 peak measurements."""
    fp32_rows = {"fp32", *peak.cpu_types_below_fp32()}
    if peak.after and peak.after["gflops"] > peak.before["gflops"]:
        for v in o.live:
            if v.device == "cpu" and v.name in sweep.cells and gm.compute_type(v.precision) in fp32_rows:
                for c in sweep.cells[v.name]:
                    c["fraction_of_peak"] = c["gflops"] / peak.cpu_gflops


def first_use(first_s: Optional[float], times, lat) -> Optional[dict]:
    """A fresh process's first pass over the eval set and first sight of each request, against the
    warm figures of the table (None for the padded reference, whose shapes never change)."""
    if first_s is None:
        return None
    out = {"e2e_pass_s": first_s, "e2e_vs_warm": first_s / float(np.median(times))}
    if lat.first and lat.e2e:
        req, warm = bm.percentiles(lat.first, scale=1000), bm.percentiles(lat.e2e, scale=1000)
        out.update(request_ms=req, request_mean_vs_warm=req["mean"] / warm["mean"],
                   request_p99_vs_warm=req["p99"] / warm["p99"])
    return out


def first_use_note(row: dict) -> Optional[str]:
    """One sentence when a row's first use is much slower than its warm figures, else None (kept in
    the row as ``first_use.note``: the report and the recommendation show it). Judged on the first
    pass and the mean first request: a p99 of 200 requests is one or two of them, and ONNX Runtime
    rows' first-request p99 alone varied 1.0-2.1x warm where their means stayed within 1.1x."""
    f = row.get("first_use") or {}
    ratio = max(f.get("e2e_vs_warm") or 0, f.get("request_mean_vs_warm") or 0)
    if ratio < FIRST_USE_RATIO:
        return None
    req = f.get("request_ms") or {}
    requests = (f", and its first sight of each request took {req['mean']:.1f} ms on average, "
                f"{f['request_mean_vs_warm']:.1f}x warm (p99 {req['p99']:.1f} ms)" if req else "")
    return (f"{row['name']}: a fresh process's first pass over the eval set took {f['e2e_pass_s']:.2f} s, "
            f"{f['e2e_vs_warm']:.1f}x a warm pass" + requests
            + " (a new input shape costs extra on first use; the table is warm): warm it up on the input "
              "shapes it will serve" + ("; the endpoint handler does so for every batch-1 length at load"
                                        if row.get("backend") == "openvino" else ""))


def _measured(s: Setup, o: Opened, v, peak: Peak, sweep: Sweep, e2e: EndToEnd, lat, single: dict,
              memory: dict) -> dict:
    """The measured part of one row."""
    y, t = e2e.predictions[v.name], e2e.times[v.name]
    bsz, why = e2e.batch[v.name]
    padded = v.batching == "padded"
    by_batching = {f"batch_{bsz}": s.score(y)}  # the task metric; accuracy for a plain classifier
    if v.name in single:
        by_batching["batch_1"] = s.score(single[v.name])
    row = {"accuracy": min(by_batching.values()),  # the worst case is what a deployment can promise
           "accuracy_by_batching": by_batching, "predictions_consistent": e2e.consistent.get(v.name, True),
           "task_metrics": _task_metrics(s, y)}
    row["throughput"] = {"samples_per_s": bm.spread(bm.rates(len(s.texts), t)), "seconds": bm.spread(t),
                         "batch_size": bsz, "batch_size_reason": why, "texts": len(s.texts),
                         "real_tokens": int(sum(s.lengths)),
                         "batching": (f"data order, padded to {PADDED_LENGTH}" if padded
                                      else "length-sorted batches, dynamic padding"),
                         "mode": e2e.modes.get(v.name, {"mode": "one call", "streams": 1})}
    if padded:
        row["throughput"]["padded_tokens"] = len(s.texts) * PADDED_LENGTH
    row["latency"] = {"e2e_ms": bm.percentiles(lat.e2e, scale=1000), "model_ms": bm.percentiles(lat.model, scale=1000),
                      "round_p50_ms": bm.spread(lat.round_p50, 1000, keep_values=False), "requests": len(lat.e2e),
                      "padded_to": PADDED_LENGTH if padded else None}
    row["first_use"] = first_use(e2e.first_pass_s.get(v.name), t, lat)
    if row["first_use"]:
        row["first_use"]["note"] = first_use_note({"name": v.name, "backend": v.backend, **row})
    row["sweep"] = sweep.cells.get(v.name)
    if padded:
        row["sweep_note"] = f"model-only sweep is the same model as {BASELINE_ROW}"
    mem = memory.get(v.name)
    row["memory"] = mem
    if mem is None and s.proto.get("memory_only_eligible") and not s.cfg.skip_memory:
        row["memory_note"] = f"not probed: the {s.proto['name']} protocol probes only recommendable variants"
    row["load_time_s"] = (mem or {}).get("load_time_s", o.load_s.get(v.name))
    row["load_time_in_process_s"] = o.load_s.get(v.name)
    eff = {"e2e": bm.efficiency(bm.forward_flops(s.configs[v.source], s.lengths), float(np.median(t)),
                                peak.flops_for(v, peak.cpu_gflops))}
    cell = next((c for c in sweep.cells.get(v.name) or [] if (c["batch"], c["seq"]) == EFFICIENCY_CELL), None)
    if cell:
        eff["sweep_32x128"] = {"gflops": cell["gflops"], "fraction_of_peak": cell["fraction_of_peak"]}
    row["efficiency"] = eff
    return row


def assemble_rows(s: Setup, o: Opened, peak: Peak, sweep: Sweep, e2e: EndToEnd, lat_tasks: dict, single: dict,
                  memory: dict) -> list[dict]:
    """Every row of results.json, measured or with its reason, plus accuracy deltas and speed-ups."""
    rows = []
    for v in s.rows:
        row = {"name": v.name, "status": v.status, "reason": v.reason, "backend": v.backend,
               "precision": v.precision, "source": v.source, "device": v.device, "kind": v.kind,
               "registry": v.registry, "path": v.path, "model_dir": v.model_dir, "variant": v.variant,
               "batching": v.batching, "size_bytes": v.size_bytes, "threads": s.threads if v.device == "cpu" else None,
               **v.extra, "accuracy": None, "accuracy_delta": None, "throughput": None, "latency": None,
               "sweep": None, "memory": None, "efficiency": None, "speedup_vs_padded": None, "speedup_vs_fp32": None}
        if v.status == "ok":
            row.update(_measured(s, o, v, peak, sweep, e2e, lat_tasks[v.name], single, memory))
        rows.append(row)
    by_name = {r["name"]: r for r in rows}
    base_row, ref = by_name.get(BASELINE_ROW), by_name.get(REFERENCE)
    baseline_acc = _baseline_accuracy(s, by_name)
    for r in rows:
        if r["accuracy"] is not None and baseline_acc is not None:
            r["accuracy_delta"] = r["accuracy"] - baseline_acc
        if r["throughput"]:
            mine = r["throughput"]["samples_per_s"]["median"]
            if ref and ref.get("throughput"):
                r["speedup_vs_padded"] = mine / ref["throughput"]["samples_per_s"]["median"]
            if base_row and base_row.get("throughput"):
                r["speedup_vs_fp32"] = mine / base_row["throughput"]["samples_per_s"]["median"]
    return rows


def _task_entry(s: Setup) -> dict:
    spec = s.spec
    return {"task": spec.task, "metric": spec.metric, "label_names": list(s.splits.label_names),
            "pairs": s.pairs is not None, "long_text": s.long_text, "stride": s.stride}


def _task_metrics(s: Setup, y: np.ndarray) -> Optional[dict]:
    """Per-class precision/recall/F1 and the confusion matrix (classification), micro/macro F1
    (multi-label) or Pearson/Spearman (regression) of one row's end-to-end output."""
    from .. import metrics

    if s.spec is None or not len(s.labels):
        return None
    scores = y if y.ndim == 2 else np.eye(max(len(s.spec.label_names), int(y.max()) + 1))[y]
    out = metrics.score_all(s.spec, scores, s.labels)
    return {k: v for k, v in out.items() if k != "predictions"}


def _baseline_accuracy(s: Setup, by_name: dict) -> Optional[float]:
    base_row = by_name.get(BASELINE_ROW)
    if base_row and base_row["accuracy"] is not None:
        return base_row["accuracy"]
    trained = s.manifests["baseline"].get("metrics") or {}
    return trained.get("best_eval_metric", trained.get("best_eval_accuracy"))


def _environment(s: Setup, torch, load_start, cpu_share) -> dict:
    env = artifacts.environment()
    env.update(threads=s.threads, usable_cores=usable_cores(), torch_threads=torch.get_num_threads(),
               tokenizers_parallelism=os.environ.get("TOKENIZERS_PARALLELISM"),
               load_average_start=load_start, load_average_end=_loadavg(),
               other_processes_cpu_share=round(cpu_share.others(), 3))
    try:
        import onnxruntime as ort

        env["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:  # pragma: no cover
        pass
    env["openvino"] = artifacts._version("openvino")
    try:
        import psutil

        env["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover
        pass
    return env


def _protocol_facts(s: Setup, sweep: Sweep, e2e: EndToEnd, phases: Phases) -> dict:
    return {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in s.proto.items()},
            "sweep_seqs_used": sweep.seqs, "sweep_batches_used": sweep.batches,
            "e2e_seq_for_batch_choice": e2e.e2e_seq, "interleaving": "round-robin, rotating start each round",
            "timer": "time.perf_counter (CUDA events + synchronisation for GPU rows)",
            "reference": {"name": REFERENCE, "pad_to": PADDED_LENGTH, "batch_size": PADDED_BATCH},
            "streams": e2e.streams,
            "rounds_recorded": {"end_to_end": e2e.rounds, "sweep_cells": sweep.rounds,
                                "end_to_end_dominated_after": e2e.dominated},
            "wall_s": None, "retried_rounds": phases.retried}


def _results(s: Setup, rows: list[dict], env: dict, peak: Peak, sweep: Sweep, e2e: EndToEnd, phases: Phases) -> dict:
    cfg = s.cfg
    baseline_acc = _baseline_accuracy(s, {r["name"]: r for r in rows})
    chosen, message, verdicts = recommend(rows, baseline_acc, optimize_for=cfg.optimize_for, target=cfg.target,
                                          accuracy_budget=cfg.accuracy_budget)
    note = (chosen.get("first_use") or {}).get("note") if chosen else None
    if note:
        message = f"{message}. Note: {note}"
        log.warning("%s", note)
    warnings = busy_warnings(env["other_processes_cpu_share"], usable_cores())
    for w in warnings:
        log.warning("%s", w)
    out = Path(cfg.output_dir)
    results = {
        "schema_version": results_mod.SCHEMA_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_revision": artifacts.git_revision(), "config": cfg.to_dict(), "environment": env,
        "protocol": _protocol_facts(s, sweep, e2e, phases),
        "data": {"source": s.splits.source, "eval_rows": len(s.texts), "label_names": s.splits.label_names,
                 "max_length": s.max_length, "mean_tokens": e2e.mean_len, "max_tokens": int(max(s.lengths)),
                 "real_tokens": int(sum(s.lengths)), "settings": s.dcfg},
        "hardware": {"matmul_peak": {**peak.before, "gflops": peak.cpu_gflops, "before": peak.before["gflops"],
                                     "after": peak.after["gflops"]},
                     "cpu_matmul_peaks": peak.cpu_types_record(), "gpu_matmul_peaks": peak.gpu},
        "task": _task_entry(s), "baseline_accuracy": baseline_acc, "variants": rows,
        "reference_model": reference_model(s.manifests["baseline"]),
        "recommendation": recommendation_entry(chosen, message) if chosen else None,
        "recommendation_message": message, "warnings": warnings, "eligibility": verdicts,
        "training": _training_summary(s.manifests),
        "inputs": {k: {"stage": m.get("stage"), "status": m.get("status"), "created": m.get("created")}
                   for k, m in s.manifests.items()},
    }
    results.update(pruning_records(out))
    results["targets"] = evaluate_targets(results)
    return results


def pruning_records(out) -> dict:
    """The prune stage's records results.json carries: ``pruning`` (sensitivity.json) and
    ``compression_search`` (search.json of prune.py --auto), where present and readable."""
    found = {}
    for key, path in (("pruning", artifacts.sensitivity_path(out)), ("compression_search", artifacts.search_path(out))):
        if path.is_file():
            try:
                found[key] = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                log.warning("cannot read %s: %s", path, exc)
    return found
