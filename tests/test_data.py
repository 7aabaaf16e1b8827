"""Data resolution, validation, subsets and length-grouped batching."""
import json
from pathlib import Path

import numpy as np
import pytest

from bertopt import data
from bertopt.errors import DataError
from conftest import SST2_DIR, make_texts, write_table


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl", ".parquet"])
def test_each_local_format_loads_with_autodetected_columns(tmp_path, suffix):
    texts, labels = make_texts(60)
    path = write_table(tmp_path / f"reviews{suffix}", texts, labels, text_col="review", label_col="sentiment")
    splits = data.load_splits(str(path), seed=3)
    assert splits.eval_carved  # a single file has no eval split: a seeded one is carved
    assert len(splits.train) + len(splits.eval) == 60
    assert len(splits.eval) == 6
    assert set(splits.train.texts).isdisjoint(splits.eval.texts)
    assert splits.label_names == ["negative", "positive"]
    # carving is seeded and reproducible
    again = data.load_splits(str(path), seed=3)
    assert again.eval.texts == splits.eval.texts


def test_directory_with_train_and_dev(tiny_data_dir):
    splits = data.load_splits(tiny_data_dir)
    assert (len(splits.train), len(splits.eval)) == (400, 100)
    assert not splits.eval_carved


def test_explicit_columns(tmp_path):
    texts, labels = make_texts(20)
    import pandas as pd

    pd.DataFrame({"a": texts, "b": texts, "y_true": labels}).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(DataError, match="cannot tell which column holds the text"):
        data.load_splits(str(tmp_path / "d.csv"))
    splits = data.load_splits(str(tmp_path / "d.csv"), text_column="b", label_column="y_true")
    assert len(splits.train) + len(splits.eval) == 20


def test_missing_column_named(tmp_path):
    texts, labels = make_texts(20)
    path = write_table(tmp_path / "d.csv", texts, labels)
    with pytest.raises(DataError, match="no text column 'body'"):
        data.load_splits(str(path), text_column="body")


def test_missing_file_and_unknown_name():
    with pytest.raises(DataError, match="not a known data set"):
        data.load_splits("no/such/file.csv")


def test_unreadable_and_unsupported_files(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="cannot read"):
        data.load_splits(str(bad))
    other = tmp_path / "x.xlsx"
    other.write_text("x")
    with pytest.raises(DataError, match="unsupported data file type"):
        data.load_splits(str(other))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError):
        data.load_splits(str(empty))


def test_empty_split(tmp_path):
    (tmp_path / "train.csv").write_text("sentence,label\n")
    with pytest.raises(DataError, match="train split is empty"):
        data.load_splits(str(tmp_path))


@pytest.mark.parametrize("labels,match", [
    ([0, 2] * 10, r"missing \[1\]"),
    ([-1, 0] * 10, "found -1"),
    (["positive", 1] * 10, "mixed types"),
    ([1] * 20, "only one label"),
])
def test_bad_labels(tmp_path, labels, match):
    texts, _ = make_texts(20)
    path = write_table(tmp_path / "d.jsonl", texts, labels)
    with pytest.raises(DataError, match=match):
        data.load_splits(str(path))


def test_string_labels_are_mapped_in_known_order(tmp_path):
    texts, labels = make_texts(40)
    names = ["positive" if y else "negative" for y in labels]
    path = write_table(tmp_path / "d.csv", texts, names)
    splits = data.load_splits(str(path))
    assert splits.label_names == ["negative", "positive"]
    by_text = dict(zip(texts, labels))
    assert all(by_text[t] == y for t, y in zip(splits.train.texts, splits.train.labels))


