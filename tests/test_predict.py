"""predict.py: scoring a file with a variant (tiny models built in code, real SST-2 / MRPC / STS-B rows)."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bertopt import artifacts

GLUE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "glue"
SST2_DEV = Path(__file__).resolve().parents[1] / "data" / "sst2" / "dev.tsv"


def _stage(tmp_path, packaged_model_dir, *, num_labels=2, names=("negative", "positive"), task="classification",
           pairs=False, text_columns=("sentence",)) -> Path:
    """saved_models/ with a baseline/ holding a tiny random BERT and a manifest whose data record
    says what training would have said."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(packaged_model_dir)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=128, num_labels=num_labels,
                        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
                        problem_type="regression" if task == "regression" else None)
    out = tmp_path / "saved_models"
    d = out / "baseline"
    BertForSequenceClassification(config).save_pretrained(d)
    tok.save_pretrained(d)
    artifacts.write_manifest(d, stage="baseline", status="ok", config={"max_length": 64}, fingerprint="test",
                             outputs=artifacts.list_files(d), metrics={},
                             data={"task": task, "label_names": list(names), "pairs": pairs,
                                   "text_columns": list(text_columns), "long_text": "truncate", "stride": None})
    return out


def _predict(out: Path, input_path, dest, **kw) -> object:
    from bertopt.predict.config import PredictConfig
    from bertopt.predict.stage import run

    cfg = PredictConfig(input=str(input_path), output=str(dest), output_dir=str(out),
                        reports_dir=str(out.parent / "reports"), quiet=True, max_length=64,
                        **{"variant": "torch", **kw})
    return run(cfg)


