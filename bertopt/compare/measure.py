"""The measurement: an orchestrator of named phases (set-up, open predictors, machine peak,
sweep, end to end, latency, batch-1 accuracy, memory, assembly), each returning a typed result.
The timing protocol itself lives in :mod:`bertopt.benchmarking`."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .. import artifacts, modeling, tasks, variants
from .. import benchmarking as bm
from .. import gpu_measure as gm
from ..config import CommonConfig
from ..errors import PipelineError
from ..logs import progress
from .assemble import _environment, _loadavg, _rescale_cpu_efficiency, _results, assemble_rows
from .config import BASELINE_ROW, PADDED_BATCH, PADDED_LENGTH, REFERENCE, CompareConfig
from .discover import discover
from .memory import memory_probes, probe_names
from .streams import TAG as STREAM_TAG
from .streams import choose as choose_modes
from .streams import open_stream_predictors
from .workloads import LatencyTask, _inputs_for, classify_texts, single_request

log = logging.getLogger("bertopt.compare")


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
    spec: object = None      # bertopt.tasks.TaskSpec the baseline was trained for
    pairs: Optional[list] = None
    long_text: str = "truncate"
    stride: Optional[int] = None

    @property
    def text_kwargs(self) -> dict:
        """What classify_texts needs beyond the texts: pairs, the long-text strategy, the task."""
        return {"pairs": self.pairs, "long_text": self.long_text, "stride": self.stride,
                "task": None if self.spec is None or self.spec.plain else self.spec.task}

    def score(self, y: np.ndarray) -> float:
        """The task metric of classify_texts' output (label ids: accuracy, as always)."""
        from ..metrics import score

        if y.ndim == 1:  # label ids (a plain classifier): accuracy
            return float((y == self.labels).mean()) if len(y) else float("nan")
        return score(self.spec, y, self.labels)

    def request(self, i: int):
        return self.texts[i] if self.pairs is None else (self.texts[i], self.pairs[i])

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
    """Phase 'matmul_peak': this machine's FP32 matmul peak on the CPU (before and after the
    measurement), the CPU's peak for each other compute type its rows run (bf16, int8, ...), and on
    the GPU (where a row runs there) the peak per compute type: each row is divided by the peak of
    its own compute type."""

    before: dict
    gpu: Optional[dict]
    after: Optional[dict] = None
    cpu_types: dict = field(default_factory=dict)

    @property
    def cpu_gflops(self) -> float:
        return max(self.before["gflops"], (self.after or self.before)["gflops"])

    def flops_for(self, v, cpu_gflops: Optional[float] = None) -> Optional[float]:
        """The peak a row is a fraction of; a CPU type slower than fp32 here (fp16 without a native
        kernel: runtimes compute it in fp32; it read 12,153% of its own peak) against fp32's."""
        if v.device == "cuda":  # fp32 rows run with TF32 off (torch default, ORT use_tf32=0, TensorRT flag cleared)
            return gm.peak_for(v.precision, self.gpu)[0]
        fp32 = (cpu_gflops or self.before["gflops"]) * 1e9
        if gm.compute_type(v.precision) != "fp32":
            own = gm.peak_for(v.precision, self.cpu_types)[0]
            return max(own, fp32) if own else None
        return fp32

    def cpu_types_below_fp32(self) -> list:
        """The CPU compute types measured slower than fp32 (their rows are measured against fp32)."""
        return sorted(t for t, e in self.cpu_types.items() if e.get("gflops") and e["gflops"] < self.before["gflops"])

    def cpu_types_record(self) -> dict:
        """``cpu_types`` for results.json: a type below fp32 says ``rows_measured_against: fp32``."""
        below = self.cpu_types_below_fp32()
        return {t: {**e, **({"rows_measured_against": "fp32"} if t in below else {})} for t, e in self.cpu_types.items()}


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
    dominated: dict = field(default_factory=dict)  # row -> the round after which it was not timed again
    first_pass_s: dict = field(default_factory=dict)  # row -> seconds of its first (untimed-for-the-table) pass
    modes: dict = field(default_factory=dict)  # row -> e2e_mode: one call at a time or N streams (streams.py)
    streams: dict = field(default_factory=dict)  # the throughput-mode plan (protocol.streams)


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
                gm.gpu_matmul_peaks() if any(v.device == "cuda" for v in o.live) else None,
                cpu_types=bm.cpu_matmul_peaks({gm.compute_type(v.precision) for v in o.live if v.device == "cpu"},
                                              s.threads, sizes=s.proto["matmul_sizes"]))
    log.info("CPU matmul peak, %d threads: %s", s.threads, ", ".join(
        f"{t} {e['gflops']:.1f}" if e.get("gflops") else f"{t} not measured ({e.get('error')})"
        for t, e in {"fp32": peak.before, **peak.cpu_types}.items()) + " GFLOP/s" + (
        f" ({', '.join(peak.cpu_types_below_fp32())} slower than fp32 here: those rows are measured against fp32)"
        if peak.cpu_types_below_fp32() else ""))
    phases.done("matmul_peak")
    sweep = run_sweep(s, o, peak, phases)
    e2e = run_end_to_end(s, o, sweep, phases)
    lat_tasks = run_latency(s, o, phases)
    single = batch1_accuracy(s, o)
    phases.done("batch1_accuracy")
    rows = assemble_rows(s, o, peak, sweep, e2e, lat_tasks, single, memory={})
    memory = memory_probes(s, o, e2e, sweep, probe_names(s, rows))
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
    trained = manifests["baseline"].get("config") or {}
    splits = data_mod.load_splits_for(dcfg, max_train_samples=None, no_header=trained.get("no_header"),
                                      task=trained.get("task"), eval_only=trained.get("eval_only"))
    texts, labels = splits.eval.texts, np.asarray(splits.eval.labels)
    max_length = int(dcfg["max_length"])
    tokenizer = modeling.load_tokenizer(str(baseline_dir))
    base_config = AutoConfig.from_pretrained(str(baseline_dir))
    with_tt = modeling.uses_token_type_ids(base_config)
    lengths = [len(x) for x in data_mod.tokenize(texts, tokenizer, max_length, splits.eval.pairs)]
    log.info("eval data: %s, %d texts, mean %.1f tokens (max %d); %d threads; %d variant row(s), %d measurable; "
             "%s protocol", splits.source, len(texts), float(np.mean(lengths)), max(lengths), threads, len(rows),
             sum(v.status == "ok" for v in rows), proto["name"])
    configs = {}
    for v in rows:
        if v.model_dir and v.source not in configs:
            cdir = v.model_dir if (Path(v.model_dir) / "config.json").is_file() else str(baseline_dir)
            configs[v.source] = AutoConfig.from_pretrained(cdir).to_dict()
    return Setup(cfg, proto, threads, rows, manifests, dcfg, splits, texts, labels, max_length, tokenizer,
                 base_config, with_tt, lengths, configs,
                 tasks.spec_from_record(manifests["baseline"].get("data"), splits.label_names),
                 splits.eval.pairs, trained.get("long_text") or "truncate", trained.get("stride"))


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
    return {n: gm.CudaTimer() for n in names if next(v for v in o.live if v.name == n).device == "cuda"}


