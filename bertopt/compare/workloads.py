"""The workloads compare times: texts in, labels out (padded reference or length-sorted dynamic
batches), single requests with and without tokenization, and the latency task the interleaved
runner calls once per round."""
from __future__ import annotations

import time
from typing import Optional

import numpy as np


def _inputs_for(predictor, batch: dict) -> dict:
    names = getattr(predictor, "input_names", None)
    return {k: v for k, v in batch.items() if k in names} if names else batch


def _run_batches(predictor, batches: list, streams: int):
    """Each batch's logits, in order; ``streams`` > 1 runs that many calls at once
    (:mod:`bertopt.throughput`; the predictor must be opened for it)."""
    from ..throughput import map_batches

    return map_batches(lambda b: predictor.predict_logits(_inputs_for(predictor, b)), batches, streams)


def classify_texts(predictor, tokenizer, texts, *, batch_size: int, max_length: int, with_tt: bool,
                   pad_to: Optional[int] = None, pairs=None, long_text: str = "truncate", stride=None,
                   task: Optional[str] = None, streams: int = 1) -> np.ndarray:
    """Texts in, label ids out (tokenization included). ``pad_to`` set = the naive reference:
    batches in data order, every input padded to ``pad_to``. Otherwise length-sorted batches
    with dynamic padding, predictions returned in input order; ``streams`` > 1 runs that many of
    them at once (throughput mode), with the same batches and so the same predictions.

    Sentence ``pairs`` and ``long_text`` head-tail/chunk (windows aggregated per text) go through
    :func:`text_scores`; a ``task`` (not plain accuracy-scored classification) returns each text's
    logits (regression: values) instead of label ids."""
    from ..data import pad_batch, tokenize

    if task is not None or pairs is not None or long_text != "truncate":
        scores = text_scores(predictor, tokenizer, texts, batch_size=batch_size, max_length=max_length,
                             with_tt=with_tt, pad_to=pad_to, pairs=pairs, long_text=long_text, stride=stride,
                             task=task, streams=streams)
        return scores if task is not None else scores.argmax(-1)
    n = len(texts)
    preds = np.empty(n, dtype=np.int64)
    if pad_to:
        for start in range(0, n, batch_size):
            enc = tokenizer(list(texts[start:start + batch_size]), padding="max_length", truncation=True,
                            max_length=pad_to, return_tensors="np", return_token_type_ids=with_tt)
            batch = {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}
            preds[start:start + batch_size] = predictor.predict_logits(_inputs_for(predictor, batch)).argmax(-1)
        return preds
    ids = tokenize(texts, tokenizer, max_length)
    order = np.argsort([-len(s) for s in ids], kind="stable")
    pad_id = tokenizer.pad_token_id or 0
    idxs = [order[start:start + batch_size] for start in range(0, n, batch_size)]
    batches = [pad_batch([ids[i] for i in idx], pad_id, with_tt) for idx in idxs]
    for idx, logits in zip(idxs, _run_batches(predictor, batches, streams)):
        preds[idx] = logits.argmax(-1)
    return preds


def text_scores(predictor, tokenizer, texts, *, batch_size: int, max_length: int, with_tt: bool,
                pad_to: Optional[int] = None, pairs=None, long_text: str = "truncate", stride=None,
                task: Optional[str] = None, streams: int = 1) -> np.ndarray:
    """Per-text logits for pairs and long-text strategies (chunk windows: mean, max for multi-label)."""
    from ..data import encode, pad_batch
    from ..metrics import aggregate

    ids, owners = encode(texts, tokenizer, max_length, pairs, long_text, stride)
    order = np.arange(len(ids)) if pad_to else np.argsort([-len(s) for s in ids], kind="stable")
    pad_id, sep = tokenizer.pad_token_id or 0, tokenizer.sep_token_id if pairs is not None else None
    out = None
    idxs = [order[start:start + batch_size] for start in range(0, len(ids), batch_size)]
    batches = [pad_batch([ids[i] for i in idx], pad_id, with_tt, pad_to=pad_to, sep_id=sep) for idx in idxs]
    for idx, raw in zip(idxs, _run_batches(predictor, batches, streams)):
        logits = np.asarray(raw, dtype=np.float64)
        if out is None:
            out = np.empty((len(ids), logits.shape[1]), dtype=np.float64)
        out[idx] = logits
    return aggregate(out, owners, task or "classification")


def single_request(predictor, tokenizer, text: str, *, max_length: int, with_tt: bool,
                   pad_to: Optional[int] = None, clock=time.perf_counter) -> tuple[float, float]:
    """One request at batch 1: (end-to-end seconds incl. tokenization, model-only seconds); ``text``
    may be a (text, text_pair) tuple."""
    from ..data import pad_batch

    t0 = clock()
    ids = tokenizer(*(text if isinstance(text, tuple) else (text,)), truncation=True, max_length=max_length, return_attention_mask=False,
                    return_token_type_ids=False)["input_ids"]
    batch = _inputs_for(predictor, pad_batch([ids], tokenizer.pad_token_id or 0, with_tt, pad_to=pad_to))
    t1 = clock()
    logits = predictor.predict_logits(batch)
    t2 = clock()
    int(logits.argmax(-1)[0])
    return clock() - t0, t2 - t1


class LatencyTask:
    """Called once per round by the interleaved runner: the first ``warmup`` calls serve the
    warm-up requests (unrecorded), recorded call r serves chunk r of the requests (after one
    untimed primer request), timing each request on its own."""

    def __init__(self, fn, warm_texts, chunks, warmup: int):
        self.fn, self.warm_texts, self.chunks, self.warmup = fn, warm_texts, chunks, warmup
        self.calls, self.e2e, self.model, self.round_p50 = 0, [], [], []
        self.first: list = []  # end-to-end seconds of each request the first time it was served (before the rounds)

    def __call__(self):
        i = self.calls
        self.calls += 1
        if i < self.warmup:
            for t in self.warm_texts:
                self.fn(t)
            return
        chunk = self.chunks[i - self.warmup]
        self.fn(chunk[0])  # untimed primer: wakes this runtime's threads after the variant switch
        e2e, model = [], []
        for t in chunk:
            total, m = self.fn(t)
            e2e.append(total)
            model.append(m)
        self._last = (len(e2e), self.calls)
        self.e2e += e2e
        self.model += model
        self.round_p50.append(float(np.median(e2e)))

    def discard_last(self):
        """The runner discarded this round (the machine was disturbed): forget it and serve the
        same chunk again next time."""
        n, calls = getattr(self, "_last", (0, None))
        if calls is None or calls != self.calls:
            return
        del self.e2e[-n:], self.model[-n:], self.round_p50[-1:]
        self.calls -= 1
        self._last = (0, None)
