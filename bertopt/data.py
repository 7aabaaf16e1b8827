"""Data sets: resolution by name or path (files are read by :mod:`bertopt.tables`), validation,
seeded subsets, tokenization (long-text strategies) and length-grouped, dynamically padded batches.
Task types and label mapping live in :mod:`bertopt.tasks`."""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from . import hub as _hub
from . import tasks
from .config import DEFAULT_DATA_DIR
from .errors import DataError, first_line
from .tables import SUFFIXES, RawSplit, frame_to_raw, read_table

log = logging.getLogger("bertopt.data")

TRAIN_NAMES = ("train",)
EVAL_NAMES = ("dev", "validation", "valid", "val", "test")
HUB = {"sst2": ("nyu-mll/glue", "sst2", "train", "validation", "sentence"),
       "imdb": ("stanfordnlp/imdb", None, "train", "test", "text")}
LONG_TEXT = ("truncate", "head-tail", "chunk")


@dataclass
class TextData:
    texts: list[str]
    labels: list  # class ids; multi-hot lists (multi-label); floats (regression)
    pairs: Optional[list[str]] = None  # the second text of each row (sentence pairs)

    def __len__(self):
        return len(self.texts)


@dataclass
class Splits:
    train: TextData
    eval: TextData
    label_names: list[str]
    source: str
    eval_carved: bool = False
    task: str = tasks.CLASSIFICATION
    text_columns: list = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return 1 if self.task == tasks.REGRESSION else len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return self.train.pairs is not None


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


def _check_given_dirs(data_dir: str) -> None:
    """A directory the user named that does not exist is a typo, not a reason to try the hub."""
    env = os.environ.get("BERTOPT_DATA_DIR")
    for what, d in (("--data-dir", data_dir if data_dir != DEFAULT_DATA_DIR else None), ("BERTOPT_DATA_DIR", env)):
        if d and not Path(d).is_dir():
            raise DataError(f"{what} {d}: no such directory")


def _load_hub(name: str) -> tuple[dict, str]:
    repo, subset, train_split, eval_split, text_col = HUB[name]
    offline = None
    try:
        import datasets

        datasets.disable_progress_bars()
        offline = _hub.prepare()
        ds = datasets.load_dataset(repo, subset) if subset else datasets.load_dataset(repo)
    except Exception as exc:  # offline, hub errors, missing package
        first = offline or first_line(exc)
        env = os.environ.get("BERTOPT_DATA_DIR")
        raise DataError(
            f"data set {name!r} not found locally and the hub is unreachable ({first}). "
            f"Put train.tsv and dev.tsv in data/{name}/ (or --data-dir DIR with DIR/{name}/), "
            f"or set BERTOPT_DATA_DIR to a directory holding {name}/"
            + (f" (BERTOPT_DATA_DIR={env} has no {name}/train.*)" if env else "")
        ) from None
    raw = {"train": RawSplit(ds[train_split][text_col], ds[train_split]["label"], None, (text_col,), ("label",)),
           "eval": RawSplit(ds[eval_split][text_col], ds[eval_split]["label"], None, (text_col,), ("label",))}
    return raw, f"hub:{repo}" + (f"/{subset}" if subset else "")


def _load_dir(directory: Path, text_col, label_col, no_header=False) -> tuple[dict, str]:
    train = _find_split_file(directory, TRAIN_NAMES)
    if train is None:
        raise DataError(f"{directory}: no train file (expected train{{{','.join(SUFFIXES)}}})")
    raw = {"train": frame_to_raw(read_table(train, no_header), train, text_col, label_col)}
    ev = _find_split_file(directory, EVAL_NAMES)
    if ev is not None:
        raw["eval"] = frame_to_raw(read_table(ev, no_header), ev, text_col, label_col, like=raw["train"])
    return raw, str(directory)


