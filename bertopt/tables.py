"""Reading one split's table: CSV/TSV/JSON lines/parquet files, UTF-8 BOMs, header rows (or their
absence, detected), and which columns hold the text, the optional text pair and the label(s),
by name, by index or by the usual names; ``RawSplit`` is what a file becomes.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import tasks
from .errors import DataError, first_line

log = logging.getLogger("bertopt.data")

SUFFIXES = (".tsv", ".csv", ".jsonl", ".json", ".parquet")
TEXT_CANDIDATES = ("sentence", "text", "review", "content", "document", "sentence1")
PAIR_CANDIDATES = (("sentence1", "sentence2"), ("question", "sentence"), ("premise", "hypothesis"),
                   ("#1 string", "#2 string"), ("text", "text_pair"), ("question1", "question2"))
LABEL_CANDIDATES = ("label", "labels", "sentiment", "target", "class", "y", "quality", "score")


@dataclass
class RawSplit:
    texts: list
    labels: list
    pairs: Optional[list] = None
    text_columns: tuple = ()
    label_columns: tuple = ()


# ----------------------------------------------------------------------------- reading files
def _read(path: Path, suffix: str, header):
    import pandas as pd

    if suffix == ".tsv":
        # GLUE-style TSV: no quoting (sentences contain bare quote characters); utf-8-sig drops a BOM
        return pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False,
                           dtype=str, encoding="utf-8-sig", header=header)
    if suffix == ".csv":
        return pd.read_csv(path, keep_default_na=False, dtype=str, encoding="utf-8-sig", header=header)
    if suffix in (".jsonl", ".json"):
        return pd.read_json(path, lines=suffix == ".jsonl", dtype=False)
    if suffix == ".parquet":
        return pd.read_parquet(path)
    raise DataError(f"unsupported data file type {suffix!r} ({path}); use one of {', '.join(SUFFIXES)}")


def header_looks_like_data(columns) -> Optional[str]:
    """Why a CSV/TSV's first row looks like a data row rather than a header (None = a header)."""
    for c in map(str, columns):
        if tasks.as_float(c) is not None:
            return f"column name {c!r} is a number"
        if not c.strip() or c.startswith("Unnamed: "):
            return "a column name is empty"
        if len(c.split()) >= 5:
            return f"column name {c[:40]!r} reads like a sentence"
    return None


