"""``--compress auto`` inside the prune stage: the held-out search split, the candidate shapes timed on
this host, and the KD fine-tune + score of each shape the bisection (:func:`bertopt.compress.search`)
asks for.

The search split is carved from the train file, never the reported eval split: rows the baseline
was not trained on (its ``--max-train-samples`` subset left them out) where there are enough, else a
stratified slice of train that the candidates then do not train on (the record says which)."""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Optional

from . import artifacts
from .config import PruneConfig

log = logging.getLogger("bertopt.prune_search")

MIN_UNSEEN = 200  # unseen train rows needed to search on them instead of a slice of the training rows
TIMING_ROWS = 16
TIMING_REPEATS = 3


@dataclass
class Found:
    model: object  # the chosen, fine-tuned model; None = no smaller shape met the budget
    info: dict
    trained: dict
    record: dict
    reason: str = ""


def _key(data, i):
    return (data.texts[i], data.pairs[i] if data.pairs is not None else None)


def search_split(cfg: PruneConfig, splits, src_manifest) -> tuple[object, object, str]:
    """(search rows, the training rows the candidates use, how the search rows were chosen)."""
    from . import data as data_mod
    from .prune_steps import subset

    base = (src_manifest or {}).get("config") or {}
    full = data_mod.load_splits_for(cfg.to_dict(), max_train_samples=None, max_eval_samples=1,
                                    no_header=cfg.no_header or bool(base.get("no_header")),
                                    task=cfg.task or base.get("task")).train
    used = set(range(len(full)))
    if base.get("max_train_samples"):
        used = set(data_mod.stratified_indices(full.labels, int(base["max_train_samples"]), int(base.get("seed", 42))))
    unseen = [i for i in range(len(full)) if i not in used]
    if len(unseen) >= MIN_UNSEEN:
        pool = data_mod.TextData([full.texts[i] for i in unseen], [full.labels[i] for i in unseen],
                                 [full.pairs[i] for i in unseen] if full.pairs is not None else None)
        how = f"train rows the baseline did not train on ({len(unseen)} of {len(full)})"
    else:
        pool = splits.train
        how = ("a stratified slice of train (every train row was in the baseline's training set; the candidates "
               "do not train on it)")
    rows = subset(pool, cfg.search_rows, cfg.seed + 5)
    held = {_key(rows, i) for i in range(len(rows))}
    keep = [i for i in range(len(splits.train)) if _key(splits.train, i) not in held]
    t = splits.train
    train = data_mod.TextData([t.texts[i] for i in keep], [t.labels[i] for i in keep],
                              [t.pairs[i] for i in keep] if t.pairs is not None else None)
    return rows, train, how


def _quick_shape(model, shape, depth: int):
    """Any model of ``shape`` (last layers dropped, first heads / neurons kept): only for timing."""
    from . import pruning, width

    m = pruning.remove_layers(model, list(range(shape.layers, depth))) if shape.layers < depth else copy.deepcopy(model)
    if width.spec(m) and not width.unsupported_reason(m):
        n = len(width.blocks(m))
        m = width.shrink(m, [list(range(shape.heads))] * n, [list(range(shape.ffn))] * n, copy_model=False)
    return m


def _depth_order(cfg, model, depth: int, min_layers: int, rows, loaders, device) -> list[int]:
    """Original layer indices in greedy removal order (re-scored after each removal)."""
    from . import pruning
    from .prune_steps import subset

    if min_layers >= depth:
        return []
    _, loader = loaders(subset(rows, cfg.sensitivity_samples or 500, cfg.seed), cfg.eval_batch_size, False)
    return pruning.greedy_prune(model, depth - min_layers,
                                lambda m: pruning.layer_sensitivity(m, loader, device, cfg.method)).removed


def _timing_batch(loader):
    batch = next(iter(loader))
    return {k: v for k, v in batch.items() if k not in ("labels", "index")}


def _budget_rows(cfg, fwd_s: float, teacher_s: float, timing_rows: int, available: int) -> int:
    """Training rows one KD epoch can cover in --time-budget: a step costs about a forward and a
    backward of the student (3 forwards) plus the teacher's forward, scaled from the timing batch."""
    per_row = (3 * fwd_s + teacher_s) / max(timing_rows, 1)
    rows = int(cfg.time_budget / per_row) if per_row > 0 else available
    return max(min(rows, available), min(4 * cfg.batch_size, available))


