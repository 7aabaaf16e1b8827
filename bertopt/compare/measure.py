"""The measurement: an orchestrator of named phases (set-up, open predictors, machine peak,
sweep, end to end, latency, batch-1 accuracy, memory, assembly), each returning a typed result.
The timing protocol itself lives in :mod:`bertopt.benchmarking`."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .. import artifacts
from .. import benchmarking as bm
from .. import results as results_mod
from ..config import CommonConfig
from ..errors import PipelineError
from ..logs import progress
from .config import (BASELINE_ROW, EFFICIENCY_CELL, PADDED_BATCH, PADDED_LENGTH, REFERENCE, CompareConfig,
                     usable_cores)
from .discover import discover
from .recommend import recommend, recommendation_entry
from .targets import evaluate_targets
from .workloads import LatencyTask, _inputs_for, classify_texts, single_request

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
                "loss_curve", "train_rows", "eval_rows", "parameters", "trainable_parameters", "skipped_steps")
        out[stage] = {"status": m.get("status"), "reason": m.get("reason"), **{k: met.get(k) for k in keys}}
    return out

def _resolve_data(cfg: CompareConfig, baseline: dict, protocol: dict) -> dict:
    """Eval-data settings: an explicit non-default flag wins, else what the baseline trained with
    (so accuracy is measured on the split the models were selected on)."""
    defaults = CommonConfig.__dataclass_fields__
    trained = baseline.get("config") or {}
    out = {}
    for key in ("dataset", "data_dir", "text_column", "label_column", "max_length", "seed", "max_eval_samples"):
        mine = getattr(cfg, key)
        default = defaults[key].default
        out[key] = mine if mine != default else trained.get(key, mine)
    if out["max_eval_samples"] is None and protocol["max_eval_samples"]:
        out["max_eval_samples"] = protocol["max_eval_samples"]
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


@dataclass
class Setup:
    """Phase 'setup': the protocol, the rows, the eval data and what every workload needs."""

    cfg: CompareConfig
    proto: dict
    threads: int
    rows: list
    manifests: dict
    dcfg: dict
    splits: object
    texts: list
    labels: np.ndarray
    max_length: int
    tokenizer: object
    base_config: object
    with_tt: bool
    lengths: list
    configs: dict

    @property
    def guard(self):
        return bm.CpuShare.guard if self.proto["guard"] else None

    def pad_to(self, v) -> Optional[int]:
        return PADDED_LENGTH if v.batching == "padded" else None


@dataclass
class Opened:
    """Phase 'open_predictors': one predictor per measurable row (torch rows of one model share one)."""

    preds: dict
    load_s: dict
    live: list


@dataclass
class Peak:
    """Phase 'matmul_peak': this machine's FP32 matmul peak (CPU, and GPU where a row runs there)."""

    before: dict
    gpu: Optional[dict]
    after: Optional[dict] = None

    @property
    def cpu_gflops(self) -> float:
        return max(self.before["gflops"], (self.after or self.before)["gflops"])

    def flops_for(self, v, cpu_gflops: Optional[float] = None) -> Optional[float]:
        if v.device == "cuda":
            return self.gpu["gflops"] * 1e9 if self.gpu else None
        return (cpu_gflops or self.before["gflops"]) * 1e9


@dataclass
class Sweep:
    """Phase 'sweep': model-only batch x sequence cells per dynamic-batching row."""

    cells: dict
    seqs: list
    batches: list
    rounds: list = field(default_factory=list)


@dataclass
class EndToEnd:
    """Phase 'end_to_end': eval-set throughput and predictions at each row's chosen batch size."""

    batch: dict
    times: dict
    predictions: dict
    consistent: dict
    e2e_seq: int
    mean_len: float
    rounds: int


class Phases:
    """Named wall-clock phases of one measurement, and the retried rounds they reported."""

    def __init__(self):
        self.start = self.clock = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.retried = 0

    def done(self, name: str, stats: Optional[dict] = None) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.clock, 2)
        self.clock = now
        self.retried += (stats or {}).get("retried_rounds", 0)


