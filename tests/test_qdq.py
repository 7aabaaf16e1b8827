"""Static Q/DQ INT8: the CPU form of the TensorRT file runs integer kernels and means the same
values; the TensorRT structural check; the accuracy-aware search on a fake scorer."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bertopt import export as ex
from bertopt import qdq


def _batch(model_dir, texts, pad_to=None):
    from transformers import AutoTokenizer

    from bertopt import data

    tok = AutoTokenizer.from_pretrained(model_dir)
    return data.pad_batch(data.tokenize(texts, tok, 64), tok.pad_token_id, True, pad_to=pad_to)


TEXTS = ["a good film", "bad", "the acting was really quite dull", "great", "not my kind of story at all",
         "a warm and funny movie", "boring", "it was fine I guess"]


@pytest.fixture(scope="module")
def signed(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny BERT exported and statically quantized the TensorRT way (signed, symmetric)."""
    d = tmp_path_factory.mktemp("qdq")
    ex.export_onnx(tiny_model_dir, d / "model.onnx", opset=17, max_length=64)
    feeds = [_batch(tiny_model_dir, TEXTS[i:i + 4]) for i in (0, 4)]
    ex.quantize_qdq(d / "model.onnx", d / "model.qdq.onnx", feeds)
    return d


def _optimized_ops(path, tmp_path) -> dict:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return ex.op_counts(tmp_path / "optimized.onnx")


def test_signed_file_passes_the_tensorrt_check_and_cpu_form_runs_integer_matmuls(signed, tiny_model_dir,
                                                                                 tmp_path):
    from bertopt.runtimes import OrtPredictor

    assert qdq.trt_problems(signed / "model.qdq.onnx") == []
    facts = qdq.cpu_qdq(signed / "model.qdq.onnx", tmp_path / "cpu.onnx")
    assert facts["rewritten_quantize"] > 0 and facts["rewritten_dequantize"] >= facts["rewritten_quantize"]
    graph = onnx.load(str(signed / "model.qdq.onnx")).graph
    quantized = len([n for n in graph.node if n.op_type == "MatMul"])
    assert len(qdq.quantized_nodes(graph and onnx.load(str(signed / "model.qdq.onnx")))) >= quantized
    before, after = _optimized_ops(signed / "model.qdq.onnx", tmp_path), _optimized_ops(tmp_path / "cpu.onnx", tmp_path)
    # the signed file leaves the MatMuls whose input Q is shared (Q/K/V) as DQ + float MatMul
    assert before.get("QLinearMatMul", 0) < quantized
    assert after.get("QLinearMatMul", 0) == quantized  # every quantized MatMul on an integer kernel
    assert after.get("MatMul", 0) == 0 and after.get("FusedMatMul", 0) == 0  # no float MatMul left
    # same calibration, same representable values: the logits agree to float rounding of the
    # requantization (1e-2 of logits ~1 in size; what differs is where the float rounding happens)
    batch = _batch(tiny_model_dir, TEXTS)
    a = OrtPredictor(signed / "model.qdq.onnx").predict_logits(batch)
    b = OrtPredictor(tmp_path / "cpu.onnx").predict_logits(batch)
    assert np.abs(a - b).max() < 1e-2 and (a.argmax(-1) == b.argmax(-1)).all()
    assert any("zero-point is not INT8" in p for p in qdq.trt_problems(tmp_path / "cpu.onnx"))  # not TRT's file


def _edit_first(model, op_type, fn):
    inits = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == op_type and fn(n, inits):
            return model
    raise AssertionError("nothing edited")


@pytest.mark.parametrize("damage,text", [
    ("negative-scale", "scale not positive"),
    ("zero-point", "zero-point not 0"),
    ("activation-per-channel", "activation scale is per-channel"),
])
def test_tensorrt_check_names_each_violation(signed, damage, text):
    model = onnx.load(str(signed / "model.qdq.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    consts = {i.name for i in model.graph.initializer}
    acts = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in consts]
    node = acts[0]
    if damage == "negative-scale":
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(np.array(-0.1, np.float32), node.input[1]))
    elif damage == "zero-point":
        inits[node.input[2]].CopyFrom(numpy_helper.from_array(np.array(3, np.int8), node.input[2]))
    else:
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(np.array([0.1, 0.2], np.float32), node.input[1]))
    assert any(text in p for p in qdq.trt_problems(model))


def test_tensorrt_check_wants_per_channel_weights(signed, tmp_path, tiny_model_dir):
    feeds = [_batch(tiny_model_dir, TEXTS[:4])]
    ex.quantize_qdq(signed / "model.onnx", tmp_path / "pt.onnx", feeds, per_channel=False)
    assert any("not per-channel on axis 1" in p for p in qdq.trt_problems(tmp_path / "pt.onnx"))
    assert qdq.trt_problems(signed / "model.onnx") == [
        "no QuantizeLinear/DequantizeLinear node: not an explicitly quantized model"]


