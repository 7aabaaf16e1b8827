"""--trained: the pipeline from a model fine-tuned elsewhere (plain transformers/torch code here, not
bertopt's loop): the trained stage writes the baseline in the baseline's shape, the ONNX stage,
compare --quick, the report and a local endpoint use it, and compare's reference accuracy is the
model's own accuracy. Models or data that do not fit are one line, exit 1, nothing written."""
from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from conftest import make_texts, write_table

COMPARE_FAST = ["--quick", "--threads", "1", "--sweep-batches", "1", "--sweep-seqs", "16", "--latency-requests", "3",
                "--skip-memory", "--repeats", "1", "--warmup", "0"]


def _tiny_config(tok, **kw):
    from transformers import BertConfig

    return BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=37, max_position_embeddings=128, **kw)


def plain_finetune(tok, texts, labels, id2label, epochs=1, lr=2e-3, seed=0):
    """A tiny BERT classifier fine-tuned by a plain torch loop (no bertopt code)."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification(_tiny_config(tok, num_labels=len(id2label), id2label=id2label,
                                                       label2id={v: k for k, v in id2label.items()}))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for s in range(0, len(texts), 16):
            enc = tok(texts[s:s + 16], padding=True, truncation=True, max_length=64, return_tensors="pt")
            model(**enc, labels=torch.tensor(labels[s:s + 16])).loss.backward()
            opt.step()
            opt.zero_grad()
    return model.eval()


def own_accuracy(model, tok, texts, labels) -> float:
    """The model's accuracy on the eval rows, by plain transformers code."""
    import torch

    with torch.no_grad():
        enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1)
    return float((pred == torch.tensor(labels)).float().mean())


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, packaged_model_dir, tiny_data_dir):
    """{'dir': a save_pretrained fine-tuned tiny classifier, 'accuracy': its own dev accuracy, ...}."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(packaged_model_dir)
    texts, labels = make_texts(400, seed=1)   # tiny_data_dir's train.tsv
    model = plain_finetune(tok, texts, labels, {0: "negative", 1: "positive"})
    d = tmp_path_factory.mktemp("finetuned")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    dev_t, dev_l = make_texts(100, seed=2)    # tiny_data_dir's dev.tsv
    accuracy = own_accuracy(model, tok, dev_t, dev_l)
    assert 0.55 < accuracy < 0.95  # part-trained (0.69): matching it means scoring the same rows the same way
    return {"dir": str(d), "accuracy": accuracy, "model": model, "tok": tok}


def test_pipeline_from_a_model_trained_elsewhere(finetuned, tiny_data_dir, tmp_path):
    import main
    from bertopt.aws import local
    from bertopt.aws.config import AwsDeployConfig

    out, reports = tmp_path / "out", tmp_path / "reports"
    argv = ["--trained", finetuned["dir"], "--dataset", tiny_data_dir, "--output-dir", str(out), "--reports-dir",
            str(reports), "--device", "cpu", "--variants", "int8", "--quiet", "--prune-layers", "1",
            "--sensitivity-samples", "16", "--epochs", "1", *COMPARE_FAST]
    assert main.main(argv) == 0
    assert not (out / "mixed_precision").exists()  # no training stage ran
    pruned = json.loads((out / "pruned" / "manifest.json").read_text())  # re-fine-tuned from the --trained model
    assert pruned["status"] == "ok" and pruned["metrics"]["layers_after"] == 1
    base = json.loads((out / "baseline" / "manifest.json").read_text())
    assert base["status"] == "ok" and base["metrics"]["train_samples"] == 0
    assert base["origin"]["trained_here"] is False and base["origin"]["kind"] == "directory"
    assert base["origin"]["path"] == str(Path(finetuned["dir"]).resolve())
    assert set(base["origin"]["files"]) >= {"config.json", "model.safetensors"}
    assert all(len(h) == 64 for h in base["origin"]["files"].values())
    assert base["metrics"]["best_eval_accuracy"] == pytest.approx(finetuned["accuracy"])
    assert base["data"]["label_names"] == ["negative", "positive"] and base["config"]["max_length"] == 128
    onnx = json.loads((out / "onnx" / "baseline" / "manifest.json").read_text())["metrics"]["variants"]
    assert onnx["fp32"]["status"] == "ok" and onnx["int8"]["status"] in ("ok", "rejected")

    res = json.loads((reports / "results.json").read_text())
    assert res["reference_model"]["name"] == finetuned["dir"] and res["reference_model"]["trained_here"] is False
    by = {r["name"]: r for r in res["variants"]}
    for name in ("torch-fp32-padded", "torch-fp32"):
        assert by[name]["trained_elsewhere"] is True and by[name]["reference_model"] == finetuned["dir"]
    assert by["pruned-ort-fp32"]["status"] == "ok" and "trained_elsewhere" not in by["pruned-torch-fp32"]
    assert res["data"]["eval_rows"] == 100
    assert by["torch-fp32"]["accuracy"] == pytest.approx(finetuned["accuracy"])
    assert res["baseline_accuracy"] == pytest.approx(finetuned["accuracy"])
    assert by["ort-fp32"]["accuracy"] == pytest.approx(finetuned["accuracy"])
    html = (reports / "performance_report.html").read_text()
    assert f"Reference (FP32 baseline): {finetuned['dir']}</strong>, fine-tuned elsewhere" in html
    assert "fine-tuned elsewhere (--trained)" in (reports / "summary.md").read_text()
    assert res["training"]["baseline"]["trained_here"] is False and res["training"]["baseline"]["train_rows"] == 0
    assert "ok (--trained: fine-tuned elsewhere, not trained here)" in html

    cfg = AwsDeployConfig(output_dir=str(out), reports_dir=str(reports), local=True, port=0, quiet=True)
    archive, model_dir, handler, model = local.prepare_local(cfg)
    endpoint = local.LocalEndpoint(local.InvocationsApp(handler, model), "127.0.0.1", 0, threads=1).start()
    try:
        req = urllib.request.Request(endpoint.url + "/invocations", method="POST",
                                     data=json.dumps({"inputs": ["a wonderful film", "dull"]}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            answer = json.loads(resp.read())
    finally:
        endpoint.stop()
    assert len(answer) == 2 and all(a["label"] in ("negative", "positive") and 0 <= a["score"] <= 1 for a in answer)


def _save(model, tok, d: Path) -> str:
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def test_head_in_another_label_order_is_permuted(finetuned, tiny_data_dir, tmp_path):
    """A head whose outputs are (positive, negative) is reordered into the data's order: same accuracy."""
    import copy

    import torch

    from bertopt.trained_stage import TrainedConfig, run_trained

    model = copy.deepcopy(finetuned["model"])
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight.flip(0))
        model.classifier.bias.copy_(model.classifier.bias.flip(0))
    model.config.id2label, model.config.label2id = {0: "POSITIVE", 1: "NEGATIVE"}, {"POSITIVE": 0, "NEGATIVE": 1}
    src = _save(model, finetuned["tok"], tmp_path / "flipped")
    out = tmp_path / "out"
    result = run_trained(TrainedConfig(trained=src, dataset=tiny_data_dir, output_dir=str(out), device="cpu",
                                       quiet=True))
    m = json.loads((out / "baseline" / "manifest.json").read_text())
    assert result.status == "ok" and m["head_permutation"] == [1, 0]
    assert m["metrics"]["best_eval_accuracy"] == pytest.approx(finetuned["accuracy"])
    assert json.loads((out / "baseline" / "labels.json").read_text()) == ["negative", "positive"]
    again = run_trained(TrainedConfig(trained=src, dataset=tiny_data_dir, output_dir=str(out), device="cpu",
                                      quiet=True))
    assert again.status == "up-to-date"


