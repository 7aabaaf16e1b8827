"""Accuracy-aware post-training INT8: when a static INT8 variant misses ``--onnx-accuracy-budget``,
keep its most sensitive quantized nodes in float until it meets the budget (or a step limit).

ONNX Runtime (``qdq``): our greedy loop (:func:`bertopt.qdq.accuracy_aware`) over the quantized
MatMuls of ``model.qdq.onnx``, each candidate put back in float with the same calibration
(:func:`bertopt.qdq.keep_float`, what ``nodes_to_exclude`` gives), scored on a seeded sample of
the *training* split (never the eval split the gate and compare report). OpenVINO (``ov-int8``):
NNCF's ``quantize_with_accuracy_control`` with the same split as its validation set.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from . import variants

log = logging.getLogger("bertopt.ptq_search")

SEARCH_ROWS = 256   # training rows the search scores on (a seed apart from the calibration sample)
MAX_STEPS = 8       # nodes put back in float at most (one per step)
SEARCHED = ("qdq", "ov-int8")


class SearchSplit:
    """A seeded training sample with labels, its batches and the FP32 reference metric on it."""

    def __init__(self, ref, rows: int = SEARCH_ROWS):
        train = ref.splits.train
        rng = np.random.default_rng(int(ref.data_cfg.get("seed", ref.cfg.seed)) + 1)
        idx = sorted(rng.choice(len(train), size=min(rows, len(train)), replace=False))
        texts = [train.texts[i] for i in idx]
        pairs = [train.pairs[i] for i in idx] if train.pairs is not None else None
        self.batches, order, self.owners = ref._batches(texts, ref.cfg.eval_batch_size, pairs)
        labels = np.asarray([train.labels[i] for i in idx])
        self.labels = labels[self.owners] if self.owners is not None else labels[order]
        self.ref = ref
        self.rows = len(idx)
        self.reference = self.score(ref.torch)

    def score(self, predictor) -> float:
        from .reference import accuracy

        return accuracy([predictor.predict_logits(b) for b in self.batches], self.labels, self.ref.spec,
                        self.owners)


def maybe_recover(cfg, ref, out_dir: Path, name: str, info: dict, fp32_size: int, evaluate) -> dict:
    """``info`` unchanged unless ``name`` is a searched static INT8 variant the gate rejected;
    then the search's files replace it and it is re-evaluated with ``evaluate`` (the ONNX stage's
    evaluate_variant), with the steps recorded."""
    if name not in SEARCHED or info.get("status") != "rejected":
        return info
    start = time.perf_counter()
    split = SearchSplit(ref)
    log.info("%s: %s, searching for the nodes to keep in float (%d training rows, FP32 %.4f)", name,
             info["reason"], split.rows, split.reference)
    search = (_search_ort if name == "qdq" else _search_openvino)(cfg, ref, out_dir, split)
    facts = {k: v for k, v in info.items() if k not in ("status", "reason", "parity", "accuracy", "accuracy_delta",
                                                        "size_bytes", "size_pct_of_fp32", "devices")}
    search.update(split="train (seeded sample, not the reported eval split)", rows=split.rows,
                  reference=split.reference, budget=cfg.onnx_accuracy_budget, search_s=round(time.perf_counter() - start, 1),
                  before={"accuracy": info["accuracy"], "accuracy_delta": info["accuracy_delta"]})
    return evaluate(cfg, ref, out_dir, name, fp32_size, dict(facts, accuracy_aware=search))


def _search_ort(cfg, ref, out_dir: Path, split: SearchSplit) -> dict:
    from . import qdq
    from .runtimes import OrtPredictor

    spec = variants.by_key("onnx", "qdq")
    signed = out_dir / variants.get("trt-int8").built_from
    candidates = qdq.quantized_nodes(signed)

    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        def score(kept: list[str]) -> float:
            qdq.keep_float(signed, Path(tmp) / "s.onnx", kept)
            qdq.cpu_qdq(Path(tmp) / "s.onnx", Path(tmp) / "c.onnx")
            return split.score(OrtPredictor(Path(tmp) / "c.onnx", intra_op_threads=cfg.ort_threads))

        result = qdq.accuracy_aware(candidates, score, split.reference, cfg.onnx_accuracy_budget, MAX_STEPS)
    if result.kept_float:
        qdq.keep_float(signed, signed, result.kept_float)  # the TensorRT file keeps the same nodes in float
        qdq.cpu_qdq(signed, out_dir / spec.file)
    return dict(result.to_dict(), method="greedy: per-node sensitivity, then the most sensitive nodes kept in "
                                         "float one per step (ONNX Runtime, same calibration)",
                candidates=len(candidates), max_steps=MAX_STEPS)


def _search_openvino(cfg, ref, out_dir: Path, split: SearchSplit) -> dict:
    """NNCF quantize_with_accuracy_control: calibrate as ov-int8, validate on the search split."""
    import nncf
    import openvino as ov

    from . import export as ex
    from .reference import accuracy

    spec = variants.by_key("onnx", "ov-int8")
    model = ov.Core().read_model(str(out_dir / spec.built_from))
    names = [i.get_any_name() for i in model.inputs]
    feeds = ref.calibration_feeds(cfg.calibration_samples)
    pick = lambda b: {n: b[n] for n in names}  # noqa: E731

    def validate(compiled, batches) -> float:
        out = compiled.outputs[0]
        return accuracy([compiled(pick(b))[out] for b in batches], split.labels, ref.spec, split.owners)

    with ex.quiet_quantizer_logs():
        quantized = nncf.quantize_with_accuracy_control(
            model, nncf.Dataset(list(feeds), pick), nncf.Dataset(list(split.batches)), validate,
            max_drop=cfg.onnx_accuracy_budget, drop_type=nncf.DropType.ABSOLUTE,
            model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds),
            advanced_accuracy_restorer_parameters=nncf.AdvancedAccuracyRestorerParameters(
                max_num_iterations=MAX_STEPS))
    ov.save_model(quantized, str(out_dir / spec.file), compress_to_fp16=False)
    compiled = ov.Core().compile_model(quantized, "CPU")
    final = float(validate(compiled, split.batches))
    kept = [op.get_friendly_name() for op in quantized.get_ordered_ops()
            if op.get_type_name() == "MatMul" and not _reads_fake_quantize(op)]
    return {"method": "nncf.quantize_with_accuracy_control (OpenVINO backend)", "max_steps": MAX_STEPS,
            "kept_float": kept, "steps": [{"kept_float": kept, "score": final, "delta": final - split.reference}],
            "met_budget": final >= split.reference - cfg.onnx_accuracy_budget}


def _reads_fake_quantize(op) -> bool:
    for value in op.inputs():
        node = value.get_source_output().get_node()
        for _ in range(3):  # FakeQuantize, maybe behind a Convert/Transpose of a weight
            if node.get_type_name() == "FakeQuantize":
                return True
            if not node.inputs():
                break
            node = node.inputs()[0].get_source_output().get_node()
    return False
