"""Throughput mode in compare's end-to-end pass: every row that has one (ONNX Runtime, OpenVINO
on the CPU) is timed both ways in the same interleaved rounds, one call at a time and N
single-threaded calls at once (:mod:`bertopt.throughput`); its end-to-end figure is the faster of
the two, and the row says which it is (``e2e_mode``). Both modes run the same batches, so their
predictions must be equal: a difference is recorded, not hidden. Batch-1 latency keeps its
one-call measurement."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .. import throughput
from ..errors import PipelineError

log = logging.getLogger("bertopt.compare")

TAG = "@streams"  # the interleaved runner's task name of a row's throughput mode


@dataclass
class StreamPlan:
    n: int                                        # concurrent calls per stream row
    why: str                                      # how n was chosen
    preds: dict = field(default_factory=dict)     # row -> predictor opened for n streams
    refused: dict = field(default_factory=dict)   # row -> why it has no throughput mode

    def record(self) -> dict:
        """results.json's ``protocol.streams``."""
        return {"n": self.n, "chosen_by": self.why, "rows": sorted(self.preds), "refused": dict(self.refused)}


def open_stream_predictors(rows, threads: int) -> StreamPlan:
    """The rows' throughput-mode predictors (``rows``: compare's live rows)."""
    n, why = throughput.host_streams(threads)
    plan = StreamPlan(n, why)
    for v in rows:
        reason = ("the padded reference is the seed's loop as it was written" if v.batching == "padded"
                  else throughput.streams_refusal(v.backend, v.device))
        if n <= 1:
            reason = f"one stream here ({why})"
        if reason:
            plan.refused[v.name] = reason
            continue
        try:
            plan.preds[v.name] = throughput.open_streams(v.registry, v.path, n, name=v.name)
        except PipelineError as exc:
            plan.refused[v.name] = f"cannot open for {n} streams: {exc}"
            log.warning("%s: %s", v.name, plan.refused[v.name])
    if plan.preds:
        log.info("throughput mode: %d single-threaded calls at once (%s) for %s", n, why, ", ".join(plan.preds))
    return plan


def choose(times: dict, predictions: dict, plan: StreamPlan) -> dict:
    """Each row's ``e2e_mode`` from both modes' timed passes; ``times`` and ``predictions`` keep
    only the chosen mode's entries under the row's name (the stream entries are removed)."""
    modes = {}
    for name in [k for k in times if not k.endswith(TAG)]:
        one = times.get(name) or []
        streamed = times.pop(name + TAG, None)
        streamed_pred = predictions.pop(name + TAG, None)
        if streamed is None:
            modes[name] = {"mode": "one call", "streams": 1,
                           "reason": plan.refused.get(name, "no throughput-mode pass was timed")}
            continue
        same = streamed_pred is None or name not in predictions or bool(
            np.array_equal(np.asarray(predictions[name]), np.asarray(streamed_pred)))
        one_s, streamed_s = _median(one), _median(streamed)
        faster = streamed_s is not None and (one_s is None or streamed_s < one_s)
        modes[name] = {"mode": "streams" if faster else "one call", "streams": plan.n if faster else 1,
                       "one_call_median_s": one_s, "streams_median_s": streamed_s,
                       "streams_speedup": round(one_s / streamed_s, 3) if one_s and streamed_s else None,
                       "same_predictions": same}
        if not same:
            log.warning("%s: %d streams predicted differently from one call at a time", name, plan.n)
        if faster:
            times[name] = streamed
    return modes


def _median(values) -> Optional[float]:
    return float(np.median(values)) if values else None
