"""The OpenVINO backend, added through the variant registry alone: FP32 from model.onnx, INT8 by
NNCF. Both sides are covered: with the module hidden (rows 'skipped' with the reason) and, where
requirements.txt is installed (CI installs it), built, checked and measured."""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from bertopt import variants
from bertopt.aws.choice import resolve_model
from bertopt.errors import BackendUnavailable


def _run_onnx(out: Path, **kw):
    from bertopt.onnx_stage import OnnxConfig, run

    return run(OnnxConfig(output_dir=str(out), quiet=True, calibration_samples=32, variants="ov-fp32,ov-int8", **kw))


@pytest.fixture()
def hide_openvino(monkeypatch):
    for name in ("openvino", "nncf"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails, find_spec raises


@pytest.fixture()
def with_openvino():
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")


@pytest.fixture()
def built(tmp_path, tiny_baseline) -> Path:
    """tmp_path holding the tiny baseline and its ONNX stage, run for the OpenVINO variants (request
    it after hide_openvino / with_openvino)."""
    shutil.copytree(tiny_baseline, tmp_path / "baseline")
    assert _run_onnx(tmp_path).status == "ok"
    return tmp_path


def test_registry_holds_the_backend_in_one_place():
    fp32, int8 = variants.get("ov-fp32"), variants.get("ov-int8")
    assert fp32.backend == int8.backend == "openvino" and fp32.file == "model.onnx"
    assert int8.built_from == "model.onnx" and int8.builder and int8.targets == ("cpu",)
    assert {"ov-fp32", "ov-int8"} <= set(variants.onnx_keys(("openvino",)))


def test_without_openvino_variants_are_skipped_with_the_reason(hide_openvino, built):
    from bertopt.compare.discover import discover
    from bertopt.runtimes import OpenVinoPredictor

    tmp_path = built
    m = json.loads((tmp_path / "onnx" / "baseline" / "manifest.json").read_text())["metrics"]["variants"]
    for key in ("ov-fp32", "ov-int8"):
        assert m[key]["status"] == "skipped" and "requirements.txt" in m[key]["reason"], m[key]
    assert not (tmp_path / "onnx" / "baseline" / "model.ov-int8.xml").exists()
    rows = {v.name: v for v in discover(tmp_path, "cpu")[0]}
    assert rows["ov-int8"].status == "skipped" and "openvino" in rows["ov-int8"].reason.lower()
    with pytest.raises(BackendUnavailable, match="requirements.txt"):
        OpenVinoPredictor(tmp_path / "onnx" / "baseline" / "model.onnx")


def test_with_openvino_fp32_and_nncf_int8_are_built_checked_and_opened(with_openvino, built):
    from bertopt.compare.discover import discover
    from bertopt.runtimes import OrtPredictor, open_predictor

    tmp_path = built
    d = tmp_path / "onnx" / "baseline"
    m = json.loads((d / "manifest.json").read_text())["metrics"]["variants"]
    assert m["ov-fp32"]["status"] == "ok", m["ov-fp32"]
    assert m["ov-fp32"]["parity"]["max_abs_diff"] < 1e-4  # same graph, f32 inference precision
    assert m["ov-int8"]["status"] in ("ok", "rejected"), m["ov-int8"]
    assert (d / "model.ov-int8.xml").is_file() and (d / "model.ov-int8.bin").is_file()
    assert m["ov-int8"]["size_bytes"] == (d / "model.ov-int8.xml").stat().st_size + (d / "model.ov-int8.bin").stat().st_size
    assert 0 <= m["ov-int8"]["accuracy"] <= 1
    rows = {v.name: v for v in discover(tmp_path, "cpu")[0]}
    assert rows["ov-fp32"].status == "ok" and rows["ov-fp32"].backend == "openvino"
    ov = open_predictor("ov-fp32", d / "model.onnx", threads=1)
    ort = OrtPredictor(d / "model.onnx")
    import numpy as np

    batch = {"input_ids": np.array([[101, 2000, 2001, 102]]), "attention_mask": np.ones((1, 4), dtype=np.int64),
             "token_type_ids": np.zeros((1, 4), dtype=np.int64)}
    assert set(ov.input_names) == set(ort.input_names)
    np.testing.assert_allclose(ov.predict_logits(batch), ort.predict_logits(batch), atol=1e-4)


def test_a_recommended_openvino_variant_is_packaged_and_served(with_openvino, built):
    from types import SimpleNamespace

    import numpy as np

    from bertopt.aws import packaging
    from bertopt.aws.serving import inference

    tmp_path = built
    d = tmp_path / "onnx" / "baseline"
    reports = tmp_path / "reports"
    reports.mkdir()
    rec = {"variant": "ov-int8", "backend": "openvino", "precision": "int8", "source": "baseline", "device": "cpu",
           "path": str(d / "model.ov-int8.xml"), "model_dir": str(d), "onnx_variant": "ov-int8",
           "registry": "ov-int8", "reason": "test"}
    (reports / "results.json").write_text(json.dumps({"recommendation": rec}))
    cfg = SimpleNamespace(reports_dir=str(reports), model_path=None, variant=None, gpu=False, max_length=64,
                          max_batch=8, max_chars=100, vendor_wheels=None, batch_wait_ms=2.0, batch_max_texts=64)
    choice = resolve_model(cfg)
    assert choice.backend == "openvino" and choice.path.name == "model.ov-int8.xml"
    members = dict(packaging.archive_members(choice, cfg))
    assert {"model.ov-int8.xml", "model.ov-int8.bin", "serving.json", "code/bertopt_runtime/runtimes.py"} <= set(members)
    assert b"openvino==" in members["code/requirements.txt"]
    settings = json.loads(members["serving.json"])
    pred = inference._make_predictor(str(d), settings)
    batch = {"input_ids": np.array([[101, 2000, 102]]), "attention_mask": np.ones((1, 3), dtype=np.int64),
             "token_type_ids": np.zeros((1, 3), dtype=np.int64)}
    assert pred.backend == "openvino" and pred.predict_logits(batch).shape == (1, 2)


@pytest.mark.parametrize("variant, file", [("ov-int8", "model.ov-int8.xml"), ("baseline:ov-fp32", "model.onnx")])
def test_an_openvino_variant_chosen_with_variant_is_packaged_for_openvino(with_openvino, built, variant, file):
    from types import SimpleNamespace

    from bertopt.aws import packaging

    cfg = SimpleNamespace(output_dir=str(built), reports_dir=str(built / "reports"), model_path=None, variant=variant,
                          gpu=False, max_length=64, max_batch=8, max_chars=100, vendor_wheels=None, batch_wait_ms=0.0,
                          batch_max_texts=64)
    choice = resolve_model(cfg)   # was: backend onnxruntime, "ort-ov-int8", and the IR read as ONNX (DecodeError)
    assert (choice.backend, choice.variant, choice.path.name) == ("openvino", variant.split(":")[-1], file)
    members = dict(packaging.archive_members(choice, cfg))
    assert json.loads(members["serving.json"])["backend"] == "openvino" and file in members


def test_an_openvino_ir_given_with_model_path_is_served_by_openvino(with_openvino, built, tmp_path_factory):
    from types import SimpleNamespace

    from bertopt.errors import ModelError

    d = built / "onnx" / "baseline"
    cfg = SimpleNamespace(model_path=str(d / "model.ov-int8.xml"), variant=None, gpu=False, max_length=64)
    choice = resolve_model(cfg)
    assert (choice.backend, choice.variant, choice.precision) == ("openvino", "ov-int8", "int8")
    assert resolve_model(SimpleNamespace(**{**vars(cfg), "model_path": str(d / "model.onnx")})).variant == "ort-fp32"
    lonely = tmp_path_factory.mktemp("ir") / "model.ov-int8.xml"
    shutil.copy(d / "model.ov-int8.xml", lonely)
    with pytest.raises(ModelError, match=r"OpenVINO IR without its weights model\.ov-int8\.bin$"):
        resolve_model(SimpleNamespace(model_path=str(lonely), variant=None, gpu=False, max_length=64))


def test_an_openvino_server_meets_every_batch1_length_before_its_first_request(with_openvino, built, caplog,
                                                                               tmp_path_factory):
    import logging

    from bertopt.aws import local
    from bertopt.aws.config import AwsDeployConfig
    from bertopt.runtimes import OpenVinoPredictor

    d = built / "onnx" / "baseline"
    pred, shapes = OpenVinoPredictor(d / "model.ov-int8.xml", threads=1), []
    run = pred.predict_logits
    pred.predict_logits = lambda batch: shapes.append(batch["input_ids"].shape) or run(batch)
    assert pred.warm_up(6) >= 0 and shapes == [(1, n) for n in range(2, 7)]
    cfg = AwsDeployConfig(output_dir=str(built), reports_dir=str(built / "reports"), variant="ov-int8", local=True,
                          quiet=True)
    served_log = logging.getLogger("bertopt.serving")   # earlier stage runs may stop it propagating to root
    served_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="bertopt.serving"):
            model = local.prepare_local(cfg, tmp_path_factory.mktemp("ov-served"))[3]
    finally:
        served_log.removeHandler(caplog.handler)
    assert f"warmed up batch-1 inputs of 2..{model.max_length} tokens in " in caplog.text


