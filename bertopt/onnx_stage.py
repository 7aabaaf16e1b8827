"""The onnx_tensorrt stage: export every trained model to ONNX, build every ONNX-stage variant of
the registry (:mod:`bertopt.variants`: ONNX Runtime fused/INT8/INT4/FP16/QDQ and OpenVINO FP32/INT8,
each with its registered converter; a backend that is not installed is 'skipped' with the reason),
check each against PyTorch (optimum-style ✓/x lines) and measure accuracy; then the TensorRT
sub-stage (:mod:`bertopt.tensorrt_stage`) where an NVIDIA GPU and TensorRT are present.

Output per source model (``baseline``, ``mixed_precision``, ``pruned`` or ``--source DIR``):
``<output_dir>/onnx/<source>/`` (model*.onnx, tokenizer, config.json, manifest.json) and
``<output_dir>/tensorrt/<source>/`` (model.<precision>.plan, manifest.json).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import artifacts, model_files, modeling, ptq_search, variants
from . import export as ex
from .cli import StageResult, print_config
from .config import CommonConfig
from .errors import ConfigError, PipelineError, first_line
from .logs import stage_logging
from .reference import Reference, accuracy
from .tensorrt_stage import tensorrt_source

log = logging.getLogger("bertopt.onnx_stage")

STAGE = "onnx_tensorrt"
OPTIONAL_VARIANTS = tuple(k for k in variants.onnx_keys(("onnxruntime", "openvino")) if k != "fp32")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
QDQ_EXCLUDES = ("ffn-output", "none")
MAX_TORCHSCRIPT_OPSET = 20  # the dynamo=False exporter's newest opset
COPY_FILES = ("config.json", "labels.json", "generation_config.json")


@dataclass
class OnnxConfig(CommonConfig):
    """onnx_tensorrt.py: ONNX export, ONNX Runtime variants and TensorRT engines."""

    source: Optional[str] = None  # comma list of stage names or model directories; None = every trained stage
    opset: int = 17
    variants: str = ",".join(OPTIONAL_VARIANTS)
    onnx_accuracy_budget: float = 0.01  # --onnx-accuracy-budget (compare's --accuracy-budget is another)
    parity_tolerance: float = 1e-4
    int8_per_channel: bool = True
    int8_reduce_range: Optional[bool] = None  # None = auto (True only on x86 without VNNI)
    int4_block_size: int = 32
    calibration_samples: int = 256
    calibration_method: str = "minmax"
    qdq_per_channel: bool = True
    qdq_exclude: str = "ffn-output"  # ffn-output = keep the feed-forward output MatMuls in float | none
    ort_threads: Optional[int] = None
    trt_min_shapes: str = "1x1"
    trt_opt_shapes: str = "8x128"
    trt_max_shapes: Optional[str] = None  # None = 64 x the source's max length
    trt_precisions: str = "fp32,fp16,int8"
    trt_workspace_mb: int = 4096

    def variant_list(self) -> list[str]:
        return [v.strip() for v in self.variants.split(",") if v.strip()]

    def trt_precision_list(self) -> list[str]:
        return [p.strip() for p in self.trt_precisions.split(",") if p.strip()]

    def problems(self) -> list[str]:
        from . import tensorrt as trt_mod

        p = super().problems()
        if not (ex.MIN_OPSET <= self.opset <= MAX_TORCHSCRIPT_OPSET):
            p.append(f"--opset must be between {ex.MIN_OPSET} and {MAX_TORCHSCRIPT_OPSET} (got {self.opset})")
        unknown = [v for v in self.variant_list() if v not in OPTIONAL_VARIANTS and v != "fp32"]
        if unknown:
            p.append(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(OPTIONAL_VARIANTS)}; "
                     "fp32 is always built)")
        if not (0 <= self.onnx_accuracy_budget < 1):
            p.append(f"--onnx-accuracy-budget is an absolute accuracy loss in [0, 1), e.g. 0.01 "
                     f"(got {self.onnx_accuracy_budget})")
        if not (self.parity_tolerance > 0):
            p.append(f"--parity-tolerance must be > 0 (got {self.parity_tolerance})")
        b = self.int4_block_size
        if not isinstance(b, int) or b < 16 or b & (b - 1):
            p.append(f"--int4-block-size must be a power of two >= 16 (got {b})")
        if not isinstance(self.calibration_samples, int) or self.calibration_samples < 1:
            p.append(f"--calibration-samples must be a positive integer (got {self.calibration_samples})")
        if self.calibration_method not in CALIBRATION_METHODS:
            p.append(f"--calibration-method must be one of {', '.join(CALIBRATION_METHODS)} "
                     f"(got {self.calibration_method!r})")
        if self.qdq_exclude not in QDQ_EXCLUDES:
            p.append(f"--qdq-exclude must be one of {', '.join(QDQ_EXCLUDES)} (got {self.qdq_exclude!r})")
        if self.ort_threads is not None and self.ort_threads < 1:
            p.append(f"--ort-threads must be >= 1 (got {self.ort_threads})")
        bad = [x for x in self.trt_precision_list() if x not in trt_mod.PRECISIONS]
        if bad:
            p.append(f"--trt-precisions: unknown {', '.join(bad)} (choose from {', '.join(trt_mod.PRECISIONS)})")
        if self.trt_workspace_mb < 64:
            p.append(f"--trt-workspace-mb must be >= 64 (got {self.trt_workspace_mb})")
        try:
            trt_mod.make_profile(self.trt_min_shapes, self.trt_opt_shapes, self.trt_max_shapes, self.max_length)
        except ConfigError as exc:
            p += exc.problems
        return p


def options_dict(cfg: OnnxConfig) -> dict:
    """The fields that determine this stage's ONNX output (the skip fingerprint)."""
    common = {f.name for f in dataclasses.fields(CommonConfig)}
    skip = {"source", "ort_threads"} | {f for f in vars(cfg) if f.startswith("trt_")}
    return {k: v for k, v in cfg.to_dict().items() if k not in common and k not in skip}


