"""The qat stage: quantization-aware training of a trained model and one Q/DQ ONNX for every runtime.

Reads the baseline (or ``--qat-source pruned|DIR``), inserts ModelOpt fake quantization
(:mod:`bertopt.qat`: TensorRT's symmetric signed INT8), calibrates on a seeded training sample,
fine-tunes a fraction of an epoch (dropout off, lr ~1.5e-5) with distillation from the FP32
model through the shared training loop, and writes ``<output_dir>/qat/<source>/``:
``model.qat.onnx`` (signed Q/DQ, read by ONNX Runtime, OpenVINO and TensorRT alike: unlike the
post-training Q/DQ model, every quantized input has its own quantizer, so ONNX Runtime's CPU
provider runs it on integer kernels as it is), the tokenizer, config.json and ``manifest.json``. Each registry row of the stage (``ort-qat``,
``ov-qat``, ``trt-qat``) is recorded like an ONNX-stage variant (parity, accuracy, the
``--onnx-accuracy-budget`` gate), so compare measures them beside the others. Where ModelOpt is
missing or cannot quantize the family, the stage is ``skipped`` with the reason.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import artifacts, variants
from .cli import StageResult, print_config
from .config import CommonConfig, TrainConfig, result_config
from .errors import ConfigError
from .logs import stage_logging

log = logging.getLogger("bertopt.qat_stage")

STAGE = "qat"
COPY_FILES = ("config.json", "labels.json")


@dataclass
class QatConfig(CommonConfig):
    """qat.py: quantization-aware training + Q/DQ export."""

    qat_source: str = "baseline"   # baseline | pruned | a model directory
    qat_fraction: float = 0.25     # of one epoch of the training split
    qat_lr: float = 1.5e-5
    qat_calibration_samples: int = 256
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0
    onnx_accuracy_budget: float = 0.01
    opset: int = 17
    ort_threads: Optional[int] = None

    def problems(self) -> list[str]:
        p = super().problems()
        if not (isinstance(self.qat_fraction, (int, float)) and 0 < self.qat_fraction <= 1):
            p.append(f"--qat-fraction must be in (0, 1] (got {self.qat_fraction!r})")
        if not (isinstance(self.qat_lr, (int, float)) and 0 < self.qat_lr < 1e-2):
            p.append(f"--qat-lr must be a small positive learning rate such as 1.5e-5 (got {self.qat_lr!r})")
        if not isinstance(self.qat_calibration_samples, int) or self.qat_calibration_samples < 1:
            p.append(f"--qat-calibration-samples must be a positive integer (got {self.qat_calibration_samples!r})")
        if not (isinstance(self.distill_alpha, (int, float)) and 0 <= self.distill_alpha <= 1):
            p.append(f"--distill-alpha must be in [0, 1] (got {self.distill_alpha!r})")
        if not (isinstance(self.distill_temperature, (int, float)) and self.distill_temperature > 0):
            p.append(f"--distill-temperature must be > 0 (got {self.distill_temperature!r})")
        if not (isinstance(self.onnx_accuracy_budget, (int, float)) and 0 <= self.onnx_accuracy_budget < 1):
            p.append(f"--onnx-accuracy-budget must be in [0, 1) (got {self.onnx_accuracy_budget!r})")
        if not self.qat_source:
            p.append("--qat-source must be baseline, pruned or a model directory")
        return p


def resolve_source(cfg: QatConfig):
    """The trained model to quantize, as an onnx_stage.Source (its manifest carries the data set)."""
    from .onnx_stage import Source

    if cfg.qat_source in artifacts.TRAINED_STAGES:
        d = artifacts.stage_dir(cfg.output_dir, cfg.qat_source)
        return Source(cfg.qat_source, d, artifacts.require_manifest(d, cfg.qat_source))
    path = Path(cfg.qat_source).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"--qat-source {cfg.qat_source}: not baseline/pruned and not a saved model directory "
                          "(no config.json)")
    manifest = artifacts.read_manifest(path)
    if manifest is not None and manifest.get("status") != "ok":
        raise ConfigError(f"--qat-source {cfg.qat_source}: its manifest has status {manifest.get('status')!r}")
    return Source(path.resolve().name, path, manifest)


def train_config(cfg: QatConfig, ref) -> TrainConfig:
    """The shared loop's settings for the short QAT schedule (one pass over the sampled rows)."""
    common = {k: v for k, v in cfg.to_dict().items() if k in TrainConfig.__dataclass_fields__}
    common.update({k: ref.data_cfg[k] for k in ("task", "metric", "long_text", "stride") if k in ref.data_cfg})
    return TrainConfig(**dict(common, lr=float(cfg.qat_lr), epochs=1, warmup_ratio=0.1, weight_decay=0.0,
                              precision="fp32", max_train_samples=None, early_stopping_patience=0))