def test_without_openvino_a_recommended_openvino_variant_is_refused_clearly(tmp_path, hide_openvino):
    from bertopt.errors import BackendUnavailable
    from bertopt.aws.serving import inference

    with pytest.raises(BackendUnavailable, match="openvino is not installed"):
        inference._make_predictor(str(tmp_path), {"backend": "openvino", "model_file": "model.onnx"})


@pytest.mark.parametrize("installed", [False, True], ids=["hidden", "installed"])
def test_compare_and_the_report_show_the_openvino_rows(request, installed):
    import compare

    request.getfixturevalue("with_openvino" if installed else "hide_openvino")
    tmp_path = request.getfixturevalue("built")
    reports = tmp_path / "reports"
    assert compare.main(["--output-dir", str(tmp_path), "--reports-dir", str(reports), "--quick", "--quiet",
                         "--skip-memory", "--sweep-batches", "1,4", "--sweep-seqs", "16", "--latency-requests", "4",
                         "--threads", "1"]) == 0
    res = json.loads((reports / "results.json").read_text())
    by = {r["name"]: r for r in res["variants"]}
    summary = (reports / "summary.md").read_text()
    html = (reports / "performance_report.html").read_text()
    assert res["protocol"]["name"] == "quick"
    if installed:
        for name in ("ov-fp32", "ov-int8"):
            assert by[name]["status"] == "ok" and by[name]["backend"] == "openvino", by[name]
            assert by[name]["throughput"]["samples_per_s"]["median"] > 0 and 0 <= by[name]["accuracy"] <= 1
            assert f"| {name} | openvino |" in summary or f"| **{name}** ★ | openvino |" in summary
            assert name in html
    else:
        for name in ("ov-fp32", "ov-int8"):
            assert by[name]["status"] == "skipped" and "requirements.txt" in by[name]["reason"]
            assert f"- {name} (skipped):" in summary
        assert "requirements.txt" in html