# ----------------------------------------------------------------------------- sources
@dataclass
class Source:
    name: str
    model_dir: Path
    manifest: Optional[dict]

    def digest(self) -> str:
        d = artifacts.manifest_digest(self.model_dir)
        if d:
            return d
        h = hashlib.sha256()  # a plain model directory: names, sizes and mtimes of its files
        for p in sorted(self.model_dir.iterdir()):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


def resolve_sources(cfg: OnnxConfig) -> list[Source]:
    """Every trained stage with an OK manifest (baseline required), or the ``--source`` list."""
    if cfg.source:
        sources = []
        for item in [s.strip() for s in cfg.source.split(",") if s.strip()]:
            if item in artifacts.TRAINED_STAGES:
                d = artifacts.stage_dir(cfg.output_dir, item)
                manifest = artifacts.require_manifest(d, item, ok_only=item != "pruned")
                if manifest.get("status") == "skipped":  # e.g. --compress auto kept the unpruned model
                    log.info("--source %s: the stage was skipped (%s); not exported", item, manifest.get("reason"))
                    continue
                sources.append(Source(item, d, artifacts.require_manifest(d, item)))
                continue
            path = Path(item).expanduser()
            if not path.is_dir():
                raise ConfigError(f"--source {item}: not a trained stage ({', '.join(artifacts.TRAINED_STAGES)}) "
                                  "and no such directory")
            if not (path / "config.json").is_file():
                raise ConfigError(f"--source {item}: directory has no config.json (not a save_pretrained model)")
            manifest = artifacts.read_manifest(path)
            if manifest is not None and manifest.get("status") != "ok":
                raise ConfigError(f"--source {item}: its manifest has status {manifest.get('status')!r}")
            sources.append(Source(path.resolve().name, path, manifest))
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"--source: several sources are named {', '.join(dupes)}")
        return sources
    base = artifacts.stage_dir(cfg.output_dir, "baseline")
    sources = [Source("baseline", base, artifacts.require_manifest(base, "baseline"))]
    for stage in artifacts.TRAINED_STAGES[1:]:
        d = artifacts.stage_dir(cfg.output_dir, stage)
        manifest = artifacts.read_manifest(d)
        if manifest is None:
            continue
        if manifest.get("status") != "ok":
            log.info("%s not exported: its stage is %s (%s)", stage, manifest.get("status"), manifest.get("reason"))
            continue
        sources.append(Source(stage, d, manifest))
    return sources


