"""Data sets: resolution by name or path, validation, seeded subsets, tokenization and
length-grouped, dynamically padded batches."""
from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from .errors import DataError, first_line

log = logging.getLogger("bertopt.data")

SUFFIXES = (".tsv", ".csv", ".jsonl", ".json", ".parquet")
TEXT_CANDIDATES = ("sentence", "text", "review", "content", "document", "sentence1")
LABEL_CANDIDATES = ("label", "labels", "sentiment", "target", "class", "y")
TRAIN_NAMES = ("train",)
EVAL_NAMES = ("dev", "validation", "valid", "val", "test")
KNOWN_LABEL_ORDERS = (("negative", "positive"), ("neg", "pos"), ("false", "true"), ("no", "yes"))
HUB = {"sst2": ("nyu-mll/glue", "sst2", "train", "validation", "sentence"),
       "imdb": ("stanfordnlp/imdb", None, "train", "test", "text")}


@dataclass
class TextData:
    texts: list[str]
    labels: list[int]

    def __len__(self):
        return len(self.texts)


@dataclass
class Splits:
    train: TextData
    eval: TextData
    label_names: list[str]
    source: str
    eval_carved: bool = False

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


# ----------------------------------------------------------------------------- reading files
def read_table(path: Path):
    """Read one CSV/TSV/JSONL/Parquet file into a DataFrame with clear errors."""
    import pandas as pd

    suffix = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        if suffix == ".tsv":
            # GLUE-style TSV: no quoting (sentences contain bare quote characters)
            df = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False,
                             dtype=str, encoding="utf-8")
        elif suffix == ".csv":
            df = pd.read_csv(path, keep_default_na=False, dtype=str, encoding="utf-8")
        elif suffix in (".jsonl", ".json"):
            df = pd.read_json(path, lines=suffix == ".jsonl", dtype=False)
        elif suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            raise DataError(f"unsupported data file type {suffix!r} ({path}); use one of {', '.join(SUFFIXES)}")
    except DataError:
        raise
    except (UnicodeDecodeError, ValueError, OSError, Exception) as exc:  # pandas/pyarrow raise many types
        first = first_line(exc)
        raise DataError(f"cannot read {path}: {first}") from None
    if df.shape[1] == 0:
        raise DataError(f"{path} has no columns (is it empty?)")
    return df


def _pick_column(df, requested: Optional[str], candidates: Sequence[str], kind: str, path: Path,
                 exclude: Optional[str] = None) -> str:
    cols = [str(c) for c in df.columns]
    if requested:
        if requested not in cols:
            raise DataError(f"{path}: no {kind} column {requested!r} (columns: {', '.join(cols)}); "
                            f"set --{kind}-column")
        return requested
    lower = {c.lower(): c for c in cols}
    for cand in candidates:
        if cand in lower and lower[cand] != exclude:
            return lower[cand]
    others = [c for c in cols if c != exclude]
    if kind == "text":
        stringy = [c for c in others if df[c].map(lambda v: isinstance(v, str)).mean() > 0.9]
        if len(stringy) == 1:
            return stringy[0]
    raise DataError(f"{path}: cannot tell which column holds the {kind} (columns: {', '.join(cols)}); "
                    f"pass --{kind}-column")


def _frame_to_raw(df, path: Path, text_col: Optional[str], label_col: Optional[str]):
    text_col = _pick_column(df, text_col, TEXT_CANDIDATES, "text", path)
    label_col = _pick_column(df, label_col, LABEL_CANDIDATES, "label", path, exclude=text_col)
    texts = df[text_col].tolist()
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise DataError(f"{path}: {len(bad)} row(s) have an empty or non-text {text_col!r} "
                        f"(first at data row {bad[0] + 1})")
    return [t.strip() for t in texts], df[label_col].tolist()


# ----------------------------------------------------------------------------- labels
def _as_int(v):
    if isinstance(v, (bool, np.bool_)):
        return None
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)) and not math.isnan(v) and float(v).is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v.strip())
    return None


def map_labels(split_labels: dict[str, list], where: str) -> tuple[dict[str, list[int]], list[str]]:
    """Map raw labels of every split to ids 0..K-1; returns (ids per split, label names)."""
    all_values = [v for labels in split_labels.values() for v in labels]
    if not all_values:
        raise DataError(f"{where}: no labels")
    ints = [_as_int(v) for v in all_values]
    if all(i is not None for i in ints):
        values = sorted(set(ints))
        if values[0] < 0:
            raise DataError(f"{where}: labels must be integers 0..K-1; found {values[0]} "
                            "(unlabelled rows such as GLUE test sets use -1: drop them)")
        k = values[-1] + 1
        missing = sorted(set(range(k)) - set(values))
        if missing and len(values) < 2:
            raise DataError(f"{where}: only one label value ({values[0]}) found; need at least two classes")
        if missing:
            raise DataError(f"{where}: labels must be integers 0..K-1 with every class present; "
                            f"missing {missing} among 0..{k - 1}")
        names = [str(i) for i in range(k)]
        if k == 2:
            names = ["negative", "positive"]
        return {s: [_as_int(v) for v in labels] for s, labels in split_labels.items()}, names
    bad = [v for v in all_values if not isinstance(v, str) or not v.strip()]
    if bad:
        raise DataError(f"{where}: labels must be integers 0..K-1 or class names; "
                        f"cannot map {bad[0]!r} ({len(bad)} such value(s))")
    names = sorted({v.strip() for v in all_values}, key=str.lower)
    lowered = [n.lower() for n in names]
    for order in KNOWN_LABEL_ORDERS:
        if sorted(lowered) == sorted(order):
            names = [names[lowered.index(o)] for o in order]
            break
    if len(names) < 2:
        raise DataError(f"{where}: only one label value ({names[0]!r}) found; need at least two classes")
    index = {n: i for i, n in enumerate(names)}
    return {s: [index[v.strip()] for v in labels] for s, labels in split_labels.items()}, names


