"""The GPU smoke run (``python gpu_smoke.py``): every GPU path of the pipeline in a few minutes, on
whatever is installed, ending with one table. Each row is ``ok``, ``skipped`` (with the reason: no
CUDA device, no onnxruntime-gpu, no tensorrt) or ``failed`` (with the error).

Rows: CUDA fine-tunes (FP32, fp16 autocast + GradScaler, bf16) on a few hundred rows; torch GPU
inference FP32/FP16/BF16 at batch 1 and 32 x seq 128 (synchronised timing, p50/p99, samples/s,
memory) with parity against the CPU FP32 reference; the ONNX stage (ONNX Runtime CUDA rows, TensorRT
engines when ``tensorrt`` imports); ``compare --quick --target gpu``.

It needs no package registry and no optional package: the model comes from ``--model`` (a
save_pretrained directory you bring along), the data from ``--data-dir`` (SST-2 TSVs) or a small
synthetic task written on the fly, and every optional back end is imported lazily.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .errors import ConfigError

log = logging.getLogger("bertopt.gpu_smoke")

NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class Row:
    name: str
    status: str = "ok"          # ok | skipped | failed
    reason: Optional[str] = None
    figures: dict = field(default_factory=dict)


MIN_ROWS = 16  # both labels in every split of the fine-tunes


@dataclass
class SmokeConfig:
    model: Optional[str] = None
    data_dir: Optional[str] = None
    out: str = "gpu_smoke_out"
    rows: int = 256
    epochs: int = 1
    max_length: int = 128
    repeats: int = 30
    bert_base: bool = False
    skip_compare: bool = False
    device: str = "cuda"  # "cpu" rehearses every row on the CPU (checks the code paths; figures mean nothing)
    external_data: bool = False  # every ONNX file with its weights in <name>.onnx.data (the > 2 GB layout)

    def __post_init__(self):
        p = [f"--{name.replace('_', '-')} must be an integer >= {low} (got {getattr(self, name)!r})"
             for name, low in (("rows", MIN_ROWS), ("epochs", 1), ("repeats", 1), ("max_length", 8))
             if not isinstance(getattr(self, name), int) or getattr(self, name) < low]
        dev = self.device
        if not (dev in ("cuda", "cpu") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            p.append(f"--device must be cuda, cuda:N or cpu (got {dev!r})")
        if p:
            raise ConfigError(p)


# ----------------------------------------------------------------------------- helpers
def cuda_state(device: str = "cuda") -> tuple[bool, dict]:
    """(run the GPU rows, facts). ``device`` cpu = a rehearsal of every row on the CPU."""
    import torch

    facts = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "device": device}
    if device == "cpu":
        return True, facts
    if not torch.cuda.is_available():
        return False, facts
    cc = torch.cuda.get_device_capability(0)
    facts.update(gpu=torch.cuda.get_device_name(0), compute_capability=f"{cc[0]}.{cc[1]}",
                 devices=torch.cuda.device_count())
    return True, facts


def _safe(name: str, fn: Callable[[], Row | list[Row]]) -> list[Row]:
    """Run one step; an unexpected exception becomes a failed row (the run goes on)."""
    try:
        out = fn()
    except Exception as exc:  # a smoke run reports every failure and keeps going
        log.debug("%s", traceback.format_exc())
        text = str(exc).strip().splitlines()
        return [Row(name, "failed", f"{type(exc).__name__}: {text[0][:300] if text else ''}")]
    return out if isinstance(out, list) else [out]


def write_synthetic_sst2(directory: Path, n: int, seed: int = 0) -> Path:
    """A small separable sentiment task in SST-2's layout (for machines without the data)."""
    pos, neg = ["good", "great", "wonderful", "superb"], ["bad", "awful", "boring", "dull"]
    fill = ["the", "movie", "film", "was", "really", "quite", "plot", "acting", "a", "very"]
    rng = random.Random(seed)
    for split, count in (("train", n), ("dev", max(64, n // 4))):
        lines = ["sentence\tlabel"]
        for i in range(count):
            words = [rng.choice(fill) for _ in range(rng.randint(3, 40))]
            words.insert(rng.randrange(len(words) + 1), rng.choice(pos if i % 2 else neg))
            lines.append(f"{' '.join(words)}\t{i % 2}")
        (directory / "sst2").mkdir(parents=True, exist_ok=True)
        (directory / "sst2" / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def resolve_data(cfg: SmokeConfig) -> tuple[str, str]:
    """(data_dir, where it came from)."""
    if cfg.data_dir and (Path(cfg.data_dir) / "sst2" / "train.tsv").is_file():
        return cfg.data_dir, f"SST-2 from {cfg.data_dir}"
    path = write_synthetic_sst2(Path(cfg.out) / "data", cfg.rows)
    return str(path), "a synthetic separable task (no SST-2 found under --data-dir)"


def build_bert_base(model_dir: str, out: Path) -> str:
    """A BERT-base-sized classifier (random weights, 12 x 768) with --model's tokenizer: for the
    throughput rows only (its accuracy means nothing)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    target = out / "bert-base-random"
    if not (target / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(model_dir)
        BertForSequenceClassification(BertConfig(vocab_size=len(tok), num_labels=2)).save_pretrained(target)
        tok.save_pretrained(target)
    return str(target)


# ----------------------------------------------------------------------------- fine-tuning rows
def train_rows(cfg: SmokeConfig, model: str, data_dir: str, cuda: bool, tag: str = "") -> list[Row]:
    """FP32 baseline, then fp16 + GradScaler and bf16 autocast fine-tunes of ``model`` on CUDA."""
    if not cuda:
        return [Row(f"train{tag}-{p}", "skipped", NO_CUDA) for p in PRECISIONS]
    return [r for p in PRECISIONS for r in _safe(f"train{tag}-{p}", lambda p=p: _train_one(cfg, model, data_dir, p, tag))]


def _train_one(cfg: SmokeConfig, model: str, data_dir: str, precision: str, tag: str) -> Row:
    from .config import TrainConfig
    from .train_stage import run_baseline, run_mixed_precision

    out = Path(cfg.out) / ("saved_models" if not tag and precision != "fp16" else f"train{tag}-{precision}")
    tc = TrainConfig(model=model, dataset="sst2", data_dir=data_dir, output_dir=str(out), device=cfg.device,
                     max_train_samples=cfg.rows, max_length=cfg.max_length, epochs=cfg.epochs,
                     precision=precision, quiet=True, force=True)
    result = (run_baseline if precision == "fp32" else run_mixed_precision)(tc)
    name = f"train{tag}-{precision}"
    if result.status != "ok":
        return Row(name, result.status, result.key_metric)
    from . import artifacts

    m = (artifacts.read_manifest(result.directory) or {}).get("metrics", {})
    keys = ("samples_per_s", "train_time_s", "peak_memory_mb", "peak_memory_kind", "best_eval_accuracy",
            "overflow_skipped_steps", "mean_train_tokens")
    return Row(name, "ok", None, {k: m.get(k) for k in keys if k in m})


# ----------------------------------------------------------------------------- torch inference rows
def torch_inference_rows(cfg: SmokeConfig, model_dir: str, texts: list[str], cuda: bool, tag: str = "") -> list[Row]:
    names = [f"infer{tag}-torch-{p}" for p in PRECISIONS]
    if not cuda:
        return [Row(n, "skipped", NO_CUDA) for n in names]
    from .runtimes import TorchPredictor

    ref = _reference_logits(model_dir, texts, cfg.max_length)
    rows = []
    for name, precision in zip(names, PRECISIONS):
        rows += _safe(name, lambda n=name, p=precision: _time_predictor(
            n, TorchPredictor(model_dir, name=n, device=cfg.device, precision=p), cfg, model_dir, texts, ref))
    return rows


def _encode(model_dir: str, texts: list[str], max_length: int) -> list[dict]:
    from . import data as data_mod
    from . import modeling

    tok = modeling.load_tokenizer(model_dir)
    enc = data_mod.tokenize(texts, tok, max_length)
    return [data_mod.pad_batch(enc[i:i + 32], tok.pad_token_id or 0, True) for i in range(0, len(enc), 32)]


def _wall_timer(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _reference_logits(model_dir: str, texts: list[str], max_length: int) -> list[np.ndarray]:
    from .runtimes import TorchPredictor

    cpu = TorchPredictor(model_dir, name="torch-fp32-cpu", device="cpu")
    return [cpu.predict_logits(_inputs(cpu, b)) for b in _encode(model_dir, texts, max_length)]


def _inputs(predictor, batch: dict) -> dict:
    names = getattr(predictor, "input_names", None) or batch.keys()
    return {k: v for k, v in batch.items() if k in names}


def _time_predictor(name: str, predictor, cfg: SmokeConfig, model_dir: str, texts: list[str],
                    reference: Optional[list]) -> Row:
    """Batch 1 and 32 at seq 128: synchronised p50/p99, samples/s, CUDA memory; parity vs CPU FP32."""
    import torch

    from . import benchmarking as bm
    from . import gpu_measure as gm
    from . import export as ex
    from . import modeling

    vocab = len(modeling.load_tokenizer(model_dir))
    cuda = cfg.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timer = gm.CudaTimer(cfg.device) if cuda else _wall_timer
    figures = {}
    for b in (1, 32):
        batch = _inputs(predictor, bm.synthetic_batch(b, cfg.max_length, vocab))
        for _ in range(5):
            predictor.predict_logits(batch)  # warm-up (kernels, allocator, autotuning)
        times = [timer(lambda: predictor.predict_logits(batch)) for _ in range(cfg.repeats)]
        p = bm.percentiles(times, scale=1000.0)
        figures[f"b{b}_p50_ms"], figures[f"b{b}_p99_ms"] = round(p["p50"], 3), round(p["p99"], 3)
        figures[f"b{b}_samples_per_s"] = round(b / float(np.median(times)), 1)
    if cuda:
        figures["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if reference is not None:
        got = [predictor.predict_logits(_inputs(predictor, x)) for x in _encode(model_dir, texts, cfg.max_length)]
        parity = ex.compare_logits(reference, got)
        figures.update(max_abs_diff_vs_cpu_fp32=parity["max_abs_diff"], argmax_agreement=parity["argmax_agreement"])
    return Row(name, "ok", None, figures)


# ----------------------------------------------------------------------------- ONNX Runtime CUDA + TensorRT rows
ORT_GPU_FILES = (("fp32", "model.onnx"), ("opt", "model.opt.onnx"), ("fp16", "model.fp16.onnx"))


def onnx_rows(cfg: SmokeConfig, data_dir: str, texts: list[str], cuda: bool) -> list[Row]:
    """The ONNX stage on the CUDA-trained baseline, then ORT CUDA and TensorRT rows from its files."""
    names = [f"ort-{v}-cuda" for v, _ in ORT_GPU_FILES] + ["tensorrt"]
    baseline = Path(cfg.out) / "saved_models" / "baseline"
    if not cuda:
        return [Row(n, "skipped", NO_CUDA) for n in names]
    if not (baseline / "config.json").is_file():
        return [Row(n, "skipped", "no CUDA-trained baseline (its train row failed)") for n in names]
    stage = _safe("onnx-stage", lambda: _onnx_stage(cfg, data_dir))
    if stage[0].status != "ok":
        return stage
    onnx_dir = Path(cfg.out) / "saved_models" / "onnx" / "baseline"
    ref = _reference_logits(str(baseline), texts, cfg.max_length)
    rows = stage + _safe("onnx-layout", lambda: _layout_row(cfg, onnx_dir))
    for variant, file in ORT_GPU_FILES:
        rows += _safe(f"ort-{variant}-cuda", lambda v=variant, f=file: _ort_cuda_row(cfg, onnx_dir / f, v, baseline,
                                                                                    texts, ref))
    return rows + _trt_rows(cfg, baseline, texts, ref)


def _layout_row(cfg: SmokeConfig, onnx_dir: Path) -> Row:
    """Each ONNX model is one .onnx plus at most one data file (with --external-data: exactly one,
    so the CUDA and TensorRT rows below read the external-data layout)."""
    from . import model_files

    layout = {p.name: [f.name for f in model_files.model_files(p)] for p in sorted(onnx_dir.glob("*.onnx"))}
    bad = [n for n, files in layout.items() if len(files) > 2 or (cfg.external_data and len(files) != 2)]
    return Row("onnx-layout", "failed" if bad else "ok", f"unexpected layout: {', '.join(bad)}" if bad else None,
               {"files": layout, "bytes": {n: model_files.model_bytes(onnx_dir / n) for n in layout}})


def _onnx_stage(cfg: SmokeConfig, data_dir: str) -> Row:
    from .onnx_stage import OnnxConfig, run

    oc = OnnxConfig(output_dir=str(Path(cfg.out) / "saved_models"), source="baseline", dataset="sst2",
                    data_dir=data_dir, variants="opt,int8,fp16,qdq", device=cfg.device, quiet=True, force=True,
                    max_length=cfg.max_length)
    result = run(oc)
    return Row("onnx-stage", "ok" if result.status in ("ok", "up-to-date") else result.status, None,
               {"summary": result.key_metric, "wall_s": round(result.wall_s, 1)})


def _ort_cuda_row(cfg: SmokeConfig, path: Path, variant: str, baseline: Path, texts, ref) -> Row:
    from .errors import BackendUnavailable
    from .runtimes import DEVICE_PROVIDERS, OrtPredictor

    name = f"ort-{variant}-cuda"
    if not path.is_file():
        return Row(name, "skipped", f"{path.name} was not built (see the onnx-stage row)")
    try:
        pred = OrtPredictor(path, name=name, providers=DEVICE_PROVIDERS["cuda"],
                            precision="fp16" if variant == "fp16" else "fp32")
    except BackendUnavailable as exc:
        return Row(name, "skipped", str(exc))
    return _time_predictor(name, pred, cfg, str(baseline), texts, ref)


def _trt_rows(cfg: SmokeConfig, baseline: Path, texts, ref) -> list[Row]:
    from . import artifacts
    from .runtimes import TensorRTPredictor

    m = artifacts.read_manifest(Path(cfg.out) / "saved_models" / "tensorrt" / "baseline") or {}
    if m.get("status") != "ok":
        return [Row("tensorrt", m.get("status", "missing"), m.get("reason") or "no TensorRT manifest")]
    rows = []
    for precision, e in m.get("metrics", {}).get("engines", {}).items():
        name = f"trt-{precision}"
        if e.get("status") != "ok":
            rows.append(Row(name, e.get("status"), e.get("reason")))
            continue
        path = Path(cfg.out) / "saved_models" / "tensorrt" / "baseline" / e["file"]
        rows += _safe(name, lambda n=name, p=path, pr=precision: _time_predictor(
            n, TensorRTPredictor(p, precision=pr), cfg, str(baseline), texts, ref))
    return rows


# ----------------------------------------------------------------------------- compare
def compare_row(cfg: SmokeConfig, data_dir: str, cuda: bool) -> Row:
    if not cuda:
        return Row("compare-quick-gpu", "skipped", NO_CUDA)
    if cfg.skip_compare:
        return Row("compare-quick-gpu", "skipped", "--skip-compare")
    from .compare import CompareConfig, run

    reports = Path(cfg.out) / "reports"
    cc = CompareConfig(output_dir=str(Path(cfg.out) / "saved_models"), reports_dir=str(reports), quick=True,
                       target="gpu", dataset="sst2", data_dir=data_dir, quiet=True, force=True)
    result = run(cc)
    res = json.loads((reports / "results.json").read_text())
    rec = res.get("recommendation") or {}
    return Row("compare-quick-gpu", result.status, None if rec else res.get("recommendation_message"),
               {"recommendation": rec.get("variant"), "results_json": str(reports / "results.json")})


# ----------------------------------------------------------------------------- the run
def run(cfg: SmokeConfig) -> dict:
    """Every row, in order; returns (and writes to ``<out>/gpu_smoke.json``) the whole result.
    ``--external-data``: the threshold of :mod:`bertopt.model_files` is 0 for the run (restored after)."""
    import os

    from .model_files import THRESHOLD_ENV

    saved = os.environ.get(THRESHOLD_ENV)
    if cfg.external_data:
        os.environ[THRESHOLD_ENV] = "0"
    try:
        return _run(cfg)
    finally:
        if saved is None:
            os.environ.pop(THRESHOLD_ENV, None)
        else:
            os.environ[THRESHOLD_ENV] = saved


def _run(cfg: SmokeConfig) -> dict:
    from . import data as data_mod
    from . import modeling

    start = time.perf_counter()
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    cuda, facts = cuda_state(cfg.device)
    model = modeling.resolve_model(cfg.model or modeling.DEFAULT_MODEL)
    data_dir, data_note = resolve_data(cfg)
    texts = data_mod.load_splits("sst2", data_dir, None, None, None, 256, 0).eval.texts
    facts.update(_backend_facts(), model=model, data=data_note, external_data=cfg.external_data)
    rows = train_rows(cfg, model, data_dir, cuda)
    rows += torch_inference_rows(cfg, _trained_or(cfg, model), texts, cuda)
    if cfg.bert_base:
        big = build_bert_base(model, Path(cfg.out))
        rows += train_rows(cfg, big, data_dir, cuda, tag="-bert-base")
        rows += torch_inference_rows(cfg, big, texts, cuda, tag="-bert-base")
    rows += onnx_rows(cfg, data_dir, texts, cuda)
    rows += _safe("compare-quick-gpu", lambda: compare_row(cfg, data_dir, cuda))
    result = {"environment": facts, "cuda": cuda, "wall_s": round(time.perf_counter() - start, 1),
              "rows": [vars(r) for r in rows]}
    from . import artifacts

    artifacts.atomic_write_json(Path(cfg.out) / "gpu_smoke.json", result)
    return result


def _trained_or(cfg: SmokeConfig, model: str) -> str:
    """The fine-tuned baseline of this run (a fixed classifier head, so GPU vs CPU parity means
    something), else the model as given."""
    baseline = Path(cfg.out) / "saved_models" / "baseline"
    return str(baseline) if (baseline / "manifest.json").is_file() else model


def _backend_facts() -> dict:
    facts = {}
    try:
        import onnxruntime as ort

        facts.update(onnxruntime=ort.__version__, ort_providers=ort.get_available_providers())
    except ImportError as exc:
        facts["onnxruntime"] = f"not installed ({exc})"
    from . import tensorrt as trt_mod

    facts["tensorrt"] = trt_mod.availability()[1]
    try:
        import transformers

        facts["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - a hard dependency
        pass
    return facts


def table(result: dict) -> str:
    """The closing summary: one line per row (figures abbreviated)."""
    lines = [f"{'row':28s} {'status':8s} figures / reason", "-" * 100]
    for r in result["rows"]:
        fig = ", ".join(f"{k}={_fmt(v)}" for k, v in r["figures"].items())
        lines.append(f"{r['name']:28s} {r['status']:8s} {fig or r['reason'] or ''}"[:400])
    env = result["environment"]
    lines.append("-" * 100)
    lines.append(f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), GPU {env.get('gpu', 'none')}, "
                 f"onnxruntime {env.get('onnxruntime')}, TensorRT: {env.get('tensorrt')}; {result['wall_s']}s")
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR", help="save_pretrained model directory (default: the packaged "
                        "MiniLM, if its package is installed)")
    parser.add_argument("--data-dir", metavar="DIR", help="directory with sst2/{train,dev}.tsv (default: data; "
                        "without it a synthetic task is written)", default="data")
    parser.add_argument("--output-dir", dest="out", metavar="DIR", default=SmokeConfig.out,
                        help=f"where everything is written (default: {SmokeConfig.out})")
    parser.add_argument("--rows", type=int, default=SmokeConfig.rows, help="training rows (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=SmokeConfig.epochs, help="epochs (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=SmokeConfig.repeats,
                        help="timed calls per inference cell (default: %(default)s)")
    parser.add_argument("--bert-base", action="store_true",
                        help="also time a BERT-base-sized model built from its config (random weights)")
    parser.add_argument("--skip-compare", action="store_true", help="leave out compare --quick --target gpu")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to rehearse every row on "
                        "the CPU (checks the code paths before a GPU run; the figures mean nothing)")
    parser.add_argument("--external-data", action="store_true",
                        help="save every ONNX file with its weights in one <name>.onnx.data (the layout of models "
                             "over 2 GB), so the ONNX Runtime CUDA and TensorRT rows read external data")