def test_eval_file_only_and_prune_needs_training_data(finetuned, tiny_data_dir, tmp_path, capsys):
    import main

    dev = str(Path(tiny_data_dir) / "dev.tsv")
    out, out2 = tmp_path / "out", tmp_path / "out2"

    def argv(o):
        return ["--trained", finetuned["dir"], "--dataset", dev, "--output-dir", str(o), "--device", "cpu", "--quiet"]

    assert main.main(argv(out) + ["--stages", "trained"]) == 0
    m = json.loads((out / "baseline" / "manifest.json").read_text())
    assert m["data"]["eval_only"] is True and m["metrics"]["eval_rows"] == 100 and m["metrics"]["data_train_rows"] == 0
    assert m["metrics"]["best_eval_accuracy"] == pytest.approx(finetuned["accuracy"])
    from bertopt.onnx_stage import OnnxConfig, run   # static calibration takes eval rows: no train rows here

    assert run(OnnxConfig(output_dir=str(out), variants="qdq", calibration_samples=16, device="cpu",
                          quiet=True)).status == "ok"
    qdq = json.loads((out / "onnx" / "baseline" / "manifest.json").read_text())["metrics"]["variants"]["qdq"]
    assert qdq["status"] in ("ok", "rejected") and qdq["parity"]["eval"]["rows"] == 100
    capsys.readouterr()
    assert main.main(argv(out2) + ["--prune-layers", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs training data" in err[0] and dev in err[0]
    assert not out2.exists()


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, finetuned, packaged_model_dir):
    """Models --trained must refuse: other label names, no weights, a bare encoder, a regression head."""
    import torch
    from transformers import BertForSequenceClassification, BertModel

    tok = finetuned["tok"]
    root = tmp_path_factory.mktemp("bad_models")
    torch.manual_seed(0)
    other = BertForSequenceClassification(_tiny_config(tok, num_labels=2, id2label={0: "NEG", 1: "POS"},
                                                       label2id={"NEG": 0, "POS": 1}))
    dirs = {"labels": _save(other, tok, root / "labels"),
            "bare": _save(BertModel(_tiny_config(tok)), tok, root / "bare"),
            "regression": _save(BertForSequenceClassification(_tiny_config(tok, num_labels=1,
                                                                           problem_type="regression")),
                                tok, root / "regression")}
    no_weights = root / "no_weights"
    no_weights.mkdir()
    other.config.save_pretrained(no_weights)
    tok.save_pretrained(no_weights)
    dirs["no_weights"] = str(no_weights)
    return dirs


@pytest.mark.parametrize("case, words", [
    ("labels", ["labels disagree", "{NEG, POS}", "{negative, positive}", "--label-map"]),
    ("no_weights", ["no weights", "save_pretrained"]),
    ("bare", ["no classification head", "BertModel", "bare encoder"]),
    ("regression", ["regression model", "classification (negative, positive)"]),
])
def test_refused_models_are_one_line_and_write_nothing(case, words, bad_models, tiny_data_dir, tmp_path, capsys):
    import main

    out, reports = tmp_path / "out", tmp_path / "reports"
    argv = ["--trained", bad_models[case], "--dataset", tiny_data_dir, "--output-dir", str(out), "--reports-dir",
            str(reports), "--device", "cpu", "--quiet"]
    assert main.main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[0].startswith("error: ") and "Traceback" not in "\n".join(err)
    assert [line for line in err if line.startswith("error")] == [err[0]]
    for w in words:
        assert w in err[0], (w, err[0])
    assert not out.exists() and not reports.exists()


def test_training_stages_cannot_be_asked_for_with_trained(capsys):
    import main

    assert main.main(["--trained", "x", "--stages", "baseline,compare"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --trained replaces the training stage(s) baseline: drop them from --stages "
                   "(the trained stage writes the baseline)"]


def test_label_map_aligns_other_names(bad_models, tiny_data_dir, tmp_path):
    from bertopt.errors import ConfigError
    from bertopt.trained_stage import TrainedConfig, run_trained

    out = tmp_path / "out"
    common = dict(trained=bad_models["labels"], dataset=tiny_data_dir, output_dir=str(out), device="cpu", quiet=True)
    with pytest.raises(ConfigError, match="NOPE is not a label"):
        run_trained(TrainedConfig(label_map="NOPE=negative", **common))
    with pytest.raises(ConfigError, match="MODEL_LABEL=DATA_LABEL"):
        TrainedConfig(label_map="NEG", **common)
    assert run_trained(TrainedConfig(label_map="NEG=negative,POS=positive", **common)).status == "ok"
    m = json.loads((out / "baseline" / "manifest.json").read_text())
    assert m["head_permutation"] is None and m["config"]["label_map"] == "NEG=negative,POS=positive"
    assert json.loads((out / "baseline" / "config.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}


def test_regression_model_on_regression_data(tmp_path, finetuned):
    """A regression head (problem_type regression) is scored with the regression metric on float labels."""
    import torch
    from transformers import BertForSequenceClassification

    from bertopt.trained_stage import TrainedConfig, run_trained

    tok = finetuned["tok"]
    torch.manual_seed(0)
    model = BertForSequenceClassification(_tiny_config(tok, num_labels=1, problem_type="regression"))
    src = _save(model, tok, tmp_path / "reg")
    texts, labels = make_texts(60, seed=3)
    data = tmp_path / "data"
    write_table(data / "train.tsv", texts[:40], [0.5 + 4 * y + 0.1 * (i % 3) for i, y in enumerate(labels[:40])])
    write_table(data / "dev.tsv", texts[40:], [0.5 + 4 * y + 0.1 * (i % 3) for i, y in enumerate(labels[40:])])
    out = tmp_path / "out"
    assert run_trained(TrainedConfig(trained=src, dataset=str(data), output_dir=str(out), device="cpu",
                                     quiet=True)).status == "ok"
    m = json.loads((out / "baseline" / "manifest.json").read_text())
    assert m["data"]["task"] == "regression" and m["metrics"]["metric"] == "pearson"
    assert -1 <= m["metrics"]["best_eval_metric"] <= 1


def test_a_hub_model_records_its_id_revision_and_file_hashes(finetuned, tiny_data_dir, tmp_path):
    """A hub id (served from huggingface_hub's cache; the hub itself is a closed local port)."""
    from test_hub import cache_as_hub_model, run_offline

    cache_as_hub_model(tmp_path, finetuned["dir"], "someone/tiny-sst2")
    out = tmp_path / "out"
    code = ("import sys, benchmark\nsys.exit(benchmark.main(['--trained', 'someone/tiny-sst2', '--dataset', "
            f"{tiny_data_dir!r}, '--output-dir', {str(out)!r}, '--device', 'cpu', '--quiet']))\n")
    proc = run_offline(tmp_path, code)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "baseline" / "manifest.json").read_text())
    origin = m["origin"]
    assert origin["kind"] == "hub" and origin["model"] == "someone/tiny-sst2" and origin["revision"] == "0" * 40
    local = json.loads((Path(finetuned["dir"]) / "config.json").read_text())
    assert local["id2label"] == {"0": "negative", "1": "positive"}
    import hashlib

    expected = hashlib.sha256((Path(finetuned["dir"]) / "model.safetensors").read_bytes()).hexdigest()
    assert origin["files"]["model.safetensors"] == expected and "config.json" in origin["files"]
    assert m["metrics"]["best_eval_accuracy"] == pytest.approx(finetuned["accuracy"])