def measure(cfg: CompareConfig) -> dict:
    """The whole measurement, phase by phase; returns the results.json content."""
    import torch

    phases = Phases()
    load_start, cpu_share = _loadavg(), bm.CpuShare()
    s = setup(cfg)
    phases.done("setup")
    o = open_predictors(s)
    phases.done("open_predictors")
    peak = Peak(bm.matmul_peak(s.threads, sizes=s.proto["matmul_sizes"]),
                bm.matmul_peak(sizes=(2048, 4096), device="cuda") if any(v.device == "cuda" for v in o.live) else None)
    log.info("FP32 matmul peak: %.1f GFLOP/s (%d threads)", peak.before["gflops"], s.threads)
    phases.done("matmul_peak")
    sweep = run_sweep(s, o, peak, phases)
    e2e = run_end_to_end(s, o, sweep, phases)
    lat_tasks = run_latency(s, o, phases)
    single = batch1_accuracy(s, o)
    phases.done("batch1_accuracy")
    rows = assemble_rows(s, o, peak, sweep, e2e, lat_tasks, single, memory={})
    memory = memory_probes(s, o, e2e, sweep, _probe_names(s, rows))
    phases.done("memory")
    peak.after = bm.matmul_peak(s.threads, sizes=s.proto["matmul_sizes"])
    phases.done("matmul_peak_after")
    _rescale_cpu_efficiency(o, peak, sweep)
    rows = assemble_rows(s, o, peak, sweep, e2e, lat_tasks, single, memory)
    env = _environment(s, torch, load_start, cpu_share)
    results = _results(s, rows, env, peak, sweep, e2e, phases)
    results["protocol"]["wall_s"] = round(time.perf_counter() - phases.start, 1)
    results["protocol"]["phase_s"] = phases.seconds
    return results


def setup(cfg: CompareConfig) -> Setup:
    import torch
    from transformers import AutoConfig

    from .. import data as data_mod
    from .. import modeling

    proto = cfg.protocol()
    threads = proto["threads"]
    torch.set_num_threads(threads)
    out = Path(cfg.output_dir)
    rows, manifests = discover(out, cfg.device)
    baseline_dir = artifacts.stage_dir(out, "baseline")
    dcfg = _resolve_data(cfg, manifests["baseline"], proto)
    splits = data_mod.load_splits(dcfg["dataset"], dcfg["data_dir"], dcfg["text_column"], dcfg["label_column"],
                                  None, dcfg["max_eval_samples"], dcfg["seed"])
    texts, labels = splits.eval.texts, np.asarray(splits.eval.labels)
    max_length = int(dcfg["max_length"])
    tokenizer = modeling.load_tokenizer(str(baseline_dir))
    base_config = AutoConfig.from_pretrained(str(baseline_dir))
    with_tt = getattr(base_config, "type_vocab_size", 0) > 0 and base_config.model_type not in (
        "distilbert", "roberta", "xlm-roberta")
    lengths = [len(x) for x in data_mod.tokenize(texts, tokenizer, max_length)]
    log.info("eval data: %s, %d texts, mean %.1f tokens (max %d); %d threads; %d variant row(s), %d measurable; "
             "%s protocol", splits.source, len(texts), float(np.mean(lengths)), max(lengths), threads, len(rows),
             sum(v.status == "ok" for v in rows), proto["name"])
    configs = {}
    for v in rows:
        if v.model_dir and v.source not in configs:
            cdir = v.model_dir if (Path(v.model_dir) / "config.json").is_file() else str(baseline_dir)
            configs[v.source] = AutoConfig.from_pretrained(cdir).to_dict()
    return Setup(cfg, proto, threads, rows, manifests, dcfg, splits, texts, labels, max_length, tokenizer,
                 base_config, with_tt, lengths, configs)


def open_predictors(s: Setup) -> Opened:
    import torch

    preds, load_s, shared_torch = {}, {}, {}
    for v in s.rows:
        if v.status != "ok":
            continue
        key = (v.kind, v.path, v.device, v.precision)
        t0 = time.perf_counter()
        try:
            if v.kind == "torch" and key in shared_torch:
                preds[v.name] = shared_torch[key]
            else:
                preds[v.name] = v.open(s.threads)
                if v.kind == "torch":
                    shared_torch[key] = preds[v.name]
        except PipelineError as exc:
            v.status, v.reason = "failed", f"cannot open: {exc}"
            log.warning("%s: %s", v.name, v.reason)
            continue
        load_s[v.name] = time.perf_counter() - t0
    torch.set_num_threads(s.threads)  # a predictor may have changed it
    return Opened(preds, load_s, [v for v in s.rows if v.status == "ok"])