# ----------------------------------------------------------------------------- resolution
def _find_split_file(directory: Path, names: Sequence[str]) -> Optional[Path]:
    for name in names:
        for suffix in SUFFIXES:
            p = directory / f"{name}{suffix}"
            if p.is_file():
                return p
    return None


def _named_local_dir(name: str, data_dir: str) -> Optional[Path]:
    candidates = [Path(data_dir) / name]
    env = os.environ.get("BERTOPT_DATA_DIR")
    if env:
        candidates += [Path(env) / name, Path(env)]
    for c in candidates:
        if c.is_dir() and _find_split_file(c, TRAIN_NAMES):
            return c
    return None


def _load_hub(name: str) -> tuple[dict, str]:
    repo, subset, train_split, eval_split, text_col = HUB[name]
    try:
        import datasets

        datasets.disable_progress_bars()
        ds = datasets.load_dataset(repo, subset) if subset else datasets.load_dataset(repo)
    except Exception as exc:  # offline, hub errors, missing package
        first = first_line(exc)
        env = os.environ.get("BERTOPT_DATA_DIR")
        raise DataError(
            f"data set {name!r} not found locally and the hub is unreachable ({first}). "
            f"Put train.tsv and dev.tsv in data/{name}/ (or --data-dir DIR with DIR/{name}/), "
            f"or set BERTOPT_DATA_DIR to a directory holding {name}/"
            + (f" (BERTOPT_DATA_DIR={env} has no {name}/train.*)" if env else "")
        ) from None
    raw = {"train": (ds[train_split][text_col], ds[train_split]["label"]),
           "eval": (ds[eval_split][text_col], ds[eval_split]["label"])}
    return raw, f"hub:{repo}" + (f"/{subset}" if subset else "")


def _load_dir(directory: Path, text_col, label_col) -> tuple[dict, str]:
    train = _find_split_file(directory, TRAIN_NAMES)
    if train is None:
        raise DataError(f"{directory}: no train file (expected train{{{','.join(SUFFIXES)}}})")
    raw = {"train": _frame_to_raw(read_table(train), train, text_col, label_col)}
    ev = _find_split_file(directory, EVAL_NAMES)
    if ev is not None:
        raw["eval"] = _frame_to_raw(read_table(ev), ev, text_col, label_col)
    return raw, str(directory)


def load_raw(dataset: str, data_dir: str = "data", text_column=None, label_column=None) -> tuple[dict, str]:
    """{'train': (texts, labels), ['eval': ...]} and a description of the source."""
    key = dataset.lower()
    if key in HUB:
        local = _named_local_dir(key, data_dir)
        if local is not None:
            return _load_dir(local, text_column, label_column)
        return _load_hub(key)
    path = Path(dataset)
    if path.is_dir():
        return _load_dir(path, text_column, label_column)
    if path.is_file():
        return {"train": _frame_to_raw(read_table(path), path, text_column, label_column)}, str(path)
    raise DataError(f"--dataset {dataset!r}: not a known data set (sst2, imdb) and no such file or directory")