def load_raw(dataset: str, data_dir: str = DEFAULT_DATA_DIR, text_column=None, label_column=None,
             no_header: bool = False) -> tuple[dict, str]:
    """{'train': RawSplit, ['eval': RawSplit]} and a description of the source."""
    key = dataset.lower()
    if key in HUB:
        local = _named_local_dir(key, data_dir)
        if local is not None:
            return _load_dir(local, text_column, label_column, no_header)
        _check_given_dirs(data_dir)
        return _load_hub(key)
    path = Path(dataset)
    if path.is_dir():
        return _load_dir(path, text_column, label_column, no_header)
    if path.is_file():
        return {"train": frame_to_raw(read_table(path, no_header), path, text_column, label_column)}, str(path)
    raise DataError(f"--dataset {dataset!r}: not a known data set (sst2, imdb) and no such file or directory")


# ----------------------------------------------------------------------------- subsets
def stratified_indices(labels: Sequence, n: int, seed: int) -> list[int]:
    """A seeded subset of ``n`` indices keeping the label proportions (sorted). Multi-label rows are
    stratified by their label set, regression values by quintile."""
    if n >= len(labels):
        return list(range(len(labels)))
    if len(labels) and isinstance(labels[0], (list, tuple)):
        labels = ["".join(map(str, row)) for row in labels]
    elif len(labels) and isinstance(labels[0], float):
        labels = np.digitize(labels, np.quantile(labels, [0.2, 0.4, 0.6, 0.8]))
    labels = np.asarray(labels)
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
    pairs = [data.pairs[i] for i in idx] if data.pairs is not None else None
    return TextData([data.texts[i] for i in idx], [data.labels[i] for i in idx], pairs)


def _listed(values):
    return list(values) if values is not None else None


def load_splits(dataset: str = "sst2", data_dir: str = DEFAULT_DATA_DIR, text_column=None, label_column=None,
                max_train_samples=None, max_eval_samples=None, seed: int = 42,
                eval_fraction: float = 0.1, no_header: bool = False, task: Optional[str] = None,
                eval_only: bool = False) -> Splits:
    """``eval_only`` (a --trained model's single data file): a source without an eval split is all
    evaluation rows, and the train split is empty."""
    raw, source = load_raw(dataset, data_dir, text_column, label_column, no_header)
    for split, r in raw.items():
        if len(r.texts) == 0:
            raise DataError(f"{source}: the {split} split is empty")
    label_cols = raw["train"].label_columns
    multi_cols = list(label_cols) if len(label_cols) > 1 else None
    if multi_cols and task not in (None, tasks.MULTI_LABEL):
        raise DataError(f"{source}: several label columns ({', '.join(label_cols)}) mean --task multi-label")
    ids, names, task = tasks.map_labels({s: r.labels for s, r in raw.items()}, source,
                                        tasks.MULTI_LABEL if multi_cols else task, multi_cols)
    train = TextData(list(raw["train"].texts), ids["train"], _listed(raw["train"].pairs))
    carved = "eval" not in raw and not eval_only
    if eval_only and "eval" not in raw:
        ev, train = train, _take(train, [])
    elif carved:
        if len(train) < 10:
            raise DataError(f"{source}: {len(train)} rows are too few to carve an evaluation split")
        n_eval = max(1, int(round(len(train) * eval_fraction)))
        eval_idx = set(stratified_indices(train.labels, n_eval, seed + 1))
        ev = _take(train, sorted(eval_idx))
        train = _take(train, [i for i in range(len(train)) if i not in eval_idx])
        log.info("no evaluation split in %s: carved a seeded, stratified %d-row one from train", source, len(ev))
    else:
        ev = TextData(list(raw["eval"].texts), ids["eval"], _listed(raw["eval"].pairs))
    if max_train_samples:
        train = _take(train, stratified_indices(train.labels, max_train_samples, seed))
    if max_eval_samples:
        ev = _take(ev, stratified_indices(ev.labels, max_eval_samples, seed))
    return Splits(train=train, eval=ev, label_names=names, source=source, eval_carved=carved, task=task,
                  text_columns=list(raw["train"].text_columns))


def load_splits_for(d: dict, **overrides) -> Splits:
    """The splits a stage's recorded config (a manifest's ``config``) names; ``overrides`` win."""
    d = {**d, **overrides}
    return load_splits(d.get("dataset", "sst2"), d.get("data_dir", "data"), d.get("text_column"),
                       d.get("label_column"), d.get("max_train_samples"), d.get("max_eval_samples"),
                       int(d.get("seed", 42)), no_header=bool(d.get("no_header")), task=d.get("task"),
                       eval_only=bool(d.get("eval_only")))