def _timers_for(o: Opened, names) -> dict:
    return {n: bm.CudaTimer() for n in names if next(v for v in o.live if v.name == n).device == "cuda"}


def _adaptive(proto: dict) -> dict:
    """run_interleaved's early-stop arguments of the protocol (none for the full/quick ones)."""
    if proto.get("min_repeats") is None:
        return {}
    return {"min_repeats": proto["min_repeats"], "tolerance": proto["spread_tolerance"]}


def run_sweep(s: Setup, o: Opened, peak: Peak, phases: Phases) -> Sweep:
    max_pos = int(getattr(s.base_config, "max_position_embeddings", 512))
    seqs = sorted({min(x, max_pos) for x in s.proto["sweep_seqs"]})
    batches = list(s.proto["sweep_batches"])
    vocab = int(getattr(s.base_config, "vocab_size", 30522))
    rows = [v for v in o.live if v.batching == "dynamic"]
    out = Sweep({v.name: [] for v in rows}, seqs, batches)
    cells = [(b, q) for q in seqs for b in batches]
    log.info("sweep: %d cells x %d variants, %d repeats", len(cells), len(rows), s.proto["repeats"])
    stats_all: dict = {}
    for b, q in progress(cells, desc="sweep", unit="cell"):
        batch = bm.synthetic_batch(b, q, vocab, s.with_tt)
        tasks = {v.name: (lambda p=o.preds[v.name], x=_inputs_for(o.preds[v.name], batch): p.predict_logits(x))
                 for v in rows}
        stats: dict = {}
        times = bm.run_interleaved(tasks, s.proto["repeats"], warmup=1, timers=_timers_for(o, list(tasks)),
                                   settle_s=s.proto["settle_s"], prime_below_s=s.proto["prime_below_s"],
                                   guard=s.guard, stats=stats, **_adaptive(s.proto))
        stats_all["retried_rounds"] = stats_all.get("retried_rounds", 0) + stats.get("retried_rounds", 0)
        out.rounds.append(stats.get("rounds"))
        for v in rows:
            t = times[v.name]
            med = float(np.median(t))
            out.cells[v.name].append({
                "batch": b, "seq": q, "samples_per_s": bm.spread(bm.rates(b, t), keep_values=False),
                "p50_ms": med * 1000, "latency_ms": bm.spread(t, 1000, keep_values=False),
                "other_cpu_share_max": max(stats.get("other_cpu_share") or [0.0]),
                **bm.efficiency(bm.forward_flops(s.configs[v.source], [q] * b), med, peak.flops_for(v))})
    phases.done("sweep", stats_all)
    return out


def _e2e_batches(s: Setup, o: Opened, sweep: Sweep) -> tuple[dict, int, float]:
    """Each row's end-to-end batch size: the best sweep throughput at the eval set's typical length."""
    mean_len = float(np.mean(s.lengths))
    e2e_seq = next((q for q in sweep.seqs if q >= mean_len), sweep.seqs[-1])
    chosen = {}
    for v in o.live:
        if v.batching == "padded":
            chosen[v.name] = (PADDED_BATCH, f"fixed: the naive reference pads every input to {PADDED_LENGTH}")
            continue
        cands = [c for c in sweep.cells[v.name] if c["seq"] == e2e_seq]
        best = max(cands, key=lambda c: c["samples_per_s"]["median"])
        chosen[v.name] = (best["batch"], f"best sweep throughput at seq {e2e_seq} (eval mean {mean_len:.1f} tokens)")
    return chosen, e2e_seq, mean_len