def _rows(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _reference(out: Path, texts, pairs=None) -> np.ndarray:
    """Each text alone through the predictor (batch 1): what predict.py must reproduce in any batching."""
    from transformers import AutoTokenizer

    from bertopt import data
    from bertopt.runtimes import TorchPredictor

    d = out / "baseline"
    predictor, tok = TorchPredictor(str(d)), AutoTokenizer.from_pretrained(d)
    rows = []
    for i, t in enumerate(texts):
        ids = data.tokenize([t], tok, 64, None if pairs is None else [pairs[i]])
        batch = data.pad_batch(ids, tok.pad_token_id, True, sep_id=tok.sep_token_id if pairs is not None else None)
        rows.append(predictor.predict_logits(batch)[0])
    return np.asarray(rows, dtype=np.float64)


def _sst2_slice(n: int) -> "object":
    import pandas as pd

    return pd.read_csv(SST2_DEV, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False, dtype=str).iloc[:n]


@pytest.mark.parametrize("suffix,out_suffix", [(".tsv", ".csv"), (".jsonl", ".jsonl"), (".parquet", ".csv")])
def test_predictions_equal_the_predictor_in_input_order(tmp_path, packaged_model_dir, suffix, out_suffix):
    out = _stage(tmp_path, packaged_model_dir)
    df = _sst2_slice(150)
    src = tmp_path / f"dev{suffix}"
    {".tsv": lambda: df.to_csv(src, sep="\t", index=False), ".jsonl": lambda: df.to_json(src, orient="records", lines=True),
     ".parquet": lambda: df.to_parquet(src)}[suffix]()
    result = _predict(out, src, tmp_path / f"pred{out_suffix}", chunk_rows=40, batch=16)
    rows = _rows(tmp_path / f"pred{out_suffix}")
    assert [int(r["id"]) for r in rows] == list(range(150)) and result.details["rows"] == 150
    logits = _reference(out, df["sentence"].str.strip().tolist())
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    got = np.array([[float(r["scores"]["negative"]), float(r["scores"]["positive"])] if out_suffix == ".jsonl"
                    else [float(r["score_negative"]), float(r["score_positive"])] for r in rows])
    np.testing.assert_allclose(got, probs, atol=2e-5)
    assert [r["label"] for r in rows] == [("negative", "positive")[k] for k in probs.argmax(1)]


def test_default_variant_is_the_recommendation_and_output_goes_to_reports(tmp_path, packaged_model_dir):
    from bertopt.predict.config import PredictConfig
    from bertopt.predict.stage import run

    out = _stage(tmp_path, packaged_model_dir)
    reports = tmp_path / "reports"
    reports.mkdir()
    rec = {"variant": "torch-fp32", "backend": "torch", "precision": "fp32", "source": "baseline",
           "registry": "torch-fp32", "path": str(out / "baseline"), "model_dir": str(out / "baseline")}
    (reports / "results.json").write_text(json.dumps(
        {"recommendation": rec, "variants": [{**rec, "name": "torch-fp32", "throughput": {"batch_size": 8}}]}))
    src = tmp_path / "in.csv"
    _sst2_slice(20).to_csv(src, index=False)
    result = run(PredictConfig(input=str(src), output_dir=str(out), reports_dir=str(reports), quiet=True))
    dest = reports / "predictions" / "in.csv"
    assert result.directory == str(dest) and len(_rows(dest)) == 20


def test_mrpc_pairs(tmp_path, packaged_model_dir):
    out = _stage(tmp_path, packaged_model_dir, names=("0", "1"), pairs=True, text_columns=("#1 String", "#2 String"))
    src = GLUE / "MRPC" / "dev.tsv"
    _predict(out, src, tmp_path / "pred.jsonl", chunk_rows=100)
    rows = _rows(tmp_path / "pred.jsonl")
    from bertopt.tables import read_table

    df = read_table(src)
    assert len(rows) == len(df) and [r["id"] for r in rows] == list(range(len(df)))
    logits = _reference(out, df["#1 String"].str.strip().tolist(), df["#2 String"].str.strip().tolist())
    assert [r["label"] for r in rows] == [str(k) for k in logits.argmax(1)]


def test_stsb_regression_and_the_id_column(tmp_path, packaged_model_dir):
    out = _stage(tmp_path, packaged_model_dir, num_labels=1, names=("score",), task="regression", pairs=True,
                 text_columns=("sentence1", "sentence2"))
    src = GLUE / "STS-B" / "dev.tsv"
    _predict(out, src, tmp_path / "pred.csv", chunk_rows=500)
    rows = _rows(tmp_path / "pred.csv")
    from bertopt.tables import read_table

    df = read_table(src).iloc[:50]
    assert set(rows[0]) == {"id", "value"}
    assert [r["id"] for r in rows[:50]] == df["index"].tolist()  # STS-B's own "index" column is the row id
    ref = _reference(out, df["sentence1"].str.strip().tolist(), df["sentence2"].str.strip().tolist())[:, 0]
    np.testing.assert_allclose([float(r["value"]) for r in rows[:50]], ref, atol=1e-5)


def test_bad_rows_fail_with_the_row_number_or_are_skipped(tmp_path, packaged_model_dir):
    from bertopt.errors import DataError

    out = _stage(tmp_path, packaged_model_dir)
    src = tmp_path / "bad.csv"
    src.write_text("sentence,label\na fine film,1\nanother one,0\n   ,1\nlast good text,0\n,1\n")
    dest = tmp_path / "pred.csv"
    with pytest.raises(DataError, match=r"data row 3: empty 'sentence'"):
        _predict(out, src, dest)
    assert not dest.exists() and not list(tmp_path.glob(".pred.csv*"))  # nothing half-written
    result = _predict(out, src, dest, on_error="skip", chunk_rows=2)
    assert result.details["bad_rows"] == [3, 5]
    assert [int(r["id"]) for r in _rows(dest)] == [0, 1, 3]


def test_a_pair_model_refuses_a_single_text_file(tmp_path, packaged_model_dir):
    from bertopt.errors import DataError

    out = _stage(tmp_path, packaged_model_dir, pairs=True, text_columns=("sentence1", "sentence2"))
    src = tmp_path / "single.csv"
    _sst2_slice(5).to_csv(src, index=False)
    with pytest.raises(DataError, match="trained on sentence pairs"):
        _predict(out, src, tmp_path / "p.csv")


def test_predict_script_one_line_error(tmp_path, capsys, monkeypatch):
    import logging

    import predict

    # a console handler an earlier test bound to its (now closed) captured stderr would print "Logging error"
    root = logging.getLogger("bertopt")
    monkeypatch.setattr(root, "handlers", [h for h in root.handlers if not getattr(h, "_bertopt_console", False)])

    assert predict.main([str(tmp_path / "missing.csv"), "--output-dir", str(tmp_path), "--variant", "torch"]) == 1
    err = capsys.readouterr().err
    assert "error: input file not found:" in err and "Traceback" not in err


def test_a_row_compare_measured_faster_in_streams_is_scored_in_streams_with_the_same_answers(
        tmp_path, packaged_model_dir, monkeypatch):
    from bertopt import export as ex
    from bertopt.predict.config import PredictConfig
    from bertopt.predict.scoring import open_scorer

    out = _stage(tmp_path, packaged_model_dir)
    onnx = out / "onnx" / "baseline"
    onnx.mkdir(parents=True)
    ex.export_onnx(out / "baseline", onnx / "model.onnx", 17, 64)
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(out / "baseline" / f, onnx / f)
    reports = tmp_path / "reports"
    reports.mkdir()
    rec = {"variant": "ort-fp32", "backend": "onnxruntime", "precision": "fp32", "source": "baseline",
           "registry": "ort-fp32", "path": str(onnx / "model.onnx"), "model_dir": str(onnx), "onnx_variant": "fp32"}
    (reports / "results.json").write_text(json.dumps({"recommendation": rec, "variants": [
        {**rec, "name": "ort-fp32", "throughput": {"batch_size": 8, "mode": {"mode": "streams", "streams": 3}}}]}))
    cfg = PredictConfig(input="x.csv", output_dir=str(out), reports_dir=str(reports), quiet=True, max_length=64)
    texts = _sst2_slice(60)["sentence"].tolist()
    streamed = open_scorer(cfg)
    assert streamed.streams == 3 and streamed.batch == 8
    monkeypatch.setenv("BERTOPT_STREAMS", "1")
    one = open_scorer(cfg)
    assert one.streams == 1
    np.testing.assert_allclose(streamed.scores(texts), one.scores(texts), rtol=0, atol=1e-6)