class _Fitter:
    """evaluate(shape) for the search: prune the source to the shape (depth by the greedy order,
    width by importance), KD fine-tune on a time-budgeted slice of train, score on the search split;
    the best model within the budget so far is kept."""

    def __init__(self, cfg, model, train, search_loader, loaders, spec, device, plan, order, timings, teacher_s,
                 timing_rows, base_metric):
        self.__dict__.update(cfg=cfg, model=model, train=train, search_loader=search_loader, loaders=loaders,
                             spec=spec, device=device, plan=plan, order=order, timings=timings, teacher_s=teacher_s,
                             timing_rows=timing_rows, base_metric=base_metric)
        self.kept, self.details = None, {}

    def __call__(self, shape) -> float:
        from . import families, modeling, pruning, training
        from .prune_steps import refinetune, subset, width_prune

        n = families.depth(self.model)
        drop = self.order[: n - shape.layers]
        cand = pruning.remove_layers(self.model, drop) if drop else copy.deepcopy(self.model)
        for p in cand.parameters():  # the teacher (the source) was frozen by the first distillation
            p.requires_grad_(True)
        record = {}
        if shape.heads:  # 0 = a family without width pruning: depth only
            cand, record = width_prune(cand, shape.heads, shape.ffn, self.train, self.loaders, self.spec,
                                       self.device, self.cfg.seed)
        rows = _budget_rows(self.cfg, self.timings[shape]["forward_s"], self.teacher_s, self.timing_rows,
                            len(self.train))
        _, loader = self.loaders(subset(self.train, rows, self.cfg.seed + 7), self.cfg.batch_size, True)
        cfg = modeling.resolve_lr(dataclasses.replace(self.cfg, epochs=1, eval_every=0, early_stopping_patience=0),
                                  cand)
        trained = refinetune(cfg, cand, self.model, loader, self.search_loader, self.spec, self.device, self.plan)
        ev = training.evaluate(cand, self.search_loader, self.device, spec=self.spec, desc=f"search {shape.label()}")
        metric = ev.get("metric", ev.get("accuracy"))
        self.details[shape] = {"train_rows": rows, "removed_layers": sorted(drop)}
        if self.base_metric - metric <= self.cfg.search_accuracy_budget + 1e-12:
            self.kept = (shape, cand, trained.metrics, dict(record, removed_layers=sorted(drop), train_rows=rows))
        return metric


def run(cfg: PruneConfig, model, splits, loaders, spec, device, plan, src_manifest, directory) -> Found:
    """Search the shapes; write search.json; the chosen model (fine-tuned) or None with the reason."""
    from . import compress, families, training, width
    from .prune_steps import subset

    t0 = time.perf_counter()
    rows, train, how = search_split(cfg, splits, src_manifest)
    _, search_loader = loaders(rows, cfg.eval_batch_size, False)
    base = training.evaluate(model, search_loader, device, spec=spec, desc="search split, unpruned")
    base_metric = base.get("metric", base.get("accuracy"))
    log.info("search split: %d rows, %s; unpruned %s %.4f; budget %.2f points", len(rows), how, spec.metric,
             base_metric, 100 * cfg.search_accuracy_budget)
    depth = families.depth(model)
    why_not_width = width.unsupported_reason(model) if width.spec(model) else "no width layout for this family"
    if why_not_width:
        log.warning("width pruning not possible (%s); searching depth only", why_not_width)
    h0, w0 = (0, 0) if why_not_width else (width.num_heads(model), width.ffn_width(model))
    shapes = compress.grid(depth, h0, w0, width=not why_not_width)
    _, tl = loaders(subset_rows(rows, TIMING_ROWS), TIMING_ROWS, False)
    batch = {k: v.to(device) for k, v in _timing_batch(tl).items()}
    base_s = compress.time_forward(model, batch, TIMING_REPEATS)
    timings = compress.time_shapes(model, shapes, batch, lambda m, s: _quick_shape(m, s, depth), TIMING_REPEATS)
    ordered = sorted((s for s in shapes if timings[s]["forward_s"] < base_s), key=lambda s: timings[s]["forward_s"])
    min_layers = min((s.layers for s in ordered), default=depth)
    order = _depth_order(cfg, model, depth, min_layers, rows, loaders, device)
    fit = _Fitter(cfg, model, train, search_loader, loaders, spec, device, plan, order, timings, base_s,
                  len(batch["input_ids"]), base_metric)
    chosen, tried = compress.search(ordered, timings, base_s, base_metric, cfg.search_accuracy_budget, fit,
                                    cfg.max_candidates)
    record = {"split": how, "search_rows": len(rows), "metric": spec.metric, "unpruned_search_metric": base_metric,
              "budget": cfg.search_accuracy_budget, "time_budget_s": cfg.time_budget,
              "unpruned": {"shape": compress.Shape(depth, h0, w0).label(),
                           "forward_ms": round(1000 * base_s, 3), "parameters": sum(p.numel() for p in model.parameters())},
              "speed": f"forward time of one {len(batch['input_ids'])}-row batch on this host (fastest of {TIMING_REPEATS}), "
                       "no training",
              "shapes_timed": [{"shape": s.label(), "forward_ms": round(1000 * timings[s]["forward_s"], 3),
                                "parameters": timings[s]["parameters"]} for s in ordered],
              "depth_order": order, "tried": [dict(t.to_dict(), **fit.details.get(t.shape, {})) for t in tried],
              "chosen": chosen.label() if chosen else None, "search_time_s": round(time.perf_counter() - t0, 1)}
    artifacts.atomic_write_json(directory / artifacts.SEARCH_FILE, record)
    if chosen is None:
        return Found(None, {}, {}, record, f"no smaller shape met the budget ({100 * cfg.search_accuracy_budget:.1f} "
                     f"points of {spec.metric} on the search split) in {len(tried)} tried; the unpruned model is kept")
    shape, cand, trained, wrec = fit.kept
    artifacts.atomic_write_json(directory / artifacts.WIDTH_FILE, wrec)
    info = {"removed_layers": wrec["removed_layers"], "shape": shape.label()}
    log.info("chosen %s: %.2fx faster forward, search time %.0fs", shape.label(),
             base_s / timings[shape]["forward_s"], record["search_time_s"])
    return Found(cand, info, trained, record)


def subset_rows(data, n: int):
    from . import data as data_mod

    return data_mod.TextData(data.texts[:n], data.labels[:n], data.pairs[:n] if data.pairs is not None else None)