def run_end_to_end(s: Setup, o: Opened, sweep: Sweep, phases: Phases) -> EndToEnd:
    chosen, e2e_seq, mean_len = _e2e_batches(s, o, sweep)
    predictions, consistent = {}, {}

    def task(v):
        p, bsz = o.preds[v.name], chosen[v.name][0]

        def go():
            y = classify_texts(p, s.tokenizer, s.texts, batch_size=bsz, max_length=s.max_length, with_tt=s.with_tt,
                               pad_to=s.pad_to(v))
            if v.name in predictions:
                consistent[v.name] = consistent.get(v.name, True) and bool(np.array_equal(predictions[v.name], y))
            predictions[v.name] = y
        return go

    warm_texts = s.texts[:min(len(s.texts), 2 * PADDED_BATCH)]
    for v in o.live:  # warm-up on a slice: a full pass of the padded reference is long
        for _ in range(max(s.proto["warmup"], 1)):
            classify_texts(o.preds[v.name], s.tokenizer, warm_texts, batch_size=chosen[v.name][0],
                           max_length=s.max_length, with_tt=s.with_tt, pad_to=s.pad_to(v))
    log.info("end to end: %d texts x %d variants x %d repeats", len(s.texts), len(o.live), s.proto["repeats"])
    bar = progress(total=len(o.live) * s.proto["repeats"], desc="end to end", unit="pass")
    stats: dict = {}
    times = bm.run_interleaved({v.name: task(v) for v in o.live}, s.proto["repeats"], warmup=0,
                               progress=lambda n, r: bar.update(1), settle_s=s.proto["settle_s"], guard=s.guard,
                               stats=stats, **_adaptive(s.proto))
    bar.close()
    phases.done("end_to_end", stats)
    return EndToEnd(chosen, times, predictions, consistent, e2e_seq, mean_len, stats.get("rounds") or 0)


def run_latency(s: Setup, o: Opened, phases: Phases) -> dict:
    """Batch-1 requests, sequential, interleaved by rounds; returns each row's LatencyTask."""
    rng = np.random.default_rng(s.dcfg["seed"])
    n_req = min(s.proto["latency_requests"], len(s.texts))
    req_texts = [s.texts[i] for i in rng.permutation(len(s.texts))[:n_req]]
    chunks = [list(c) for c in np.array_split(np.array(req_texts, dtype=object), s.proto["repeats"]) if len(c)]
    warm_req = req_texts[:max(2, min(10, n_req))]
    tasks = {}
    for v in o.live:
        fn = (lambda t, p=o.preds[v.name], pad_to=s.pad_to(v):
              single_request(p, s.tokenizer, t, max_length=s.max_length, with_tt=s.with_tt, pad_to=pad_to))
        tasks[v.name] = LatencyTask(fn, warm_req, chunks, s.proto["warmup"])
    log.info("latency: %d single requests x %d variants", n_req, len(o.live))
    stats: dict = {}
    bm.run_interleaved(tasks, len(chunks), warmup=s.proto["warmup"], settle_s=s.proto["settle_s"], guard=s.guard,
                       stats=stats)
    phases.done("latency", stats)
    return tasks


def batch1_accuracy(s: Setup, o: Opened) -> dict:
    """Untimed predictions of single requests: dynamically quantized models compute activation
    scales per batch tensor, so their predictions depend on what shares a batch."""
    return {v.name: classify_texts(o.preds[v.name], s.tokenizer, s.texts, batch_size=1, max_length=s.max_length,
                                   with_tt=s.with_tt)
            for v in progress([v for v in o.live if v.batching == "dynamic"], desc="batch-1 accuracy", unit="variant")}


def _probe_names(s: Setup, rows: list[dict]) -> list[str]:
    """The rows whose peak memory and load time a fresh process measures: all of them (full
    protocol), or only those the recommendation can choose from (fast protocol)."""
    if s.cfg.skip_memory:
        return []
    names = [r["name"] for r in rows if r["status"] == "ok"]
    if not s.proto.get("memory_only_eligible"):
        return names
    baseline = _baseline_accuracy(s, {r["name"]: r for r in rows})
    _, _, verdicts = recommend(rows, baseline, optimize_for=s.cfg.optimize_for, target=s.cfg.target,
                               accuracy_budget=s.cfg.accuracy_budget)
    eligible = {x["variant"] for x in verdicts if x["eligible"]}
    return [n for n in names if n in eligible]