def test_empty_text_rows_are_an_error(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\nhello,1\n,0\nworld,0\n")
    with pytest.raises(DataError, match="empty or non-text"):
        data.load_splits(str(tmp_path / "d.csv"))


def test_stratified_subset_keeps_proportions_and_is_seeded():
    labels = [0] * 700 + [1] * 300
    idx = data.stratified_indices(labels, 100, seed=5)
    assert len(idx) == 100 and len(set(idx)) == 100
    assert sum(labels[i] for i in idx) == 30
    assert idx == data.stratified_indices(labels, 100, seed=5)
    assert idx != data.stratified_indices(labels, 100, seed=6)


def test_sst2_from_data_dir_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("BERTOPT_DATA_DIR", raising=False)
    splits = data.load_splits("sst2", data_dir=str(SST2_DIR.parent), max_train_samples=500,
                              max_eval_samples=100)
    assert (len(splits.train), len(splits.eval)) == (500, 100)
    assert splits.label_names == ["negative", "positive"]
    # the TSV holds bare quote characters: all 872 dev rows must survive unquoted parsing
    full = data.load_splits("sst2", data_dir=str(SST2_DIR.parent), max_train_samples=10)
    assert len(full.eval) == 872
    monkeypatch.setenv("BERTOPT_DATA_DIR", str(SST2_DIR.parent))
    via_env = data.load_splits("sst2", data_dir=str(tmp_path), max_train_samples=10)
    assert len(via_env.eval) == 872


def test_sst2_offline_without_files_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("BERTOPT_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"Put train.tsv and dev.tsv in data/sst2/"):
        data.load_splits("sst2", data_dir=str(tmp_path))


def test_a_named_directory_that_does_not_exist_fails_before_the_hub(tmp_path, monkeypatch):
    def no_hub(name):
        raise AssertionError("the hub must not be tried")

    monkeypatch.setattr(data, "_load_hub", no_hub)
    monkeypatch.delenv("BERTOPT_DATA_DIR", raising=False)
    with pytest.raises(DataError, match=r"^--data-dir .*missing: no such directory$"):
        data.load_splits("sst2", data_dir=str(tmp_path / "missing"))
    monkeypatch.setenv("BERTOPT_DATA_DIR", str(tmp_path / "gone"))
    with pytest.raises(DataError, match=r"^BERTOPT_DATA_DIR .*gone: no such directory$"):
        data.load_splits("sst2", data_dir=str(tmp_path))


def test_length_groups_split_a_batch_where_padding_would_exceed_the_slack():
    assert data.length_groups([10, 30, 11, 31, 12, 50]) == [[0, 2, 4], [1, 3], [5]]
    assert data.length_groups([9] * 5) == [[0, 1, 2, 3, 4]]     # equal lengths: one run
    assert data.length_groups([10, 50], slack=10.0) == [[0, 1]]  # padding within the slack: one run
    assert data.length_groups([]) == []


def test_length_grouped_batches_cover_everything_once_and_group_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 128, size=1000).tolist()
    sampler = data.LengthGroupedBatchSampler(lengths, batch_size=16, shuffle=True, seed=1, chunk_batches=10)
    batches = list(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    assert len(batches) == len(sampler) == 63
    # padding waste: grouped batches pad far less than random batches of the same size
    def waste(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)
    perm = rng.permutation(1000)
    random_batches = [perm[i:i + 16].tolist() for i in range(0, 1000, 16)]
    assert waste(batches) < 0.25 * waste(random_batches)
    # deterministic per (seed, epoch), different across epochs
    assert list(data.LengthGroupedBatchSampler(lengths, 16, seed=1, chunk_batches=10)) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_sharded_batches_are_disjoint():
    lengths = list(range(1, 101))
    shards = [list(data.LengthGroupedBatchSampler(lengths, 8, seed=0, num_replicas=2, rank=r)) for r in (0, 1)]
    a = {i for b in shards[0] for i in b}
    b = {i for b in shards[1] for i in b}
    assert a.isdisjoint(b) and len(shards[0]) == len(shards[1])


def test_dynamic_padding(packaged_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(packaged_model_dir)
    ids = data.tokenize(["a short one", "a much longer sentence than the first one is"], tok, max_length=8)
    assert len(ids[1]) == 8  # truncated to max_length
    batch = data.pad_batch(ids, tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].sum(1).tolist() == [len(ids[0]), 8]
    assert (batch["token_type_ids"] == 0).all()
