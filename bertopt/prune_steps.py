"""Pruning steps the prune stage and its compression search share: loaders over (paired) text,
stratified subsets, width pruning by importance over training rows, and the distilled re-fine-tune."""
from __future__ import annotations

import logging
import time

from .config import PruneConfig

log = logging.getLogger("bertopt.prune_steps")


class Loaders:
    """Builds loaders over TextData (sentence pairs included) with the source model's conventions."""

    def __init__(self, cfg: PruneConfig, tokenizer, model, device):
        from . import modeling

        self.cfg, self.tokenizer = cfg, tokenizer
        self.with_tt = modeling.uses_token_type_ids(model)
        cuda = device.type == "cuda"
        self.workers = cfg.num_workers if cfg.num_workers is not None else (2 if cuda else 0)
        self.pin = cfg.pin_memory if cfg.pin_memory is not None else cuda

    def __call__(self, data, batch_size: int, shuffle: bool):
        """(dataset, loader)."""
        from . import data as data_mod

        ds = data_mod.EncodedDataset(data_mod.tokenize(data.texts, self.tokenizer, self.cfg.max_length, data.pairs),
                                     data.labels)
        return ds, data_mod.make_loader(ds, batch_size, shuffle=shuffle, seed=self.cfg.seed,
                                        pad_id=self.tokenizer.pad_token_id or 0, with_token_type_ids=self.with_tt,
                                        num_workers=self.workers, pin_memory=self.pin)


def subset(data, n: int, seed: int):
    """A stratified ``n``-row TextData of ``data`` (all of it when smaller)."""
    from . import data as data_mod

    if not n or n >= len(data):
        return data
    idx = data_mod.stratified_indices(data.labels, n, seed)
    return data_mod.TextData([data.texts[i] for i in idx], [data.labels[i] for i in idx],
                             [data.pairs[i] for i in idx] if data.pairs is not None else None)


def width_prune(model, heads, ffn, train_data, loaders: Loaders, spec, device, seed: int):
    """(``model`` with ``heads`` heads and ``ffn`` FFN neurons per layer, the importance record).
    Importance from gradients over up to --importance-rows training rows (not the reported split)."""
    import torch

    from . import tasks, width

    h0, w0 = width.num_heads(model), width.ffn_width(model)
    heads, ffn = heads or h0, ffn or w0
    if heads == h0 and ffn == w0:
        return model, {}
    rows = subset(train_data, loaders.cfg.importance_rows, seed + 3)
    _, loader = loaders(rows, loaders.cfg.eval_batch_size, False)
    loss = tasks.task_loss(spec) or (lambda lg, y, inputs=None: torch.nn.functional.cross_entropy(lg, y))
    t0 = time.perf_counter()
    imp = width.importance(model, loader, device, lambda lg, y: loss(lg, y))
    row = width.spec(model)
    hk = width.keep_indices(imp["heads"], heads, shared=bool(row.shared_heads))
    nk = width.keep_indices(imp["neurons"], ffn)
    pruned = width.shrink(model, hk if heads < h0 else None, nk if ffn < w0 else None)
    record = {"split": "train", "rows": len(rows), "heads_before": h0, "heads_after": heads, "ffn_before": w0,
              "ffn_after": ffn, "kept_heads": hk, "head_importance": imp["heads"],
              "head_selection": "shared across layers: " + row.shared_heads if row.shared_heads else "per layer",
              "auto_loadable": width.auto_loadable(pruned), "time_s": round(time.perf_counter() - t0, 3)}
    log.info("width: heads %d -> %d, FFN %d -> %d per layer (importance over %d train rows)%s", h0, heads, w0, ffn,
             len(rows), "" if record["auto_loadable"] else "; fewer heads than transformers' config can describe: "
             "the saved model loads through bertopt (modeling.load_model), its ONNX export is the deliverable")
    return pruned, record


def refinetune(cfg: PruneConfig, pruned, teacher, train_loader, eval_loader, spec, device, plan):
    """The shared loop; distilling from ``teacher`` (the unpruned model) unless --no-distill."""
    from . import pruning, training

    loss_fn = None
    if cfg.distill:
        loss_fn = pruning.DistillLoss(teacher, cfg.distill_temperature, cfg.distill_alpha)
        log.info("distilling from the unpruned model: alpha %.2f x KD (T=%.1f) + %.2f x task loss",
                 cfg.distill_alpha, cfg.distill_temperature, 1 - cfg.distill_alpha)
    training.seed_everything(cfg.seed)
    return training.train(pruned, train_loader, eval_loader, cfg, device, plan, loss_fn=loss_fn, spec=spec)
