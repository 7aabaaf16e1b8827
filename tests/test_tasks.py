"""Sentence pairs, headerless files, task detection, task metrics and task training."""
import numpy as np
import pytest

from bertopt import data, metrics, tasks
from bertopt.errors import DataError
from conftest import make_texts


def _pairs_file(path, n=40, bom=True):
    texts, labels = make_texts(n)
    rows = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
    rows += [f"{y}\t{i}\t{i}\t{t}\tsecond {t}" for i, (t, y) in enumerate(zip(texts, labels))]
    path.write_text(("\ufeff" if bom else "") + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_mrpc_style_pairs_with_bom_are_detected(tmp_path):
    _pairs_file(tmp_path / "train.tsv")
    _pairs_file(tmp_path / "dev.tsv", 20)
    s = data.load_splits(str(tmp_path))
    assert s.text_columns == ["#1 String", "#2 String"] and s.is_pair
    assert s.train.pairs[0] == "second " + s.train.texts[0]
    assert s.task == tasks.CLASSIFICATION


def test_pair_column_missing_in_dev_is_one_error(tmp_path):
    _pairs_file(tmp_path / "train.tsv")
    (tmp_path / "dev.tsv").write_text("Quality\t#1 String\n1\ta b c\n0\td e f\n")
    with pytest.raises(DataError, match="no column '#2 String', which the train split uses"):
        data.load_splits(str(tmp_path))


def test_headerless_tsv_by_index(tmp_path):
    texts, labels = make_texts(30)
    (tmp_path / "train.tsv").write_text("".join(f"src\t{y}\t\t{t}\n" for t, y in zip(texts, labels)))
    s = data.load_splits(str(tmp_path), text_column="3", label_column="1")
    assert len(s.train) + len(s.eval) == 30  # the first row is data, not a header
    assert s.label_names == ["negative", "positive"]


def test_regression_and_multilabel_detection(tmp_path):
    import pandas as pd

    texts, _ = make_texts(40)
    pd.DataFrame({"text": texts, "score": [i / 8 for i in range(40)]}).to_csv(tmp_path / "r.csv", index=False)
    s = data.load_splits(str(tmp_path / "r.csv"))
    assert s.task == tasks.REGRESSION and s.num_labels == 1 and isinstance(s.train.labels[0], float)
    pd.DataFrame({"text": texts, "labels": [["a", "b"][: 1 + i % 2] if i % 3 else ["c"] for i in range(40)]}
                 ).to_json(tmp_path / "m.jsonl", orient="records", lines=True)
    s = data.load_splits(str(tmp_path / "m.jsonl"))
    assert s.task == tasks.MULTI_LABEL and s.label_names == ["a", "b", "c"]
    assert all(sum(v) >= 1 and len(v) == 3 for v in s.train.labels)


def test_multilabel_unknown_label_in_dev(tmp_path):
    import pandas as pd

    texts, _ = make_texts(20)
    pd.DataFrame({"text": texts, "labels": [["a"], ["b"]] * 10}).to_json(tmp_path / "train.jsonl", orient="records", lines=True)
    pd.DataFrame({"text": texts[:4], "labels": [["a"], ["zz"]] * 2}).to_json(tmp_path / "dev.jsonl", orient="records", lines=True)
    with pytest.raises(DataError, match="label 'zz', which no train row has"):
        data.load_splits(str(tmp_path))


def test_chunk_windows_cover_long_texts(packaged_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(packaged_model_dir)
    long = " ".join(["word"] * 100)
    ids, owners = data.encode([long, "short"], tok, max_length=32, long_text="chunk", stride=8)
    assert all(len(s) <= 32 for s in ids) and owners[-1] == 1 and owners.count(0) >= 4
    ht, _ = data.encode([long], tok, max_length=32, long_text="head-tail")
    assert len(ht[0]) == 32


def test_pair_token_types():
    assert data.pad_batch([[101, 5, 102, 7, 102]], 0, sep_id=102)["token_type_ids"].tolist() == [[0, 0, 0, 1, 1]]
    assert data.pad_batch([[101, 5, 102]], 0, pad_to=5, sep_id=102)["token_type_ids"].tolist() == [[0, 0, 0, 0, 0]]


def test_metrics_and_defaults():
    m = metrics.compute(tasks.CLASSIFICATION, [0, 1, 1, 1], np.array([[1, 0], [0, 1], [1, 0], [0, 1]]), ["n", "p"])
    assert m["accuracy"] == 0.75 and m["confusion_matrix"] == [[1, 0], [1, 2]] and m["f1"] == pytest.approx(0.8)
    assert metrics.default_metric(tasks.CLASSIFICATION, [1] * 7 + [0] * 3, 2, True)[0] == "f1"
    assert metrics.default_metric(tasks.CLASSIFICATION, [1] * 7 + [0] * 3, 2, False)[0] == "mcc"
    assert metrics.default_metric(tasks.CLASSIFICATION, [1] * 5 + [0] * 4, 2, False)[0] == "accuracy"
    r = metrics.compute(tasks.REGRESSION, [0.0, 1.0, 2.0], np.array([[0.1], [0.9], [2.2]]), ["score"])
    assert r["pearson"] > 0.99
    agg = metrics.aggregate(np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0]]), [0, 0, 1], tasks.CLASSIFICATION)
    assert agg.tolist() == [[2.0, 0.0], [0.0, 1.0]]


