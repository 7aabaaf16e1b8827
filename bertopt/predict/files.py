"""predict.py's input and output files: chunked reading of CSV/TSV/JSONL/Parquet with the training
column detection (pairs included), bad-row checks by row number, and the predictions writer (CSV or
JSON Lines, written to a temp file and renamed when complete)."""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from .. import tables
from ..errors import DataError, first_line

log = logging.getLogger("bertopt.predict")

ID_CANDIDATES = ("id", "idx", "guid", "index")


@dataclass
class Chunk:
    """Rows ``start`` .. ``start + len(ids) - 1`` (0-based data rows) of the input."""

    start: int
    ids: list
    texts: list
    pairs: Optional[list]


def _frames(path: Path, rows: int, header) -> Iterator:
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        kw = dict(sep="\t", quoting=csv.QUOTE_NONE) if suffix == ".tsv" else {}
        yield from pd.read_csv(path, keep_default_na=False, dtype=str, encoding="utf-8-sig", header=header,
                               chunksize=rows, **kw)
    elif suffix == ".jsonl":
        yield from pd.read_json(path, lines=True, dtype=False, chunksize=rows)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=rows):
            yield batch.to_pandas()
    elif suffix == ".json":
        df = pd.read_json(path, dtype=False)
        for i in range(0, len(df), rows):
            yield df.iloc[i:i + rows]
    else:
        raise DataError(f"unsupported input file type {suffix!r} ({path}); use one of {', '.join(tables.SUFFIXES)}")


def _header(path: Path, no_header: bool):
    """None (no header row: columns 0..N-1) or 'infer', as :func:`bertopt.tables.read_table` decides."""
    if path.suffix.lower() not in (".csv", ".tsv"):
        return "infer"
    if no_header:
        return None
    first = next(_frames(path, 50, "infer"), None)
    why = tables.header_looks_like_data(first.columns) if first is not None else None
    if why:
        log.warning("%s: the first row looks like data, not a header (%s): reading it as headerless", path, why)
        return None
    return "infer"


