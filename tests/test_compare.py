"""compare.py: config, variant discovery from manifests, workloads, the recommendation rule,
targets, output files, and a --quick end-to-end run on a tiny model."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bertopt import artifacts
from bertopt import compare as cs
from bertopt.errors import ConfigError, MissingArtifact


# ----------------------------------------------------------------------------- config
def test_config_collects_every_problem_naming_flags():
    with pytest.raises(ConfigError) as exc:
        cs.CompareConfig(optimize_for="speed", target="tpu", accuracy_budget=2, repeats=3,
                         sweep_batches="1,x", threads=0)
    text = str(exc.value)
    for flag in ("--optimize-for", "--target", "--accuracy-budget", "--repeats", "--sweep-batches", "--threads"):
        assert flag in text
    assert len(exc.value.problems) == 6


def test_protocol_full_quick_and_overrides():
    full = cs.CompareConfig().protocol()
    assert full["repeats"] >= 5 and full["warmup"] >= 1
    assert full["sweep_batches"] == (1, 8, 32, 64) and full["sweep_seqs"] == (32, 64, 128, 256)
    assert full["threads"] >= 1 and full["quick"] is False
    quick = cs.CompareConfig(quick=True, repeats=2).protocol()  # fewer repeats allowed only with --quick
    assert quick["quick"] and quick["repeats"] == 2 and quick["max_eval_samples"]
    custom = cs.CompareConfig(sweep_batches="64,8,8", sweep_seqs=[16], threads=1).protocol()
    assert custom["sweep_batches"] == (8, 64) and custom["sweep_seqs"] == (16,) and custom["threads"] == 1


# ----------------------------------------------------------------------------- recommendation
def row(name, sps=None, p50=None, acc=0.90, device="cpu", status="ok", size=100, backend="onnxruntime"):
    return {"name": name, "status": status, "reason": None if status == "ok" else "why not", "device": device,
            "backend": backend, "precision": "fp32", "source": "baseline", "path": f"/m/{name}",
            "model_dir": "/m", "variant": name, "size_bytes": size, "accuracy": acc,
            "throughput": {"samples_per_s": {"median": sps}} if sps is not None else None,
            "latency": {"e2e_ms": {"p50": p50}} if p50 is not None else None}


def test_recommend_fastest_within_budget_on_target():
    rows = [row("torch-fp32", 100, 10.0, acc=0.90, backend="torch"),
            row("ort-int8", 900, 2.0, acc=0.88),          # 2 points worse: over the 1-point budget
            row("ort-opt", 500, 3.0, acc=0.895),          # 0.5 points worse: eligible
            row("ort-fp16", 5000, 0.5, device="cuda"),    # wrong device
            row("ort-qdq", None, None, status="rejected")]
    chosen, msg, verdicts = cs.recommend(rows, 0.90, target="cpu", accuracy_budget=0.01)
    assert chosen["name"] == "ort-opt"
    assert "ort-opt" in msg and "-0.50 points" in msg
    why = {v["variant"]: v["reason"] for v in verdicts}
    assert "2.00 points below" in why["ort-int8"]
    assert "runs on cuda" in why["ort-fp16"]
    assert why["ort-qdq"].startswith("not measured (rejected")
    # a wider budget admits INT8; optimizing for latency compares p50 instead
    assert cs.recommend(rows, 0.90, accuracy_budget=0.02)[0]["name"] == "ort-int8"
    rows[2]["latency"]["e2e_ms"]["p50"] = 1.0
    assert cs.recommend(rows, 0.90, optimize_for="latency")[0]["name"] == "ort-opt"
    assert cs.recommend(rows, 0.90, target="gpu")[0]["name"] == "ort-fp16"


def test_recommend_ties_break_by_accuracy_then_size_then_name():
    rows = [row("b", 1000, acc=0.90, size=50), row("a", 995, acc=0.91, size=80), row("c", 800, acc=0.95)]
    chosen, msg, _ = cs.recommend(rows, 0.91)
    assert chosen["name"] == "a"  # within 1% of the fastest and more accurate
    assert "tied" in msg
    rows = [row("b", 1000, size=50), row("a", 1000, size=80)]
    assert cs.recommend(rows, 0.90)[0]["name"] == "b"  # same speed and accuracy: smaller file
    rows = [row("b", 1000, size=50), row("a", 1000, size=50)]
    assert cs.recommend(rows, 0.90)[0]["name"] == "a"  # all equal: by name (deterministic)


def test_recommend_nothing_eligible_says_why():
    rows = [row("torch-fp32", 100, 10.0, backend="torch"), row("ort-int8", 900, acc=0.70)]
    chosen, msg, _ = cs.recommend(rows, 0.90, target="gpu")
    assert chosen is None
    assert "--target gpu" in msg and "no usable CUDA device" in msg and "--accuracy-budget" in msg
    chosen, msg, _ = cs.recommend([row("ort-int8", 900, acc=0.70)], 0.90, target="cpu")
    assert chosen is None and "accuracy points below" in msg
    chosen, msg, _ = cs.recommend([row("x", status="skipped")], 0.90)
    assert chosen is None and "no variant could be measured" in msg


def test_recommendation_entry_has_the_contract_keys():
    entry = cs.recommendation_entry(row("ort-int8", 900), "because")
    assert {"variant", "backend", "precision", "source", "path", "model_dir", "reason"} <= set(entry)
    assert entry["variant"] == "ort-int8" and entry["reason"] == "because"


# ----------------------------------------------------------------------------- targets
def _cell(b, s, sps, p50=None, frac=None):
    return {"batch": b, "seq": s, "samples_per_s": {"median": sps}, "p50_ms": p50 if p50 else 1000 * b / sps,
            "gflops": 1.0, "fraction_of_peak": frac}


def test_targets_from_results():
    ref = dict(row("torch-fp32-padded", 10, backend="torch"), accuracy_delta=0.0)
    eager = dict(row("torch-fp32", 40, backend="torch"), accuracy_delta=0.0, sweep=[_cell(1, 128, 50, p50=30.0)])
    opt = dict(row("ort-opt", 90), accuracy_delta=-0.002,
               sweep=[_cell(1, 128, 100, p50=8.0), _cell(32, 128, 200, frac=0.55)])
    fp32 = dict(row("ort-fp32", 80), accuracy_delta=0.0, sweep=[_cell(1, 128, 100, p50=12.0)])
    int8 = dict(row("ort-int8", 95), accuracy_delta=-0.004, sweep=[_cell(32, 128, 260)])
    results = {"variants": [ref, eager, opt, fp32, int8], "baseline_accuracy": 0.90,
               "recommendation": {"variant": "ort-int8", "device": "cpu"}}
    t = {x["id"]: x for x in cs.evaluate_targets(results)}
    assert t["e2e_speedup"]["measured"] == pytest.approx(9.5) and t["e2e_speedup"]["met"] is True
    assert t["ort_fp32_latency"]["measured"] == pytest.approx(8 / 30) and t["ort_fp32_latency"]["met"] is True
    assert t["ort_fp32_latency"]["variant"] == "ort-opt"
    assert t["int8_speedup"]["measured"] == pytest.approx(1.3) and t["int8_speedup"]["met"] is True
    assert t["opt_efficiency"]["measured"] == pytest.approx(0.55) and t["opt_efficiency"]["met"] is False
    # nothing measured -> "not measured" (met None), never a crash
    empty = cs.evaluate_targets({"variants": [], "recommendation": None})
    assert [x["met"] for x in empty] == [None] * 4


def test_busy_machine_warning():
    assert cs.busy_warnings(0.05, 2) == [] and cs.busy_warnings(None, 2) == []
    w = cs.busy_warnings(0.35, 2)
    assert len(w) == 1 and "other processes used 35% of the CPU time of 2 core(s)" in w[0]
    share = cs.bm.CpuShare().others()
    assert 0.0 <= share <= 1.0


# ----------------------------------------------------------------------------- workloads
class ParityPredictor:
    """Deterministic fake: label = parity of the sum of real token ids (padding-independent)."""

    input_names = ("input_ids", "attention_mask")

    def __init__(self):
        self.shapes = []

    def predict_logits(self, batch):
        assert set(batch) == set(self.input_names)
        self.shapes.append(batch["input_ids"].shape)
        s = (batch["input_ids"] * batch["attention_mask"]).sum(-1) % 2
        return np.stack([1 - s, s], -1).astype(np.float32)


def test_classify_texts_padded_and_length_sorted_agree(tiny_model_dir):
    from bertopt.modeling import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    texts = ["a", "a much longer sentence with many more words in it", "short one", "mid length text here",
             "x y z", "the end"]
    expected = []
    for t in texts:
        ids = tok(t, truncation=True, max_length=16)["input_ids"]
        expected.append(sum(ids) % 2)
    p = ParityPredictor()
    dyn = cs.classify_texts(p, tok, texts, batch_size=4, max_length=16, with_tt=True)
    assert dyn.tolist() == expected  # input order restored after length sorting
    assert p.shapes[0][1] > p.shapes[1][1]  # longest batch first, dynamic width
    p = ParityPredictor()
    padded = cs.classify_texts(p, tok, texts, batch_size=4, max_length=16, with_tt=True, pad_to=16)
    assert padded.tolist() == expected
    assert all(s[1] == 16 for s in p.shapes)
    total, model = cs.single_request(p, tok, texts[1], max_length=16, with_tt=True, pad_to=16)
    assert total >= model >= 0 and p.shapes[-1] == (1, 16)


def test_latency_task_records_rounds_after_warmup():
    calls = []
    task = cs.LatencyTask(lambda t: (calls.append(t), (0.002, 0.001))[1], ["w"], [["a", "b"], ["c"]], warmup=1)
    for _ in range(3):
        task()
    assert calls == ["w", "a", "a", "b", "c", "c"]  # an untimed primer request starts each chunk
    assert task.e2e == [0.002] * 3 and task.model == [0.001] * 3 and len(task.round_p50) == 2


# ----------------------------------------------------------------------------- discovery
def _export_tiny_onnx(model_dir: Path, onnx_dir: Path) -> None:
    """A hand-made ONNX stage directory (the contract's manifest), independent of onnx_tensorrt.py."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModelForSequenceClassification

    onnx_dir.mkdir(parents=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
    ids = torch.ones((2, 8), dtype=torch.long)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    dyn = {n: {0: "batch", 1: "sequence"} for n in names}
    dyn["logits"] = {0: "batch"}
    torch.onnx.export(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(onnx_dir / "model.onnx"),
                      input_names=names, output_names=["logits"], dynamic_axes=dyn, opset_version=17, dynamo=False)
    quantize_dynamic(str(onnx_dir / "model.onnx"), str(onnx_dir / "model.int8.onnx"), weight_type=QuantType.QInt8)
    for f in model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "config")):
            shutil.copy(f, onnx_dir / f.name)

    def v(file, precision, status="ok", devices=("cpu",), reason=None):
        size = (onnx_dir / file).stat().st_size if (onnx_dir / file).is_file() else None
        return {"file": file, "precision": precision, "status": status, "reason": reason, "size_bytes": size,
                "devices": list(devices), "parity": {"max_abs_diff": 0.0, "argmax_agreement": 1.0},
                "accuracy": None, "accuracy_delta": None}

    metrics = {"source": "baseline", "source_dir": str(model_dir), "label_names": ["negative", "positive"],
               "variants": {"fp32": v("model.onnx", "fp32"), "int8": v("model.int8.onnx", "int8"),
                            "qdq": v("model.qdq.onnx", "int8", status="rejected",
                                     reason="accuracy -3.00 points vs FP32 exceeds --accuracy-budget"),
                            "fp16": v("model.fp16.onnx", "fp16", devices=("cuda",))}}
    artifacts.write_manifest(onnx_dir, stage="onnx", status="ok", config={}, fingerprint="test", metrics=metrics)


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory, trained_tiny) -> Path:
    """A copy of the tiny trained output dir plus ONNX fp32/int8 variants and a skipped TensorRT stage."""
    out = tmp_path_factory.mktemp("compare_out")
    shutil.copytree(trained_tiny / "baseline", out / "baseline")
    _export_tiny_onnx(out / "baseline", out / "onnx" / "baseline")
    artifacts.write_manifest(out / "tensorrt" / "baseline", stage="tensorrt", status="skipped", config={},
                             fingerprint="test", reason="no CUDA device: TensorRT needs an NVIDIA GPU")
    return out


