"""predict.py's run(cfg): score INPUT locally, chunk by chunk (bounded memory), or hand it to a
SageMaker Batch Transform job (``--sagemaker-instance-type``)."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from .. import artifacts
from ..cli import StageResult, print_config
from .config import PredictConfig

log = logging.getLogger("bertopt.predict")


def output_path(cfg: PredictConfig) -> Path:
    return Path(cfg.output) if cfg.output else artifacts.predictions_path(cfg.reports_dir, cfg.input)


def _bad_rows_note(bad: list) -> str:
    shown = ", ".join(f"{row} ({why})" for row, why in bad[:10])
    return f"{len(bad)} bad row(s) skipped: {shown}" + (f" (+{len(bad) - 10} more)" if len(bad) > 10 else "")


def score_file(cfg: PredictConfig, scorer, dest: Path) -> dict:
    """Read, score and write chunk by chunk; the output appears complete or not at all."""
    from ..logs import progress
    from .files import InputReader, Writer, count_rows
    from .scoring import answer

    reader = InputReader(cfg.input, rows=cfg.chunk_rows, text_column=cfg.text_column,
                         trained_columns=scorer.text_columns, pairs=scorer.pairs, id_column=cfg.id_column,
                         no_header=cfg.no_header, on_error=cfg.on_error)
    writer = Writer(dest)
    start, n = time.perf_counter(), 0
    try:
        with progress(desc=f"predict {scorer.variant}", unit="texts", total=count_rows(cfg.input)) as bar:
            for chunk in reader:
                if chunk.texts:
                    rows = scorer.scores(chunk.texts, chunk.pairs)
                    writer.write([{"id": i, **answer(r, scorer)} for i, r in zip(chunk.ids, rows)])
                n += len(chunk.texts)
                bar.update(len(chunk.texts))
        writer.commit()
    except BaseException:
        writer.discard()
        raise
    seconds = time.perf_counter() - start
    if reader.bad:
        log.warning("%s", _bad_rows_note(reader.bad))
    return {"rows": n, "seconds": round(seconds, 3), "texts_per_s": round(n / seconds, 1) if seconds else None,
            "bad_rows": [row for row, _ in reader.bad]}


def run(cfg: PredictConfig) -> StageResult:
    start = time.perf_counter()
    print_config("predict", cfg)
    dest = output_path(cfg)
    if cfg.remote:
        from ..aws.jobs.transform import run_transform

        stats = run_transform(cfg, dest)
        if cfg.detach:
            return StageResult("predict", "detached", time.perf_counter() - start, f"transform job {stats['job']}")
    else:
        from ..errors import DataError
        from .scoring import open_scorer

        if not Path(cfg.input).is_file():
            raise DataError(f"input file not found: {cfg.input}")

        stats = score_file(cfg, open_scorer(cfg), dest)
    rate = f", {stats['texts_per_s']} texts/s" if stats.get("texts_per_s") else ""
    skipped = f", {len(stats['bad_rows'])} bad row(s) skipped" if stats.get("bad_rows") else ""
    log.info("wrote %s: %d predictions%s%s", dest, stats["rows"], rate, skipped)
    return StageResult("predict", "ok", time.perf_counter() - start, f"{stats['rows']} rows -> {dest}{rate}{skipped}",
                       str(dest), details=stats)
