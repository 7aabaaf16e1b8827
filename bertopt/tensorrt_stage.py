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
    """Build (or skip, with the reason) the TensorRT engines of one source; (manifest, was_up_to_date).
    Never fatal for the ONNX variants: engines that cannot be built or run are recorded per precision."""
    from . import tensorrt as trt_mod

    onnx_dir = artifacts.stage_dir(cfg.output_dir, "onnx") / source.name
    out_dir = artifacts.stage_dir(cfg.output_dir, "tensorrt") / source.name
    usable, reason = trt_mod.availability()
    index = _device_index(trt_device(cfg))
    onnx_metrics = onnx_manifest.get("metrics", {})
    max_length = int(onnx_metrics.get("max_length") or cfg.max_length)
    max_positions = int(onnx_metrics.get("max_positions") or max_length)  # the model's own limit
    fp = artifacts.fingerprint({"stage": "tensorrt", **trt_options(cfg)},
                               {"onnx": artifacts.manifest_digest(onnx_dir), "usable": usable, "reason": reason,
                                "device": trt_mod.device_facts(index=index)})
    run_ = artifacts.stage_run(out_dir, "tensorrt", fp, force=cfg.force, wait=cfg.wait)
    if run_.current:
        log.info("tensorrt/%s is up to date (%s)", source.name, run_.current.get("status"))
        return run_.current, True
    with run_:
        common = dict(config=cfg.to_dict(),
                      inputs={"onnx": {"dir": str(onnx_dir), "manifest_digest": artifacts.manifest_digest(onnx_dir)}})
        if not usable:
            log.warning("tensorrt/%s skipped: %s", source.name, reason)
            return run_.finish(status="skipped", reason=reason, **common,
                               metrics={"source": source.name, "engines": {},
                                        **trt_mod.device_facts(index=index)}), False
        profile = trt_profile(cfg, max_positions)
        metrics = trt_mod.build_engines(onnx_dir, run_.directory, cfg.trt_precision_list(), profile, cfg.trt_workspace_mb,
                                        device_index=index)
        metrics.update(source=source.name, profile=profile.to_dict(), workspace_mb=cfg.trt_workspace_mb)
        # write the manifest first: the runner checks it before loading a plan
        run_.finish(status="ok", outputs=artifacts.list_files(run_.directory), metrics=metrics, **common)
        _check_engines(cfg, ref, run_.directory, metrics, profile)
        good = [p for p, e in metrics["engines"].items() if e["status"] == "ok"]
        why = None if good else "no usable engine: " + "; ".join(
            f"{p}: {e['reason']}" for p, e in metrics["engines"].items())
        if why:
            log.error("tensorrt/%s: %s", source.name, why)
        manifest = run_.finish(status="ok" if good else "failed", reason=why, outputs=artifacts.list_files(run_.directory),
                               metrics=metrics, **common)
    return manifest, False


def _device_index(device: str) -> int:
    _, _, idx = str(device).partition(":")
    return int(idx) if idx.isdigit() else 0


def trt_device(cfg) -> str:
    """The CUDA device engines are built and checked on: --device cuda:N, else cuda (device 0)."""
    return cfg.device if str(cfg.device).startswith("cuda") else "cuda"


def trt_profile(cfg, max_positions: int):
    """The optimization profile: the flags, with the default maximum sequence at the model's own
    position limit (so every sequence the model accepts, e.g. compare's sweep cells, fits)."""
    from . import tensorrt as trt_mod

    return trt_mod.make_profile(cfg.trt_min_shapes, cfg.trt_opt_shapes, cfg.trt_max_shapes, max_positions,
                                max_positions=max_positions)


def engine_status(precision: str, max_abs_diff: float, accuracy_delta: float, cfg):
    """The ONNX variants' gate applied to an engine: trt-fp32 gets the FP32 rule, trt-fp16/int8 the
    budget rule. An FP32 engine over the tolerance is 'failed' here but not fatal: TensorRT is a
    sub-stage whose engines are recorded one by one."""
    from .onnx_stage import decide_status

    return decide_status(precision, max_abs_diff, accuracy_delta, cfg.parity_tolerance, cfg.onnx_accuracy_budget)


def _check_engines(cfg, ref: Reference, out_dir: Path, metrics: dict, profile) -> None:
    """Parity and accuracy of each built engine on the eval split (batches cut to the profile),
    gated like the ONNX variants; an engine that cannot run or fails its gate is recorded
    (failed / rejected) and never used downstream."""
    from .errors import PipelineError
    from .runtimes import TensorRTPredictor

    batches, labels = ref.eval_set
    fit = [b for b in batches if profile.contains(b["input_ids"].shape)]
    if len(fit) != len(batches):
        batches, order = ref._batches(ref.splits.eval.texts, profile.max[0])
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
