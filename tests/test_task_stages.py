"""Every task type through every stage: a multi-label set and a three-class set built here (and
sentence pairs) run baseline -> ONNX export/INT8 calibration -> compare -> report -> the local
serving handler, each scored by its own metric."""
import json
import random

import numpy as np
import pytest

from conftest import FILL

TOPICS = {"sport": ["goal", "match", "team"], "money": ["bank", "price", "market"], "food": ["bread", "soup", "cake"]}


def _multi_label(d):
    rng = random.Random(3)
    for name, n in (("train.jsonl", 240), ("dev.jsonl", 60)):
        rows = []
        for i in range(n):
            labels = rng.sample(sorted(TOPICS), rng.randint(1, 2))
            words = [rng.choice(FILL) for _ in range(rng.randint(3, 12))]
            for t in labels:
                words.insert(rng.randrange(len(words) + 1), rng.choice(TOPICS[t]))
            rows.append(json.dumps({"text": " ".join(words), "labels": labels}))
        (d / name).write_text("\n".join(rows) + "\n")
    return "multi-label", "micro_f1"


def _three_class(d):
    rng = random.Random(4)
    names = sorted(TOPICS)
    for name, n in (("train.tsv", 240), ("dev.tsv", 60)):
        rows = ["text\tlabel"]
        for i in range(n):
            t = names[i % 3]
            words = [rng.choice(FILL) for _ in range(rng.randint(3, 12))]
            words.insert(rng.randrange(len(words) + 1), rng.choice(TOPICS[t]))
            rows.append(f"{' '.join(words)}\t{t}")
        (d / name).write_text("\n".join(rows) + "\n")
    return "classification", "accuracy"