# ----------------------------------------------------------------------------- variants
def _fmt_line(name: str, info: dict) -> str:
    ok = info["status"] == "ok"
    mark = "✓" if ok else "x"
    parts = [f"{mark} {name:5s} {info.get('file') or '-':18s}"]
    par = info.get("parity")
    if par:
        parts.append(f"max|Δlogits| {par['max_abs_diff']:.2e}  argmax {par['argmax_agreement'] * 100:6.2f}%")
    if info.get("accuracy") is not None:
        parts.append(f"{info.get('metric', 'acc')} {info['accuracy']:.4f} ({info['accuracy_delta'] * 100:+.2f} pt)")
    if info.get("size_bytes"):
        parts.append(f"{info['size_bytes'] / 2**20:6.1f} MB ({info.get('size_pct_of_fp32', 100):.1f}%)")
    if not ok:
        parts.append(f"{info['status']}: {info.get('reason')}")
    return "  ".join(parts)


def evaluate_variant(cfg: OnnxConfig, ref: Reference, out_dir: Path, name: str, fp32_size: int,
                     facts: dict, stage: str = "onnx") -> dict:
    """Parity (shapes + eval split) and accuracy of one built variant; decides its status
    (``stage``: the registry stage of the variant, e.g. ``qat`` for the QAT stage's rows)."""
    from .errors import ModelError
    from .runtimes import open_predictor

    spec = variants.by_key(stage, name)
    path = out_dir / spec.file
    info = {"file": spec.file, "backend": spec.backend, "precision": spec.precision, "status": "ok",
            "reason": None, "size_bytes": model_files.model_bytes(path), "devices": [d for d in spec.devices if d != "cpu"],
            "parity": None, "accuracy": None, "accuracy_delta": None, **facts}
    info["size_pct_of_fp32"] = round(100.0 * info["size_bytes"] / fp32_size, 2)
    try:
        pred = open_predictor(spec, path, device="cpu", threads=cfg.ort_threads)
    except ModelError as exc:
        if spec.fp32_parity:
            raise
        info["reason"] = f"not runnable on this CPU, accuracy not measured ({exc})"
        return info
    info["devices"] = ["cpu"] + info["devices"]
    if getattr(pred, "inference_precision", None):  # OpenVINO: the float precision it compiled to
        info["inference_precision"] = pred.inference_precision
    shapes = ex.compare_logits(ref.torch_shape_logits, ref.logits(pred, ref.shape_batches, f"{name} shapes"))
    eval_logits = ref.logits(pred, ref.eval_set[0], f"{name} eval")
    on_eval = ex.compare_logits(ref.torch_eval_logits, eval_logits)
    info["parity"] = {"max_abs_diff": max(shapes["max_abs_diff"], on_eval["max_abs_diff"]),
                      "argmax_agreement": on_eval["argmax_agreement"],
                      "shapes": {"max_abs_diff": shapes["max_abs_diff"],
                                 "argmax_agreement": shapes["argmax_agreement"],
                                 "batches": ["%dx%d" % b["input_ids"].shape for b in ref.shape_batches]},
                      "eval": on_eval}
    info["accuracy"] = ref.score(eval_logits)  # the task metric (accuracy for a plain classifier)
    info["accuracy_delta"] = info["accuracy"] - ref.torch_accuracy
    if not ref.spec.plain:
        info["metric"] = ref.spec.metric
    info["status"], info["reason"] = decide_status(name, info["parity"]["max_abs_diff"], info["accuracy_delta"],
                                                   getattr(cfg, "parity_tolerance", 0.0), cfg.onnx_accuracy_budget,
                                                   ref.spec.metric)
    return info


