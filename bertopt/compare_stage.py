"""compare.py: measure every variant the earlier stages produced, recommend one, and write
results.json / results.csv / summary.md and the HTML report.

Variants are found through the stage manifests (never by globbing files): the trained stages
(baseline, mixed_precision, pruned) give PyTorch eager rows, ``onnx/<source>/manifest.json``
gives one row per ONNX Runtime variant, ``tensorrt/<source>/manifest.json`` one per engine.
Variants that cannot run here appear with their reason. Every predictor comes from
:mod:`bertopt.runtimes`; the timing protocol lives in :mod:`bertopt.benchmarking`.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from . import artifacts
from . import benchmarking as bm
from .cli import StageResult, print_config
from .config import CommonConfig, result_config
from .errors import MissingArtifact, PipelineError
from .logs import progress, stage_logging

log = logging.getLogger("bertopt.compare")

RESULTS_SCHEMA_VERSION = 1
OPTIMIZE_FOR = ("throughput", "latency")
TARGETS = ("cpu", "gpu")
REFERENCE = "torch-fp32-padded"   # the naive reference users start from
BASELINE_ROW = "torch-fp32"       # the FP32 baseline accuracy deltas are measured against
PADDED_LENGTH, PADDED_BATCH = 128, 16
SOURCE_PREFIX = {"baseline": "", "mixed_precision": "mp-", "pruned": "pruned-"}
TIE_TOLERANCE = 0.01  # scores within 1% of the best are run-to-run noise: ties
EFFICIENCY_CELL = (32, 128)
LATENCY_CELL = (1, 128)

# settle_s: CPU idle time before a timed call when the variant changes (the previous runtime's
# worker threads stop spinning); prime_below_s: calls shorter than this get one untimed call first
FULL_PROTOCOL = {"repeats": 5, "warmup": 2, "latency_requests": 200, "sweep_batches": (1, 8, 32, 64),
                 "sweep_seqs": (32, 64, 128, 256), "matmul_sizes": (1024, 2048), "max_eval_samples": None,
                 "settle_s": 0.1, "prime_below_s": 0.25, "guard": True}
QUICK_PROTOCOL = {"repeats": 3, "warmup": 1, "latency_requests": 24, "sweep_batches": (1, 32),
                  "sweep_seqs": (32, 128), "matmul_sizes": (1024,), "max_eval_samples": 200,
                  "settle_s": 0.02, "prime_below_s": 0.25, "guard": False}


# ----------------------------------------------------------------------------- config
def _int_list(value) -> Optional[tuple]:
    if value is None:
        return None
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
    else:
        parts = list(value)
    try:
        return tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        return ("invalid", value)


@dataclass
class CompareConfig(CommonConfig):
    """compare.py: what to measure and how to choose the recommended variant."""

    optimize_for: str = "throughput"
    target: str = "cpu"
    accuracy_budget: float = 0.01
    quick: bool = False
    threads: Optional[int] = None
    repeats: Optional[int] = None
    warmup: Optional[int] = None
    latency_requests: Optional[int] = None
    sweep_batches: Optional[tuple] = None
    sweep_seqs: Optional[tuple] = None
    skip_memory: bool = False
    report_only: bool = False

    def __post_init__(self):
        self.sweep_batches = _int_list(self.sweep_batches)
        self.sweep_seqs = _int_list(self.sweep_seqs)
        super().__post_init__()

    def problems(self) -> list[str]:
        p = super().problems()
        if self.optimize_for not in OPTIMIZE_FOR:
            p.append(f"--optimize-for must be throughput or latency (got {self.optimize_for!r})")
        if self.target not in TARGETS:
            p.append(f"--target must be cpu or gpu (got {self.target!r})")
        if not isinstance(self.accuracy_budget, (int, float)) or not (0 <= self.accuracy_budget < 1):
            p.append(f"--accuracy-budget must be a fraction in [0, 1), e.g. 0.01 = 1 point "
                     f"(got {self.accuracy_budget!r})")
        for name, least in (("threads", 1), ("repeats", 1), ("warmup", 0), ("latency_requests", 1)):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < least):
                p.append(f"--{name.replace('_', '-')} must be an integer >= {least} (got {v!r})")
        if self.repeats is not None and isinstance(self.repeats, int) and 1 <= self.repeats < 5 and not self.quick:
            p.append(f"--repeats must be >= 5 for a full run (got {self.repeats}); use --quick for a reduced protocol")
        for name in ("sweep_batches", "sweep_seqs"):
            v = getattr(self, name)
            if v is not None and (not v or v[0] == "invalid" or any(x < 1 for x in v)):
                p.append(f"--{name.replace('_', '-')} must be comma-separated positive integers "
                         f"(got {v[1] if v and v[0] == 'invalid' else v!r})")
        return p

    def protocol(self) -> dict:
        """The resolved measurement protocol (explicit flags over the full/quick defaults)."""
        base = dict(QUICK_PROTOCOL if self.quick else FULL_PROTOCOL)
        for key in ("repeats", "warmup", "latency_requests", "sweep_batches", "sweep_seqs"):
            if getattr(self, key) is not None:
                base[key] = getattr(self, key)
        base["sweep_batches"] = tuple(sorted(set(base["sweep_batches"])))
        base["sweep_seqs"] = tuple(sorted(set(base["sweep_seqs"])))
        base["threads"] = self.threads or usable_cores()
        base["quick"] = self.quick
        return base


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def add_compare_args(parser) -> None:
    from . import cli

    cli.add_common_args(parser)
    g = parser.add_argument_group("comparison options")
    cli.add(g, "--optimize-for", choices=OPTIMIZE_FOR,
            help="recommend the highest end-to-end throughput or the lowest p50 latency (default: throughput)")
    cli.add(g, "--target", choices=TARGETS, help="deploy target the recommendation must run on (default: cpu)")
    cli.add(g, "--accuracy-budget", type=float, metavar="F",
            help="largest accuracy drop vs the FP32 baseline a recommended variant may have, as a "
                 "fraction (default: 0.01 = 1 point)")
    cli.add(g, "--quick", action="store_true", default=None,
            help="reduced protocol for CI/smoke runs: 3 repeats, 200 eval texts, 24 latency requests, "
                 "a 2x2 sweep")
    cli.add(g, "--threads", type=int, metavar="N",
            help="CPU threads for every variant (fixed and recorded; default: all usable cores)")
    cli.add(g, "--repeats", type=int, metavar="N", help="timed repeats per measurement (default: 5; >= 5 unless --quick)")
    cli.add(g, "--warmup", type=int, metavar="N", help="untimed warm-up rounds (default: 2)")
    cli.add(g, "--latency-requests", type=int, metavar="N",
            help="single requests timed per variant for the latency percentiles (default: 200)")
    cli.add(g, "--sweep-batches", metavar="A,B", help="sweep batch sizes (default: 1,8,32,64)")
    cli.add(g, "--sweep-seqs", metavar="A,B", help="sweep sequence lengths (default: 32,64,128,256; "
                                                  "clamped to the model's maximum positions)")
    cli.add(g, "--skip-memory", action="store_true", default=None,
            help="do not start a fresh process per variant to measure peak memory and load time")
    cli.add(g, "--report-only", action="store_true", default=None,
            help="re-render summary.md and the HTML report from the existing results.json (with other "
                 "--optimize-for/--target/--accuracy-budget values: recommend again from those measurements)")


def build_compare(ns) -> CompareConfig:
    from . import cli

    return cli.build_config(CompareConfig, ns)


# ----------------------------------------------------------------------------- variants
@dataclass
class Variant:
    """One row of the comparison: a model, a runtime, a precision and a device."""

    name: str
    backend: str           # torch | onnxruntime | tensorrt
    precision: str
    source: str            # baseline | mixed_precision | pruned
    device: str            # cpu | cuda
    kind: str              # torch | onnx | tensorrt (how to open it)
    path: Optional[str] = None        # model dir / .onnx file / .plan file
    model_dir: Optional[str] = None   # the directory with tokenizer + config.json
    variant: Optional[str] = None     # the ONNX manifest's variant key / engine precision
    batching: str = "dynamic"         # dynamic | padded
    status: str = "ok"                # ok | skipped | rejected | failed | missing
    reason: Optional[str] = None
    size_bytes: Optional[int] = None
    extra: dict = field(default_factory=dict)

    def spec(self, threads: int) -> dict:
        """What :func:`open_predictor` needs (JSON-able: it also crosses into the memory probe)."""
        return {"kind": self.kind, "name": self.name, "path": self.path, "model_dir": self.model_dir,
                "variant": self.variant, "device": self.device, "precision": self.precision,
                "threads": threads}


def open_predictor(spec: dict):
    """Build the Predictor for a variant spec through bertopt.runtimes (the only place that
    constructs inference sessions). Also the factory the fresh-process memory probe calls."""
    from . import runtimes

    kind = spec["kind"]
    if kind == "torch":
        return runtimes.TorchPredictor(spec["path"], name=spec["name"], device=spec["device"],
                                       precision=spec["precision"], threads=spec.get("threads"))
    if kind == "onnx":
        if not hasattr(runtimes, "load_predictor"):
            raise PipelineError("bertopt.runtimes has no ONNX Runtime predictor (load_predictor) in this checkout")
        return runtimes.load_predictor(spec["model_dir"], spec["variant"], device=spec["device"],
                                       threads=spec.get("threads"))
    if kind == "tensorrt":
        if not hasattr(runtimes, "TensorRTPredictor"):
            raise PipelineError("bertopt.runtimes has no TensorRT predictor in this checkout")
        return runtimes.TensorRTPredictor(spec["path"], device=spec.get("device") or "cuda")
    raise ValueError(f"unknown predictor kind {kind!r}")


def cell_refusal(predictor, batch: int, seq: int) -> Optional[str]:
    """Why ``predictor`` cannot take a batch x seq input (a TensorRT engine outside its optimization
    profile), or None. Predictors without an ``accepts`` method take every shape."""
    accepts = getattr(predictor, "accepts", None)
    return accepts((batch, seq)) if accepts else None


def _dir_size(directory: Path) -> int:
    names = ("model.safetensors", "pytorch_model.bin")
    return sum((directory / n).stat().st_size for n in names if (directory / n).is_file())


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def _ort_cuda_available() -> bool:
    try:
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:  # pragma: no cover
        return False


NO_CUDA = "needs an NVIDIA GPU with CUDA; this machine has none"


def discover(output_dir: str | os.PathLike, device_pref: str = "auto") -> tuple[list[Variant], dict]:
    """Every variant the manifests under ``output_dir`` describe, plus the manifests read.

    The baseline stage is required (MissingArtifact otherwise); everything else is optional and
    shows up as a row with a reason when absent, skipped, rejected or unable to run here."""
    from .training import cpu_native_bf16

    out = Path(output_dir)
    manifests: dict[str, dict] = {}
    baseline_dir = artifacts.stage_dir(out, "baseline")
    manifests["baseline"] = artifacts.require_manifest(baseline_dir, "baseline")
    cuda = device_pref != "cpu" and _cuda_available()
    ort_cuda = cuda and _ort_cuda_available()
    rows: list[Variant] = []
    size = _dir_size(baseline_dir)
    common = dict(backend="torch", precision="fp32", source="baseline", kind="torch",
                  path=str(baseline_dir), model_dir=str(baseline_dir), size_bytes=size)
    rows.append(Variant(REFERENCE, device="cpu", batching="padded", **common,
                        extra={"note": f"eager FP32, every input padded to {PADDED_LENGTH}, batch {PADDED_BATCH}"}))
    rows.append(Variant(BASELINE_ROW, device="cpu", **common))
    if cuda:
        rows.append(Variant(BASELINE_ROW + "-cuda", device="cuda", **common))

    sources = ["baseline"]
    for stage in ("mixed_precision", "pruned"):
        d = artifacts.stage_dir(out, stage)
        m = artifacts.read_manifest(d)
        if m is None:
            continue
        manifests[stage] = m
        prefix = SOURCE_PREFIX[stage]
        if stage == "mixed_precision":
            prec = (m.get("metrics") or {}).get("precision") or "amp"
            name = f"{prefix}torch-{prec}"
            base = dict(backend="torch", precision=prec, source=stage, kind="torch", path=str(d),
                        model_dir=str(d), size_bytes=_dir_size(d) if m.get("status") == "ok" else None)
            if m.get("status") != "ok":
                rows.append(Variant(name, device="cpu", status=m.get("status") or "failed",
                                    reason=m.get("reason") or "the mixed-precision stage did not finish", **base))
                continue
            sources.append(stage)
            if prec == "bf16":
                ok, why = cpu_native_bf16()
                rows.append(Variant(name, device="cpu", status="ok" if ok else "skipped",
                                    reason=None if ok else why, **base))
                if cuda:
                    rows.append(Variant(name + "-cuda", device="cuda", **base))
            else:  # fp16 inference is CUDA-only
                rows.append(Variant(name, device="cuda", status="ok" if cuda else "skipped",
                                    reason=None if cuda else f"fp16 inference {NO_CUDA}", **base))
        else:
            if m.get("status") != "ok":
                rows.append(Variant(f"{prefix}torch-fp32", backend="torch", precision="fp32", source=stage,
                                    device="cpu", kind="torch", status=m.get("status") or "failed",
                                    reason=m.get("reason") or "the pruning stage did not finish"))
                continue
            sources.append(stage)
            rows.append(Variant(f"{prefix}torch-fp32", backend="torch", precision="fp32", source=stage,
                                device="cpu", kind="torch", path=str(d), model_dir=str(d), size_bytes=_dir_size(d)))

    for source in sources:
        prefix = SOURCE_PREFIX[source]
        onnx_dir = artifacts.stage_dir(out, "onnx") / source
        m = artifacts.read_manifest(onnx_dir)
        if m is None:
            rows.append(Variant(f"{prefix}ort", backend="onnxruntime", precision="-", source=source, device="cpu",
                                kind="onnx", status="missing",
                                reason=f"no ONNX export of {source} ({onnx_dir}/manifest.json): run "
                                       f"`{artifacts.producing_command('onnx')}`"))
        else:
            manifests[f"onnx/{source}"] = m
            rows += _onnx_rows(m, onnx_dir, source, prefix, ort_cuda)
        trt_dir = artifacts.stage_dir(out, "tensorrt") / source
        m = artifacts.read_manifest(trt_dir)
        if m is None:
            if f"onnx/{source}" in manifests:
                rows.append(Variant(f"{prefix}trt", backend="tensorrt", precision="-", source=source, device="cuda",
                                    kind="tensorrt", status="missing",
                                    reason=f"no TensorRT manifest for {source}: run "
                                           f"`{artifacts.producing_command('tensorrt')}` (needs an NVIDIA GPU)"))
            continue
        manifests[f"tensorrt/{source}"] = m
        rows += _trt_rows(m, trt_dir, onnx_dir, source, prefix, cuda)
    return rows, manifests


def _onnx_rows(manifest: dict, onnx_dir: Path, source: str, prefix: str, ort_cuda: bool) -> list[Variant]:
    rows = []
    metrics = manifest.get("metrics") or {}
    if manifest.get("status") != "ok":
        return [Variant(f"{prefix}ort", backend="onnxruntime", precision="-", source=source, device="cpu",
                        kind="onnx", status=manifest.get("status") or "failed",
                        reason=manifest.get("reason") or "the ONNX stage did not finish")]
    for key, v in (metrics.get("variants") or {}).items():
        devices = v.get("devices") or ["cpu"]
        base = dict(backend="onnxruntime", precision=v.get("precision") or key, source=source, kind="onnx",
                    path=str(onnx_dir / v["file"]) if v.get("file") else None, model_dir=str(onnx_dir),
                    variant=key, size_bytes=v.get("size_bytes"),
                    extra={"export_parity": v.get("parity"), "export_accuracy": v.get("accuracy"),
                           "export_accuracy_delta": v.get("accuracy_delta")})
        status, reason = v.get("status") or "failed", v.get("reason")
        name = f"{prefix}ort-{key}"
        if status != "ok":
            rows.append(Variant(name, device=devices[0], status=status, reason=reason or f"{status} by the ONNX stage",
                                **base))
            continue
        if "cpu" in devices:
            rows.append(Variant(name, device="cpu", **base))
        if "cuda" in devices:
            cname = name + "-cuda" if "cpu" in devices else name
            rows.append(Variant(cname, device="cuda", status="ok" if ort_cuda else "skipped",
                                reason=None if ort_cuda else f"{NO_CUDA} (and onnxruntime-gpu)", **base))
    return rows


def _trt_rows(manifest: dict, trt_dir: Path, onnx_dir: Path, source: str, prefix: str, cuda: bool) -> list[Variant]:
    if manifest.get("status") != "ok":
        return [Variant(f"{prefix}trt", backend="tensorrt", precision="-", source=source, device="cuda",
                        kind="tensorrt", status=manifest.get("status") or "failed",
                        reason=manifest.get("reason") or "the TensorRT stage did not finish")]
    rows = []
    for prec, e in ((manifest.get("metrics") or {}).get("engines") or {}).items():
        status = e.get("status") or "failed"
        if status == "ok" and not cuda:
            status, reason = "skipped", NO_CUDA
        else:
            reason = e.get("reason")
        rows.append(Variant(f"{prefix}trt-{prec}", backend="tensorrt", precision=prec, source=source, device="cuda",
                            kind="tensorrt", path=str(trt_dir / e["file"]) if e.get("file") else None,
                            model_dir=str(onnx_dir), variant=prec, size_bytes=e.get("size_bytes"),
                            status=status, reason=reason))
    return rows


# ----------------------------------------------------------------------------- workloads
def _inputs_for(predictor, batch: dict) -> dict:
    names = getattr(predictor, "input_names", None)
    return {k: v for k, v in batch.items() if k in names} if names else batch


def classify_texts(predictor, tokenizer, texts, *, batch_size: int, max_length: int, with_tt: bool,
                   pad_to: Optional[int] = None) -> np.ndarray:
    """Texts in, label ids out (tokenization included). ``pad_to`` set = the naive reference:
    batches in data order, every input padded to ``pad_to``. Otherwise length-sorted batches
    with dynamic padding, predictions returned in input order."""
    from .data import pad_batch, tokenize

    n = len(texts)
    preds = np.empty(n, dtype=np.int64)
    if pad_to:
        for start in range(0, n, batch_size):
            enc = tokenizer(list(texts[start:start + batch_size]), padding="max_length", truncation=True,
                            max_length=pad_to, return_tensors="np", return_token_type_ids=with_tt)
            batch = {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}
            preds[start:start + batch_size] = predictor.predict_logits(_inputs_for(predictor, batch)).argmax(-1)
        return preds
    ids = tokenize(texts, tokenizer, max_length)
    order = np.argsort([-len(s) for s in ids], kind="stable")
    pad_id = tokenizer.pad_token_id or 0
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        batch = pad_batch([ids[i] for i in idx], pad_id, with_tt)
        preds[idx] = predictor.predict_logits(_inputs_for(predictor, batch)).argmax(-1)
    return preds


def single_request(predictor, tokenizer, text: str, *, max_length: int, with_tt: bool,
                   pad_to: Optional[int] = None, clock=time.perf_counter) -> tuple[float, float]:
    """One request at batch 1: (end-to-end seconds incl. tokenization, model-only seconds)."""
    from .data import pad_batch

    t0 = clock()
    ids = tokenizer(text, truncation=True, max_length=max_length, return_attention_mask=False,
                    return_token_type_ids=False)["input_ids"]
    batch = _inputs_for(predictor, pad_batch([ids], tokenizer.pad_token_id or 0, with_tt, pad_to=pad_to))
    t1 = clock()
    logits = predictor.predict_logits(batch)
    t2 = clock()
    int(logits.argmax(-1)[0])
    return clock() - t0, t2 - t1


class LatencyTask:
    """Called once per round by the interleaved runner: the first ``warmup`` calls serve the
    warm-up requests (unrecorded), recorded call r serves chunk r of the requests (after one
    untimed primer request), timing each request on its own."""

    def __init__(self, fn, warm_texts, chunks, warmup: int):
        self.fn, self.warm_texts, self.chunks, self.warmup = fn, warm_texts, chunks, warmup
        self.calls, self.e2e, self.model, self.round_p50 = 0, [], [], []

    def __call__(self):
        i = self.calls
        self.calls += 1
        if i < self.warmup:
            for t in self.warm_texts:
                self.fn(t)
            return
        chunk = self.chunks[i - self.warmup]
        self.fn(chunk[0])  # untimed primer: wakes this runtime's threads after the variant switch
        e2e, model = [], []
        for t in chunk:
            total, m = self.fn(t)
            e2e.append(total)
            model.append(m)
        self._last = (len(e2e), self.calls)
        self.e2e += e2e
        self.model += model
        self.round_p50.append(float(np.median(e2e)))

    def discard_last(self):
        """The runner discarded this round (the machine was disturbed): forget it and serve the
        same chunk again next time."""
        n, calls = getattr(self, "_last", (0, None))
        if calls is None or calls != self.calls:
            return
        del self.e2e[-n:], self.model[-n:], self.round_p50[-1:]
        self.calls -= 1
        self._last = (0, None)


# ----------------------------------------------------------------------------- recommendation
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
            "model_dir": row.get("model_dir"), "onnx_variant": row.get("variant"), "reason": message}


# ----------------------------------------------------------------------------- targets
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


# ----------------------------------------------------------------------------- output files
CSV_COLUMNS = [
    "name", "status", "reason", "backend", "precision", "source", "device", "threads", "batching",
    "e2e_batch_size", "size_bytes", "accuracy", "accuracy_delta", "e2e_samples_per_s", "e2e_samples_per_s_min",
    "e2e_samples_per_s_max", "speedup_vs_padded", "latency_e2e_p50_ms", "latency_e2e_p90_ms", "latency_e2e_p99_ms",
    "latency_e2e_mean_ms", "latency_model_p50_ms", "latency_model_p90_ms", "latency_model_p99_ms",
    "latency_model_mean_ms", "peak_rss_mb", "load_time_s", "cuda_max_allocated_mb", "e2e_gflops",
    "e2e_fraction_of_peak", "sweep_32x128_samples_per_s", "sweep_32x128_fraction_of_peak",
]


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def csv_rows(results: dict) -> list[dict]:
    out = []
    for r in results.get("variants", []):
        c = next((c for c in r.get("sweep") or [] if (c["batch"], c["seq"]) == EFFICIENCY_CELL), None)
        out.append({
            "name": r["name"], "status": r["status"], "reason": r.get("reason") or "", "backend": r["backend"],
            "precision": r["precision"], "source": r["source"], "device": r["device"], "threads": r.get("threads"),
            "batching": r.get("batching"), "e2e_batch_size": _get(r, "throughput", "batch_size"),
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


def summary_table(results: dict) -> str:
    """The headline table (markdown, readable as plain text in a terminal)."""
    head = ["variant", "backend", "precision", "device", "accuracy % (Δ pts)", "e2e samples/s (min–max)", "× padded",
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
            _fmt(r.get("speedup_vs_padded"), ".2f") + ("×" if r.get("speedup_vs_padded") else ""),
            "-" if not _get(r, "latency", "e2e_ms") else
            f"{r['latency']['e2e_ms']['p50']:.2f} / {r['latency']['e2e_ms']['p99']:.2f}",
            _fmt(_get(r, "latency", "model_ms", "p50"), ".2f"),
            _fmt(r["size_bytes"] / 2**20 if r.get("size_bytes") else None, ".1f"),
            _fmt(_get(r, "memory", "peak_rss_mb"), ".0f"),
            _fmt(100 * c["fraction_of_peak"] if c and c.get("fraction_of_peak") is not None else None, ".0f"),
        ]) + " |")
    return "\n".join(lines)


def write_summary(results: dict, path: Path) -> str:
    env = results.get("environment", {})
    proto = results.get("protocol", {})
    rec = results.get("recommendation")
    parts = ["# bertopt performance summary", ""]
    parts.append(f"Recommendation (--optimize-for {results['config']['optimize_for']}, --target "
                 f"{results['config']['target']}, --accuracy-budget {results['config']['accuracy_budget']}): "
                 + (f"**{rec['variant']}** — {rec['reason']}" if rec else f"none — {results.get('recommendation_message')}"))
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
              f"measured FP32 matmul peak {_fmt(peak.get('gflops'), '.1f')} GFLOP/s.",
              f"Protocol: {'QUICK (reduced) — ' if proto.get('quick') else ''}{proto.get('warmup')} warm-up round(s), "
              f"{proto.get('repeats')} timed repeats interleaved round-robin, medians with min–max; "
              f"{results.get('data', {}).get('eval_rows')} eval texts; {proto.get('latency_requests')} single requests "
              "per variant for latency.", ""]
    text = "\n".join(parts)
    artifacts.atomic_write_text(path, text)
    return text


# ----------------------------------------------------------------------------- the stage
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


def _fingerprint(cfg: CompareConfig, manifests_dirs: dict) -> str:
    rc = result_config(cfg)
    rc.pop("report_only", None)
    return artifacts.fingerprint({"stage": "compare", **rc}, manifests_dirs)


def _input_digests(output_dir: Path) -> dict:
    digests = {}
    for stage in artifacts.TRAINED_STAGES:
        digests[stage] = artifacts.manifest_digest(artifacts.stage_dir(output_dir, stage))
    for kind in ("onnx", "tensorrt"):
        root = artifacts.stage_dir(output_dir, kind)
        if root.is_dir():
            for d in sorted(root.iterdir()):
                digests[f"{kind}/{d.name}"] = artifacts.manifest_digest(d)
    sens = artifacts.stage_dir(output_dir, "pruned") / "sensitivity.json"
    if sens.is_file():
        import hashlib

        digests["pruned/sensitivity.json"] = hashlib.sha256(sens.read_bytes()).hexdigest()[:16]
    return digests


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
    results["targets"] = evaluate_targets(results)
    log.info("recommendation re-evaluated from the existing measurements (%s): %s",
             ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in new.items()), message)
    if chosen is None:
        log.warning("%s", message)
    return True


def _render_outputs(results: dict, reports: Path) -> list[str]:
    from .report import render_report

    write_csv(results, reports / "results.csv")
    write_summary(results, reports / "summary.md")
    render_report(reports / "results.json", reports / "performance_report.html")
    return ["results.json", "results.csv", "summary.md", "performance_report.html"]


def _key_metric(results: dict) -> str:
    rec = results.get("recommendation")
    if not rec:
        return "no recommendation: " + (results.get("recommendation_message") or "")
    row = next(r for r in results["variants"] if r["name"] == rec["variant"])
    sp = row.get("speedup_vs_padded")
    return (f"recommended {rec['variant']}" + (f", {sp:.1f}x {REFERENCE} end to end" if sp else "")
            + (f", accuracy {100 * row['accuracy_delta']:+.2f} pts" if row.get("accuracy_delta") is not None else ""))


def run(cfg: CompareConfig) -> StageResult:
    start = time.perf_counter()
    reports = Path(cfg.reports_dir)
    out = Path(cfg.output_dir)
    if cfg.report_only:
        res_path = reports / "results.json"
        if not res_path.is_file():
            raise MissingArtifact(res_path, "python compare.py")
        results = json.loads(res_path.read_text(encoding="utf-8"))
        if reevaluate(results, cfg):
            artifacts.atomic_write_json(res_path, results)
        _render_outputs(results, reports)
        return StageResult("compare", "ok", time.perf_counter() - start, _key_metric(results), str(reports))
    baseline_dir = artifacts.stage_dir(out, "baseline")
    artifacts.require_manifest(baseline_dir, "baseline")
    fp = _fingerprint(cfg, _input_digests(out))
    current = None if cfg.force else artifacts.is_current(reports, fp)
    if current and (reports / "results.json").is_file():
        results = json.loads((reports / "results.json").read_text(encoding="utf-8"))
        _render_outputs(results, reports)  # cheap; picks up template changes
        log.info("compare is up to date (%s); --force re-measures", artifacts.manifest_path(reports))
        return StageResult("compare", "up-to-date", time.perf_counter() - start, _key_metric(results), str(reports))
    artifacts.begin_stage(reports)
    for name in ("results.json", "results.csv", "summary.md", "performance_report.html"):
        (reports / name).unlink(missing_ok=True)
    with stage_logging("compare", reports):
        print_config("compare", cfg)
        import torch

        threads_before = torch.get_num_threads()
        try:
            results = measure(cfg)
        finally:
            torch.set_num_threads(threads_before)
        artifacts.atomic_write_json(reports / "results.json", results)
        outputs = _render_outputs(results, reports)
        if not cfg.quiet:
            print(summary_table(results))
        artifacts.write_manifest(reports, stage="compare", status="ok", config=cfg.to_dict(), fingerprint=fp,
                                 inputs=_input_digests(out), outputs=outputs,
                                 metrics={"recommendation": results.get("recommendation"),
                                          "targets": results.get("targets")})
    if results.get("recommendation") is None:
        log.warning("%s", results.get("recommendation_message"))
    return StageResult("compare", "ok", time.perf_counter() - start, _key_metric(results), str(reports))


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


def measure(cfg: CompareConfig) -> dict:
    """The whole measurement; returns the results.json content."""
    import torch
    from transformers import AutoConfig

    from . import data as data_mod
    from . import modeling

    t_start = time.perf_counter()
    load_start = _loadavg()
    cpu_share = bm.CpuShare()
    phases: dict[str, float] = {}
    clock = [t_start]

    def phase(name):
        now = time.perf_counter()
        phases[name] = round(now - clock[0], 2)
        clock[0] = now

    proto = cfg.protocol()
    threads = proto["threads"]
    torch.set_num_threads(threads)
    out = Path(cfg.output_dir)
    rows_v, manifests = discover(out, cfg.device)
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
    lengths = [len(s) for s in data_mod.tokenize(texts, tokenizer, max_length)]
    log.info("eval data: %s, %d texts, mean %.1f tokens (max %d); %d threads; %d variant row(s), %d measurable",
             splits.source, len(texts), float(np.mean(lengths)), max(lengths), threads, len(rows_v),
             sum(v.status == "ok" for v in rows_v))

    configs = {}
    for v in rows_v:
        if v.model_dir and v.source not in configs:
            cdir = v.model_dir if (Path(v.model_dir) / "config.json").is_file() else str(baseline_dir)
            configs[v.source] = AutoConfig.from_pretrained(cdir).to_dict()

    phase("setup")
    # ---- open predictors
    preds: dict[str, object] = {}
    load_s: dict[str, float] = {}
    shared_torch: dict[tuple, object] = {}
    for v in rows_v:
        if v.status != "ok":
            continue
        key = (v.kind, v.path, v.device, v.precision)
        t0 = time.perf_counter()
        try:
            if v.kind == "torch" and key in shared_torch:
                preds[v.name] = shared_torch[key]
            else:
                preds[v.name] = open_predictor(v.spec(threads))
                if v.kind == "torch":
                    shared_torch[key] = preds[v.name]
        except PipelineError as exc:
            v.status, v.reason = "failed", f"cannot open: {exc}"
            log.warning("%s: %s", v.name, v.reason)
            continue
        load_s[v.name] = time.perf_counter() - t0
    torch.set_num_threads(threads)  # a predictor may have changed it
    live = [v for v in rows_v if v.status == "ok"]
    phase("open_predictors")

    # ---- machine peak (before)
    peak_before = bm.matmul_peak(threads, sizes=proto["matmul_sizes"])
    log.info("FP32 matmul peak: %.1f GFLOP/s (%d threads)", peak_before["gflops"], threads)
    gpu_peaks = bm.gpu_matmul_peaks() if any(v.device == "cuda" for v in live) else None

    def peak_flops(v, cpu_gflops):
        if v.device == "cuda":  # against the peak of the row's own compute type (fp32 rows run with TF32 off)
            return bm.peak_for(v.precision, gpu_peaks)[0]
        return cpu_gflops * 1e9

    def timers_for(names):
        return {n: bm.CudaTimer() for n in names if next(v for v in live if v.name == n).device == "cuda"}

    phase("matmul_peak")
    # ---- sweep (model only)
    max_pos = int(getattr(base_config, "max_position_embeddings", 512))
    seqs = sorted({min(s, max_pos) for s in proto["sweep_seqs"]})
    batches = list(proto["sweep_batches"])
    vocab = int(getattr(base_config, "vocab_size", 30522))
    sweep_rows = [v for v in live if v.batching == "dynamic"]
    sweep: dict[str, list] = {v.name: [] for v in sweep_rows}
    cells = [(b, s) for s in seqs for b in batches]
    guard = bm.CpuShare.guard if proto["guard"] else None
    retried = 0
    log.info("sweep: %d cells x %d variants, %d repeats", len(cells), len(sweep_rows), proto["repeats"])
    for b, s in progress(cells, desc="sweep", unit="cell"):
        batch = bm.synthetic_batch(b, s, vocab, with_tt)
        tasks = {}
        for v in sweep_rows:
            p = preds[v.name]
            why = cell_refusal(p, b, s)
            if why:  # e.g. outside a TensorRT engine's optimization profile: recorded, never fatal
                v.extra.setdefault("sweep_skipped", []).append({"batch": b, "seq": s, "reason": why})
                continue
            inputs = _inputs_for(p, batch)
            tasks[v.name] = (lambda p=p, inputs=inputs: p.predict_logits(inputs))
        cell_stats: dict = {}
        times = bm.run_interleaved(tasks, proto["repeats"], warmup=1, timers=timers_for(list(tasks)),
                                   settle_s=proto["settle_s"], prime_below_s=proto["prime_below_s"],
                                   guard=guard, stats=cell_stats)
        retried += cell_stats.get("retried_rounds", 0)
        for v in sweep_rows:
            if v.name not in times:
                continue
            t = times[v.name]
            flops = bm.forward_flops(configs[v.source], [s] * b)
            med = float(np.median(t))
            sweep[v.name].append({
                "batch": b, "seq": s, "samples_per_s": bm.spread(bm.rates(b, t), keep_values=False),
                "p50_ms": med * 1000, "latency_ms": bm.spread(t, 1000, keep_values=False),
                "other_cpu_share_max": max(cell_stats.get("other_cpu_share") or [0.0]),
                **bm.efficiency(flops, med, peak_flops(v, peak_before["gflops"]))})

    phase("sweep")
    # ---- choose each variant's end-to-end batch size from the sweep
    mean_len = float(np.mean(lengths))
    e2e_seq = next((s for s in seqs if s >= mean_len), seqs[-1])
    e2e_batch: dict[str, tuple[int, str]] = {}
    for v in live:
        if v.batching == "padded":
            e2e_batch[v.name] = (PADDED_BATCH, f"fixed: the naive reference pads every input to {PADDED_LENGTH}")
            continue
        cands = [c for c in sweep[v.name] if c["seq"] == e2e_seq] or sweep[v.name]
        if not cands:
            e2e_batch[v.name] = (min(batches), "no sweep cell fits this variant: the smallest sweep batch")
            continue
        best = max(cands, key=lambda c: c["samples_per_s"]["median"])
        e2e_batch[v.name] = (best["batch"], f"best sweep throughput at seq {e2e_seq} (eval mean {mean_len:.1f} tokens)")

    for v in live:  # a TensorRT profile too small for the eval texts: that variant fails, the run goes on
        why = cell_refusal(preds[v.name], e2e_batch[v.name][0], max(lengths))
        if why:
            v.status, v.reason = "failed", f"cannot take the end-to-end batches: {why}"
            log.warning("%s: %s", v.name, v.reason)
    live = [v for v in live if v.status == "ok"]

    # ---- end-to-end throughput + accuracy
    predictions: dict[str, np.ndarray] = {}
    consistent: dict[str, bool] = {}

    def e2e_task(v):
        p, (bsz, _) = preds[v.name], e2e_batch[v.name]
        pad_to = PADDED_LENGTH if v.batching == "padded" else None

        def go():
            y = classify_texts(p, tokenizer, texts, batch_size=bsz, max_length=max_length, with_tt=with_tt,
                               pad_to=pad_to)
            if v.name in predictions:
                consistent[v.name] = consistent.get(v.name, True) and bool(np.array_equal(predictions[v.name], y))
            predictions[v.name] = y
        return go

    warm_texts = texts[:min(len(texts), 2 * PADDED_BATCH)]
    for v in live:  # warm-up on a slice: a full pass of the padded reference is long
        for _ in range(max(proto["warmup"], 1)):
            classify_texts(preds[v.name], tokenizer, warm_texts, batch_size=e2e_batch[v.name][0],
                           max_length=max_length, with_tt=with_tt,
                           pad_to=PADDED_LENGTH if v.batching == "padded" else None)
    log.info("end to end: %d texts x %d variants x %d repeats", len(texts), len(live), proto["repeats"])
    bar = progress(total=len(live) * proto["repeats"], desc="end to end", unit="pass")
    e2e_stats: dict = {}
    e2e_times = bm.run_interleaved({v.name: e2e_task(v) for v in live}, proto["repeats"], warmup=0,
                                   progress=lambda n, r: bar.update(1), settle_s=proto["settle_s"],
                                   guard=guard, stats=e2e_stats)
    retried += e2e_stats.get("retried_rounds", 0)
    bar.close()
    phase("end_to_end")

    # ---- latency, batch 1, sequential
    rng = np.random.default_rng(dcfg["seed"])
    n_req = min(proto["latency_requests"], len(texts))
    req_texts = [texts[i] for i in rng.permutation(len(texts))[:n_req]]
    chunks = [list(c) for c in np.array_split(np.array(req_texts, dtype=object), proto["repeats"]) if len(c)]
    warm_req = req_texts[:max(2, min(10, n_req))]
    lat_tasks = {}
    for v in live:
        p = preds[v.name]
        pad_to = PADDED_LENGTH if v.batching == "padded" else None
        fn = (lambda t, p=p, pad_to=pad_to: single_request(p, tokenizer, t, max_length=max_length,
                                                           with_tt=with_tt, pad_to=pad_to))
        lat_tasks[v.name] = LatencyTask(fn, warm_req, chunks, proto["warmup"])
    log.info("latency: %d single requests x %d variants", n_req, len(live))
    lat_stats: dict = {}
    bm.run_interleaved(lat_tasks, len(chunks), warmup=proto["warmup"], settle_s=proto["settle_s"],
                       guard=guard, stats=lat_stats)
    retried += lat_stats.get("retried_rounds", 0)
    phase("latency")

    # ---- accuracy of single requests (untimed): dynamically quantized models compute activation
    # scales per batch tensor, so their predictions depend on what shares a batch
    single_preds: dict[str, np.ndarray] = {}
    for v in progress([v for v in live if v.batching == "dynamic"], desc="batch-1 accuracy", unit="variant"):
        single_preds[v.name] = classify_texts(preds[v.name], tokenizer, texts, batch_size=1, max_length=max_length,
                                              with_tt=with_tt)
    phase("batch1_accuracy")

    # ---- peak memory + load time, one fresh process per variant
    memory: dict[str, dict] = {}
    if not cfg.skip_memory:
        for v in progress(live, desc="memory", unit="variant"):
            bsz = e2e_batch[v.name][0]
            spec = {"factory": "bertopt.compare_stage:open_predictor", "predictor": v.spec(threads),
                    "batch": bsz, "seq": min(max_length, max_pos), "vocab_size": vocab,
                    "with_token_type_ids": with_tt, "device": v.device, "runs": 2}
            memory[v.name] = bm.fresh_process_memory(spec, env={"OMP_NUM_THREADS": str(threads)})
            if "error" in memory[v.name]:
                log.warning("%s: memory probe failed: %s", v.name, memory[v.name]["error"])
    phase("memory")
    peak_after = bm.matmul_peak(threads, sizes=proto["matmul_sizes"])
    phase("matmul_peak_after")
    peak_gflops = max(peak_before["gflops"], peak_after["gflops"])
    if peak_after["gflops"] > peak_before["gflops"]:  # CPU efficiencies against the higher of the two
        for v in sweep_rows:
            if v.device == "cpu":
                for c in sweep[v.name]:
                    c["fraction_of_peak"] = c["gflops"] / peak_gflops

    # ---- assemble rows
    flops_e2e = {src: bm.forward_flops(c, lengths) for src, c in configs.items()}
    rows = []
    for v in rows_v:
        row = {"name": v.name, "status": v.status, "reason": v.reason, "backend": v.backend,
               "precision": v.precision, "source": v.source, "device": v.device, "kind": v.kind,
               "path": v.path, "model_dir": v.model_dir, "variant": v.variant, "batching": v.batching,
               "size_bytes": v.size_bytes, "threads": threads if v.device == "cpu" else None, **v.extra,
               "accuracy": None, "accuracy_delta": None, "throughput": None, "latency": None, "sweep": None,
               "memory": None, "efficiency": None, "speedup_vs_padded": None, "speedup_vs_fp32": None}
        if v.status == "ok":
            y = predictions[v.name]
            t = e2e_times[v.name]
            bsz, why = e2e_batch[v.name]
            real = int(sum(lengths))
            padded = len(texts) * PADDED_LENGTH if v.batching == "padded" else None
            by_batching = {f"batch_{bsz}": float((y == labels).mean())}
            if v.name in single_preds:
                by_batching["batch_1"] = float((single_preds[v.name] == labels).mean())
            row["accuracy"] = min(by_batching.values())  # the worst case is what a deployment can promise
            row["accuracy_by_batching"] = by_batching
            row["predictions_consistent"] = consistent.get(v.name, True)
            row["throughput"] = {"samples_per_s": bm.spread(bm.rates(len(texts), t)),
                                 "seconds": bm.spread(t), "batch_size": bsz, "batch_size_reason": why,
                                 "texts": len(texts), "real_tokens": real,
                                 "batching": (f"data order, padded to {PADDED_LENGTH}" if v.batching == "padded"
                                              else "length-sorted batches, dynamic padding")}
            if padded:
                row["throughput"]["padded_tokens"] = padded
            lt = lat_tasks[v.name]
            row["latency"] = {"e2e_ms": bm.percentiles(lt.e2e, scale=1000),
                              "model_ms": bm.percentiles(lt.model, scale=1000),
                              "round_p50_ms": bm.spread(lt.round_p50, 1000, keep_values=False),
                              "requests": len(lt.e2e), "padded_to": PADDED_LENGTH if v.batching == "padded" else None}
            row["sweep"] = sweep.get(v.name)
            if v.batching == "padded":
                row["sweep_note"] = f"model-only sweep is the same model as {BASELINE_ROW}"
            mem = memory.get(v.name)
            row["memory"] = mem
            row["load_time_s"] = (mem or {}).get("load_time_s", load_s.get(v.name))
            row["load_time_in_process_s"] = load_s.get(v.name)
            med_t = float(np.median(t))
            eff = {"e2e": bm.efficiency(flops_e2e[v.source], med_t, peak_flops(v, peak_gflops))}
            cell = next((c for c in sweep.get(v.name) or [] if (c["batch"], c["seq"]) == EFFICIENCY_CELL), None)
            if cell:
                eff["sweep_32x128"] = {"gflops": cell["gflops"], "fraction_of_peak": cell["fraction_of_peak"]}
            row["efficiency"] = eff
        rows.append(row)

    by_name = {r["name"]: r for r in rows}
    base_row = by_name.get(BASELINE_ROW)
    baseline_acc = base_row["accuracy"] if base_row and base_row["accuracy"] is not None else \
        (manifests["baseline"].get("metrics") or {}).get("best_eval_accuracy")
    ref = by_name.get(REFERENCE)
    for r in rows:
        if r["accuracy"] is not None and baseline_acc is not None:
            r["accuracy_delta"] = r["accuracy"] - baseline_acc
        if r["throughput"]:
            mine = r["throughput"]["samples_per_s"]["median"]
            if ref and ref.get("throughput"):
                r["speedup_vs_padded"] = mine / ref["throughput"]["samples_per_s"]["median"]
            if base_row and base_row.get("throughput"):
                r["speedup_vs_fp32"] = mine / base_row["throughput"]["samples_per_s"]["median"]

    chosen, message, verdicts = recommend(rows, baseline_acc, optimize_for=cfg.optimize_for, target=cfg.target,
                                          accuracy_budget=cfg.accuracy_budget)
    env = artifacts.environment()
    load_end = _loadavg()
    others = cpu_share.others()
    env.update(threads=threads, usable_cores=usable_cores(), torch_threads=torch.get_num_threads(),
               tokenizers_parallelism=os.environ.get("TOKENIZERS_PARALLELISM"),
               load_average_start=load_start, load_average_end=load_end,
               other_processes_cpu_share=round(others, 3))
    warnings = busy_warnings(others, usable_cores())
    for w in warnings:
        log.warning("%s", w)
    try:
        import onnxruntime as ort

        env["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:  # pragma: no cover
        pass
    try:
        import psutil

        env["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover
        pass
    results = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_revision": artifacts.git_revision(),
        "config": cfg.to_dict(),
        "environment": env,
        "protocol": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in proto.items()},
                     "sweep_seqs_used": seqs, "sweep_batches_used": batches,
                     "e2e_seq_for_batch_choice": e2e_seq, "interleaving": "round-robin, rotating start each round",
                     "timer": "time.perf_counter (CUDA events + synchronisation for GPU rows)",
                     "reference": {"name": REFERENCE, "pad_to": PADDED_LENGTH, "batch_size": PADDED_BATCH},
                     "wall_s": None, "retried_rounds": retried},
        "data": {"source": splits.source, "eval_rows": len(texts), "label_names": splits.label_names,
                 "max_length": max_length, "mean_tokens": mean_len, "max_tokens": int(max(lengths)),
                 "real_tokens": int(sum(lengths)), "settings": dcfg},
        "hardware": {"matmul_peak": {**peak_before, "gflops": peak_gflops, "before": peak_before["gflops"],
                                     "after": peak_after["gflops"]},
                     "gpu_matmul_peaks": gpu_peaks},
        "baseline_accuracy": baseline_acc,
        "variants": rows,
        "recommendation": recommendation_entry(chosen, message) if chosen else None,
        "recommendation_message": message,
        "warnings": warnings,
        "eligibility": verdicts,
        "training": _training_summary(manifests),
        "inputs": {k: {"stage": m.get("stage"), "status": m.get("status"), "created": m.get("created")}
                   for k, m in manifests.items()},
    }
    sens = artifacts.stage_dir(out, "pruned") / "sensitivity.json"
    if sens.is_file():
        try:
            results["pruning"] = json.loads(sens.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            log.warning("cannot read %s: %s", sens, exc)
    results["targets"] = evaluate_targets(results)
    results["protocol"]["wall_s"] = round(time.perf_counter() - t_start, 1)
    results["protocol"]["phase_s"] = phases
    return results
