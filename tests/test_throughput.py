"""Throughput mode (several single-threaded model calls at once), the per-CPU precision rows
(ov-bf16 / ov-int8-bf16 need native bf16 math) and the saved model's file mode."""
import json
import os
import shutil
import stat
import threading
import time

import numpy as np
import pytest

from bertopt import artifacts, precision, throughput, variants
from bertopt.compare import streams
from bertopt.compare.workloads import classify_texts
from bertopt.errors import ConfigError


def test_map_batches_keeps_the_input_order_whatever_order_streams_finish_in():
    seen_threads = set()

    def slow_first(b):  # early batches take longest, so later ones finish first
        seen_threads.add(threading.get_ident())
        time.sleep(0.02 * (5 - b) / 5)
        return b * 10

    assert list(throughput.map_batches(slow_first, range(5), streams=3)) == [0, 10, 20, 30, 40]
    assert len(seen_threads) > 1  # they really ran side by side
    assert list(throughput.map_batches(lambda b: b + 1, [1, 2], streams=1)) == [2, 3]


def test_host_streams_one_per_core_or_the_environment_and_bad_values_are_one_line():
    assert throughput.host_streams(2, env={})[0] == 2
    assert throughput.host_streams(4, env={"BERTOPT_STREAMS": "1"}) == (1, "set by BERTOPT_STREAMS=1")
    for bad in ("0", "two", "-3", "1000"):
        with pytest.raises(ConfigError, match="BERTOPT_STREAMS must be an integer from 1 to 256"):
            throughput.host_streams(2, env={"BERTOPT_STREAMS": bad})


def test_torch_and_gpu_rows_have_no_throughput_mode_with_the_reason():
    assert "process-wide" in throughput.streams_refusal("torch")
    assert throughput.streams_refusal("onnxruntime") is None and throughput.streams_refusal("openvino") is None
    assert "GPU" in throughput.streams_refusal("onnxruntime", "cuda")


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, tiny_model_dir):
    from bertopt import export as ex

    d = tmp_path_factory.mktemp("tp_onnx")
    ex.export_onnx(tiny_model_dir, d / "model.onnx", 17, 64)
    return d / "model.onnx"


def _texts(n=157):
    rng = np.random.default_rng(0)
    words = "the a movie was good bad not very long short film plot actor scene".split()
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(n)]


@pytest.mark.parametrize("spec", ["ort-fp32", "ov-fp32"])
def test_the_throughput_path_gives_the_same_predictions_in_the_same_order(spec, tiny_onnx, tiny_model_dir):
    from bertopt.modeling import load_tokenizer
    from bertopt.runtimes import open_predictor

    if variants.get(spec).available()[0] is False:
        pytest.skip(f"{spec}: {variants.get(spec).available()[1]}")
    tok = load_tokenizer(tiny_model_dir)
    texts = _texts()
    one = open_predictor(spec, tiny_onnx, threads=1)
    many = throughput.open_streams(spec, tiny_onnx, 3)
    kw = dict(batch_size=8, max_length=64, with_tt=True)
    ref = classify_texts(one, tok, texts, **kw)
    got = classify_texts(many, tok, texts, streams=3, **kw)
    assert got.shape == (len(texts),) and np.array_equal(ref, got)
    # the logits too, batch for batch (pairs/tasks go through text_scores)
    ref_s = classify_texts(one, tok, texts, task="regression", **kw)
    got_s = classify_texts(many, tok, texts, task="regression", streams=3, **kw)
    np.testing.assert_allclose(got_s, ref_s, rtol=0, atol=1e-5)
    if spec == "ov-fp32":
        assert many.streams == 3 and many.inference_precision == "f32"