def _pairs(d):
    rng = random.Random(5)
    for name, n in (("train.tsv", 240), ("dev.tsv", 60)):
        rows = ["sentence1\tsentence2\tlabel"]
        for i in range(n):
            a, b = rng.choice(sorted(TOPICS)), rng.choice(sorted(TOPICS))
            s1 = " ".join([rng.choice(FILL), rng.choice(TOPICS[a]), rng.choice(FILL)])
            s2 = " ".join([rng.choice(FILL), rng.choice(TOPICS[b]), rng.choice(FILL)])
            rows.append(f"{s1}\t{s2}\t{int(a == b)}")
        (d / name).write_text("\n".join(rows) + "\n")
    return "classification", None


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory, tiny_model_dir) -> str:
    """The tiny model's encoder without its 2-label head (a base model gets a head of the data's size)."""
    import shutil
    from pathlib import Path

    from transformers import AutoModel

    d = tmp_path_factory.mktemp("tiny_encoder")
    AutoModel.from_pretrained(tiny_model_dir).save_pretrained(d)
    for f in Path(tiny_model_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
            shutil.copy(f, d / f.name)
    return str(d)


@pytest.mark.parametrize("make", [_multi_label, _three_class, _pairs])
def test_task_runs_every_stage(tmp_path, tiny_encoder, make):
    import benchmark
    import compare
    import onnx_tensorrt
    from bertopt.aws import local
    from bertopt.aws.config import AwsDeployConfig

    d = tmp_path / "data"
    d.mkdir()
    task, metric = make(d)
    out, reports = tmp_path / "out", tmp_path / "reports"
    common = ["--model", tiny_encoder, "--dataset", str(d), "--output-dir", str(out), "--quiet", "--max-length", "32"]
    assert benchmark.main(common + ["--epochs", "2", "--lr", "1e-3"]) == 0
    base = json.loads((out / "baseline" / "manifest.json").read_text())
    assert base["data"]["task"] == task and (metric is None or base["data"]["metric"] == metric)
    metric = base["data"]["metric"]

    assert onnx_tensorrt.main(common + ["--source", "baseline", "--variants", "int8,qdq",
                                        "--calibration-samples", "32"]) == 0
    onnx = json.loads((out / "onnx" / "baseline" / "manifest.json").read_text())["metrics"]
    assert onnx["reference"]["metric"] == metric and onnx["reference"]["task"] == task
    fp32 = onnx["variants"]["fp32"]
    assert fp32["status"] == "ok" and fp32["parity"]["max_abs_diff"] < 1e-3
    assert abs(fp32["accuracy"] - onnx["reference"]["accuracy"]) < 1e-6  # the task metric of the same logits
    assert onnx["variants"]["qdq"]["status"] in ("ok", "rejected")  # calibrated (pairs included)

    argv = ["--output-dir", str(out), "--reports-dir", str(reports), "--quick", "--quiet", "--sweep-batches", "1,8",
            "--sweep-seqs", "16", "--latency-requests", "4", "--threads", "1", "--skip-memory"]
    assert compare.main(argv) == 0
    res = json.loads((reports / "results.json").read_text())
    assert res["task"]["metric"] == metric and res["task"]["pairs"] == (make is _pairs)
    rows = {r["name"]: r for r in res["variants"] if r["status"] == "ok"}
    assert {"torch-fp32", "ort-fp32"} <= set(rows)
    torch_row, ort_row = rows["torch-fp32"], rows["ort-fp32"]
    assert abs(torch_row["accuracy"] - ort_row["accuracy"]) < 0.02
    tm = torch_row["task_metrics"]
    html = (reports / "performance_report.html").read_text()
    if task == "classification":
        k = len(base["data"]["label_names"])
        assert np.asarray(tm["confusion_matrix"]).shape == (k, k) and np.sum(tm["confusion_matrix"]) == 60
        assert 'aria-label="confusion matrices"' in html and set(tm["per_class"]) == set(base["data"]["label_names"])
    else:
        assert set(tm) >= {"micro_f1", "macro_f1", "per_class"}
    assert f"{metric} %" in html

    cfg = AwsDeployConfig(output_dir=str(out), reports_dir=str(reports), local=True, port=0, quiet=True,
                          model_path=str(out / "onnx" / "baseline" / "model.onnx"))
    _, _, handler, model = local.prepare_local(cfg)
    names = base["data"]["label_names"]
    if make is _pairs:
        body = {"inputs": [{"text": "a goal here", "text_pair": "the match team"}], "top_k": None}
    else:
        body = {"inputs": ["a goal and a bank"], "top_k": None}
    got = handler.predict_fn(handler.input_fn(json.dumps(body), "application/json"), model)
    assert len(got) == 1 and [x["label"] for x in got[0]] and {x["label"] for x in got[0]} == set(names)
    scores = [x["score"] for x in got[0]]
    assert scores == sorted(scores, reverse=True)
    if task == "multi-label":
        assert not np.isclose(sum(scores), 1.0)  # independent sigmoid scores, not a softmax
    else:
        assert np.isclose(sum(scores), 1.0, atol=1e-4)


class _Fixed:
    """A predictor answering fixed logits per row (what the handler does with them is under test)."""

    input_names = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(self, row):
        self.row = np.asarray(row, dtype=np.float64)
        self.seen = []

    def predict_logits(self, batch):
        self.seen.append(batch)
        return np.tile(self.row, (len(batch["input_ids"]), 1))


@pytest.mark.parametrize("task,row,names,want", [
    ("regression", [3.25], ["score"], [{"label": "score", "value": 3.25}]),
    ("multi-label", [2.0, -2.0, 0.0], ["a", "b", "c"],
     [[{"label": "a", "score": 0.880797}, {"label": "c", "score": 0.5}, {"label": "b", "score": 0.119203}]]),
    ("classification", [0.0, 1.0], ["neg", "pos"], [{"label": "pos", "score": 0.731059}]),
])
def test_serving_answers_by_task(packaged_model_dir, task, row, names, want):
    from transformers import AutoTokenizer

    from bertopt.aws.serving import inference as h

    model = h.ServingModel(AutoTokenizer.from_pretrained(packaged_model_dir), _Fixed(row), names, 32, 8, 1000,
                           task=task)
    assert h.predict_fn(h.input_fn('{"inputs": "some text"}', "application/json"), model) == want


def test_serving_pairs_top_k_and_chunked_long_text(packaged_model_dir):
    from transformers import AutoTokenizer

    from bertopt.aws.serving import inference as h

    tok = AutoTokenizer.from_pretrained(packaged_model_dir)
    fixed = _Fixed([0.0, 1.0, 2.0])
    model = h.ServingModel(tok, fixed, ["x", "y", "z"], 16, 8, 5000)
    body = '{"inputs": [{"text": "first one", "text_pair": "second one"}], "top_k": 2}'
    got = h.predict_fn(h.input_fn(body, "application/json"), model)
    assert [x["label"] for x in got[0]] == ["z", "y"]
    types = fixed.seen[-1]["token_type_ids"][0]
    assert types.max() == 1 and types[0] == 0  # the pair's second text is segment 1
    with pytest.raises(h.RequestError, match="top_k"):
        h.input_fn('{"inputs": "a", "top_k": 0}', "application/json")
    model = h.ServingModel(tok, fixed, ["x", "y", "z"], 16, 8, 5000, long_text="chunk", stride=4)
    h.predict_fn(h.input_fn(json.dumps({"inputs": " ".join(["word"] * 60)}), "application/json"), model)
    assert len(fixed.seen[-1]["input_ids"]) > 1  # one text, several windows, one answer
