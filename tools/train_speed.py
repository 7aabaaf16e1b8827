"""Training speed, side by side in one process on the same rows: the plain Hugging Face loop a
user would write vs bertopt's loop and its variants (--variants; see VARIANTS). Same model init,
same seed, same length-grouped batch order, same schedule and clipping; dev accuracy on the full
eval split after each.

The plain loop: AdamW(model.parameters()), batch 32, dynamic padding of length-sorted chunks,
tokenizing each batch in the loop, FP32. Per-phase shares (tokenize, forward, backward, clip,
optimizer) say where the CPU time goes; forward + backward is work every loop pays, so
1 / (the plain loop's forward + backward share) bounds what a faster optimizer path can reach.
``bound-frozen-word-emb`` measures the most any word-embedding row trick could save.

    flock -x /tmp/bertopt-cpu.lock python tools/train_speed.py --rows 1000 --out /tmp/speed.json \
        --variants plain,bertopt,bertopt-forloop,bertopt-bf16,bound-frozen-word-emb
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def plain_hf_loop(model, texts, labels, tokenizer, sampler, cfg) -> dict:
    import torch
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = len(sampler)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * steps), steps)
    phases = dict.fromkeys(("tokenize", "forward", "backward", "clip", "optimizer"), 0.0)
    model.train()
    samples, start = 0, time.perf_counter()
    for batch in sampler:
        t0 = time.perf_counter()
        enc = tokenizer([texts[i] for i in batch], padding=True, truncation=True, max_length=cfg.max_length,
                        return_tensors="pt")
        y = torch.tensor([labels[i] for i in batch])
        t1 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(**enc).logits, y)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        t4 = time.perf_counter()
        opt.step()
        sched.step()
        opt.zero_grad()
        t5 = time.perf_counter()
        for k, a, b in (("tokenize", t0, t1), ("forward", t1, t2), ("backward", t2, t3), ("clip", t3, t4),
                        ("optimizer", t4, t5)):
            phases[k] += b - a
        samples += len(batch)
    wall = time.perf_counter() - start
    return {"samples_per_s": samples / wall, "train_time_s": wall,
            "phase_share": {k: round(v / wall, 3) for k, v in phases.items()}}


@contextlib.contextmanager
def _timed(owner, name, when=lambda: True):
    """Accumulate the seconds spent in ``owner.name`` (calls where ``when()`` holds) while the block runs."""
    orig, total = getattr(owner, name), [0.0]

    def wrapper(*a, **k):
        if not when():
            return orig(*a, **k)
        t0 = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            total[0] += time.perf_counter() - t0

    setattr(owner, name, wrapper)
    try:
        yield total
    finally:
        setattr(owner, name, orig)


VARIANTS = {
    "bertopt": "the default loop (fused AdamW)",
    "bertopt-forloop": "the default loop with torch's for-loop AdamW (as before issue 16)",
    "bertopt-bf16": "mixed_precision.py's loop: bf16 autocast, fp32 master weights (what --precision amp "
                    "picks where bf16 measures faster here); not bit-identical to fp32",
    "bertopt-compile": "torch.compile(model, dynamic=True) (inductor), compile time included",
    "bound-frozen-word-emb": "NOT a training config: word embeddings frozen, the most any embedding-row "
                             "trick (sparse/lazy update) could save",
}


def bertopt_loop(name, model, train_ds, eval_loader, tok, cfg, training, data) -> dict:
    import torch

    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; known: plain, {', '.join(VARIANTS)}")
    device = torch.device("cpu")
    plan = training.resolve_precision("bf16" if name == "bertopt-bf16" else "fp32", device)
    training.OPTIMIZER_IMPL = "for-loop" if name == "bertopt-forloop" else "fused"
    if name == "bound-frozen-word-emb":
        model.get_input_embeddings().weight.requires_grad_(False)
    run_model = torch.compile(model, dynamic=True) if name == "bertopt-compile" else model
    loader = data.make_loader(train_ds, cfg.batch_size, shuffle=True, seed=cfg.seed, pad_id=tok.pad_token_id,
                              with_token_type_ids=True)
    with _timed(torch.optim.AdamW, "step") as opt_s, _timed(torch.nn.utils, "clip_grad_norm_") as clip_s, \
            _timed(torch.Tensor, "backward") as bwd_s, \
            (contextlib.nullcontext([float("nan")]) if run_model is not model else _timed(model, "forward", lambda: model.training)) as fwd_s:
        m = training.train(run_model, loader, eval_loader, cfg, device, plan).metrics
    wall = m["train_time_s"]
    return {"samples_per_s": m["samples_per_s"], "train_time_s": wall,
            "phase_share": {"forward": round(fwd_s[0] / wall, 3), "backward": round(bwd_s[0] / wall, 3),
                            "clip": round(clip_s[0] / wall, 3), "optimizer": round(opt_s[0] / wall, 3)}}


def main() -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out", default=None)
    p.add_argument("--variants", default="plain,bertopt",
                   help="comma list of plain, " + ", ".join(f"{k} ({v})" for k, v in VARIANTS.items()))
    args = p.parse_args()

    import torch

    from bertopt import data, modeling, training
    from bertopt.config import TrainConfig

    cfg = TrainConfig(max_train_samples=args.rows, epochs=1, device="cpu", quiet=True, data_dir=args.data_dir)
    splits = data.load_splits(cfg.dataset, cfg.data_dir, max_train_samples=cfg.max_train_samples, seed=cfg.seed)
    tok = modeling.load_tokenizer(cfg.model)
    t0 = time.perf_counter()
    train_ds = data.EncodedDataset(data.tokenize(splits.train.texts, tok, cfg.max_length), splits.train.labels)
    tokenize_once_s = time.perf_counter() - t0
    eval_ds = data.EncodedDataset(data.tokenize(splits.eval.texts, tok, cfg.max_length), splits.eval.labels)
    eval_loader = data.make_loader(eval_ds, cfg.eval_batch_size, shuffle=False, seed=0, pad_id=tok.pad_token_id,
                                   with_token_type_ids=True)
    device, plan = torch.device("cpu"), training.resolve_precision("fp32", torch.device("cpu"))
    results = {"rows": args.rows, "threads": torch.get_num_threads(), "tokenize_once_s": round(tokenize_once_s, 3),
               "variants": {}}
    for name in args.variants.split(","):
        training.seed_everything(cfg.seed)
        model = modeling.load_model(cfg.model, splits.num_labels, splits.label_names)
        cfg = modeling.resolve_lr(cfg, model)
        sampler = data.LengthGroupedBatchSampler(train_ds.lengths, cfg.batch_size, seed=cfg.seed)
        sampler.set_epoch(0)
        if name == "plain":
            row = plain_hf_loop(model, splits.train.texts, splits.train.labels, tok, sampler, cfg)
        else:
            row = bertopt_loop(name, model, train_ds, eval_loader, tok, cfg, training, data)
        eval_plan = training.resolve_precision("bf16", device) if name == "bertopt-bf16" else plan
        row["dev_accuracy"] = training.evaluate(model, eval_loader, device, eval_plan)["accuracy"]
        results["variants"][name] = row
        print(name, json.dumps(row), flush=True)
    base = results["variants"].get("plain")
    if base:
        for row in results["variants"].values():
            row["speedup_vs_plain"] = round(row["samples_per_s"] / base["samples_per_s"], 3)
            row["accuracy_delta_pts"] = round(100 * (row["dev_accuracy"] - base["dev_accuracy"]), 2)
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