def test_stride_too_large_is_a_config_error():
    from bertopt.config import TrainConfig
    from bertopt.errors import ConfigError

    with pytest.raises(ConfigError, match="--stride"):
        TrainConfig(max_length=64, stride=64)


# ----------------------------------------------------------------------------- bad input at the CLI
def _cli_error(capsys, argv):
    import benchmark

    code = benchmark.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _bad_mixed_types(d):
    texts, labels = make_texts(30)
    labels = [str(y) if i % 3 else ["a", "b"][y] + ".5" for i, y in enumerate(labels)]
    (d / "train.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(texts, labels)))
    return "mixed types"


def _bad_pair_missing(d):
    _pairs_file(d / "train.tsv")
    (d / "dev.tsv").write_text("Quality\t#1 String\n1\ta b c\n0\td e f\n")
    return "no column '#2 String'"


def _bad_unknown_multilabel(d):
    texts, _ = make_texts(30)
    rows = [f'{t}\t["sports", "{"news" if i % 2 else "tech"}"]' for i, t in enumerate(texts)]
    (d / "train.tsv").write_text("text\tlabels\n" + "\n".join(rows) + "\n")
    (d / "dev.tsv").write_text('text\tlabels\nsome text\t["sports", "weather"]\n')
    return "'weather', which no train row has"


@pytest.mark.parametrize("make", [_bad_mixed_types, _bad_pair_missing, _bad_unknown_multilabel])
def test_bad_data_is_one_line_exit_1_nothing_written(capsys, tmp_path, tiny_model_dir, make):
    d = tmp_path / "data"
    d.mkdir()
    needle = make(d)
    out = tmp_path / "out"
    line = _cli_error(capsys, ["--model", tiny_model_dir, "--dataset", str(d), "--output-dir", str(out), "--quiet"])
    assert needle in line
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))


def test_stride_not_below_max_length_at_the_cli(capsys, tmp_path, tiny_model_dir, tiny_data_dir):
    out = tmp_path / "out"
    line = _cli_error(capsys, ["--model", tiny_model_dir, "--dataset", tiny_data_dir, "--output-dir", str(out),
                               "--long-text", "chunk", "--max-length", "32", "--stride", "32", "--quiet"])
    assert "--stride" in line and not out.exists()


# ----------------------------------------------------------------------------- long texts
def make_long_texts(n: int, seed: int, lead=(34, 50), tail=(2, 6)):
    """Reviews whose only label-bearing word sits after ``lead`` filler words: beyond the first
    window at --max-length 32, so truncation cannot see it and chunking can."""
    import random

    from conftest import FILL, NEG, POS

    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        y = i % 2
        words = [rng.choice(FILL) for _ in range(rng.randint(*lead))]
        words += [rng.choice(POS if y else NEG)] + [rng.choice(FILL) for _ in range(rng.randint(*tail))]
        texts.append(" ".join(words))
        labels.append(y)
    return texts, labels


def test_chunk_beats_truncate_on_long_reviews(tmp_path, tiny_model_dir):
    import json

    from bertopt.config import TrainConfig
    from bertopt.train_stage import run_baseline
    from conftest import write_table

    for name, n, seed in (("train.tsv", 240, 11), ("dev.tsv", 80, 12)):
        write_table(tmp_path / "data" / name, *make_long_texts(n, seed))
    acc = {}
    for strategy in ("truncate", "chunk"):
        out = tmp_path / strategy
        cfg = TrainConfig(model=tiny_model_dir, dataset=str(tmp_path / "data"), output_dir=str(out), max_length=32,
                          epochs=6, lr=1e-2, warmup_ratio=0.0, batch_size=16, seed=0, device="cpu", quiet=True, long_text=strategy)
        assert run_baseline(cfg).status == "ok"
        manifest = json.loads((out / "baseline" / "manifest.json").read_text())
        assert manifest["data"]["long_text"] == strategy  # stored for every later stage
        acc[strategy] = manifest["metrics"]["best_eval_accuracy"]
    assert acc["truncate"] < 0.7, acc  # the label word is never inside the first window
    assert acc["chunk"] >= acc["truncate"] + 0.02, acc