def _train_loader(cfg: QatConfig, ref, batch_size: int):
    """A seeded ``qat_fraction`` of the training split, as the loop's shuffled loader."""
    import numpy as np

    from . import data

    train = ref.splits.train
    n = max(batch_size, int(round(len(train) * cfg.qat_fraction)))
    idx = sorted(np.random.default_rng(cfg.seed).choice(len(train), size=min(n, len(train)), replace=False))
    ids, _ = ref._ids([train.texts[i] for i in idx], [train.pairs[i] for i in idx] if train.pairs else None)
    ds = data.EncodedDataset(ids, [train.labels[i] for i in idx])
    loader = data.make_loader(ds, batch_size, shuffle=True, seed=cfg.seed, pad_id=ref.tokenizer.pad_token_id or 0,
                              with_token_type_ids="token_type_ids" in ref.input_names, num_workers=0,
                              pin_memory=False)
    return loader, len(idx)


def _eval_loader(ref):
    """The eval split as the loop's loader (the loop evaluates once, at the end of the pass)."""
    from . import data

    ev = ref.splits.eval
    ids, _ = ref._ids(ev.texts, ev.pairs)
    ds = data.EncodedDataset(ids, list(ev.labels))
    return data.make_loader(ds, ref.cfg.eval_batch_size, shuffle=False, seed=ref.cfg.seed,
                            pad_id=ref.tokenizer.pad_token_id or 0,
                            with_token_type_ids="token_type_ids" in ref.input_names, num_workers=0, pin_memory=False)


def quantize_and_train(cfg: QatConfig, ref, out_dir: Path) -> tuple[object, dict]:
    """Fake quant + calibration + the short distilled fine-tune; returns (fake-quant model, facts)."""
    import copy

    from . import modeling, qat, training
    from .pruning import DistillLoss

    model = modeling.load_model(str(ref.source.model_dir), attn_implementation="eager").eval()
    teacher = copy.deepcopy(ref.model).eval()
    dropouts = qat.dropout_off(model)
    feeds = ref.calibration_feeds(cfg.qat_calibration_samples)
    t0 = time.perf_counter()
    counts = qat.insert_fake_quant(model, lambda m: qat.fake_quant_logits(m, feeds))
    calibrate_s = time.perf_counter() - t0
    calibrated = ref.score(qat.fake_quant_logits(model, ref.eval_set[0]))
    log.info("fake quantization: %d weight + %d activation quantizers, calibrated on %d rows in %.1fs: "
             "%s %.4f before QAT", counts["weight"], counts["activation"],
             sum(len(f["input_ids"]) for f in feeds), calibrate_s, ref.spec.metric, calibrated)
    tcfg = train_config(cfg, ref)
    loader, rows = _train_loader(cfg, ref, tcfg.batch_size)
    device = training.resolve_device(cfg.device)
    if device.type != "cpu":
        model.to(device)
        teacher.to(device)
    training.seed_everything(cfg.seed)
    loss = DistillLoss(teacher, cfg.distill_temperature, cfg.distill_alpha)
    trained = training.train(model, loader, _eval_loader(ref), tcfg, device,
                             training.resolve_precision("fp32", device), loss_fn=loss, spec=ref.spec)
    model.to("cpu").eval()
    facts = {"library": "nvidia-modelopt (INT8_DEFAULT_CFG: weights per output channel, activations per tensor, "
                        "symmetric signed INT8, max calibration)",
             "quantizers": counts, "disabled_quantizers": list(qat.DISABLED), "dropout_modules_off": dropouts,
             "calibration_rows": int(sum(len(f["input_ids"]) for f in feeds)), "calibrate_s": round(calibrate_s, 2),
             "metric_after_calibration": calibrated, "train_rows": rows, "fraction_of_epoch": cfg.qat_fraction,
             "lr": tcfg.lr, "distill": {"alpha": cfg.distill_alpha, "temperature": cfg.distill_temperature},
             "train": {k: trained.metrics.get(k) for k in ("train_time_s", "optimizer_steps", "best_eval_accuracy",
                                                         "loss_curve", "eval_metrics") if k in trained.metrics},
             "versions": qat.library_versions()}
    return model, facts