class InputReader:
    """Chunks of an input file; the columns are picked on the first chunk (``text_column`` flag, else the
    training manifest's ``text_columns`` where the file has them, else training's detection)."""

    def __init__(self, path, *, rows: int, text_column=None, trained_columns=(), pairs: bool = False,
                 id_column=None, no_header: bool = False, on_error: str = "fail"):
        self.path, self.rows, self.on_error = Path(path), int(rows), on_error
        if not self.path.is_file():
            raise DataError(f"input file not found: {self.path}")
        self.text_column, self.trained, self.pairs = text_column, [str(c) for c in trained_columns or ()], pairs
        self.id_column, self.no_header = id_column, no_header
        self.columns: tuple = ()
        self.id_col: Optional[str] = None
        self.bad: list[tuple[int, str]] = []  # (1-based data row, why)

    def _pick(self, df) -> None:
        cols = [str(c) for c in df.columns]
        if self.text_column:
            self.columns = tables.pick_text_columns(df, self.text_column, self.path)
        elif self.trained and all(c in cols for c in self.trained):
            self.columns = tuple(self.trained)
        else:
            self.columns = tables.pick_text_columns(df, None, self.path)
        if self.pairs and len(self.columns) != 2:
            raise DataError(f"{self.path}: the model was trained on sentence pairs ({' + '.join(self.trained)}), "
                            f"but only the text column {self.columns[0]!r} was found; pass --text-column A,B")
        if not self.pairs and len(self.columns) == 2:
            log.warning("%s: %s look like a sentence pair, but the model was trained on single texts: scoring %r",
                        self.path, " + ".join(self.columns), self.columns[0])
            self.columns = self.columns[:1]
        if self.id_column:
            if self.id_column not in cols:
                raise DataError(f"{self.path}: no --id-column {self.id_column!r} (columns: {', '.join(cols)})")
            self.id_col = self.id_column
        else:
            lower = {c.lower(): c for c in cols}
            self.id_col = next((lower[c] for c in ID_CANDIDATES if c in lower and lower[c] not in self.columns), None)
        log.info("%s: text column(s) %s, row id %s", self.path, " + ".join(self.columns),
                 repr(self.id_col) if self.id_col else "the row number")

    def _check(self, value, column: str, row: int) -> Optional[str]:
        if value is None or (isinstance(value, float) and value != value):
            return f"missing {column!r}"
        if not isinstance(value, str) or not value.strip():
            return f"empty {column!r}"
        return None

    def _chunk(self, df, start: int) -> Chunk:
        if not self.columns:
            self._pick(df)
        missing = [c for c in self.columns if c not in df.columns]
        if missing:
            raise DataError(f"{self.path}: no column {missing[0]!r} after data row {start}")
        ids, texts, pairs = [], [], [] if len(self.columns) == 2 else None
        firsts = df[self.columns[0]].tolist()
        seconds = df[self.columns[1]].tolist() if pairs is not None else [None] * len(firsts)
        keys = df[self.id_col].tolist() if self.id_col else range(start, start + len(firsts))
        for k, (key, a, b) in enumerate(zip(keys, firsts, seconds)):
            why = self._check(a, self.columns[0], start + k + 1)
            if why is None and pairs is not None:
                why = self._check(b, self.columns[1], start + k + 1)
            if why:
                if self.on_error == "fail":
                    raise DataError(f"{self.path}: data row {start + k + 1}: {why} (--on-error skip leaves bad rows "
                                    "out and lists them)")
                self.bad.append((start + k + 1, why))
                continue
            ids.append(key.item() if hasattr(key, "item") else key)
            texts.append(a.strip())
            if pairs is not None:
                pairs.append(b.strip())
        return Chunk(start, ids, texts, pairs)

    def __iter__(self) -> Iterator[Chunk]:
        start = 0
        try:
            for df in _frames(self.path, self.rows, _header(self.path, self.no_header)):
                df.columns = [str(c) for c in df.columns]
                yield self._chunk(df, start)
                start += len(df)
        except DataError:
            raise
        except (UnicodeDecodeError, ValueError, OSError) as exc:
            raise DataError(f"cannot read {self.path} after data row {start}: {first_line(exc)}") from None
        self.total = start


def count_rows(path) -> Optional[int]:
    """Data rows of the input for the progress bar (lines, minus a header), or None when unknown."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        if suffix not in (".csv", ".tsv", ".jsonl"):
            return None
        with open(path, "rb") as fh:
            lines = sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 20), b""))
        return max(0, lines - (0 if suffix == ".jsonl" else 1))
    except (OSError, ValueError, Exception):  # only a progress hint: never fail the run for it
        return None


def flat(record: dict) -> dict:
    """One CSV row of an answer: nested scores become score_<label> columns, a label set 'a;b'."""
    out = {}
    for key, value in record.items():
        if key == "scores":
            out.update({f"score_{name}": v for name, v in value.items()})
        elif isinstance(value, list):
            out[key] = ";".join(map(str, value))
        else:
            out[key] = value
    return out


class Writer:
    """Predictions in input order, to ``path``.tmp, renamed over ``path`` by :meth:`commit`."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.jsonl = self.path.suffix.lower() == ".jsonl"
        self.fh = open(self.tmp, "w", encoding="utf-8", newline="")
        self.csv: Optional[csv.DictWriter] = None
        self.rows = 0

    def write(self, records: list[dict]) -> None:
        for r in records:
            if self.jsonl:
                self.fh.write(json.dumps(r) + "\n")
                continue
            row = flat(r)
            if self.csv is None:
                self.csv = csv.DictWriter(self.fh, fieldnames=list(row))
                self.csv.writeheader()
            self.csv.writerow(row)
        self.rows += len(records)

    def commit(self) -> None:
        self.fh.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)