# ----------------------------------------------------------------------------- tokens and batches
def tokenize(texts: Sequence[str], tokenizer, max_length: int, pairs: Optional[Sequence[str]] = None) -> list[list[int]]:
    """Token ids per text (or text/text_pair), truncated to max_length, unpadded."""
    args = (list(texts),) if pairs is None else (list(texts), list(pairs))
    enc = tokenizer(*args, truncation=True, max_length=max_length, padding=False,
                    return_attention_mask=False, return_token_type_ids=False)
    return enc["input_ids"]


def encode(texts: Sequence[str], tokenizer, max_length: int, pairs: Optional[Sequence[str]] = None,
           long_text: str = "truncate", stride: Optional[int] = None) -> tuple[list[list[int]], Optional[list[int]]]:
    """Token ids under a long-text strategy, and for ``chunk`` the text each window belongs to.

    truncate: the first max_length tokens (pairs: longest-first). head-tail: the first quarter and the
    last three quarters of the budget (Sun et al., 2019, "How to fine-tune BERT for text
    classification"). chunk: windows of max_length tokens overlapping by ``stride`` (default
    max_length // 4); the caller aggregates the windows' logits per text (``owners``)."""
    if long_text == "truncate":
        return tokenize(texts, tokenizer, max_length, pairs), None
    if pairs is not None:
        raise DataError(f"--long-text {long_text} works on single texts; sentence pairs use --long-text truncate")
    body = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    full = tokenizer(list(texts), add_special_tokens=False, truncation=False, padding=False,
                     return_attention_mask=False, return_token_type_ids=False, verbose=False)["input_ids"]
    cls = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id

    def wrap(body_ids):
        return [cls, *body_ids, sep]
    if long_text == "head-tail":
        head = body // 4
        return [wrap(t if len(t) <= body else t[:head] + t[len(t) - (body - head):]) for t in full], None
    overlap = max_length // 4 if stride is None else stride
    step = body - overlap
    if step < 1:
        raise DataError(f"--stride {overlap} leaves no new tokens per window at --max-length {max_length}")
    ids, owners = [], []
    for i, t in enumerate(full):
        starts = range(0, max(len(t) - overlap, 1), step)
        for s in starts:
            ids.append(wrap(t[s:s + body]))
            owners.append(i)
    return ids, owners


def token_types(seq: Sequence[int], sep_id: Optional[int]) -> list[int]:
    """Segment ids of a BERT-style pair encoding: 0 up to the first [SEP], 1 after it (all 0 for one text)."""
    if sep_id is None or sep_id not in seq:
        return [0] * len(seq)
    cut = list(seq).index(sep_id) + 1
    return [0] * cut + [1] * (len(seq) - cut)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, with_token_type_ids: bool = True,
              pad_to: Optional[int] = None, sep_id: Optional[int] = None) -> dict[str, np.ndarray]:
    """Dynamic padding to the longest sequence of the batch (or ``pad_to``). With ``sep_id`` the
    token types mark a pair's second text (single texts keep all-zero token types)."""
    width = pad_to or max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    types = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = s[:width]
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
        if sep_id is not None:
            types[i, :len(s)] = token_types(s, sep_id)
    out = {"input_ids": ids, "attention_mask": mask}
    if with_token_type_ids:
        out["token_type_ids"] = types
    return out


def length_groups(lengths: Sequence[int], slack: float = 0.1) -> list[list[int]]:
    """Indices in runs of similar length: sorted by length, and a new run starts where adding the
    next sequence would make the run's padding exceed ``slack`` x its real tokens. What a micro-batch
    of mixed lengths runs as: on SST-2 dev (MiniLM INT8, 1 thread) 32 texts padded to their longest
    ran at 334 texts/s and 0.55x batch 1; in such runs at 701 texts/s, 1.19x batch 1."""
    groups: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda k: lengths[k]):
        n = len(groups[-1]) if groups else 0
        if n and (n + 1) * lengths[i] - real - lengths[i] <= slack * (real + lengths[i]):
            groups[-1].append(i)
            real += lengths[i]
        else:
            groups.append([i])
            real = lengths[i]
    return groups


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
    """Token ids + labels; items are (ids, label, index) for the collate function. ``owners`` (chunked
    long texts) maps each window to its text; a window carries its text's label."""

    def __init__(self, input_ids: list[list[int]], labels: Sequence, owners: Optional[list[int]] = None):
        self.input_ids = input_ids
        self.labels = list(labels) if owners is None else [labels[o] for o in owners]
        self.owners = owners
        self.lengths = [len(s) for s in input_ids]

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        return self.input_ids[i], self.labels[i], i