def decide_status(name: str, max_abs_diff: float, accuracy_delta: Optional[float], tolerance: float,
                  budget: float, metric: str = "accuracy") -> tuple[str, Optional[str]]:
    """FP32 variants must match PyTorch within ``tolerance`` (else 'failed', which fails the stage);
    reduced-precision ones are 'rejected' when they lose more than ``budget`` of the task metric
    (``metric``, in its own units: accuracy, F1, MCC, Pearson, ...)."""
    if name in ex.FP32_VARIANTS:
        if not max_abs_diff <= tolerance:  # also catches NaN/inf
            return "failed", (f"max |Δlogits| {max_abs_diff:.2e} vs PyTorch exceeds --parity-tolerance {tolerance:g}")
        return "ok", None
    if accuracy_delta is not None and accuracy_delta < -budget:
        return "rejected", (f"{metric} {accuracy_delta * 100:+.2f} pt vs FP32 exceeds --onnx-accuracy-budget "
                            f"{budget * 100:g} pt (kept on disk, not deployed)")
    return "ok", None


def build_variant(cfg: OnnxConfig, ref: Reference, out_dir: Path, name: str, built: dict) -> dict:
    """Create one variant file with its registered converter; returns the facts for the manifest
    (a variant without a converter reads an existing file, e.g. OpenVINO FP32 reads model.onnx)."""
    import importlib

    spec = variants.by_key("onnx", name)
    if not spec.builder:
        if not (out_dir / spec.built_from).is_file():  # ov-int8-bf16 reads ov-int8's IR
            raise ex.VariantUnavailable(f"it runs {spec.built_from}, which this run did not build")
        return {"from_file": spec.built_from}
    module, attr = spec.builder.split(":")
    return getattr(importlib.import_module(module), attr)(cfg, ref, out_dir, spec, built)