def _adaptive(proto: dict) -> dict:
    """run_interleaved's early-stop arguments of the protocol (none for the full/quick ones): stop
    once every spread is within the tolerance, and stop timing a dominated row (never the padded
    reference or the FP32 baseline, the headline's denominators)."""
    if proto.get("min_repeats") is None:
        return {}
    out = {"min_repeats": proto["min_repeats"], "tolerance": proto["spread_tolerance"]}
    if proto.get("drop_dominated"):
        out["keep"] = (REFERENCE, BASELINE_ROW)
    return out


def run_sweep(s: Setup, o: Opened, peak: Peak, phases: Phases) -> Sweep:
    max_pos = modeling.max_positions(s.base_config)
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
                 for v in rows if not _refused(v, o.preds[v.name], b, q)}
        stats: dict = {}
        times = bm.run_interleaved(tasks, s.proto["repeats"], warmup=1, timers=_timers_for(o, list(tasks)),
                                   settle_s=s.proto["settle_s"], prime_below_s=s.proto["prime_below_s"],
                                   guard=s.guard, stats=stats, **_adaptive(s.proto))
        stats_all["retried_rounds"] = stats_all.get("retried_rounds", 0) + stats.get("retried_rounds", 0)
        out.rounds.append(stats.get("rounds"))
        for v in [v for v in rows if v.name in times]:
            t = times[v.name]
            med = float(np.median(t))
            out.cells[v.name].append({
                "batch": b, "seq": q, "samples_per_s": bm.spread(bm.rates(b, t), keep_values=False),
                "p50_ms": med * 1000, "latency_ms": bm.spread(t, 1000, keep_values=False),
                "other_cpu_share_max": max(stats.get("other_cpu_share") or [0.0]),
                **bm.efficiency(bm.forward_flops(s.configs[v.source], [q] * b), med, peak.flops_for(v))})
    phases.done("sweep", stats_all)
    return out