def encoded_dataset(data: TextData, tokenizer, max_length: int, long_text: str = "truncate",
                    stride: Optional[int] = None) -> EncodedDataset:
    ids, owners = encode(data.texts, tokenizer, max_length, data.pairs, long_text, stride)
    return EncodedDataset(ids, data.labels, owners)


class Collator:
    def __init__(self, pad_id: int, with_token_type_ids: bool, sep_id: Optional[int] = None):
        self.pad_id = pad_id
        self.with_token_type_ids = with_token_type_ids
        self.sep_id = sep_id

    def __call__(self, items):
        import torch

        seqs, labels, idx = zip(*items)
        padded = pad_batch(seqs, self.pad_id, self.with_token_type_ids, sep_id=self.sep_id)
        batch = {k: torch.from_numpy(v) for k, v in padded.items()}
        floats = isinstance(labels[0], (list, tuple, float))  # multi-hot (multi-label) or regression
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if floats else torch.long)
        batch["index"] = torch.tensor(idx, dtype=torch.long)
        return batch


def make_loader(ds: EncodedDataset, batch_size: int, *, shuffle: bool, seed: int, pad_id: int,
                with_token_type_ids: bool, num_workers: int = 0, pin_memory: bool = False,
                num_replicas: int = 1, rank: int = 0, sep_id: Optional[int] = None):
    from torch.utils.data import DataLoader

    sampler = LengthGroupedBatchSampler(ds.lengths, batch_size, shuffle=shuffle, seed=seed,
                                        num_replicas=num_replicas, rank=rank)
    return DataLoader(ds, batch_sampler=sampler, collate_fn=Collator(pad_id, with_token_type_ids, sep_id),
                      num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0)


# ----------------------------------------------------------------------------- request texts (serving)
MAX_JSON_DEPTH = 16  # a request is at most {"inputs": [{"text": ...}], "parameters": {...}}: depth 3
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_JSON_BRACKETS = re.compile(r"[\[\]{}]")
_BAD_CODE_POINTS = re.compile("[\ud800-\udfff\x00]")


def json_depth(text: str) -> int:
    """The deepest nesting of arrays/objects in JSON ``text`` (strings skipped), without decoding."""
    depth = deepest = 0
    for m in _JSON_BRACKETS.finditer(_JSON_STRING.sub('""', text)):
        depth += 1 if m.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def decode_request_json(text: str, max_depth: int = MAX_JSON_DEPTH):
    """json.loads for a client's request: ValueError with a short reason for nesting deeper than
    ``max_depth`` (checked before decoding: Python's decoder recurses), malformed text, and numbers
    past Python's int-digits limit."""
    depth = json_depth(text)
    if depth > max_depth:
        raise ValueError(f"JSON nested {depth} levels deep; the limit is {max_depth}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"malformed JSON: {str(exc).splitlines()[0][:200]}") from None


def bad_code_point(text) -> Optional[str]:
    """What the tokenizer cannot take or would silently drop in a text (or a (text, pair) tuple):
    a lone UTF-16 surrogate (only a JSON \\uD800-style escape makes one) or NUL, with its position;
    None when the text is clean (or not a string)."""
    for part in text if isinstance(text, tuple) else (text,):
        m = _BAD_CODE_POINTS.search(part) if isinstance(part, str) else None
        if m:
            what = "NUL" if m.group() == "\x00" else "a lone UTF-16 surrogate"
            return f"{what} (U+{ord(m.group()):04X}) at character {m.start()}"
    return None