def source_weight_bytes(model_dir: Path) -> int:
    """The source's weight files: every variant is about this size or smaller (3x sizes the check)."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*") if p.suffix in (".safetensors", ".bin"))


def _build_one(cfg: OnnxConfig, ref: Reference, out_dir: Path, name: str, built: dict, fp32_size: int) -> dict:
    """Build, check and log one variant; its manifest entry (a converter's failure is recorded, not
    raised, except for the FP32 export itself)."""
    t0 = time.perf_counter()
    facts: dict = {}
    usable, why = variants.by_key("onnx", name).available()
    if not usable:
        info = _failed(name, why, facts, status="skipped")
        log.info("%s", _fmt_line(name, info))
        return info
    try:
        if name != "fp32":
            facts = build_variant(cfg, ref, out_dir, name, built)
        facts["build_s"] = round(time.perf_counter() - t0, 2)
        info = evaluate_variant(cfg, ref, out_dir, name, fp32_size, facts)
        info = ptq_search.maybe_recover(cfg, ref, out_dir, name, info, fp32_size, evaluate_variant)
    except ex.VariantUnavailable as exc:
        info = _failed(name, str(exc), facts, status="skipped")
    except PipelineError as exc:
        if name == "fp32":
            raise
        info = _failed(name, str(exc), facts)
    except Exception as exc:  # a converter bug must not hide the other variants' results
        if name == "fp32":
            raise
        log.debug("variant %s failed", name, exc_info=True)
        info = _failed(name, f"{type(exc).__name__}: {first_line(exc)}", facts)
    (log.info if info["status"] == "ok" else log.warning)("%s", _fmt_line(name, info))
    if name == "fp32":
        ref.release_model()  # the PyTorch outputs exist now; the converters need the memory
    model_files.release_memory()
    return info


def export_source(cfg: OnnxConfig, source: Source, ref: Reference) -> tuple[dict, bool]:
    """Build and check every variant of one source; returns (manifest, was_up_to_date)."""
    out_dir = artifacts.stage_dir(cfg.output_dir, "onnx") / source.name
    fp = artifacts.fingerprint({"stage": "onnx", **options_dict(cfg)},
                               {"source": source.name, "model_dir": str(source.model_dir.resolve()),
                                "manifest": source.digest(), "versions": _versions()})
    run_ = artifacts.stage_run(out_dir, "onnx", fp, force=cfg.force, wait=cfg.wait,
                               need_bytes=3 * source_weight_bytes(source.model_dir))
    if run_.current:
        log.info("onnx/%s is up to date (%s); --force re-runs it", source.name, artifacts.manifest_path(out_dir))
        return run_.current, True
    with run_:
        out_dir = run_.directory  # the working directory, swapped into place by run_.finish
        print_config(STAGE, cfg)
        start = time.perf_counter()
        log.info("exporting %s (%s) to %s", source.name, source.model_dir, out_dir)
        ref.tokenizer.save_pretrained(out_dir)
        for name in COPY_FILES:
            if (source.model_dir / name).is_file():
                shutil.copy2(source.model_dir / name, out_dir / name)
        export_facts = ex.export_onnx(source.model_dir, out_dir / "model.onnx", cfg.opset, ref.max_length)
        log.info("torch.onnx.export (opset %d, dynamic batch/sequence, eager attention): %.1fs",
                 cfg.opset, export_facts["export_s"])
        splits = ref.splits
        log.info("reference: PyTorch FP32 on %d eval rows of %s, parity shapes %s", len(splits.eval), splits.source,
                 ", ".join(f"{b}x{s}" for b, s in ex.parity_shapes(ref.max_length)))
        fp32_size = model_files.model_bytes(out_dir / "model.onnx")
        variants_: dict[str, dict] = {}
        for name in ["fp32"] + [v for v in OPTIONAL_VARIANTS if v in cfg.variant_list()]:
            variants_[name] = _build_one(cfg, ref, out_dir, name, variants_, fp32_size)
        metrics = {
            "source": source.name, "source_dir": str(source.model_dir),
            "label_names": list(splits.label_names),
            "reference": {"backend": "torch", "precision": "fp32", "accuracy": ref.torch_accuracy,
                          "metric": ref.spec.metric, "task": ref.spec.task,
                          "eval_rows": len(splits.eval), "dataset": splits.source},
            "max_length": ref.max_length, "max_positions": modeling.max_positions(ref.config),
            "export": export_facts,
            "parity_shapes": [list(s) for s in ex.parity_shapes(ref.max_length)],
            "accuracy_budget": cfg.onnx_accuracy_budget, "parity_tolerance": cfg.parity_tolerance,
            "variants": variants_, "wall_s": round(time.perf_counter() - start, 1),
        }
        failed = [n for n, v in variants_.items() if v["status"] == "failed" and n in ex.FP32_VARIANTS]
        status = "failed" if failed else "ok"
        manifest = run_.finish(
            status=status, config=cfg.to_dict(),
            inputs={"source": {"name": source.name, "dir": str(source.model_dir), "manifest_digest": source.digest()}},
            outputs=artifacts.list_files(out_dir), metrics=metrics,
            reason="; ".join(f"{n}: {variants_[n]['reason']}" for n in failed) or None)
        if failed:
            raise ex.ExportError(f"onnx/{source.name}: FP32 variant(s) {', '.join(failed)} failed: "
                                 + "; ".join(variants_[n]["reason"] for n in failed)
                                 + f" (details in {artifacts.manifest_path(run_.directory)})")
    return manifest, False


def _failed(name: str, reason: str, facts: dict, status: str = "failed", stage: str = "onnx") -> dict:
    spec = variants.by_key(stage, name)
    return {"file": None if status == "skipped" else spec.file, "backend": spec.backend, "precision": spec.precision, "status": status,
            "reason": reason, "size_bytes": None, "devices": [], "parity": None, "accuracy": None,
            "accuracy_delta": None, **facts}


def _versions() -> dict:
    env = artifacts.environment()
    return {k: env.get(k) for k in ("torch", "transformers", "onnxruntime")} | {
        m: artifacts._version(m) for m in ("onnx", "openvino", "nncf")}


# ----------------------------------------------------------------------------- stage
def run(cfg: OnnxConfig) -> StageResult:
    start = time.perf_counter()
    summaries, statuses = [], []
    with stage_logging(STAGE, None):
        sources = resolve_sources(cfg)
        for source in sources:
            ref = Reference(cfg, source)
            manifest, cached = export_source(cfg, source, ref)
            trt_manifest, trt_cached = tensorrt_source(cfg, source, ref, manifest)
            statuses.append("up-to-date" if cached and trt_cached else "ok")
            summaries.append(_summary(source.name, manifest, trt_manifest))
    status = "up-to-date" if statuses and all(s == "up-to-date" for s in statuses) else "ok"
    return StageResult(STAGE, status, time.perf_counter() - start, "; ".join(summaries),
                       str(artifacts.stage_dir(cfg.output_dir, "onnx")))


def _summary(name: str, manifest: dict, trt_manifest: dict) -> str:
    variants = manifest.get("metrics", {}).get("variants", {})
    ok = [n for n, v in variants.items() if v.get("status") == "ok"]
    bits = [f"{name}: {len(ok)}/{len(variants)} variants ok"]
    int8 = variants.get("int8")
    if int8 and int8.get("accuracy_delta") is not None:
        bits.append(f"int8 {int8['size_pct_of_fp32']:.0f}% size, {int8['accuracy_delta'] * 100:+.2f} pt")
    trt_status = trt_manifest.get("status")
    short = str(trt_manifest.get("reason") or "").split(" (")[0].split(":")[0]
    bits.append(f"tensorrt {trt_status}" + (f" ({short})" if trt_status == "skipped" and short else ""))
    return ", ".join(bits)


def add_args(parser, standalone: bool = False) -> None:
    import argparse
    from functools import partial

    from . import cli

    cli.add_common_args(parser)
    g = parser.add_argument_group("ONNX / ONNX Runtime / OpenVINO / TensorRT options")
    add = partial(cli.add, g, config=OnnxConfig)
    add("--source", metavar="NAME|DIR[,..]",
        help="export these trained stages (baseline, mixed_precision, pruned) or model directories "
             "(default: every trained stage with a finished manifest)")
    add("--opset", type=int, metavar="N", help=f"ONNX opset, {ex.MIN_OPSET}..{MAX_TORCHSCRIPT_OPSET} (default: {{default}})")
    add("--variants", metavar="A,B", help="variants to build besides model.onnx (default: {default}; "
                                          "ov-* need openvino + nncf (in requirements.txt on x86-64/arm64), else they are skipped)")
    add("--onnx-accuracy-budget", type=float, metavar="X",
        help="reduced-precision variants losing more accuracy than this (absolute, vs their FP32 source) are "
             "marked rejected (default: {default}; compare.py's --accuracy-budget is the recommendation's)")
    add("--parity-tolerance", type=float, metavar="X",
        help="max |Δlogits| allowed for FP32 variants vs PyTorch (default: {default})")
    add("--int8-per-channel", action=argparse.BooleanOptionalAction, default=None,
        help="per-channel weight scales for dynamic INT8 (default: {default})")
    add("--int8-reduce-range", action=argparse.BooleanOptionalAction, default=None,
        help="7-bit INT8 weights (default: auto, on only for x86 CPUs without VNNI)")
    add("--int4-block-size", type=int, metavar="N", help="INT4 quantization block size (default: {default})")
    add("--calibration-samples", type=int, metavar="N",
        help="training sentences (seeded sample) to calibrate static INT8 QDQ and NNCF (default: {default})")
    add("--calibration-method", choices=CALIBRATION_METHODS, help="QDQ calibration (default: {default})")
    add("--qdq-per-channel", action=argparse.BooleanOptionalAction, default=None,
        help="per-channel weight scales for QDQ (default: {default})")
    add("--qdq-exclude", choices=QDQ_EXCLUDES,
        help="ffn-output (default): keep the feed-forward output MatMuls (GELU-fed, long-tailed "
             "activations) in float; none: quantize every MatMul")
    add("--ort-threads", type=int, metavar="N", help="ONNX Runtime / OpenVINO intra-op threads (default: the runtime's)")
    add("--trt-min-shapes", metavar="BxS", help="TensorRT profile minimum batch x sequence (default: {default})")
    add("--trt-opt-shapes", metavar="BxS", help="TensorRT profile optimum (default: {default})")
    add("--trt-max-shapes", metavar="BxS", help="TensorRT profile maximum (default: 64 x the model's position limit)")
    add("--trt-precisions", metavar="A,B", help="TensorRT engines to build (default: {default})")
    add("--trt-workspace-mb", type=int, metavar="MB", help="TensorRT builder workspace (default: {default})")
    if standalone:  # in main.py --accuracy-budget is compare's; here the old spelling was this stage's
        cli.renamed(parser, "--accuracy-budget", "--onnx-accuracy-budget")
        cli.renamed(parser, "--variant", "--variants", "is not a flag of onnx_tensorrt.py: --variants (prefixes are not expanded)")


def build_config(ns) -> OnnxConfig:
    from . import cli

    return cli.build_config(OnnxConfig, ns)