def cell_refusal(predictor, batch: int, seq: int) -> Optional[str]:
    """Why ``predictor`` cannot take a batch x seq input (a TensorRT engine outside its optimization
    profile), or None. Predictors without an ``accepts`` method take every shape."""
    accepts = getattr(predictor, "accepts", None)
    return accepts((batch, seq)) if accepts else None


def _refused(v, predictor, batch: int, seq: int) -> bool:
    """Record a sweep cell the variant cannot take (never fatal); True when refused."""
    why = cell_refusal(predictor, batch, seq)
    if why:
        v.extra.setdefault("sweep_skipped", []).append({"batch": batch, "seq": seq, "reason": why})
    return bool(why)


def _drop_unfit(s: Setup, o: Opened, chosen: dict) -> None:
    """A TensorRT profile too small for the eval texts: that variant fails, the run goes on."""
    for v in o.live:
        why = cell_refusal(o.preds[v.name], chosen[v.name][0], max(s.lengths))
        if why:
            v.status, v.reason = "failed", f"cannot take the end-to-end batches: {why}"
            log.warning("%s: %s", v.name, v.reason)
    o.live[:] = [v for v in o.live if v.status == "ok"]


def _e2e_batches(s: Setup, o: Opened, sweep: Sweep) -> tuple[dict, int, float]:
    """Each row's end-to-end batch size: the best sweep throughput at the eval set's typical length."""
    mean_len = float(np.mean(s.lengths))
    e2e_seq = next((q for q in sweep.seqs if q >= mean_len), sweep.seqs[-1])
    chosen = {}
    for v in o.live:
        if v.batching == "padded":
            chosen[v.name] = (PADDED_BATCH, f"fixed: the naive reference pads every input to {PADDED_LENGTH}")
            continue
        cands = [c for c in sweep.cells[v.name] if c["seq"] == e2e_seq] or sweep.cells[v.name]
        if not cands:
            chosen[v.name] = (min(sweep.batches), "no sweep cell fits this variant: the smallest sweep batch")
            continue
        best = max(cands, key=lambda c: c["samples_per_s"]["median"])
        chosen[v.name] = (best["batch"], f"best sweep throughput at seq {e2e_seq} (eval mean {mean_len:.1f} tokens)")
    return chosen, e2e_seq, mean_len


def run_end_to_end(s: Setup, o: Opened, sweep: Sweep, phases: Phases) -> EndToEnd:
    chosen, e2e_seq, mean_len = _e2e_batches(s, o, sweep)
    _drop_unfit(s, o, chosen)
    predictions, consistent = {}, {}
    plan = open_stream_predictors(o.live, s.threads)

    def task(v, key, p, n):
        def go():
            y = classify_texts(p, s.tokenizer, s.texts, batch_size=chosen[v.name][0], max_length=s.max_length,
                               with_tt=s.with_tt, pad_to=s.pad_to(v), streams=n, **s.text_kwargs)
            if key in predictions:
                consistent[key] = consistent.get(key, True) and bool(np.array_equal(predictions[key], y))
            predictions[key] = y
        return go

    tasks = {v.name: task(v, v.name, o.preds[v.name], 1) for v in o.live}
    tasks.update({v.name + STREAM_TAG: task(v, v.name + STREAM_TAG, plan.preds[v.name], plan.n)
                  for v in o.live if v.name in plan.preds})
    first = _first_passes(s, o, chosen, plan)
    log.info("end to end: %d texts x %d variants (%d also in %d streams) x %d repeats", len(s.texts), len(o.live),
             len(plan.preds), plan.n, s.proto["repeats"])
    bar = progress(total=len(tasks) * s.proto["repeats"], desc="end to end", unit="pass")
    stats: dict = {}
    times = bm.run_interleaved(tasks, s.proto["repeats"], warmup=0,
                               progress=lambda n, r: bar.update(1), settle_s=s.proto["settle_s"], guard=s.guard,
                               stats=stats, **_adaptive(s.proto))
    bar.close()
    _log_early_stop("end to end", stats, s.proto["repeats"])
    modes = choose_modes(times, predictions, plan)
    for key in [k for k in consistent if k.endswith(STREAM_TAG)]:
        row = key[:-len(STREAM_TAG)]
        consistent[row] = consistent.get(row, True) and consistent.pop(key)
    phases.done("end_to_end", stats)
    return EndToEnd(chosen, times, predictions, consistent, e2e_seq, mean_len, stats.get("rounds") or 0,
                    stats.get("dominated") or {}, first, modes, plan.record())


