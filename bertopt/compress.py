"""The automatic compression search (``prune.py --auto`` / ``main.py --compress auto``).

Candidate shapes are depth x attention heads x FFN width (:func:`grid`). Each is timed on this host
with one forward pass of a batch shaped like the data (:func:`time_shapes`, no training: the
weights do not change the time), and the list is ordered fastest first. :func:`search` then fine-tunes
and scores shapes through a caller's ``evaluate(shape) -> metric`` (KD under a time budget, scored
on a split carved from train) and keeps the fastest one within the budget of the unpruned model's
metric. It bisects the speed-ordered list (a faster shape is assumed to score no better than a
slower one), so N shapes cost about log2(N) fine-tunes; every shape it tried is recorded."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

log = logging.getLogger("bertopt.compress")


@dataclass(frozen=True)
class Shape:
    layers: int
    heads: int
    ffn: int

    def label(self) -> str:
        return f"{self.layers}L/{self.heads}H/{self.ffn}F"


def grid(layers: int, heads: int, ffn: int, min_layers: Optional[int] = None, width: bool = True) -> list[Shape]:
    """Every smaller shape: depth from ``layers`` down to ``min_layers`` (default half, at least 1),
    heads at 1, 3/4 and 1/2 of the count, FFN width at 1, 3/4, 1/2 and 1/4 (``width`` False: depth
    only). The unpruned shape is not a candidate."""
    low = max(1, min_layers if min_layers is not None else math.ceil(layers / 2))
    depths = range(layers, low - 1, -1)
    head_opts = sorted({heads, max(1, round(heads * 3 / 4)), max(1, heads // 2)}, reverse=True) if width else [heads]
    ffn_opts = sorted({ffn, max(1, ffn * 3 // 4), max(1, ffn // 2), max(1, ffn // 4)}, reverse=True) if width \
        else [ffn]
    full = Shape(layers, heads, ffn)
    return [s for s in (Shape(d, h, f) for d in depths for h in head_opts for f in ffn_opts) if s != full]


def time_forward(model, batch: dict, repeats: int = 5) -> float:
    """Fastest of ``repeats`` timed forwards (seconds) after one warm-up: the least disturbed by
    other load on the host."""
    import torch

    model.eval()
    best = float("inf")
    with torch.inference_mode():
        model(**batch)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(**batch)
            best = min(best, time.perf_counter() - t0)
    return best


def time_shapes(model, shapes: Sequence[Shape], batch: dict, build: Callable[[object, Shape], object],
                repeats: int = 5) -> dict[Shape, dict]:
    """{shape: {"forward_s", "parameters"}} for each shape built from ``model`` by ``build(model, shape)``
    (any heads / neurons: only the sizes matter for the time)."""
    from .logs import progress

    out = {}
    for s in progress(shapes, desc="timing shapes", unit="shape"):
        m = build(model, s)
        out[s] = {"forward_s": time_forward(m, batch, repeats), "parameters": sum(p.numel() for p in m.parameters())}
        del m
    return out


@dataclass
class Tried:
    shape: Shape
    parameters: int
    forward_ms: float
    speedup: float  # unpruned forward time / this shape's
    metric: float
    drop: float  # unpruned metric - this shape's (fraction)
    within_budget: bool
    time_s: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = self.shape.label()
        d.update(layers=self.shape.layers, heads=self.shape.heads, ffn=self.shape.ffn)
        return d


def search(ordered: Sequence[Shape], timings: dict, base_forward_s: float, base_metric: float, budget: float,
           evaluate: Callable[[Shape], float], max_tries: int,
           deadline: Optional[float] = None) -> tuple[Optional[Shape], list[Tried]]:
    """(the fastest shape found within ``budget`` of ``base_metric`` or None, every shape tried).
    ``ordered`` is fastest first; bisection keeps [lo, hi) as the shapes still possible."""
    lo, hi, best, tried = 0, len(ordered), None, []
    while lo < hi and len(tried) < max_tries and (deadline is None or time.perf_counter() < deadline):
        mid = (lo + hi) // 2
        s = ordered[mid]
        t0 = time.perf_counter()
        metric = float(evaluate(s))
        drop = base_metric - metric
        ok = drop <= budget + 1e-12
        fwd = timings[s]["forward_s"]
        tried.append(Tried(s, timings[s]["parameters"], round(1000 * fwd, 3), round(base_forward_s / fwd, 3),
                           metric, drop, ok, round(time.perf_counter() - t0, 2)))
        log.info("shape %s (%.2fx faster forward): metric %.4f, %+.2f points vs unpruned -> %s", s.label(),
                 base_forward_s / fwd, metric, -100 * drop, "within budget" if ok else "over budget")
        if ok:
            best, hi = s, mid
        else:
            lo = mid + 1
    return best, tried