def test_discover_rows_and_reasons(tiny_pipeline):
    rows, manifests = cs.discover(tiny_pipeline, "cpu")
    by = {r.name: r for r in rows}
    assert list(by)[:2] == ["torch-fp32-padded", "torch-fp32"]
    assert by["torch-fp32-padded"].batching == "padded" and by["torch-fp32"].batching == "dynamic"
    assert by["ort-fp32"].status == "ok" and by["ort-fp32"].path.endswith("model.onnx")
    assert by["ort-int8"].precision == "int8" and by["ort-int8"].size_bytes > 0
    assert by["ort-qdq"].status == "rejected" and "accuracy" in by["ort-qdq"].reason
    assert by["ort-fp16"].status == "skipped" and "CUDA" in by["ort-fp16"].reason
    assert by["trt"].status == "skipped" and "NVIDIA" in by["trt"].reason
    assert {"baseline", "onnx/baseline", "tensorrt/baseline"} <= set(manifests)


def test_discover_missing_inputs(tmp_path, trained_tiny):
    with pytest.raises(MissingArtifact) as exc:
        cs.discover(tmp_path)
    assert "python benchmark.py" in str(exc.value)
    shutil.copytree(trained_tiny / "baseline", tmp_path / "baseline")
    artifacts.write_manifest(tmp_path / "mixed_precision", stage="mixed_precision", status="skipped",
                             config={}, fingerprint="x", reason="CPU has no native bf16 math")
    rows, _ = cs.discover(tmp_path, "cpu")
    by = {r.name: r for r in rows}
    assert by["ort"].status == "missing" and "python onnx_tensorrt.py" in by["ort"].reason
    mp = [r for r in rows if r.source == "mixed_precision"]
    assert len(mp) == 1 and mp[0].status == "skipped" and "bf16" in mp[0].reason


