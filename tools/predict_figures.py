#!/usr/bin/env python
"""predict.py's acceptance figures: SST-2 dev scored with a variant (default: compare's recommendation),
its accuracy and texts/s next to compare's row for the same variant, and the peak RSS of scoring a
100,000-row file built (in a temp dir) by repeating the dev rows. Each run is a fresh predict.py
process; RSS is sampled with psutil every 20 ms (the process and its children).

  python tools/predict_figures.py [--variant NAME] [--rows 100000] [--chunk-rows 10000]"""
import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT / "data" / "sst2" / "dev.tsv"


def run(args: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, output) of one predict.py process."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "predict.py"), *args, "--quiet"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]))
        except psutil.Error:
            pass
        time.sleep(0.02)
    out = proc.stdout.read()
    if proc.returncode:
        sys.exit(f"predict.py failed:\n{out}")
    return time.perf_counter() - start, peak, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant")
    ap.add_argument("--rows", type=int, default=100000)
    ap.add_argument("--chunk-rows", type=int, default=10000)
    a = ap.parse_args()
    extra = ["--variant", a.variant] if a.variant else []
    with open(DEV, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wall, peak, out = run([str(DEV), "--output", str(tmp / "dev.csv"), *extra])
        with open(tmp / "dev.csv", newline="") as fh:
            pred = list(csv.DictReader(fh))
        names = json.loads((ROOT / "saved_models" / "baseline" / "labels.json").read_text())
        acc = sum(names.index(p["label"]) == int(r["label"]) for p, r in zip(pred, rows)) / len(rows)
        rate = next((line.split("texts/s")[0].rsplit(",", 1)[1].strip() for line in out.splitlines()
                     if "texts/s" in line and "[predict]" in line), "?")
        print(f"SST-2 dev ({len(rows)} rows): accuracy {acc:.4f}, {rate} texts/s (scoring loop), "
              f"{wall:.1f} s wall, peak RSS {peak / 2**20:.0f} MiB")
        results = ROOT / "reports" / "results.json"
        if results.is_file():
            r = json.loads(results.read_text())
            name = a.variant or r["recommendation"]["variant"]
            row = next((v for v in r["variants"] if v["name"] == name), None)
            if row:
                print(f"compare's {name}: accuracy {row.get('accuracy')}, end-to-end "
                      f"{row['throughput']['samples_per_s']['median']:.1f} texts/s at batch "
                      f"{row['throughput']['batch_size']}")
        big = tmp / "big.tsv"
        with open(big, "w", encoding="utf-8") as fh:
            fh.write("sentence\tlabel\n")
            for i in range(a.rows):
                r = rows[i % len(rows)]
                fh.write(f"{r['sentence']}\t{r['label']}\n")
        wall, peak, out = run([str(big), "--output", str(tmp / "big.csv"), "--chunk-rows", str(a.chunk_rows), *extra])
        n = sum(1 for _ in open(tmp / "big.csv")) - 1
        print(f"{a.rows:,}-row file: {n:,} predictions in {wall:.1f} s, peak RSS {peak / 2**20:.0f} MiB "
              f"(--chunk-rows {a.chunk_rows})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