def memory_probes(s: Setup, o: Opened, e2e: EndToEnd, sweep: Sweep, names: list[str]) -> dict:
    """Peak memory + load time, one fresh process per row in ``names``."""
    memory: dict[str, dict] = {}
    max_pos = int(getattr(s.base_config, "max_position_embeddings", 512))
    vocab = int(getattr(s.base_config, "vocab_size", 30522))
    for v in progress([v for v in o.live if v.name in names], desc="memory", unit="variant"):
        spec = {"factory": "bertopt.runtimes:open_from_dict", "predictor": v.spec(s.threads),
                "batch": e2e.batch[v.name][0], "seq": min(s.max_length, max_pos), "vocab_size": vocab,
                "with_token_type_ids": s.with_tt, "device": v.device, "runs": 2}
        memory[v.name] = bm.fresh_process_memory(spec, env={"OMP_NUM_THREADS": str(s.threads)})
        if "error" in memory[v.name]:
            log.warning("%s: memory probe failed: %s", v.name, memory[v.name]["error"])
    return memory

def _rescale_cpu_efficiency(o: Opened, peak: Peak, sweep: Sweep) -> None:
    """CPU efficiencies against the higher of the two peak measurements."""
    if peak.after and peak.after["gflops"] > peak.before["gflops"]:
        for v in o.live:
            if v.device == "cpu" and v.name in sweep.cells:
                for c in sweep.cells[v.name]:
                    c["fraction_of_peak"] = c["gflops"] / peak.cpu_gflops


def _measured(s: Setup, o: Opened, v, peak: Peak, sweep: Sweep, e2e: EndToEnd, lat, single: dict,
              memory: dict) -> dict:
    """The measured part of one row."""
    y, t = e2e.predictions[v.name], e2e.times[v.name]
    bsz, why = e2e.batch[v.name]
    padded = v.batching == "padded"
    by_batching = {f"batch_{bsz}": float((y == s.labels).mean())}
    if v.name in single:
        by_batching["batch_1"] = float((single[v.name] == s.labels).mean())
    row = {"accuracy": min(by_batching.values()),  # the worst case is what a deployment can promise
           "accuracy_by_batching": by_batching, "predictions_consistent": e2e.consistent.get(v.name, True)}
    row["throughput"] = {"samples_per_s": bm.spread(bm.rates(len(s.texts), t)), "seconds": bm.spread(t),
                         "batch_size": bsz, "batch_size_reason": why, "texts": len(s.texts),
                         "real_tokens": int(sum(s.lengths)),
                         "batching": (f"data order, padded to {PADDED_LENGTH}" if padded
                                      else "length-sorted batches, dynamic padding")}
    if padded:
        row["throughput"]["padded_tokens"] = len(s.texts) * PADDED_LENGTH
    row["latency"] = {"e2e_ms": bm.percentiles(lat.e2e, scale=1000), "model_ms": bm.percentiles(lat.model, scale=1000),
                      "round_p50_ms": bm.spread(lat.round_p50, 1000, keep_values=False), "requests": len(lat.e2e),
                      "padded_to": PADDED_LENGTH if padded else None}
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


def _baseline_accuracy(s: Setup, by_name: dict) -> Optional[float]:
    base_row = by_name.get(BASELINE_ROW)
    if base_row and base_row["accuracy"] is not None:
        return base_row["accuracy"]
    return (s.manifests["baseline"].get("metrics") or {}).get("best_eval_accuracy")


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
            "rounds_recorded": {"end_to_end": e2e.rounds, "sweep_cells": sweep.rounds},
            "wall_s": None, "retried_rounds": phases.retried}


def _results(s: Setup, rows: list[dict], env: dict, peak: Peak, sweep: Sweep, e2e: EndToEnd, phases: Phases) -> dict:
    cfg = s.cfg
    baseline_acc = _baseline_accuracy(s, {r["name"]: r for r in rows})
    chosen, message, verdicts = recommend(rows, baseline_acc, optimize_for=cfg.optimize_for, target=cfg.target,
                                          accuracy_budget=cfg.accuracy_budget)
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
                     "gpu_matmul_peak": peak.gpu},
        "baseline_accuracy": baseline_acc, "variants": rows,
        "recommendation": recommendation_entry(chosen, message) if chosen else None,
        "recommendation_message": message, "warnings": warnings, "eligibility": verdicts,
        "training": _training_summary(s.manifests),
        "inputs": {k: {"stage": m.get("stage"), "status": m.get("status"), "created": m.get("created")}
                   for k, m in s.manifests.items()},
    }
    sens = artifacts.sensitivity_path(out)
    if sens.is_file():
        try:
            results["pruning"] = json.loads(sens.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            log.warning("cannot read %s: %s", sens, exc)
    results["targets"] = evaluate_targets(results)
    return results