# ----------------------------------------------------------------------------- subsets
def stratified_indices(labels: Sequence[int], n: int, seed: int) -> list[int]:
    """A seeded subset of ``n`` indices keeping the label proportions (sorted)."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(counts / counts.sum() * n).astype(int)
    # hand out the remainder to the largest fractional parts, at least one per class if possible
    remainder = n - quota.sum()
    frac = counts / counts.sum() * n - quota
    for i in np.argsort(-frac)[:remainder]:
        quota[i] += 1
    chosen = []
    for cls, q in zip(classes, quota):
        idx = np.flatnonzero(labels == cls)
        chosen.extend(rng.permutation(idx)[:q].tolist())
    return sorted(chosen)


def _take(data: TextData, idx: Sequence[int]) -> TextData:
    return TextData([data.texts[i] for i in idx], [data.labels[i] for i in idx])


def load_splits(dataset: str = "sst2", data_dir: str = "data", text_column=None, label_column=None,
                max_train_samples=None, max_eval_samples=None, seed: int = 42,
                eval_fraction: float = 0.1) -> Splits:
    raw, source = load_raw(dataset, data_dir, text_column, label_column)
    for split, (texts, _) in raw.items():
        if len(texts) == 0:
            raise DataError(f"{source}: the {split} split is empty")
    ids, names = map_labels({s: labels for s, (_, labels) in raw.items()}, source)
    train = TextData(list(raw["train"][0]), ids["train"])
    carved = "eval" not in raw
    if carved:
        if len(train) < 10:
            raise DataError(f"{source}: {len(train)} rows are too few to carve an evaluation split")
        n_eval = max(1, int(round(len(train) * eval_fraction)))
        eval_idx = set(stratified_indices(train.labels, n_eval, seed + 1))
        ev = _take(train, sorted(eval_idx))
        train = _take(train, [i for i in range(len(train)) if i not in eval_idx])
        log.info("no evaluation split in %s: carved a seeded, stratified %d-row one from train", source, len(ev))
    else:
        ev = TextData(list(raw["eval"][0]), ids["eval"])
    if max_train_samples:
        train = _take(train, stratified_indices(train.labels, max_train_samples, seed))
    if max_eval_samples:
        ev = _take(ev, stratified_indices(ev.labels, max_eval_samples, seed))
    return Splits(train=train, eval=ev, label_names=names, source=source, eval_carved=carved)


# ----------------------------------------------------------------------------- tokens and batches
def tokenize(texts: Sequence[str], tokenizer, max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to max_length, unpadded."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False,
                    return_attention_mask=False, return_token_type_ids=False)
    return enc["input_ids"]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, with_token_type_ids: bool = True,
              pad_to: Optional[int] = None) -> dict[str, np.ndarray]:
    """Dynamic padding to the longest sequence of the batch (or ``pad_to``)."""
    width = pad_to or max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = s[:width]
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if with_token_type_ids:
        out["token_type_ids"] = np.zeros_like(ids)
    return out


class LengthGroupedBatchSampler:
    """Batches of similar length: shuffle, cut into chunks of ``chunk_batches`` batches, sort each
    chunk by length, split into batches, shuffle the batch order. Deterministic per (seed, epoch).
    With ``num_replicas`` > 1 every rank gets a disjoint, equally long share of the batches."""

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool = True, seed: int = 0,
                 chunk_batches: int = 50, num_replicas: int = 1, rank: int = 0):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.chunk = batch_size * chunk_batches
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Epoch ``epoch``'s batch order; ``start`` skips its first batches (a resumed run)."""
        self.epoch = epoch
        self.start = start

    def _all_batches(self) -> list[list[int]]:
        n = len(self.lengths)
        if not self.shuffle:  # evaluation: globally sorted, longest first
            order = np.argsort(-self.lengths, kind="stable")
            return [order[i:i + self.batch_size].tolist() for i in range(0, n, self.batch_size)]
        rng = np.random.default_rng(self.seed + self.epoch)
        perm = rng.permutation(n)
        batches = []
        for start in range(0, n, self.chunk):
            chunk = perm[start:start + self.chunk]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        order = rng.permutation(len(batches))
        return [batches[i] for i in order]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._all_batches()
        if self.num_replicas > 1:
            usable = len(batches) - len(batches) % self.num_replicas
            batches = batches[self.rank:usable:self.num_replicas]
        return iter(batches[self.start:])

    def __len__(self) -> int:
        n = math.ceil(len(self.lengths) / self.batch_size)
        if self.num_replicas > 1:
            n = n // self.num_replicas
        return n


class EncodedDataset:
    """Token ids + labels; items are (ids, label) for the collate function."""

    def __init__(self, input_ids: list[list[int]], labels: Sequence[int]):
        self.input_ids = input_ids
        self.labels = list(labels)
        self.lengths = [len(s) for s in input_ids]

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        return self.input_ids[i], self.labels[i], i


class Collator:
    def __init__(self, pad_id: int, with_token_type_ids: bool):
        self.pad_id = pad_id
        self.with_token_type_ids = with_token_type_ids

    def __call__(self, items):
        import torch

        seqs, labels, idx = zip(*items)
        batch = {k: torch.from_numpy(v) for k, v in pad_batch(seqs, self.pad_id, self.with_token_type_ids).items()}
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
        batch["index"] = torch.tensor(idx, dtype=torch.long)
        return batch


def make_loader(ds: EncodedDataset, batch_size: int, *, shuffle: bool, seed: int, pad_id: int,
                with_token_type_ids: bool, num_workers: int = 0, pin_memory: bool = False,
                num_replicas: int = 1, rank: int = 0):
    from torch.utils.data import DataLoader

    sampler = LengthGroupedBatchSampler(ds.lengths, batch_size, shuffle=shuffle, seed=seed,
                                        num_replicas=num_replicas, rank=rank)
    return DataLoader(ds, batch_sampler=sampler, collate_fn=Collator(pad_id, with_token_type_ids),
                      num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0)
