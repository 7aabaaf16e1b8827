"""Scoring texts with one variant: the model the user chose (compare's recommendation by default,
resolved like the endpoint's through :mod:`bertopt.aws.choice`), its task, labels and long-text
strategy from the training manifest, and the answer rows predict.py writes.

:func:`run_batches` is the one place that runs a chunk's length-grouped batches through the
predictor: one call at a time, or N at once where compare measured that mode faster for the row
(:mod:`bertopt.throughput`)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np

from .. import artifacts, tasks
from ..errors import PipelineError

log = logging.getLogger("bertopt.predict")

DEFAULT_BATCH = 32


@dataclass
class Scorer:
    """A tokenizer + predictor + what the training manifest says about the task."""

    predictor: object
    tokenizer: object
    variant: str
    label_names: list
    task: str = tasks.CLASSIFICATION
    max_length: int = 128
    long_text: str = "truncate"
    stride: Optional[int] = None
    threshold: float = 0.5
    pairs: bool = False
    text_columns: list = field(default_factory=list)
    batch: int = DEFAULT_BATCH
    origin: str = ""
    streams: int = 1

    @property
    def with_tt(self) -> bool:
        return "token_type_ids" in tuple(getattr(self.predictor, "input_names", ()) or ())

    def scores(self, texts: list, pairs: Optional[list] = None) -> np.ndarray:
        """One row per text: softmax probabilities, sigmoid scores (multi-label) or the value (regression)."""
        from .. import data

        ids, owners = data.encode(texts, self.tokenizer, self.max_length, pairs,
                                  self.long_text if pairs is None else "truncate", self.stride)
        sep = self.tokenizer.sep_token_id if pairs is not None else None
        batches = [(group, data.pad_batch([ids[i] for i in group], self.tokenizer.pad_token_id or 0, self.with_tt,
                                          sep_id=sep)) for group in batch_groups([len(s) for s in ids], self.batch)]
        logits = run_batches(self.predictor, batches, len(ids), self.streams)
        return to_scores(tasks.aggregate(logits, owners, self.task), self.task)


def batch_groups(lengths: list, batch: int) -> list[list[int]]:
    """compare's and the handler's length grouping (:func:`bertopt.data.length_groups`), each run cut
    to at most ``batch`` texts."""
    from ..data import length_groups

    return [g[i:i + batch] for g in length_groups(lengths) for i in range(0, len(g), batch)]


def run_batches(predictor, batches: list, n: int, streams: int = 1) -> np.ndarray:
    """Logits of every (indices, padded batch), placed at their indices; ``streams`` > 1 runs that many
    batches at once (the predictor must be opened for it)."""
    from ..throughput import map_batches

    out = None
    outputs = map_batches(lambda b: predictor.predict_logits(b[1]), batches, streams)
    for (idx, _), raw in zip(batches, outputs):
        logits = np.asarray(raw, dtype=np.float64)
        if out is None:
            out = np.empty((n, logits.shape[1]), dtype=np.float64)
        out[idx] = logits
    return out if out is not None else np.empty((0, 1))


def to_scores(logits: np.ndarray, task: str) -> np.ndarray:
    if task == tasks.REGRESSION:
        return logits
    if task == tasks.MULTI_LABEL:
        return 1.0 / (1.0 + np.exp(-logits))
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def answer(row: np.ndarray, scorer: Scorer) -> dict:
    """One text's answer (without its id): label + score + every label's score; the multi-label set at
    the threshold; the regression value."""
    names = scorer.label_names
    if scorer.task == tasks.REGRESSION:
        return {"value": round(float(row[0]), 6)}
    scores = {names[k] if k < len(names) else f"LABEL_{k}": round(float(p), 6) for k, p in enumerate(row)}
    if scorer.task == tasks.MULTI_LABEL:
        return {"labels": [n for n, p in scores.items() if p >= scorer.threshold], "threshold": scorer.threshold,
                "scores": scores}
    k = int(np.argmax(row))
    return {"label": list(scores)[k], "score": round(float(row[k]), 6), "scores": scores}


# ----------------------------------------------------------------------------- loading
def _training_record(output_dir: str, source: Optional[str]) -> dict:
    """The ``data`` record and metrics of the trained stage a variant comes from."""
    if source not in artifacts.TRAINED_STAGES:
        return {}
    manifest = artifacts.read_manifest(artifacts.stage_dir(output_dir, source)) or {}
    return {**(manifest.get("data") or {}), "_metrics": manifest.get("metrics") or {}}


def _threshold(record: dict) -> float:
    for value in (record.get("threshold"), (record.get("_metrics") or {}).get("threshold")):
        if isinstance(value, (int, float)):
            return float(value)
    return 0.5


def _row_run(cfg, variant: str) -> tuple[int, int]:
    """compare's measured end-to-end batch size and stream count for this row (results.json), else
    the defaults; ``BERTOPT_STREAMS`` overrides the stream count."""
    import json
    import os

    from ..throughput import STREAMS_ENV, host_streams

    path = artifacts.results_path(cfg.reports_dir)
    try:
        rows = json.loads(path.read_text(encoding="utf-8")).get("variants") or []
    except (OSError, ValueError):
        rows = []
    row = next((r for r in rows if r.get("name") == variant), None) or {}
    value = (row.get("throughput") or {}).get("batch_size")
    batch = int(value) if isinstance(value, int) and value > 0 else DEFAULT_BATCH
    streams = int(((row.get("throughput") or {}).get("mode") or {}).get("streams") or 1)
    if os.environ.get(STREAMS_ENV):
        streams = host_streams(1)[0]
    return batch, streams


def choose(cfg, gpu: bool = False):
    """The :class:`bertopt.aws.choice.ModelChoice` of ``--variant`` or compare's recommendation (``gpu``:
    for a GPU transform instance)."""
    from ..aws.choice import resolve_model

    ns = SimpleNamespace(model_path=None, variant=cfg.variant, output_dir=cfg.output_dir,
                         reports_dir=cfg.reports_dir, max_length=cfg.max_length, gpu=gpu, local=True, batching=True)
    return resolve_model(ns)


def scorer_info(cfg, choice) -> Scorer:
    """The chosen variant's task, labels, columns and threshold, without loading it (Batch Transform)."""
    record = _training_record(cfg.output_dir, choice.source)
    return Scorer(None, None, choice.variant, list(record.get("label_names") or choice.label_names),
                  record.get("task") or tasks.CLASSIFICATION, choice.max_length, record.get("long_text") or "truncate",
                  record.get("stride"), _threshold(record), bool(record.get("pairs")),
                  list(record.get("text_columns") or []), cfg.batch or DEFAULT_BATCH, choice.origin)


