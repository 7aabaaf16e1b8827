"""ONNX export, parity, ONNX Runtime variants and the onnx_tensorrt stage on a tiny BERT."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from bertopt import artifacts
from bertopt import export as ex
from bertopt.errors import ConfigError, MissingArtifact, ModelError, PipelineError

VARIANT_FILES = {"model.onnx", "model.opt.onnx", "model.int8.onnx", "model.int8-unfused.onnx", "model.int4.onnx",
                 "model.fp16.onnx",
                 "model.qdq.onnx", "model.qdq-cpu.onnx"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir) -> Path:
    """model.onnx of the tiny BERT (traced at 2x8)."""
    d = tmp_path_factory.mktemp("exported")
    facts = ex.export_onnx(tiny_model_dir, d / "model.onnx", opset=17, max_length=64)
    assert facts["input_names"] == ["input_ids", "attention_mask", "token_type_ids"]
    return d


def torch_logits(model_dir, batch):
    from bertopt.runtimes import TorchPredictor

    return TorchPredictor(model_dir).predict_logits(batch)


def real_batch(model_dir, texts):
    from transformers import AutoTokenizer

    from bertopt import data

    tok = AutoTokenizer.from_pretrained(model_dir)
    return data.pad_batch(data.tokenize(texts, tok, 64), tok.pad_token_id, True)


# ----------------------------------------------------------------------------- export + parity
def test_export_has_dynamic_axes_opset_and_io_names(exported):
    model = onnx.load(str(exported / "model.onnx"))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in model.graph.output] == ["logits"]
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch", "sequence"]  # symbolic, not the traced 2x8


@pytest.mark.parametrize("batch_size,seq", [(3, 17), (5, 40), (1, 64)])
def test_exported_model_matches_torch_at_untraced_shapes(exported, tiny_model_dir, batch_size, seq):
    from bertopt.runtimes import OrtPredictor

    batch = ex.random_batches(("input_ids", "attention_mask", "token_type_ids"), [(batch_size, seq)],
                              vocab_size=30522, seed=batch_size)[0]
    assert batch["attention_mask"].min() == 0 or batch_size == 1  # padded rows are exercised
    got = OrtPredictor(exported / "model.onnx").predict_logits(batch)
    want = torch_logits(tiny_model_dir, batch)
    assert got.shape == (batch_size, 2)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_parity_shapes_and_compare_logits():
    assert ex.parity_shapes(128) == [(b, s) for b in (1, 7, 32) for s in (8, 64, 128)]
    assert ex.parity_shapes(32) == [(b, s) for b in (1, 7, 32) for s in (8, 32)]
    ref = [np.array([[0.0, 1.0], [2.0, 0.0]], np.float32)]
    same = ex.compare_logits(ref, ref)
    assert same == {"max_abs_diff": 0.0, "argmax_agreement": 1.0, "rows": 2}
    flipped = ex.compare_logits(ref, [np.array([[1.5, 1.0], [2.0, 0.5]], np.float32)])
    assert flipped["argmax_agreement"] == 0.5 and flipped["max_abs_diff"] == pytest.approx(1.5)
    nan = ex.compare_logits(ref, [np.array([[np.nan, 1.0], [2.0, 0.0]], np.float32)])
    assert nan["max_abs_diff"] == float("inf")
    with pytest.raises(ex.ExportError, match="shape"):
        ex.compare_logits(ref, [np.zeros((2, 3), np.float32)])


def test_export_rejects_low_opset(tiny_model_dir, tmp_path):
    with pytest.raises(ex.ExportError, match="opset"):
        ex.export_onnx(tiny_model_dir, tmp_path / "m.onnx", opset=13)


# ----------------------------------------------------------------------------- ORT variants
def test_optimizer_fuses_attention(exported, tmp_path):
    facts = ex.optimize(exported / "model.onnx", tmp_path / "model.opt.onnx", num_heads=4, hidden_size=32)
    assert facts["fused_operators"]["Attention"] == 2  # one per layer of the tiny BERT
    assert ex.op_counts(tmp_path / "model.opt.onnx").get("Attention") == 2


def test_optimizer_fails_loudly_without_attention(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel())
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "plain.onnx")
    with pytest.raises(ex.ExportError, match="0 Attention"):
        ex.optimize(tmp_path / "plain.onnx", tmp_path / "out.onnx", num_heads=1, hidden_size=4)
    assert not (tmp_path / "out.onnx").exists()


def test_each_quantized_variant_loads_and_predicts(exported, tiny_model_dir, tmp_path):
    from bertopt.runtimes import OrtPredictor

    src = exported / "model.onnx"
    ex.optimize(src, tmp_path / "model.opt.onnx", num_heads=4, hidden_size=32)
    # dynamic INT8 of the *optimized* graph (needs DefaultTensorType for the contrib ops)
    int8 = ex.quantize_int8(tmp_path / "model.opt.onnx", tmp_path / "model.int8.onnx")
    assert int8["quantized_operators"].get("QAttention") == 2
    int4 = ex.quantize_int4(src, tmp_path / "model.int4.onnx", block_size=16)
    assert int4["quantized_operators"]["MatMulNBits"] > 0
    assert int4["quantized_operators"].get("GatherBlockQuantized", 0) >= 1  # the word embeddings
    ex.convert_fp16(src, tmp_path / "model.fp16.onnx")
    fp16 = onnx.load(str(tmp_path / "model.fp16.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16.graph.initializer)
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in fp16.graph.output)  # fp32 I/O
    ln = [n for n in fp16.graph.node if n.op_type == "LayerNormalization"]
    assert ln  # kept as fp32 ops (the converter surrounds them with casts)
    batch = real_batch(tiny_model_dir, ["the movie was great", "awful", "a dull and tedious story"])
    feeds = [real_batch(tiny_model_dir, ["good film", "boring plot and acting"])]
    qdq = ex.quantize_qdq(src, tmp_path / "model.qdq.onnx", feeds)
    assert qdq["quantized_operators"]["QuantizeLinear"] > 0 and qdq["quantized_operators"]["DequantizeLinear"] > 0
    want = torch_logits(tiny_model_dir, batch)
    sizes = {}
    for name in ("int8", "int4", "fp16", "qdq"):
        path = tmp_path / f"model.{name}.onnx"
        got = OrtPredictor(path).predict_logits(batch)
        assert got.shape == want.shape and got.dtype == np.float32 and np.isfinite(got).all(), name
        assert np.abs(got - want).max() < 1.0, name  # same function, reduced precision
        sizes[name] = path.stat().st_size
    fp32 = src.stat().st_size
    assert sizes["int8"] < 0.4 * fp32 and sizes["int4"] < 0.3 * fp32 and sizes["fp16"] < 0.6 * fp32


def test_default_reduce_range_depends_on_vnni(monkeypatch):
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setattr(ex, "cpu_has_vnni", lambda: False)
    assert ex.default_reduce_range()[0] is True
    monkeypatch.setattr(ex, "cpu_has_vnni", lambda: True)
    assert ex.default_reduce_range()[0] is False
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert ex.default_reduce_range()[0] is False


# ----------------------------------------------------------------------------- bad files
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_onnx_gives_clear_error(exported, tmp_path, damage):
    from bertopt.runtimes import OrtPredictor

    data = (exported / "model.onnx").read_bytes()
    bad = tmp_path / "model.onnx"
    bad.write_bytes({"truncate": data[: len(data) // 3], "garbage": b"not an onnx file" * 10, "empty": b""}[damage])
    with pytest.raises(ModelError, match="corrupt or truncated") as err:
        OrtPredictor(bad)
    assert str(bad) in str(err.value) and "--force" in str(err.value)
    with pytest.raises(ModelError, match=r"corrupt|truncated"):
        ex.load_onnx(bad)
    with pytest.raises(ModelError, match="not found"):
        ex.load_onnx(tmp_path / "missing.onnx")


# ----------------------------------------------------------------------------- the stage
def onnx_config(output_dir, **kw):
    from bertopt.onnx_stage import OnnxConfig

    return OnnxConfig(output_dir=str(output_dir), quiet=True, calibration_samples=64, **kw)


@pytest.fixture()
def stage_out(tmp_path, tiny_baseline) -> Path:
    """A private output dir holding a copy of the tiny baseline (the stage writes beside it)."""
    shutil.copytree(tiny_baseline, tmp_path / "baseline")
    return tmp_path


def test_stage_builds_every_variant_with_manifest(stage_out):
    from bertopt.onnx_stage import run

    result = run(onnx_config(stage_out))
    assert result.status == "ok" and "tensorrt skipped" in result.key_metric
    d = stage_out / "onnx" / "baseline"
    files = set(artifacts.list_files(d))
    assert VARIANT_FILES <= files
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["stage"] == "onnx" and manifest["status"] == "ok"
    m = manifest["metrics"]
    assert m["source"] == "baseline" and m["label_names"] == ["negative", "positive"]
    assert set(m["variants"]) == {"fp32", "opt", "int8", "int8-unfused", "int4", "fp16", "qdq", "ov-fp32", "ov-bf16",
                                 "ov-int8", "ov-int8-bf16"}
    for name, v in m["variants"].items():
        if v["backend"] == "openvino":  # optional extra: covered by tests/test_openvino.py
            continue
        assert set(v) >= {"file", "precision", "status", "reason", "size_bytes", "devices", "parity", "accuracy",
                          "accuracy_delta"}, name
        assert (d / v["file"]).stat().st_size == v["size_bytes"]
        assert v["status"] in ("ok", "rejected"), (name, v["reason"])
        assert "cpu" in v["devices"] and 0 <= v["accuracy"] <= 1
        assert 0 <= v["parity"]["argmax_agreement"] <= 1
    for name in ("fp32", "opt"):
        assert m["variants"][name]["parity"]["max_abs_diff"] <= 1e-4
        assert m["variants"][name]["parity"]["argmax_agreement"] == 1.0
    assert m["variants"]["opt"]["fused_operators"]["Attention"] == 2
    assert m["variants"]["int8"]["precision"] == "int8" and m["variants"]["int4"]["precision"] == "int4"
    fused, unfused = m["variants"]["int8"], m["variants"]["int8-unfused"]  # one quantizer, two graphs
    assert (fused["from_file"], unfused["from_file"]) == ("model.opt.onnx", "model.onnx")
    assert "QAttention" in fused["quantized_operators"] and "QAttention" not in unfused["quantized_operators"]
    assert unfused["quantized_operators"].keys() & {"MatMulInteger", "DynamicQuantizeMatMul"}
    assert m["reference"]["accuracy"] == pytest.approx(m["variants"]["fp32"]["accuracy"])
    trt = json.loads((stage_out / "tensorrt" / "baseline" / "manifest.json").read_text())
    assert trt["stage"] == "tensorrt" and trt["status"] == "skipped" and "CUDA" in trt["reason"]

    again = run(onnx_config(stage_out))  # unchanged inputs: skipped
    assert again.status == "up-to-date"
    forced = run(onnx_config(stage_out, force=True))
    assert forced.status == "ok"
    assert json.loads((d / "manifest.json").read_text())["created"] >= manifest["created"]


def test_unfused_int8_is_skipped_when_int8_already_is_the_unfused_graphs(stage_out):
    from bertopt.onnx_stage import run

    assert run(onnx_config(stage_out, variants="int8,int8-unfused")).status == "ok"  # no opt: nothing fused
    v = json.loads((stage_out / "onnx" / "baseline" / "manifest.json").read_text())["metrics"]["variants"]
    assert v["int8"]["status"] == "ok" and v["int8"]["from_file"] == "model.onnx"
    assert v["int8-unfused"]["status"] == "skipped" and "already the unfused graph" in v["int8-unfused"]["reason"]
    assert not (stage_out / "onnx" / "baseline" / "model.int8-unfused.onnx").exists()


def test_stage_reruns_when_the_source_changes(stage_out):
    from bertopt.onnx_stage import run

    cfg = onnx_config(stage_out, variants="opt")
    assert run(cfg).status == "ok"
    manifest = json.loads((stage_out / "baseline" / "manifest.json").read_text())
    manifest["created"] = "changed"  # a re-trained source has a new manifest digest
    (stage_out / "baseline" / "manifest.json").write_text(json.dumps(manifest))
    assert run(cfg).status == "ok"
    assert run(cfg).status == "up-to-date"


def test_stage_missing_baseline_names_the_command(tmp_path):
    from bertopt.onnx_stage import run

    with pytest.raises(MissingArtifact, match="python benchmark.py"):
        run(onnx_config(tmp_path))


def test_stage_fails_when_fp32_parity_is_violated(stage_out):
    from bertopt.onnx_stage import run

    with pytest.raises(PipelineError, match="parity-tolerance"):
        run(onnx_config(stage_out, variants="opt", parity_tolerance=1e-12))
    manifest = artifacts.read_manifest(stage_out / "onnx" / "baseline")
    assert manifest["status"] == "failed" and manifest["metrics"]["variants"]["fp32"]["status"] == "failed"
    assert artifacts.is_current(stage_out / "onnx" / "baseline", manifest["fingerprint"]) is None


def test_stage_source_directory(stage_out, tiny_model_dir):
    from bertopt.onnx_stage import run

    result = run(onnx_config(stage_out, source=str(stage_out / "baseline"), variants="int8"))
    assert result.status == "ok"
    manifest = artifacts.read_manifest(stage_out / "onnx" / "baseline")
    assert set(manifest["metrics"]["variants"]) == {"fp32", "int8"}  # int8 falls back to model.onnx without opt
    assert manifest["metrics"]["variants"]["int8"]["from_file"] == "model.onnx"
    with pytest.raises(ConfigError, match="no such directory"):
        run(onnx_config(stage_out, source=str(stage_out / "nope")))


def test_decide_status():
    from bertopt.onnx_stage import decide_status

    assert decide_status("fp32", 1e-6, 0.0, 1e-4, 0.01) == ("ok", None)
    status, reason = decide_status("opt", 2e-3, 0.0, 1e-4, 0.01)
    assert status == "failed" and "parity-tolerance" in reason
    assert decide_status("fp32", float("nan"), 0.0, 1e-4, 0.01)[0] == "failed"
    assert decide_status("int8", 0.5, -0.005, 1e-4, 0.01) == ("ok", None)
    status, reason = decide_status("int4", 0.5, -0.02, 1e-4, 0.01)
    assert status == "rejected" and "accuracy-budget" in reason and "-2.00 pt" in reason


@pytest.mark.parametrize("kwargs, text", [
    ({"opset": 13}, "--opset"),
    ({"variants": "opt,int3"}, "--variants"),
    ({"onnx_accuracy_budget": -0.1}, "--onnx-accuracy-budget"),
    ({"int4_block_size": 24}, "--int4-block-size"),
    ({"calibration_method": "mse"}, "--calibration-method"),
    ({"trt_min_shapes": "9x1"}, "min <= opt <= max"),
    ({"trt_opt_shapes": "eight"}, "--trt-opt-shapes"),
    ({"trt_precisions": "fp8"}, "--trt-precisions"),
])
def test_config_problems_name_the_flag(kwargs, text):
    from bertopt.onnx_stage import OnnxConfig

    with pytest.raises(ConfigError, match=text):
        OnnxConfig(**kwargs)


def test_script_help_and_error_exit(tmp_path, capsys):
    import onnx_tensorrt

    with pytest.raises(SystemExit) as exit_info:
        onnx_tensorrt.main(["--help"])
    assert exit_info.value.code == 0
    assert "--onnx-accuracy-budget" in capsys.readouterr().out
    assert onnx_tensorrt.main(["--output-dir", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "error: missing input" in err and "python benchmark.py" in err and "Traceback" not in err


def test_ffn_output_matmuls_found_by_structure(exported, tmp_path):
    model = onnx.load(str(exported / "model.onnx"))
    found = ex.ffn_output_matmuls(model)
    assert len(found) == 2 and all(n.endswith("output/dense/MatMul") and "attention" not in n for n in found)
    ex.optimize(exported / "model.onnx", tmp_path / "opt.onnx", num_heads=4, hidden_size=32)
    assert len(ex.ffn_output_matmuls(onnx.load(str(tmp_path / "opt.onnx")))) == 2  # fed by a fused BiasGelu


def test_qdq_histogram_calibration_and_exclusion(exported, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from bertopt import data

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = data.tokenize(["a good film", "bad", "the acting was really quite dull", "great"], tok, 64)
    feeds = [data.pad_batch(ids[i:i + 2], 0, True, pad_to=12) for i in (0, 2)]  # one shape for histograms
    facts = ex.quantize_qdq(exported / "model.onnx", tmp_path / "q.onnx", feeds, method="percentile",
                            exclude_ffn_output=True)
    assert len(facts["nodes_to_exclude"]) == 2 and facts["calibration"] == "percentile"
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    excluded = [n for n in matmuls if n.name in facts["nodes_to_exclude"]]
    others = [n for n in matmuls if n.name not in facts["nodes_to_exclude"]]
    assert len(excluded) == 2 and all(producer.get(n.input[1]) != "DequantizeLinear" for n in excluded)
    assert any(producer.get(n.input[1]) == "DequantizeLinear" for n in others)  # the rest is quantized


def test_the_reference_reads_the_trained_data_set_where_data_dir_says_it_lies_now():
    """A stage reads the eval data the source trained on; an explicit --data-dir says where it is now."""
    from types import SimpleNamespace

    from bertopt.onnx_stage import OnnxConfig
    from bertopt.reference import Reference
    from conftest import SST2_DIR

    source = SimpleNamespace(manifest={"config": {"dataset": "sst2", "data_dir": "/gone/data", "max_length": 64}})
    moved = Reference(OnnxConfig(data_dir=str(SST2_DIR.parent)), source)
    assert moved.data_cfg["data_dir"] == str(SST2_DIR.parent) and moved.data_cfg["max_length"] == 64
    assert len(moved.splits.eval) == 872
    assert Reference(OnnxConfig(), source).data_cfg["data_dir"] == "/gone/data"  # no flag: as trained
