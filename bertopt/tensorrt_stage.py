"""The TensorRT sub-stage of onnx_tensorrt.py: per source, build the engines from the ONNX stage's
files (``tensorrt/<source>/model.<precision>.plan``) where CUDA and TensorRT are present, check
each against PyTorch on the eval split, and write the manifest; elsewhere a 'skipped' manifest
with the reason. The build itself is :mod:`bertopt.tensorrt`."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from . import artifacts
from . import export as ex
from .reference import Reference, accuracy

log = logging.getLogger("bertopt.onnx_stage")


def trt_options(cfg) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if k.startswith("trt_")}


def tensorrt_source(cfg, source, ref: Reference, onnx_manifest: dict) -> tuple[dict, bool]:
    """Build (or skip, with the reason) the TensorRT engines of one source; (manifest, was_up_to_date)."""
    from . import tensorrt as trt_mod

    onnx_dir = artifacts.stage_dir(cfg.output_dir, "onnx") / source.name
    out_dir = artifacts.stage_dir(cfg.output_dir, "tensorrt") / source.name
    usable, reason = trt_mod.availability()
    onnx_metrics = onnx_manifest.get("metrics", {})
    max_length = int(onnx_metrics.get("max_length") or cfg.max_length)
    max_positions = int(onnx_metrics.get("max_positions") or max_length)  # the model's own limit
    fp = artifacts.fingerprint({"stage": "tensorrt", **trt_options(cfg)},
                               {"onnx": artifacts.manifest_digest(onnx_dir), "usable": usable, "reason": reason,
                                "device": trt_mod.device_facts()})
    run_ = artifacts.stage_run(out_dir, "tensorrt", fp, force=cfg.force)
    if run_.current:
        log.info("tensorrt/%s is up to date (%s)", source.name, run_.current.get("status"))
        return run_.current, True
    with run_:
        inputs = {"onnx": {"dir": str(onnx_dir), "manifest_digest": artifacts.manifest_digest(onnx_dir)}}
        if not usable:
            log.warning("tensorrt/%s skipped: %s", source.name, reason)
            return run_.finish(status="skipped", reason=reason, config=cfg.to_dict(), inputs=inputs,
                               metrics={"source": source.name, "engines": {}, **trt_mod.device_facts()}), False
        profile = trt_mod.make_profile(cfg.trt_min_shapes, cfg.trt_opt_shapes, cfg.trt_max_shapes, max_length,
                                       max_positions=max_positions)
        metrics = trt_mod.build_engines(onnx_dir, out_dir, cfg.trt_precision_list(), profile, cfg.trt_workspace_mb)
        metrics.update(source=source.name, profile=profile.to_dict(), workspace_mb=cfg.trt_workspace_mb)
        ok = [p for p, e in metrics["engines"].items() if e["status"] == "ok"]
        status = "ok" if ok else "failed"
        # write the manifest first: the runner checks it before loading a plan
        run_.finish(status=status, config=cfg.to_dict(), inputs=inputs, outputs=artifacts.list_files(out_dir),
                    metrics=metrics, reason=None if ok else "no engine could be built")
        if ok:
            _check_engines(ref, out_dir, metrics, profile)
            manifest = run_.finish(status=status, config=cfg.to_dict(), inputs=inputs,
                                   outputs=artifacts.list_files(out_dir), metrics=metrics)
        else:
            raise ex.ExportError(f"tensorrt/{source.name}: no engine could be built: "
                                 + "; ".join(f"{p}: {e['reason']}" for p, e in metrics["engines"].items()))
    return manifest, False


def _check_engines(ref: Reference, out_dir: Path, metrics: dict, profile) -> None:
    """Parity and accuracy of each built engine on the eval split (batches cut to the profile)."""
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
        pred = TensorRTPredictor(out_dir / engine["file"], precision=precision)
        logits = ref.logits(pred, batches, f"trt-{precision} eval")
        engine["parity"] = ex.compare_logits(torch_logits, logits)
        engine["accuracy"] = accuracy(logits, labels)
        engine["accuracy_delta"] = engine["accuracy"] - accuracy(torch_logits, labels)
        log.info("✓ trt-%s  max|Δlogits| %.2e  argmax %.2f%%  acc %.4f (%+.2f pt)", precision,
                 engine["parity"]["max_abs_diff"], engine["parity"]["argmax_agreement"] * 100, engine["accuracy"],
                 engine["accuracy_delta"] * 100)