def _in_threads(fn, n: int) -> None:
    """fn(0) .. fn(n - 1) at once, one thread each; returns when all are done."""
    import threading

    threads = [threading.Thread(target=fn, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_one_openvino_model_answers_concurrent_callers_correctly(with_openvino, built):
    """A server calls one predictor from several threads (batch runners, HTTP threads). One shared
    InferRequest handed callers each other's outputs (MiniLM: 128 of 600 wrong, no error); ``streams``
    compiles one CPU stream per concurrent caller (one stream made 2 callers queue: no gain)."""
    import numpy as np

    from bertopt.aws.serving import inference
    from bertopt.runtimes import OpenVinoPredictor

    d = built / "onnx" / "baseline"
    rng = np.random.default_rng(0)
    feeds = []
    for rows, length in ((1, 5), (8, 60), (2, 14), (6, 40)):
        ids = rng.integers(1000, 1500, (rows, length))
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": 0 * ids})
    two = min(2, len(os.sched_getaffinity(0)))  # OpenVINO gives no more streams than cores
    pred = OpenVinoPredictor(d / "model.ov-int8.xml", threads=1, streams=2)
    assert pred.compiled.get_property("NUM_STREAMS") == two
    expected = [pred.predict_logits(f) for f in feeds]
    wrong = []

    def call(k: int) -> None:
        for i in range(300):
            j = (i + k) % len(feeds)
            try:
                if not np.allclose(pred.predict_logits(feeds[j]), expected[j], atol=1e-5):
                    wrong.append(j)
            except Exception as exc:  # e.g. a request still busy with another thread's run
                wrong.append(f"{type(exc).__name__}: {exc}")

    _in_threads(call, 4)
    assert not wrong, wrong[:3]
    settings = {**inference.DEFAULTS, "backend": "openvino", "model_file": "model.ov-int8.xml", "batch_wait_ms": 0.0,
                "batch_runners": 2}
    assert inference._make_predictor(str(d), settings).compiled.get_property("NUM_STREAMS") == two
    per_request = {**settings, "batch_wait_ms": -1.0}
    assert inference._make_predictor(str(d), per_request).compiled.get_property("NUM_STREAMS") == 1
    per_request["model_streams"] = 2
    assert inference._make_predictor(str(d), per_request).compiled.get_property("NUM_STREAMS") == two


def test_the_load_tests_model_only_ceiling_runs_an_openvino_ir(with_openvino, built):
    from bertopt.aws import instances, loadcompare

    ceiling = loadcompare.model_ceiling(str(built / "onnx" / "baseline" / "model.ov-int8.xml"), 8, seconds=0.2)
    runs = instances.thread_plan(instances.local_vcpus(), batching=True).concurrent_runs
    assert "skipped" not in ceiling and ceiling["micro_batching"]["concurrent_runs"] == runs
    assert ceiling["per_request"]["texts_per_s"] > 0 and ceiling["micro_batching"]["texts_per_s"] > 0


def test_an_openvino_endpoint_answers_concurrent_clients_as_it_answers_one(with_openvino, built, tmp_path_factory,
                                                                           monkeypatch):
    """Through HTTP, micro-batched on two runners: before the fix 400 SST-2 sentences from 16 clients
    got 209 errors ("Infer Request is busy") and 42 answers that differed from one-at-a-time."""
    import urllib.request

    from bertopt.aws import local
    from bertopt.aws.config import AwsDeployConfig

    monkeypatch.setenv("BERTOPT_BATCH_RUNNERS", "2")
    monkeypatch.setenv("BERTOPT_THREADS", "1")
    cfg = AwsDeployConfig(output_dir=str(built), reports_dir=str(built / "reports"), variant="ov-int8", local=True,
                          quiet=True, max_length=32)
    handler, model = local.prepare_local(cfg, tmp_path_factory.mktemp("ov-concurrent"))[2:]
    endpoint = local.LocalEndpoint(local.InvocationsApp(handler, model), "127.0.0.1", 0, threads=16).start()
    texts = [" ".join(["good", "bad", "film", "plot", "acting"][: 1 + i % 5] * (1 + i % 7)) for i in range(120)]

    def ask(text):
        req = urllib.request.Request(endpoint.url + "/invocations", data=json.dumps({"inputs": [text]}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())[0]

    try:
        alone = [ask(t) for t in texts]
        together, failures = [None] * len(texts), []

        def client(k):
            for i in range(k, len(texts), 8):
                try:
                    together[i] = ask(texts[i])
                except Exception as exc:  # a 500 raises HTTPError
                    failures.append(f"{type(exc).__name__}: {exc}")

        _in_threads(client, 8)
    finally:
        endpoint.stop()
        model.batcher.close()
    assert not failures, failures[:3]
    differ = [i for i, (a, b) in enumerate(zip(alone, together))
              if a["label"] != b["label"] or abs(a["score"] - b["score"]) > 1e-4]
    assert not differ, [(alone[i], together[i]) for i in differ[:3]]