def read_table(path: Path, no_header: bool = False):
    """Read one CSV/TSV/JSONL/Parquet file into a DataFrame with clear errors.

    A CSV/TSV without a header row (``no_header``, or detected: a number, an empty name or a
    sentence among the column names) gets the columns 0, 1, 2, ... so they can be picked by index."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        df = _read(path, suffix, None if no_header and suffix in (".tsv", ".csv") else "infer")
        why = header_looks_like_data(df.columns) if suffix in (".tsv", ".csv") and not no_header else None
        if why:
            log.warning("%s: the first row looks like data, not a header (%s): reading the file as headerless "
                        "with columns 0..N-1 (pass --no-header to say so; pick columns by index, e.g. "
                        "--text-column 3 --label-column 1)", path, why)
            df = _read(path, suffix, None)
    except DataError:
        raise
    except (UnicodeDecodeError, ValueError, OSError, Exception) as exc:  # pandas/pyarrow raise many types
        first = first_line(exc)
        raise DataError(f"cannot read {path}: {first}") from None
    if df.shape[1] == 0:
        raise DataError(f"{path} has no columns (is it empty?)")
    df.columns = [str(c) for c in df.columns]
    return df


def _resolve_name(cols: list[str], requested: str, kind: str, path: Path) -> str:
    if requested in cols:
        return requested
    if requested.isdigit() and int(requested) < len(cols):  # a column index
        return cols[int(requested)]
    raise DataError(f"{path}: no {kind} column {requested!r} (columns: {', '.join(cols)}); "
                    f"set --{kind}-column (a name, an index, or two for a pair: a,b)")


def _is_texty(df, c) -> bool:
    values = df[c]
    return bool(values.map(lambda v: isinstance(v, str) and tasks.as_float(v) is None).mean() > 0.9
                and values.map(lambda v: len(v) if isinstance(v, str) else 0).mean() > 15)


def _pick_text(df, requested: Optional[str], path: Path) -> tuple[str, ...]:
    cols = list(df.columns)
    if requested:
        if requested in cols:
            return (requested,)
        parts = [p.strip() for p in requested.split(",")]
        if len(parts) > 2:
            raise DataError(f"--text-column {requested!r}: give one column or two (a pair: a,b)")
        return tuple(_resolve_name(cols, p, "text", path) for p in parts)
    lower = {c.lower(): c for c in cols}
    for a, b in PAIR_CANDIDATES:
        if a in lower and b in lower:
            return lower[a], lower[b]
    for cand in TEXT_CANDIDATES:
        if cand in lower:
            return (lower[cand],)
    stringy = [c for c in cols if df[c].map(lambda v: isinstance(v, str)).mean() > 0.9
               and df[c].map(lambda v: tasks.as_float(v) is None if isinstance(v, str) else False).mean() > 0.9]
    if len(stringy) == 1:
        return (stringy[0],)
    raise DataError(f"{path}: cannot tell which column holds the text (columns: {', '.join(cols)}); "
                    "pass --text-column (a name, an index, or two for a pair: a,b)")


def pick_text_columns(df, requested: Optional[str], path: Path) -> tuple[str, ...]:
    """The text column(s) training would use in ``df``: ``requested`` (a name, an index, or a,b), else detected."""
    return _pick_text(df, requested, path)


def _pick_label(df, requested: Optional[str], path: Path, exclude) -> tuple[str, ...]:
    cols = list(df.columns)
    if requested:
        if requested in cols:
            return (requested,)
        return tuple(_resolve_name(cols, p.strip(), "label", path) for p in requested.split(","))
    lower = {c.lower(): c for c in cols}
    for cand in LABEL_CANDIDATES:
        if cand in lower and lower[cand] not in exclude:
            return (lower[cand],)
    raise DataError(f"{path}: cannot tell which column holds the label (columns: {', '.join(cols)}); "
                    "pass --label-column (a name, an index, or several 0/1 columns for multi-label: a,b,c)")


def _texts(df, col: str, path: Path) -> list[str]:
    texts = df[col].tolist()
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise DataError(f"{path}: {len(bad)} row(s) have an empty or non-text {col!r} "
                        f"(first at data row {bad[0] + 1})")
    return [t.strip() for t in texts]


def frame_to_raw(df, path: Path, text_col: Optional[str], label_col: Optional[str],
                  like: Optional[RawSplit] = None) -> RawSplit:
    """Texts (and pairs) and raw labels; ``like`` = the train split, whose columns the eval split must have."""
    if like is not None:
        missing = [c for c in like.text_columns + like.label_columns if c not in df.columns]
        if missing:
            raise DataError(f"{path}: no column {missing[0]!r}, which the train split uses "
                            f"(columns here: {', '.join(df.columns)}); every split needs the same columns")
        text_cols, label_cols = like.text_columns, like.label_columns
    else:
        text_cols = _pick_text(df, text_col, path)
        label_cols = _pick_label(df, label_col, path, exclude=text_cols)
        unused = [c for c in df.columns if c not in text_cols + label_cols and _is_texty(df, c)]
        if len(text_cols) == 1 and unused:
            log.warning("%s: column %r also looks like text and is not used; for sentence pairs pass "
                        "--text-column %s,%s", path, unused[0], text_cols[0], unused[0])
    texts = _texts(df, text_cols[0], path)
    pairs = _texts(df, text_cols[1], path) if len(text_cols) == 2 else None
    if len(label_cols) > 1:  # several 0/1 columns: multi-label in column order
        labels = [list(row) for row in df[list(label_cols)].itertuples(index=False)]
    else:
        labels = df[label_cols[0]].tolist()
    return RawSplit(texts, labels, pairs, tuple(text_cols), tuple(label_cols))