def test_keeping_nodes_in_float_removes_their_quantizers(signed, tiny_model_dir, tmp_path):
    from bertopt.runtimes import OrtPredictor

    names = qdq.quantized_nodes(signed / "model.qdq.onnx")
    assert len(names) >= 8
    all_float = qdq.keep_float(signed / "model.qdq.onnx", tmp_path / "f.onnx", names)
    assert all_float["kept_float"] == names
    batch = _batch(tiny_model_dir, TEXTS)
    want = OrtPredictor(signed / "model.onnx").predict_logits(batch)
    got = OrtPredictor(tmp_path / "f.onnx").predict_logits(batch)
    quantized = OrtPredictor(signed / "model.qdq.onnx").predict_logits(batch)
    # weights are their dequantized values and the residual Adds still read quantized activations,
    # so not FP32 exactly, but closer to it than the quantized model
    assert np.abs(want - got).max() < 0.5 * np.abs(want - quantized).max()
    assert qdq.quantized_nodes(tmp_path / "f.onnx") == []
    qdq.keep_float(signed / "model.qdq.onnx", tmp_path / "one.onnx", names[:1])
    assert qdq.quantized_nodes(tmp_path / "one.onnx") == names[1:]


def test_accuracy_aware_search_stops_at_the_budget_and_records_its_steps():
    cost = {"a": 0.05, "b": 0.02, "c": 0.001, "d": 0.0}
    calls = []

    def score(kept):  # a fake scorer: each quantized node costs its own amount
        calls.append(list(kept))
        return 0.90 - sum(v for k, v in cost.items() if k not in kept)

    res = qdq.accuracy_aware(list(cost), score, reference=0.90, budget=0.01, max_steps=10)
    assert res.met_budget and res.kept_float == ["a", "b"]
    assert [s["kept_float"] for s in res.steps] == [[], ["a"], ["a", "b"]]  # stops as soon as it holds
    assert res.steps[-1]["delta"] >= -0.01 and res.steps[0]["delta"] == pytest.approx(-0.071)
    assert res.sensitivity["a"] == pytest.approx(0.05)
    capped = qdq.accuracy_aware(list(cost), score, reference=0.90, budget=0.001, max_steps=1)
    assert not capped.met_budget and len(capped.steps) == 2  # the step limit
    ok = qdq.accuracy_aware(list(cost), lambda kept: 0.899, reference=0.90, budget=0.01)
    assert ok.met_budget and ok.kept_float == [] and len(ok.steps) == 1  # nothing to do


def test_ort_search_records_each_step_and_rewrites_both_files(signed, tmp_path, monkeypatch):
    """The ONNX stage's search on a real Q/DQ model, scored by a fake split whose reference can
    never be met: it stops at the step limit, records every step, and both files keep the best
    step's nodes in float (the TensorRT file and its CPU form alike)."""
    import shutil
    from types import SimpleNamespace

    from bertopt import ptq_search

    shutil.copy(signed / "model.onnx", tmp_path / "model.onnx")
    shutil.copy(signed / "model.qdq.onnx", tmp_path / "model.qdq.onnx")
    monkeypatch.setattr(ptq_search, "MAX_STEPS", 3)
    calls = []

    class FakeSplit:
        reference = 2.0  # unreachable

        def score(self, predictor):  # every call a little better: the last step is the best one
            calls.append(predictor)
            return 0.5 + 0.001 * len(calls)

    cfg = SimpleNamespace(ort_threads=1, onnx_accuracy_budget=0.01)
    out = ptq_search._search_ort(cfg, None, tmp_path, FakeSplit())
    n = len(qdq.quantized_nodes(signed / "model.qdq.onnx"))
    assert out["candidates"] == n and not out["met_budget"]
    assert len(out["steps"]) == 1 + 3 and [len(s["kept_float"]) for s in out["steps"]] == [0, 1, 2, 3]
    assert len(calls) == 1 + n + 3  # the start, one sensitivity score per node, then the steps
    kept = out["kept_float"]
    assert kept == out["steps"][-1]["kept_float"] and len(kept) == 3  # budget missed: the best-scoring step
    assert qdq.quantized_nodes(tmp_path / "model.qdq.onnx") == [x for x in qdq.quantized_nodes(
        signed / "model.qdq.onnx") if x not in kept]
    assert qdq.trt_problems(tmp_path / "model.qdq.onnx") == []
    assert (tmp_path / "model.qdq-cpu.onnx").is_file()