# ----------------------------------------------------------------------------- end to end (--quick)
def test_quick_end_to_end(tiny_pipeline, tmp_path):
    import compare

    reports = tmp_path / "reports"
    argv = ["--output-dir", str(tiny_pipeline), "--reports-dir", str(reports), "--quick", "--quiet",
            "--sweep-batches", "1,8", "--sweep-seqs", "16,256", "--latency-requests", "9", "--threads", "1"]
    assert compare.main(argv) == 0
    files = {p.name for p in reports.iterdir()}
    assert {"results.json", "results.csv", "summary.md", "performance_report.html", "manifest.json"} <= files
    res = json.loads((reports / "results.json").read_text())
    assert res["schema_version"] == cs.RESULTS_SCHEMA_VERSION
    env = res["environment"]
    for key in ("cpu", "cpu_count", "torch", "onnxruntime", "threads", "python", "load_average_start",
                "other_processes_cpu_share"):
        assert key in env
    assert res["protocol"]["quick"] is True and res["protocol"]["threads"] == 1
    assert res["protocol"]["sweep_seqs_used"] == [16, 128]  # 256 clamped to the tiny model's 128 positions
    assert res["hardware"]["matmul_peak"]["gflops"] > 0
    by = {r["name"]: r for r in res["variants"]}
    fp32_peak, int8_peak = res["hardware"]["matmul_peak"]["gflops"], res["hardware"]["cpu_matmul_peaks"]["int8"]["gflops"]
    assert set(res["hardware"]["cpu_matmul_peaks"]) == {"int8"} and int8_peak > 0
    for name, peak in (("ort-int8", int8_peak), ("ort-fp32", fp32_peak)):   # each row against its own type's peak
        for c in by[name]["sweep"]:
            assert c["fraction_of_peak"] == pytest.approx(c["gflops"] / peak)
    measured = {"torch-fp32-padded", "torch-fp32", "ort-fp32", "ort-int8"}
    assert {n for n, r in by.items() if r["status"] == "ok"} == measured
    for name in measured:
        r = by[name]
        assert 0 <= r["accuracy"] <= 1 and r["predictions_consistent"]
        assert r["accuracy"] == min(r["accuracy_by_batching"].values())
        assert set(r["accuracy_by_batching"]) == (
            {"batch_16"} if name == "torch-fp32-padded" else {f"batch_{r['throughput']['batch_size']}", "batch_1"})
        tp = r["throughput"]["samples_per_s"]
        assert tp["min"] <= tp["median"] <= tp["max"] and tp["n"] == res["protocol"]["repeats"]
        for kind in ("e2e_ms", "model_ms"):
            lat = r["latency"][kind]
            assert lat["n"] == 9 and lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert r["latency"]["e2e_ms"]["p50"] >= r["latency"]["model_ms"]["p50"]
        assert r["memory"] and "error" not in r["memory"], r["memory"]
        assert r["memory"]["peak_rss_mb"] > 0 and r["load_time_s"] >= 0
        assert r["efficiency"]["e2e"]["gflops"] > 0 and r["efficiency"]["e2e"]["fraction_of_peak"] > 0
        assert r["threads"] == res["protocol"]["threads"]
        if name != "torch-fp32-padded":
            assert {(c["batch"], c["seq"]) for c in r["sweep"]} == {(1, 16), (8, 16), (1, 128), (8, 128)}
            first = r["first_use"]   # the untimed-for-the-table first pass and first requests, kept
            assert first["e2e_pass_s"] > 0 and first["e2e_vs_warm"] == pytest.approx(
                first["e2e_pass_s"] / r["throughput"]["seconds"]["median"])
            assert first["request_ms"]["n"] == 9 and "note" in first
            assert r["throughput"]["batch_size"] in (1, 8)
        else:
            assert r["first_use"] is None   # fixed shapes: nothing is seen for the first time
    assert by["torch-fp32-padded"]["throughput"]["batch_size"] == 16
    assert by["torch-fp32-padded"]["speedup_vs_padded"] == pytest.approx(1.0)
    assert by["torch-fp32"]["accuracy_delta"] == 0.0
    # the same model: padding changes nothing but speed
    assert by["torch-fp32-padded"]["accuracy"] == pytest.approx(by["torch-fp32"]["accuracy"])
    for name in ("ort-qdq", "ort-fp16", "trt"):
        assert by[name]["status"] != "ok" and by[name]["reason"]
    rec = res["recommendation"]
    assert rec and rec["variant"] in measured and rec["device"] == "cpu" and rec["reason"]
    assert Path(rec["model_dir"]).is_dir()
    assert [t["id"] for t in res["targets"]] == ["e2e_speedup", "ort_fp32_latency", "int8_speedup", "opt_efficiency"]
    assert res["training"]["baseline"]["loss_curve"]
    with open(reports / "results.csv", newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [r["name"] for r in csv_rows] == [r["name"] for r in res["variants"]]
    first_csv = {r["name"]: r["first_pass_vs_warm"] for r in csv_rows}
    assert float(first_csv["ort-int8"]) == pytest.approx(by["ort-int8"]["first_use"]["e2e_vs_warm"])
    assert first_csv["torch-fp32-padded"] == ""
    summary = (reports / "summary.md").read_text()
    assert "| variant | backend |" in summary and f"**{rec['variant']}** ★" in summary
    assert "trt (skipped)" in summary
    html = (reports / "performance_report.html").read_text()
    assert rec["variant"] in html and "<svg" in html
    manifest = artifacts.read_manifest(reports)
    assert manifest["stage"] == "compare" and manifest["status"] == "ok"

    # unchanged inputs and config: up to date (re-renders, does not re-measure)
    from bertopt.compare import CompareConfig, run

    cfg = CompareConfig(output_dir=str(tiny_pipeline), reports_dir=str(reports), quick=True, quiet=True,
                        sweep_batches="1,8", sweep_seqs="16,256", latency_requests=9, threads=1)
    result = run(cfg)
    assert result.status == "up-to-date"
    assert json.loads((reports / "results.json").read_text())["created"] == res["created"]
    # --report-only re-renders from results.json alone
    (reports / "performance_report.html").unlink()
    assert compare.main(["--reports-dir", str(reports), "--report-only", "--quiet"]) == 0
    assert (reports / "performance_report.html").is_file()
    # --report-only with another target/budget re-chooses from the same measurements
    assert compare.main(["--reports-dir", str(reports), "--report-only", "--quiet", "--target", "gpu"]) == 0
    again = json.loads((reports / "results.json").read_text())
    assert again["recommendation"] is None and "--target gpu" in again["recommendation_message"]
    assert again["config"]["target"] == "gpu" and again["variants"] == res["variants"]
    assert "No recommendation." in (reports / "performance_report.html").read_text()
    assert compare.main(["--reports-dir", str(reports), "--report-only", "--quiet",
                         "--optimize-for", "latency"]) == 0
    lat = json.loads((reports / "results.json").read_text())["recommendation"]
    fastest = min((r for r in res["variants"] if r["status"] == "ok"), key=lambda r: r["latency"]["e2e_ms"]["p50"])
    assert lat["device"] == "cpu" and by[lat["variant"]]["latency"]["e2e_ms"]["p50"] <= \
        fastest["latency"]["e2e_ms"]["p50"] * (1 + cs.TIE_TOLERANCE)


def test_missing_baseline_is_one_clear_error(tmp_path, capsys):
    import compare

    assert compare.main(["--output-dir", str(tmp_path / "nothing"), "--reports-dir", str(tmp_path / "r"),
                         "--quick", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "error: missing input" in err and "python benchmark.py" in err and "Traceback" not in err


def test_compare_is_registered_after_onnx_tensorrt():
    from bertopt.stages import STAGES

    names = [s.name for s in STAGES]
    assert "compare" in names
    # right after the ONNX stage, or after the optional qat stage that follows it (its rows are compared too)
    between = names[names.index("onnx_tensorrt") + 1:names.index("compare")]
    assert between in ([], ["qat"])


def test_latency_task_discards_a_disturbed_round():
    calls = []
    task = cs.LatencyTask(lambda t: (calls.append(t), (0.002, 0.001))[1], ["w"], [["a", "b"], ["c"]], warmup=0)
    task()
    task.discard_last()
    task()  # serves chunk 0 again
    task()
    assert calls == ["a", "a", "b", "a", "a", "b", "c", "c"]
    assert len(task.e2e) == 3 and len(task.model) == 3 and len(task.round_p50) == 2


def test_fast_protocol_asks_batch1_accuracy_only_of_runtime_quantized_rows(monkeypatch):
    """Batch composition changes predictions only where activations are quantized at run time
    (ONNX Runtime dynamic int8, int4 at accuracy level 4); the fast protocol skips the others."""
    from types import SimpleNamespace

    import importlib

    from bertopt.compare.config import PROTOCOLS

    measure_mod = importlib.import_module("bertopt.compare.measure")  # the package exports a function of that name

    asked = []
    monkeypatch.setattr(measure_mod, "classify_texts", lambda pred, *a, **kw: asked.append(pred) or [0])
    live = [SimpleNamespace(name=n, registry=reg, batching=bt) for n, reg, bt in [
        ("torch-fp32-padded", "torch-fp32", "padded"), ("torch-fp32", "torch-fp32", "dynamic"),
        ("ort-fp32", "ort-fp32", "dynamic"), ("ort-int8", "ort-int8", "dynamic"), ("ort-int4", "ort-int4", "dynamic"),
        ("ort-qdq", "ort-qdq", "dynamic"), ("ov-int8", "ov-int8", "dynamic"), ("mp-torch-bf16", None, "dynamic")]]
    opened = SimpleNamespace(live=live, preds={v.name: v.name for v in live})
    setup = lambda name: SimpleNamespace(proto=PROTOCOLS[name], tokenizer=None, texts=[], max_length=8,  # noqa: E731
                                         with_tt=False, text_kwargs={})
    assert set(measure_mod.batch1_accuracy(setup("fast"), opened)) == {"ort-int8", "ort-int4"}
    assert set(measure_mod.batch1_accuracy(setup("full"), opened)) == {v.name for v in live} - {"torch-fp32-padded"}
    assert PROTOCOLS["fast"]["warmup"] == 1 and PROTOCOLS["full"]["warmup"] == 2


def test_setup_scores_label_ids_as_accuracy():
    """compare's accuracy of a plain classifier is the share of label ids that match (a regression
    once scored every row by the argmax of the id vector itself: 0.49 on SST-2 for every variant)."""
    import importlib
    from types import SimpleNamespace

    import numpy as np

    measure_mod = importlib.import_module("bertopt.compare.measure")
    s = SimpleNamespace(spec=None, labels=np.array([0, 1, 1, 0, 1]))
    assert measure_mod.Setup.score(s, np.array([0, 1, 0, 0, 1])) == pytest.approx(0.8)
    assert measure_mod.Setup.score(s, np.array([1, 0, 0, 1, 0])) == pytest.approx(0.0)


def test_an_early_stopped_phase_says_why_its_progress_ended_short():
    import importlib
    import logging

    measure = importlib.import_module("bertopt.compare.measure")
    lines = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger, level = logging.getLogger("bertopt.compare"), logging.getLogger("bertopt.compare").level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        measure._log_early_stop("end to end", {"rounds": 3, "dominated": {"ort-qdq": 2, "ort-int4": 3}}, 5)
        measure._log_early_stop("end to end", {"rounds": 5, "dominated": {}}, 5)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert lines == ["end to end: stopped after 3 of 5 rounds, every spread within the tolerance",
                     "end to end: not timed again, slower in every pass than the leader: "
                     "ort-qdq (after round 2), ort-int4 (after round 3)"]


def test_a_cpu_row_is_measured_against_the_peak_of_its_own_compute_type():
    from types import SimpleNamespace

    from bertopt.compare.measure import Peak

    peak = Peak({"gflops": 400.0}, None, cpu_types={"int8": {"gflops": 3600.0}, "bf16": {"gflops": None}})
    row = lambda precision: SimpleNamespace(device="cpu", precision=precision)  # noqa: E731
    assert peak.flops_for(row("fp32")) == 400e9
    assert peak.flops_for(row("fp32"), cpu_gflops=420.0) == 420e9
    assert peak.flops_for(row("int8")) == 3600e9
    assert peak.flops_for(row("int4")) == 3600e9     # weight-only int4: the CPU kernel computes in int8
    assert peak.flops_for(row("bf16")) is None        # not measured: no fraction rather than one against fp32
    assert peak.flops_for(row("fp16")) is None
    # a type the CPU runs slower than fp32 (fp16 without a native kernel: 1.0 against 400 GFLOP/s):
    # its rows run in fp32 there and are measured against the fp32 peak, not at 40,000% of their own
    slow = Peak({"gflops": 400.0}, None, cpu_types={"fp16": {"gflops": 1.0}, "int8": {"gflops": 3600.0}})
    assert slow.flops_for(row("fp16")) == 400e9 and slow.flops_for(row("fp16"), cpu_gflops=420.0) == 420e9
    assert slow.cpu_types_below_fp32() == ["fp16"]
    assert slow.cpu_types_record()["fp16"]["rows_measured_against"] == "fp32"
    assert "rows_measured_against" not in slow.cpu_types_record()["int8"]


class _ShapeLog:
    """A predictor that records every input shape it is given."""

    def __init__(self):
        self.shapes = []

    def predict_logits(self, batch):
        self.shapes.append(batch["input_ids"].shape)
        return np.zeros((batch["input_ids"].shape[0], 2), dtype=np.float32)


def test_the_first_pass_meets_every_shape_the_timed_passes_will(packaged_model_dir):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from bertopt.compare.measure import _first_passes
    from bertopt.compare.workloads import classify_texts

    texts = [" ".join(["word"] * n) for n in (3, 9, 3, 17, 30, 5, 12, 9, 40, 2)]
    s = SimpleNamespace(texts=texts, tokenizer=AutoTokenizer.from_pretrained(packaged_model_dir), max_length=64,
                        with_tt=True, text_kwargs={}, pairs=None, proto={"warmup": 2},
                        pad_to=lambda v: 128 if v.batching == "padded" else None)
    dyn, padded = SimpleNamespace(name="dyn", batching="dynamic"), SimpleNamespace(name="ref", batching="padded")
    o = SimpleNamespace(live=[dyn, padded], preds={"dyn": _ShapeLog(), "ref": _ShapeLog()})
    first = _first_passes(s, o, {"dyn": (4, "test"), "ref": (4, "test")})
    assert set(first) == {"dyn"} and first["dyn"] > 0   # the padded reference has nothing to meet first
    warmed = set(o.preds["dyn"].shapes)
    timed = _ShapeLog()
    classify_texts(timed, s.tokenizer, texts, batch_size=4, max_length=64, with_tt=True)
    assert set(timed.shapes) <= warmed and len(set(timed.shapes)) == 3   # 3 length-sorted batches of 4, 4, 2
    assert set(o.preds["ref"].shapes) == {(4, 128), (2, 128)}            # a slice, twice (--warmup 2)


def test_a_slow_first_use_is_called_out_once_in_a_sentence():
    from types import SimpleNamespace

    from bertopt.compare.assemble import first_use, first_use_note

    lat = SimpleNamespace(first=[0.030] * 10, e2e=[0.002] * 10)
    f = first_use(1.5, [0.5, 0.5, 0.6], lat)
    assert f["e2e_vs_warm"] == pytest.approx(3.0) and f["request_p99_vs_warm"] == pytest.approx(15.0)
    assert f["request_mean_vs_warm"] == pytest.approx(15.0)
    note = first_use_note({"name": "ov-int8", "backend": "openvino", "first_use": f})
    assert note.endswith("warm it up on the input shapes it will serve; the endpoint handler does so for every "
                         "batch-1 length at load")
    assert first_use_note({"name": "x", "backend": "onnxruntime", "first_use": f}).endswith("it will serve")
    assert note.startswith("ov-int8: a fresh process's first pass over the eval set took 1.50 s, 3.0x a warm pass, "
                           "and its first sight of each request took 30.0 ms on average, 15.0x warm (p99 30.0 ms)")
    warm = first_use(0.55, [0.5, 0.5, 0.6], SimpleNamespace(first=[0.002] * 10, e2e=[0.002] * 10))
    assert first_use_note({"name": "ort-int8", "first_use": warm}) is None
    one_slow = first_use(0.5, [0.5], SimpleNamespace(first=[0.002] * 98 + [0.02] * 2, e2e=[0.002] * 100))
    assert one_slow["request_p99_vs_warm"] > 1.5 and first_use_note({"name": "x", "first_use": one_slow}) is None
    assert first_use(None, [0.5], lat) is None


def test_quick_end_to_end_times_both_modes_and_records_the_stream_count(tiny_pipeline, tmp_path, monkeypatch):
    import compare

    monkeypatch.setenv("BERTOPT_STREAMS", "2")
    reports = tmp_path / "reports"
    argv = ["--output-dir", str(tiny_pipeline), "--reports-dir", str(reports), "--quick", "--quiet", "--skip-memory",
            "--sweep-batches", "8", "--sweep-seqs", "16", "--latency-requests", "3", "--threads", "1"]
    assert compare.main(argv) == 0
    res = json.loads((reports / "results.json").read_text())
    plan = res["protocol"]["streams"]
    assert plan["n"] == 2 and plan["chosen_by"] == "set by BERTOPT_STREAMS=2"
    assert set(plan["rows"]) == {"ort-fp32", "ort-int8"} and "process-wide" in plan["refused"]["torch-fp32"]
    by = {r["name"]: r for r in res["variants"] if r["status"] == "ok"}
    for name in ("ort-fp32", "ort-int8"):
        mode = by[name]["throughput"]["mode"]
        assert mode["mode"] in ("one call", "streams") and mode["same_predictions"] is True
        assert mode["streams"] == (2 if mode["mode"] == "streams" else 1)
        assert mode["one_call_median_s"] > 0 and mode["streams_median_s"] > 0
        chosen = min(mode["one_call_median_s"], mode["streams_median_s"])
        assert by[name]["throughput"]["seconds"]["median"] == pytest.approx(chosen)
    assert by["torch-fp32"]["throughput"]["mode"]["mode"] == "one call"
    html = (reports / "performance_report.html").read_text()
    assert "e2e mode" in html and "N = 2, set by BERTOPT_STREAMS=2" in html
    assert "e2e mode" in (reports / "summary.md").read_text()
    monkeypatch.setenv("BERTOPT_STREAMS", "many")
    assert compare.main(argv) == 1  # a bad value: one line, nothing rewritten
    assert json.loads((reports / "results.json").read_text())["created"] == res["created"]