def _first_passes(s: Setup, o: Opened, chosen: dict, plan=None) -> dict:
    """The warm-up before the timed passes. A dynamically padded row runs the whole eval set once
    (and once more in its throughput mode), so no timed pass meets an input shape for the first
    time (OpenVINO compiles kernels for each new shape, ~10-60 ms apiece); that first pass is timed
    and returned (``first_use``). The padded reference runs a slice: its shapes never change, and
    its full pass is long. Further warm-up rounds (``--warmup`` > 1) run the slice."""
    warm_texts = s.texts[:min(len(s.texts), 2 * PADDED_BATCH)]

    def run(v, texts, p, n=1):
        classify_texts(p, s.tokenizer, texts, batch_size=chosen[v.name][0], max_length=s.max_length,
                       with_tt=s.with_tt, pad_to=s.pad_to(v), streams=n,
                       **dict(s.text_kwargs, pairs=s.pairs[:len(texts)] if s.pairs else None))

    first = {}
    for v in progress(o.live, desc="first pass", unit="variant"):
        full = v.batching != "padded"
        if full:
            t0 = time.perf_counter()
            run(v, s.texts, o.preds[v.name])
            first[v.name] = time.perf_counter() - t0
        if plan is not None and v.name in plan.preds:
            run(v, s.texts, plan.preds[v.name], plan.n)
        for _ in range(max(s.proto["warmup"], 1) - full):
            run(v, warm_texts, o.preds[v.name])
    return first


def _log_early_stop(phase: str, stats: dict, repeats: int) -> None:
    """Say why a progress bar ended short of its total (the adaptive protocol stopped early)."""
    rounds, dominated = stats.get("rounds") or repeats, stats.get("dominated") or {}
    if rounds < repeats:
        log.info("%s: stopped after %d of %d rounds, every spread within the tolerance", phase, rounds, repeats)
    if dominated:
        log.info("%s: not timed again, slower in every pass than the leader: %s", phase,
                 ", ".join(f"{name} (after round {r})" for name, r in dominated.items()))


def run_latency(s: Setup, o: Opened, phases: Phases) -> dict:
    """Batch-1 requests, sequential, interleaved by rounds; returns each row's LatencyTask. Before the
    rounds each dynamically padded row serves every request once (its first sight of each request's
    shape, timed and kept as ``first``), so the rounds time warm requests."""
    rng = np.random.default_rng(s.dcfg["seed"])
    n_req = min(s.proto["latency_requests"], len(s.texts))
    req_idx = rng.permutation(len(s.texts))[:n_req]
    req_texts = [s.request(i) for i in req_idx]
    chunks = [[s.request(i) for i in c] for c in np.array_split(req_idx, s.proto["repeats"]) if len(c)]
    warm_req = req_texts[:max(2, min(10, n_req))]
    tasks = {}
    for v in o.live:
        fn = (lambda t, p=o.preds[v.name], pad_to=s.pad_to(v):
              single_request(p, s.tokenizer, t, max_length=s.max_length, with_tt=s.with_tt, pad_to=pad_to))
        tasks[v.name] = LatencyTask(fn, warm_req, chunks, s.proto["warmup"])
    log.info("latency: %d single requests x %d variants", n_req, len(o.live))
    for v in progress([v for v in o.live if v.batching != "padded"], desc="first requests", unit="variant"):
        tasks[v.name].first = [tasks[v.name].fn(t)[0] for t in req_texts]  # every request's first sight, timed
    stats: dict = {}
    bm.run_interleaved(tasks, len(chunks), warmup=s.proto["warmup"], settle_s=s.proto["settle_s"], guard=s.guard,
                       stats=stats)
    phases.done("latency", stats)
    return tasks


def batch1_accuracy(s: Setup, o: Opened) -> dict:
    """Untimed predictions of single requests: dynamically quantized models compute activation
    scales per batch tensor, so their predictions depend on what shares a batch (the fast protocol
    asks only those rows; the full protocol asks every dynamically batched row)."""
    only_dependent = s.proto.get("batch1_only_batch_dependent")
    rows = [v for v in o.live if v.batching == "dynamic"
            and (not only_dependent or getattr(variants.REGISTRY.get(v.registry), "batch_dependent", False))]
    return {v.name: classify_texts(o.preds[v.name], s.tokenizer, s.texts, batch_size=1, max_length=s.max_length,
                                   with_tt=s.with_tt, **s.text_kwargs)
            for v in progress(rows, desc="batch-1 accuracy", unit="variant")}