def export_files(cfg: QatConfig, ref, model, out_dir: Path) -> dict:
    """model.qat.onnx (signed, checked for TensorRT); parity of ONNX Runtime vs the fake-quant model."""
    from . import export as ex
    from . import qat, qdq

    signed = out_dir / variants.get("ov-qat").file
    try:
        facts = qat.export(model, ref.input_names, signed, cfg.opset)
    except Exception as exc:  # the exporter or ModelOpt's symbolics on an architecture they do not handle
        raise qat.QatUnavailable(f"the fake-quant {type(model).__name__} does not export to Q/DQ ONNX: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    facts["tensorrt_check"] = qdq.trt_problems(signed)[:5] or "ok"
    from .runtimes import OrtPredictor

    fq = qat.fake_quant_logits(model, ref.eval_set[0])
    onnx_logits = [OrtPredictor(out_dir / variants.get("ort-qat").file).predict_logits(b) for b in ref.eval_set[0]]
    facts["fake_quant_parity"] = ex.compare_logits(fq, onnx_logits)
    facts["fake_quant_metric"] = ref.score(fq)
    return facts


def evaluate_rows(cfg: QatConfig, ref, out_dir: Path, facts: dict) -> dict:
    """Every registry row of the stage: recorded like ONNX-stage variants (same gate and parity)."""
    from . import export as ex
    from .onnx_stage import _failed, evaluate_variant

    fp32_size = ex.file_size(ref.source.model_dir / "model.safetensors") if (
        ref.source.model_dir / "model.safetensors").is_file() else None
    rows = {}
    for spec in variants.for_stage(STAGE):
        usable, why = spec.available()
        if spec.backend == "tensorrt":
            why = (why or "").replace(" ()", "") or "TensorRT engines are built on an NVIDIA GPU (none here)"
            rows[spec.key] = _failed(spec.key, f"{why}; model.qat.onnx is its explicit-quantization input",
                                     {}, status="skipped", stage=STAGE)
            continue
        if not usable:
            rows[spec.key] = _failed(spec.key, why, {}, status="skipped", stage=STAGE)
            continue
        rows[spec.key] = evaluate_variant(cfg, ref, out_dir, spec.key, fp32_size or 1,
                                          {"from_file": spec.built_from or spec.file}, stage=STAGE)
    return rows


def run(cfg: QatConfig) -> StageResult:
    start = time.perf_counter()
    source = resolve_source(cfg)
    out_dir = artifacts.stage_dir(cfg.output_dir, STAGE) / source.name
    fp = artifacts.fingerprint({"stage": STAGE, **result_config(cfg)},
                               {"source": source.name, "manifest": source.digest()})
    run_ = artifacts.stage_run(out_dir, STAGE, fp, force=cfg.force)
    if run_.current:
        log.info("qat/%s is up to date (%s); --force re-runs it", source.name, artifacts.manifest_path(out_dir))
        return StageResult(STAGE, "up-to-date", time.perf_counter() - start, _key(run_.current), str(out_dir))
    with stage_logging(STAGE, None), run_:
        print_config(STAGE, cfg)
        manifest = _run(cfg, source, out_dir, run_)
    return StageResult(STAGE, manifest["status"], time.perf_counter() - start, _key(manifest), str(out_dir))


def _run(cfg: QatConfig, source, out_dir: Path, run_) -> dict:
    from . import qat
    from .reference import Reference

    ref = Reference(cfg, source)
    out_dir = run_.directory  # the working directory, swapped into place by run_.finish
    inputs = {"source": {"name": source.name, "dir": str(source.model_dir), "manifest_digest": source.digest()}}
    try:
        qat.modelopt()
        model, facts = quantize_and_train(cfg, ref, out_dir)
        facts["export"] = export_files(cfg, ref, model, out_dir)
    except qat.QatUnavailable as exc:
        log.warning("qat skipped: %s", exc)
        for leftover in out_dir.glob("model.qat*"):  # nothing half-written stays beside the manifest
            leftover.unlink()
        return run_.finish(status="skipped", reason=str(exc), config=cfg.to_dict(), inputs=inputs,
                           outputs=[], metrics={"source": source.name})
    ref.tokenizer.save_pretrained(out_dir)
    for name in COPY_FILES:
        if (source.model_dir / name).is_file():
            shutil.copy2(source.model_dir / name, out_dir / name)
    rows = evaluate_rows(cfg, ref, out_dir, facts)
    metrics = {"source": source.name, "source_dir": str(source.model_dir),
               "label_names": list(ref.splits.label_names),
               "reference": {"backend": "torch", "precision": "fp32", "accuracy": ref.torch_accuracy,
                             "metric": ref.spec.metric, "task": ref.spec.task, "eval_rows": len(ref.splits.eval),
                             "dataset": ref.splits.source},
               "max_length": ref.max_length, "accuracy_budget": cfg.onnx_accuracy_budget,
               "qat": facts, "variants": rows}
    return run_.finish(status="ok", config=cfg.to_dict(), inputs=inputs, outputs=artifacts.list_files(out_dir),
                       metrics=metrics)


def _key(manifest: dict) -> str:
    m = manifest.get("metrics") or {}
    row = (m.get("variants") or {}).get("qat") or {}
    if row.get("accuracy") is None:
        return manifest.get("reason") or ""
    return (f"ort-qat {m['reference']['metric']} {row['accuracy']:.4f} ({row['accuracy_delta'] * 100:+.2f} pt vs "
            f"FP32), {row['status']}")


def add_args(parser, standalone: bool = False) -> None:
    from functools import partial

    from . import cli

    cli.add_common_args(parser)
    g = parser.add_argument_group("quantization-aware training (QAT)")
    add = partial(cli.add, g, config=QatConfig)
    if not standalone:
        add("--qat", action="store_true", default=None, help="run the qat stage (QAT INT8 with nvidia-modelopt)")
    add("--qat-source", metavar="baseline|pruned|DIR", help="the trained model to quantize (default: {default})")
    add("--qat-fraction", type=float, metavar="F", help="fraction of one training epoch to fine-tune (default: {default})")
    add("--qat-lr", type=float, metavar="LR", help="QAT learning rate (default: {default})")
    add("--qat-calibration-samples", type=int, metavar="N",
        help="training sentences to calibrate the quantizers before QAT (default: {default})")
    cli.add(g, "--distill-alpha", type=float, metavar="A", help="weight of the distillation term (default: 0.5)")
    cli.add(g, "--distill-temperature", type=float, metavar="T", help="softmax temperature (default: 2.0)")
    # the ONNX stage's flag, defined with the same meaning (the QAT rows go through the same gate)
    add("--onnx-accuracy-budget", type=float, metavar="X",
        help="reduced-precision variants losing more accuracy than this (absolute, vs their FP32 source) are "
             "marked rejected (default: {default}; compare.py's --accuracy-budget is the recommendation's)")


def build_config(ns) -> QatConfig:
    from . import cli

    return cli.build_config(QatConfig, ns)