def test_choose_keeps_the_faster_mode_and_records_both():
    plan = streams.StreamPlan(2, "test", preds={"ort-int8": object(), "ov-int8": object()},
                              refused={"torch-fp32": "PyTorch's intra-op thread pool is process-wide"})
    times = {"torch-fp32": [2.0, 2.1], "ort-int8": [1.0, 1.2, 1.1], "ort-int8@streams": [0.6, 0.5, 0.7],
             "ov-int8": [0.5, 0.5], "ov-int8@streams": [0.9, 0.8]}
    y = np.array([0, 1, 1])
    preds = {"ort-int8": y, "ort-int8@streams": y.copy(), "ov-int8": y, "ov-int8@streams": np.array([0, 1, 0])}
    modes = streams.choose(times, preds, plan)
    assert modes["ort-int8"]["mode"] == "streams" and modes["ort-int8"]["streams"] == 2
    assert times["ort-int8"] == [0.6, 0.5, 0.7] and modes["ort-int8"]["streams_speedup"] == pytest.approx(1.1 / 0.6, 1e-3)
    assert modes["ov-int8"]["mode"] == "one call" and times["ov-int8"] == [0.5, 0.5]
    assert modes["ov-int8"]["same_predictions"] is False and modes["ort-int8"]["same_predictions"] is True
    assert modes["torch-fp32"] == {"mode": "one call", "streams": 1, "reason": plan.refused["torch-fp32"]}
    assert not any(k.endswith(streams.TAG) for k in list(times) + list(preds))


def test_bf16_rows_are_skipped_with_the_reason_on_a_cpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma", "avx512f", "avx512_vnni"})
    for name in ("ov-bf16", "ov-int8-bf16"):
        ok, why = variants.get(name).available()
        assert not ok and "no native bf16 math" in why and "amx_bf16" in why and "avx512_bf16" in why
    assert variants.get("ov-fp32").available()[0] == variants.get("ov-int8").available()[0]  # untouched
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "amx_bf16", "amx_tile"})
    assert precision.cpu_math_support("bf16") == (True, "CPU has native bf16 math (amx_bf16)")


def test_the_onnx_stage_records_the_bf16_skip_and_compare_shows_it(monkeypatch, tmp_path, tiny_baseline):
    pytest.importorskip("openvino")
    from bertopt.compare.discover import discover
    from bertopt.onnx_stage import OnnxConfig, run

    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f"})
    shutil.copytree(tiny_baseline, tmp_path / "baseline")
    assert run(OnnxConfig(output_dir=str(tmp_path), quiet=True, variants="ov-fp32,ov-bf16")).status == "ok"
    m = json.loads((tmp_path / "onnx" / "baseline" / "manifest.json").read_text())["metrics"]["variants"]
    assert m["ov-fp32"]["status"] == "ok" and m["ov-fp32"]["inference_precision"] == "f32"
    assert m["ov-bf16"]["status"] == "skipped" and "no native bf16 math" in m["ov-bf16"]["reason"]
    rows = {v.name: v for v in discover(tmp_path, "cpu")[0]}
    assert rows["ov-bf16"].status == "skipped" and "bf16" in rows["ov-bf16"].reason


def test_a_bf16_row_compiles_bf16_where_the_cpu_has_it(tiny_onnx):
    pytest.importorskip("openvino")
    from bertopt.runtimes import open_predictor

    ok, why = precision.cpu_math_support("bf16")
    if not ok:
        pytest.skip(why)
    assert open_predictor("ov-bf16", tiny_onnx, threads=1).inference_precision == "bf16"
    assert open_predictor("ov-fp32", tiny_onnx, threads=1).inference_precision == "f32"


def test_saved_models_are_readable_by_everyone_the_umask_allows(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    old = os.umask(0o022)
    try:
        artifacts.save_model(model, tok, tmp_path / "m")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes
    # the 0600 it had came from the writer, not from here: a plain save_pretrained still shows it
    model.save_pretrained(tmp_path / "plain")
    assert stat.S_IMODE((tmp_path / "plain" / "model.safetensors").stat().st_mode) == 0o600
