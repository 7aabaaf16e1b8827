"""The onnx_tensorrt stage: export every trained model to ONNX, build the ONNX Runtime variants,
check each against PyTorch (optimum-style ✓/x lines), measure accuracy, and build TensorRT
engines where an NVIDIA GPU and TensorRT are present (a 'skipped' manifest elsewhere).

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
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np

from . import artifacts
from . import export as ex
from .cli import StageResult, print_config
from .config import CommonConfig
from .errors import ConfigError, PipelineError
from .logs import progress, stage_logging

log = logging.getLogger("bertopt.onnx_stage")

STAGE = "onnx_tensorrt"
OPTIONAL_VARIANTS = ("opt", "int8", "int4", "fp16", "qdq")
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
    accuracy_budget: float = 0.01
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
    trt_max_shapes: Optional[str] = None  # None = 64 x the model's position limit
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
        if not (0 <= self.accuracy_budget < 1):
            p.append(f"--accuracy-budget is an absolute accuracy loss in [0, 1), e.g. 0.01 (got {self.accuracy_budget})")
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


def trt_options(cfg: OnnxConfig) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if k.startswith("trt_")}


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


# ----------------------------------------------------------------------------- reference data
class Reference:
    """The PyTorch FP32 source, its eval split and calibration sample, built lazily once."""

    def __init__(self, cfg: OnnxConfig, source: Source):
        self.cfg = cfg
        self.source = source
        self.data_cfg = dict(cfg.to_dict(), **(source.manifest or {}).get("config", {}))

    @cached_property
    def tokenizer(self):
        from . import modeling

        return modeling.load_tokenizer(str(self.source.model_dir))

    @cached_property
    def model(self):
        from . import modeling

        return modeling.load_model(str(self.source.model_dir), attn_implementation="eager").eval()

    @cached_property
    def max_length(self) -> int:
        from . import modeling

        return min(int(self.data_cfg.get("max_length") or self.cfg.max_length), modeling.max_positions(self.model))

    @cached_property
    def input_names(self) -> tuple[str, ...]:
        return ex.input_names_for(self.model)

    @cached_property
    def torch(self):
        from .runtimes import TorchPredictor

        return TorchPredictor(self.model, name="torch-fp32", device="cpu")

    @cached_property
    def splits(self):
        from . import data

        d = self.data_cfg
        return data.load_splits(d.get("dataset", self.cfg.dataset), d.get("data_dir", self.cfg.data_dir),
                                d.get("text_column"), d.get("label_column"), d.get("max_train_samples"),
                                d.get("max_eval_samples"), int(d.get("seed", self.cfg.seed)))

    def _batches(self, texts, batch_size: int) -> tuple[list[dict], np.ndarray]:
        """Length-sorted, dynamically padded batches and the row order they hold."""
        from . import data

        ids = data.tokenize(texts, self.tokenizer, self.max_length)
        order = np.argsort([-len(s) for s in ids], kind="stable")
        pad = self.tokenizer.pad_token_id or 0
        with_tt = "token_type_ids" in self.input_names
        batches = [data.pad_batch([ids[i] for i in order[s:s + batch_size]], pad, with_tt)
                   for s in range(0, len(order), batch_size)]
        return batches, order

    @cached_property
    def eval_set(self) -> tuple[list[dict], np.ndarray]:
        batches, order = self._batches(self.splits.eval.texts, self.cfg.eval_batch_size)
        return batches, np.asarray(self.splits.eval.labels)[order]

    @cached_property
    def shape_batches(self) -> list[dict]:
        shapes = ex.parity_shapes(self.max_length)
        cls = self.tokenizer.cls_token_id if self.tokenizer.cls_token_id is not None else 101
        return ex.random_batches(self.input_names, shapes, int(self.model.config.vocab_size), seed=self.cfg.seed,
                                 cls_id=cls)

    def logits(self, predictor, batches, desc: str) -> list[np.ndarray]:
        loop = progress(batches, desc=desc, unit="batch") if len(batches) >= 20 else batches  # no bar for a few
        return [predictor.predict_logits(b) for b in loop]

    @cached_property
    def torch_shape_logits(self):
        return self.logits(self.torch, self.shape_batches, "torch shapes")

    @cached_property
    def torch_eval_logits(self):
        return self.logits(self.torch, self.eval_set[0], "torch eval")

    @cached_property
    def torch_accuracy(self) -> float:
        return accuracy(self.torch_eval_logits, self.eval_set[1])

    def calibration_feeds(self, n: int, batch_size: int = 32, fixed_shape: bool = False) -> list[dict]:
        """A seeded sample of training sentences, as length-grouped batches; ``fixed_shape`` pads
        every batch to one width and drops a short last batch (histogram calibrators stack them)."""
        from . import data

        train = self.splits.train
        rng = np.random.default_rng(int(self.data_cfg.get("seed", self.cfg.seed)))
        idx = rng.choice(len(train), size=min(n, len(train)), replace=False)
        texts = [train.texts[i] for i in sorted(idx)]
        if not fixed_shape:
            return self._batches(texts, batch_size)[0]
        ids = data.tokenize(texts, self.tokenizer, self.max_length)
        width = max(len(s) for s in ids)
        with_tt = "token_type_ids" in self.input_names
        usable = len(ids) - len(ids) % batch_size if len(ids) >= batch_size else len(ids)
        return [data.pad_batch(ids[s:s + batch_size], self.tokenizer.pad_token_id or 0, with_tt, pad_to=width)
                for s in range(0, usable, batch_size)]


def accuracy(logits: list[np.ndarray], labels: np.ndarray) -> float:
    preds = np.concatenate(logits).argmax(-1)
    return float((preds == labels).mean()) if len(labels) else float("nan")


# ----------------------------------------------------------------------------- variants
def _fmt_line(name: str, info: dict) -> str:
    ok = info["status"] == "ok"
    mark = "✓" if ok else "x"
    parts = [f"{mark} {name:5s} {info.get('file') or '-':18s}"]
    par = info.get("parity")
    if par:
        parts.append(f"max|Δlogits| {par['max_abs_diff']:.2e}  argmax {par['argmax_agreement'] * 100:6.2f}%")
    if info.get("accuracy") is not None:
        parts.append(f"acc {info['accuracy']:.4f} ({info['accuracy_delta'] * 100:+.2f} pt)")
    if info.get("size_bytes"):
        parts.append(f"{info['size_bytes'] / 2**20:6.1f} MB ({info.get('size_pct_of_fp32', 100):.1f}%)")
    if not ok:
        parts.append(f"{info['status']}: {info.get('reason')}")
    return "  ".join(parts)


def evaluate_variant(cfg: OnnxConfig, ref: Reference, out_dir: Path, name: str, fp32_size: int,
                     facts: dict) -> dict:
    """Parity (shapes + eval split) and accuracy of one built variant; decides its status."""
    from .errors import ModelError
    from .runtimes import OrtPredictor

    file, precision, devices = ex.VARIANTS[name]
    path = out_dir / file
    info = {"file": file, "precision": precision, "status": "ok", "reason": None,
            "size_bytes": ex.file_size(path), "devices": [d for d in devices if d != "cpu"],
            "parity": None, "accuracy": None, "accuracy_delta": None, **facts}
    info["size_pct_of_fp32"] = round(100.0 * info["size_bytes"] / fp32_size, 2)
    try:
        pred = OrtPredictor(path, name=f"ort-{name}", intra_op_threads=cfg.ort_threads, precision=precision)
    except ModelError as exc:
        if name in ex.FP32_VARIANTS:
            raise
        info["reason"] = f"not runnable on this CPU, accuracy not measured ({exc})"
        return info
    info["devices"] = ["cpu"] + info["devices"]
    shapes = ex.compare_logits(ref.torch_shape_logits, ref.logits(pred, ref.shape_batches, f"{name} shapes"))
    eval_logits = ref.logits(pred, ref.eval_set[0], f"{name} eval")
    on_eval = ex.compare_logits(ref.torch_eval_logits, eval_logits)
    info["parity"] = {"max_abs_diff": max(shapes["max_abs_diff"], on_eval["max_abs_diff"]),
                      "argmax_agreement": on_eval["argmax_agreement"],
                      "shapes": {"max_abs_diff": shapes["max_abs_diff"],
                                 "argmax_agreement": shapes["argmax_agreement"],
                                 "batches": ["%dx%d" % b["input_ids"].shape for b in ref.shape_batches]},
                      "eval": on_eval}
    info["accuracy"] = accuracy(eval_logits, ref.eval_set[1])
    info["accuracy_delta"] = info["accuracy"] - ref.torch_accuracy
    info["status"], info["reason"] = decide_status(name, info["parity"]["max_abs_diff"], info["accuracy_delta"],
                                                   cfg.parity_tolerance, cfg.accuracy_budget)
    return info


def decide_status(name: str, max_abs_diff: float, accuracy_delta: Optional[float], tolerance: float,
                  budget: float) -> tuple[str, Optional[str]]:
    """FP32 variants must match PyTorch within ``tolerance`` (else 'failed', which fails the stage);
    reduced-precision ones are 'rejected' when they lose more than ``budget`` accuracy."""
    if name in ex.FP32_VARIANTS:
        if not max_abs_diff <= tolerance:  # also catches NaN/inf
            return "failed", (f"max |Δlogits| {max_abs_diff:.2e} vs PyTorch exceeds --parity-tolerance {tolerance:g}")
        return "ok", None
    if accuracy_delta is not None and accuracy_delta < -budget:
        return "rejected", (f"accuracy {accuracy_delta * 100:+.2f} pt vs FP32 exceeds --accuracy-budget "
                            f"{budget * 100:g} pt (kept on disk, not deployed)")
    return "ok", None


def build_variant(cfg: OnnxConfig, ref: Reference, out_dir: Path, name: str, built: dict) -> dict:
    """Create one variant file; returns the facts recorded in the manifest."""
    src = out_dir / ex.VARIANTS["fp32"][0]
    dst = out_dir / ex.VARIANTS[name][0]
    if name == "opt":
        return ex.optimize(src, dst, int(ref.model.config.num_attention_heads), int(ref.model.config.hidden_size))
    if name == "int8":
        reduce_range, why = ((cfg.int8_reduce_range, "set by --int8-reduce-range")
                             if cfg.int8_reduce_range is not None else ex.default_reduce_range())
        opt_ok = built.get("opt", {}).get("status") == "ok"
        base = out_dir / ex.VARIANTS["opt"][0] if opt_ok else src
        facts = ex.quantize_int8(base, dst, per_channel=cfg.int8_per_channel, reduce_range=reduce_range)
        return dict(facts, reduce_range_reason=why, from_file=base.name)
    if name == "int4":
        return dict(ex.quantize_int4(src, dst, block_size=cfg.int4_block_size), from_file=src.name)
    if name == "fp16":
        return dict(ex.convert_fp16(src, dst), from_file=src.name)
    if name == "qdq":
        feeds = ref.calibration_feeds(cfg.calibration_samples, fixed_shape=cfg.calibration_method != "minmax")
        return dict(ex.quantize_qdq(src, dst, feeds, per_channel=cfg.qdq_per_channel,
                                    method=cfg.calibration_method,
                                    exclude_ffn_output=cfg.qdq_exclude == "ffn-output"), from_file=src.name)
    raise ValueError(name)  # pragma: no cover


def export_source(cfg: OnnxConfig, source: Source, ref: Reference) -> tuple[dict, bool]:
    """Build and check every variant of one source; returns (manifest, was_up_to_date)."""
    out_dir = artifacts.stage_dir(cfg.output_dir, "onnx") / source.name
    fp = artifacts.fingerprint({"stage": "onnx", **options_dict(cfg)},
                               {"source": source.name, "model_dir": str(source.model_dir.resolve()),
                                "manifest": source.digest(), "versions": _versions()})
    current = None if cfg.force else artifacts.is_current(out_dir, fp)
    if current:
        log.info("onnx/%s is up to date (%s); --force re-runs it", source.name, artifacts.manifest_path(out_dir))
        return current, True
    artifacts.begin_stage(out_dir)
    artifacts.clear_dir(out_dir)
    with stage_logging("onnx", out_dir):
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
        fp32_size = ex.file_size(out_dir / "model.onnx")
        variants: dict[str, dict] = {}
        for name in ["fp32"] + [v for v in OPTIONAL_VARIANTS if v in cfg.variant_list()]:
            t0 = time.perf_counter()
            facts: dict = {}
            try:
                if name != "fp32":
                    facts = build_variant(cfg, ref, out_dir, name, variants)
                facts["build_s"] = round(time.perf_counter() - t0, 2)
                info = evaluate_variant(cfg, ref, out_dir, name, fp32_size, facts)
            except PipelineError as exc:
                if name == "fp32":
                    raise
                info = _failed(name, str(exc), facts)
            except Exception as exc:  # a converter bug must not hide the other variants' results
                if name == "fp32":
                    raise
                log.debug("variant %s failed", name, exc_info=True)
                info = _failed(name, f"{type(exc).__name__}: {ex._first_line(exc)}", facts)
            variants[name] = info
            (log.info if info["status"] == "ok" else log.warning)("%s", _fmt_line(name, info))
        metrics = {
            "source": source.name, "source_dir": str(source.model_dir),
            "label_names": list(splits.label_names),
            "reference": {"backend": "torch", "precision": "fp32", "accuracy": ref.torch_accuracy,
                          "eval_rows": len(splits.eval), "dataset": splits.source},
            "max_length": ref.max_length, "export": export_facts,
            "parity_shapes": [list(s) for s in ex.parity_shapes(ref.max_length)],
            "accuracy_budget": cfg.accuracy_budget, "parity_tolerance": cfg.parity_tolerance,
            "variants": variants, "wall_s": round(time.perf_counter() - start, 1),
        }
        failed = [n for n, v in variants.items() if v["status"] == "failed" and n in ex.FP32_VARIANTS]
        status = "failed" if failed else "ok"
        manifest = artifacts.write_manifest(
            out_dir, stage="onnx", status=status, config=cfg.to_dict(), fingerprint=fp,
            inputs={"source": {"name": source.name, "dir": str(source.model_dir), "manifest_digest": source.digest()}},
            outputs=artifacts.list_files(out_dir), metrics=metrics,
            reason="; ".join(f"{n}: {variants[n]['reason']}" for n in failed) or None)
        if failed:
            raise ex.ExportError(f"onnx/{source.name}: FP32 variant(s) {', '.join(failed)} failed: "
                                 + "; ".join(variants[n]["reason"] for n in failed)
                                 + f" (details in {artifacts.manifest_path(out_dir)})")
    return manifest, False


def _failed(name: str, reason: str, facts: dict) -> dict:
    file, precision, _ = ex.VARIANTS[name]
    return {"file": file, "precision": precision, "status": "failed", "reason": reason, "size_bytes": None,
            "devices": [], "parity": None, "accuracy": None, "accuracy_delta": None, **facts}


def _versions() -> dict:
    env = artifacts.environment()
    return {k: env.get(k) for k in ("torch", "transformers", "onnxruntime")} | {"onnx": artifacts._version("onnx")}


# ----------------------------------------------------------------------------- TensorRT
def tensorrt_source(cfg: OnnxConfig, source: Source, ref: Reference, onnx_manifest: dict) -> tuple[dict, bool]:
    """Build (or skip, with the reason) the TensorRT engines of one source; (manifest, was_up_to_date).
    Never fatal for the ONNX variants: engines that cannot be built or run are recorded per precision."""
    from . import tensorrt as trt_mod

    onnx_dir = artifacts.stage_dir(cfg.output_dir, "onnx") / source.name
    out_dir = artifacts.stage_dir(cfg.output_dir, "tensorrt") / source.name
    usable, reason = trt_mod.availability()
    index = _device_index(trt_device(cfg))
    fp = artifacts.fingerprint({"stage": "tensorrt", **trt_options(cfg)},
                               {"onnx": artifacts.manifest_digest(onnx_dir), "usable": usable, "reason": reason,
                                "device": trt_mod.device_facts(index=index)})
    current = None if cfg.force else artifacts.is_current(out_dir, fp)
    if current:
        log.info("tensorrt/%s is up to date (%s)", source.name, current.get("status"))
        return current, True
    artifacts.begin_stage(out_dir)
    artifacts.clear_dir(out_dir)
    with stage_logging("tensorrt", out_dir):
        common = dict(config=cfg.to_dict(), fingerprint=fp,
                      inputs={"onnx": {"dir": str(onnx_dir), "manifest_digest": artifacts.manifest_digest(onnx_dir)}})
        if not usable:
            log.warning("tensorrt/%s skipped: %s", source.name, reason)
            return artifacts.write_manifest(out_dir, stage="tensorrt", status="skipped", reason=reason, **common,
                                            metrics={"source": source.name, "engines": {},
                                                     **trt_mod.device_facts(index=index)}), False
        return _build_and_check(cfg, source, ref, onnx_dir, out_dir, index, common), False


def _device_index(device: str) -> int:
    _, _, idx = str(device).partition(":")
    return int(idx) if idx.isdigit() else 0


def trt_profile(cfg: OnnxConfig, ref: Reference):
    """The optimization profile: the flags, with the default maximum sequence at the model's own
    position limit (so every sequence the model accepts, e.g. compare's sweep cells, fits)."""
    from . import modeling
    from . import tensorrt as trt_mod

    positions = modeling.max_positions(ref.model)
    return trt_mod.make_profile(cfg.trt_min_shapes, cfg.trt_opt_shapes, cfg.trt_max_shapes, positions,
                                max_positions=positions)


def _build_and_check(cfg: OnnxConfig, source: Source, ref: Reference, onnx_dir: Path, out_dir: Path, index: int,
                     common: dict) -> dict:
    from . import tensorrt as trt_mod

    profile = trt_profile(cfg, ref)
    metrics = trt_mod.build_engines(onnx_dir, out_dir, cfg.trt_precision_list(), profile, cfg.trt_workspace_mb,
                                    device_index=index)
    metrics.update(source=source.name, profile=profile.to_dict(), workspace_mb=cfg.trt_workspace_mb)
    # write the manifest first: the runner checks it before loading a plan
    artifacts.write_manifest(out_dir, stage="tensorrt", status="ok", outputs=artifacts.list_files(out_dir),
                             metrics=metrics, **common)
    _check_engines(cfg, ref, out_dir, metrics, profile)
    usable = [p for p, e in metrics["engines"].items() if e["status"] == "ok"]
    reason = None if usable else "no usable engine: " + "; ".join(
        f"{p}: {e['reason']}" for p, e in metrics["engines"].items())
    if reason:
        log.error("tensorrt/%s: %s", source.name, reason)
    return artifacts.write_manifest(out_dir, stage="tensorrt", status="ok" if usable else "failed", reason=reason,
                                    outputs=artifacts.list_files(out_dir), metrics=metrics, **common)


def _check_engines(cfg: OnnxConfig, ref: Reference, out_dir: Path, metrics: dict, profile) -> None:
    """Parity and accuracy of each built engine on the eval split (batches cut to the profile),
    gated like the ONNX variants: an FP32 engine must match PyTorch within --parity-tolerance,
    a reduced-precision one may lose at most --accuracy-budget against PyTorch FP32. An engine
    that cannot run or fails its gate is recorded (failed / rejected) and never used downstream."""
    from .errors import PipelineError
    from .runtimes import TensorRTPredictor

    batches, labels = ref.eval_set
    fit = [b for b in batches if profile.contains(b["input_ids"].shape)]
    if len(fit) != len(batches):
        cut = profile.max[0]
        batches, order = ref._batches(ref.splits.eval.texts, cut)
        labels = np.asarray(ref.splits.eval.labels)[order]
        torch_logits = ref.logits(ref.torch, batches, "torch eval")
    else:
        torch_logits = ref.torch_eval_logits
    for precision, engine in metrics["engines"].items():
        if engine["status"] != "ok":
            continue
        try:
            pred = TensorRTPredictor(out_dir / engine["file"], precision=precision, device=trt_device(cfg))
            logits = ref.logits(pred, batches, f"trt-{precision} eval")
        except PipelineError as exc:
            engine.update(status="failed", reason=f"built but cannot run: {exc}")
            log.warning("x trt-%s %s", precision, engine["reason"])
            continue
        engine["parity"] = ex.compare_logits(torch_logits, logits)
        engine["accuracy"] = accuracy(logits, labels)
        engine["accuracy_delta"] = engine["accuracy"] - accuracy(torch_logits, labels)
        engine["device_memory_bytes"] = getattr(pred.runner, "device_memory_bytes", None)
        engine["status"], engine["reason"] = engine_status(precision, engine["parity"]["max_abs_diff"],
                                                           engine["accuracy_delta"], cfg)
        log.info("%s trt-%s  max|Δlogits| %.2e  argmax %.2f%%  acc %.4f (%+.2f pt)%s",
                 "✓" if engine["status"] == "ok" else "x", precision, engine["parity"]["max_abs_diff"],
                 engine["parity"]["argmax_agreement"] * 100, engine["accuracy"], engine["accuracy_delta"] * 100,
                 f"  {engine['status']}: {engine['reason']}" if engine["reason"] else "")


def engine_status(precision: str, max_abs_diff: float, accuracy_delta: float,
                  cfg: OnnxConfig) -> tuple[str, Optional[str]]:
    """The ONNX variants' gate applied to an engine: trt-fp32 gets the FP32 rule, trt-fp16/int8
    the budget rule. An FP32 engine over the tolerance is 'failed' here but not fatal: TensorRT is
    a sub-stage whose engines are recorded one by one."""
    return decide_status(precision, max_abs_diff, accuracy_delta, cfg.parity_tolerance, cfg.accuracy_budget)


def trt_device(cfg: OnnxConfig) -> str:
    """The CUDA device engines are built and checked on: --device cuda:N, else cuda (device 0)."""
    return cfg.device if str(cfg.device).startswith("cuda") else "cuda"


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


def add_args(parser) -> None:
    import argparse

    from . import cli

    cli.add_common_args(parser)
    g = parser.add_argument_group("ONNX / ONNX Runtime / TensorRT options")
    cli.add(g, "--source", metavar="NAME|DIR[,..]",
            help="export these trained stages (baseline, mixed_precision, pruned) or model directories "
                 "(default: every trained stage with a finished manifest)")
    cli.add(g, "--opset", type=int, metavar="N", help=f"ONNX opset, {ex.MIN_OPSET}..{MAX_TORCHSCRIPT_OPSET} (default: 17)")
    cli.add(g, "--variants", metavar="A,B",
            help=f"ONNX Runtime variants to build besides model.onnx (default: {','.join(OPTIONAL_VARIANTS)})")
    cli.add(g, "--accuracy-budget", type=float, metavar="X",
            help="reduced-precision variants losing more accuracy than this (absolute, vs FP32) are marked "
                 "rejected (default: 0.01)")
    cli.add(g, "--parity-tolerance", type=float, metavar="X",
            help="max |Δlogits| allowed for FP32 variants vs PyTorch (default: 1e-4)")
    cli.add(g, "--int8-per-channel", action=argparse.BooleanOptionalAction, default=None,
            help="per-channel weight scales for dynamic INT8 (default: on)")
    cli.add(g, "--int8-reduce-range", action=argparse.BooleanOptionalAction, default=None,
            help="7-bit INT8 weights (default: auto, on only for x86 CPUs without VNNI)")
    cli.add(g, "--int4-block-size", type=int, metavar="N", help="INT4 quantization block size (default: 32)")
    cli.add(g, "--calibration-samples", type=int, metavar="N",
            help="training sentences (seeded sample) to calibrate static INT8 QDQ (default: 256)")
    cli.add(g, "--calibration-method", choices=CALIBRATION_METHODS, help="QDQ calibration (default: minmax)")
    cli.add(g, "--qdq-per-channel", action=argparse.BooleanOptionalAction, default=None,
            help="per-channel weight scales for QDQ (default: on)")
    cli.add(g, "--qdq-exclude", choices=QDQ_EXCLUDES,
            help="ffn-output (default): keep the feed-forward output MatMuls (GELU-fed, long-tailed "
                 "activations) in float; none: quantize every MatMul")
    cli.add(g, "--ort-threads", type=int, metavar="N", help="ONNX Runtime intra-op threads (default: ORT's)")
    cli.add(g, "--trt-min-shapes", metavar="BxS", help="TensorRT profile minimum batch x sequence (default: 1x1)")
    cli.add(g, "--trt-opt-shapes", metavar="BxS", help="TensorRT profile optimum (default: 8x128)")
    cli.add(g, "--trt-max-shapes", metavar="BxS", help="TensorRT profile maximum (default: 64 x the model's position limit)")
    cli.add(g, "--trt-precisions", metavar="A,B", help="TensorRT engines to build (default: fp32,fp16,int8)")
    cli.add(g, "--trt-workspace-mb", type=int, metavar="MB", help="TensorRT builder workspace (default: 4096)")


def build_config(ns) -> OnnxConfig:
    from . import cli

    return cli.build_config(OnnxConfig, ns)