def open_scorer(cfg, choice=None) -> Scorer:
    """Load the chosen variant's predictor and tokenizer (``choice``: already resolved)."""
    from .. import modeling, runtimes, variants

    choice = choice or choose(cfg)
    if choice.backend == "torch":
        predictor = runtimes.TorchPredictor(str(choice.path), name=choice.variant, threads=cfg.threads)
    else:
        spec = variants.REGISTRY.get(choice.variant)
        if spec is None:
            raise PipelineError(f"{choice.variant}: not a registered variant (see bertopt/variants.py)")
        predictor = None
    batch, streams = _row_run(cfg, choice.variant)
    if predictor is None:
        from ..throughput import open_streams, streams_refusal

        streams = streams if streams > 1 and not streams_refusal(spec.backend) else 1
        predictor = (open_streams(spec, Path(choice.path), streams, name=choice.variant) if streams > 1 else
                     runtimes.open_predictor(spec, Path(choice.path), threads=cfg.threads, device="cpu"))
    else:
        streams = 1
    scorer = scorer_info(cfg, choice)
    scorer.predictor, scorer.tokenizer = predictor, modeling.load_tokenizer(str(choice.model_dir))
    scorer.batch, scorer.streams = cfg.batch or batch, streams
    log.info("scoring with %s (%s, %s; %s): task %s, labels %s, max length %d, long text %s, batches of <= %d, %s",
             scorer.variant, choice.backend, choice.precision, choice.origin, scorer.task, scorer.label_names,
             scorer.max_length, scorer.long_text, scorer.batch,
             f"{streams} at once (compare's faster mode for this row)" if streams > 1 else "one call at a time")
    return scorer
