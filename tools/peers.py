#!/usr/bin/env python
"""bertopt against the peers a user would try instead, on the same fine-tuned model.

Each entry runs in its own process (nothing else's thread pools, arenas or spinning threads in it),
and the processes take turns: round r asks each in turn, from a rotating start, for one timed pass
over the eval set (texts in, label ids out, tokenization included), while the others wait idle on a
pipe. The entries:

- ``eager-padded``: the seed's loop, PyTorch FP32, every input padded to 128, batch 16;
- ``ov-default``: plain OpenVINO, ``convert_model(model.onnx)`` + ``compile_model`` with its default
  config (on a CPU with native bf16 that is bf16);
- ``ov-nncf-int8``: OpenVINO + NNCF post-training INT8 (``model_type=TRANSFORMER``, 300 training texts);
- ``ort-dynamic-int8``: ONNX Runtime dynamic INT8 with Optimum's settings for this CPU
  (``AutoQuantizationConfig.avx512_vnni`` / ``avx2`` reproduced with ``onnxruntime.quantization``:
  QOperator MatMulInteger, u8 asymmetric activations, symmetric per-channel weights, s8 on VNNI and
  u8 on AVX2, full range), default session;
- ``bertopt:<row>``: the pipeline's recommended variant from reports/results.json (and any ``--rows``)
  opened and run exactly as compare ran it: its batch size, threads and end-to-end mode (one call or
  N streams); its figure is printed next to compare's own for the same row.

The peers use length-sorted batches of 32 with dynamic padding, the same loop as compare's rows
(``bertopt.compare.workloads.classify_texts``), and each runtime's own thread defaults.

    python tools/peers.py [--output-dir saved_models] [--reports-dir reports] [--rounds 5] [--rows ov-int8,ort-int8]

Prints one table and writes reports/peers.json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEERS = ("eager-padded", "ov-default", "ov-nncf-int8", "ort-dynamic-int8")
PEER_BATCH, CALIBRATION_TEXTS = 32, 300


# ----------------------------------------------------------------------------- the data and the model
def eval_setup(output_dir: Path) -> dict:
    """Eval texts/labels, 300 calibration texts and the model paths, as compare reads them."""
    import numpy as np

    from bertopt import artifacts
    from bertopt import data as data_mod

    base = artifacts.stage_dir(output_dir, "baseline")
    trained = artifacts.require_manifest(base, "baseline").get("config") or {}
    dcfg = {k: trained.get(k) for k in ("dataset", "data_dir", "text_column", "label_column", "max_length",
                                         "seed", "max_eval_samples")}
    splits = data_mod.load_splits_for(dcfg, max_train_samples=None, no_header=trained.get("no_header"),
                                      task=trained.get("task"))
    if splits.eval.pairs is not None:
        raise SystemExit("error: tools/peers.py measures single-text classifiers (this data set has pairs)")
    rng = np.random.default_rng(int(dcfg.get("seed") or 42))
    pick = rng.permutation(len(splits.train.texts))[:CALIBRATION_TEXTS]
    return {"texts": list(splits.eval.texts), "labels": [int(x) for x in splits.eval.labels],
            "calibration": [splits.train.texts[i] for i in pick], "max_length": int(dcfg.get("max_length") or 128),
            "baseline_dir": str(base), "onnx": str(artifacts.stage_dir(output_dir, "onnx") / "baseline" / "model.onnx"),
            "source": str(splits.source)}


class _OvModel:
    """A compiled OpenVINO model with the predictor interface classify_texts calls."""

    def __init__(self, compiled):
        self.compiled, self.request = compiled, compiled.create_infer_request()
        self.input_names = tuple(i.get_any_name() for i in compiled.inputs)

    def predict_logits(self, batch):
        import numpy as np

        return np.array(self.request.infer({n: batch[n] for n in self.input_names})[self.compiled.outputs[0]])


def _feeds(tokenizer, texts, max_length, names):
    from bertopt.data import pad_batch, tokenize

    ids = tokenize(texts, tokenizer, max_length)
    batches = [pad_batch(ids[i:i + PEER_BATCH], tokenizer.pad_token_id or 0, "token_type_ids" in names)
               for i in range(0, len(ids), PEER_BATCH)]
    return [{k: v for k, v in b.items() if k in names} for b in batches]


def open_entry(entry: str, setup: dict, tokenizer, workdir: Path):
    """(predictor, classify_texts keyword arguments, facts) of one entry."""
    if entry == "eager-padded":
        from bertopt.runtimes import TorchPredictor

        return TorchPredictor(setup["baseline_dir"]), {"batch_size": 16, "pad_to": 128}, {"what": "PyTorch FP32, padded to 128, batch 16"}
    if entry in ("ov-default", "ov-nncf-int8"):
        import openvino as ov

        model = ov.convert_model(setup["onnx"])
        if entry == "ov-nncf-int8":
            import nncf

            names = [i.get_any_name() for i in model.inputs]
            data = nncf.Dataset(_feeds(tokenizer, setup["calibration"], setup["max_length"], names))
            model = nncf.quantize(model, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=CALIBRATION_TEXTS)
        compiled = ov.Core().compile_model(model, "CPU")
        prec = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        return _OvModel(compiled), {"batch_size": PEER_BATCH}, {"what": f"OpenVINO default compile ({prec})"}
    if entry == "ort-dynamic-int8":
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from bertopt.precision import cpu_flags

        vnni = bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})
        dst = workdir / "model.dynamic-int8.onnx"
        quantize_dynamic(setup["onnx"], str(dst), per_channel=True, reduce_range=False,
                         weight_type=QuantType.QInt8 if vnni else QuantType.QUInt8,
                         extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        from bertopt.runtimes import OrtPredictor

        return OrtPredictor(dst, name=entry, precision="int8"), {"batch_size": PEER_BATCH}, {
            "what": f"ONNX Runtime dynamic INT8, Optimum's {'avx512_vnni' if vnni else 'avx2'} settings"}
    return _open_pipeline_row(entry.split(":", 1)[1], setup)


def _open_pipeline_row(name: str, setup: dict):
    from bertopt import throughput
    from bertopt.results import get
    from bertopt.runtimes import open_predictor

    row = setup["rows"][name]
    mode = get(row, "throughput", "mode") or {}
    n = int(mode.get("streams") or 1)
    pred = (throughput.open_streams(row["registry"], row["path"], n, name=name) if n > 1 else
            open_predictor(row["registry"], row["path"], threads=row.get("threads"), name=name))
    kw = {"batch_size": int(get(row, "throughput", "batch_size")), "streams": n}
    return pred, kw, {"what": f"bertopt {name} as compare ran it (batch {kw['batch_size']}, "
                              f"{'%d streams' % n if n > 1 else 'one call at a time'})",
                      "compare_texts_per_s": get(row, "throughput", "samples_per_s", "median")}


# ----------------------------------------------------------------------------- one process per entry
def worker(conn, entry: str, setup: dict) -> None:
    import numpy as np

    from bertopt.compare.workloads import classify_texts
    from bertopt.modeling import load_tokenizer, uses_token_type_ids

    try:
        tok = load_tokenizer(setup["baseline_dir"])
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            pred, kw, facts = open_entry(entry, setup, tok, Path(tmp))
            facts["prepare_s"] = round(time.perf_counter() - t0, 1)
            from transformers import AutoConfig

            kw.update(max_length=setup["max_length"], with_tt=uses_token_type_ids(AutoConfig.from_pretrained(setup["baseline_dir"])))
            labels = np.asarray(setup["labels"])
            y = classify_texts(pred, tok, setup["texts"], **kw)  # warm: every shape once
            facts["accuracy"] = float((y == labels).mean())
            conn.send(("ready", facts))
            while conn.recv() == "go":
                t0 = time.perf_counter()
                classify_texts(pred, tok, setup["texts"], **kw)
                conn.send(("pass", time.perf_counter() - t0))
    except Exception as exc:  # report, don't hang the others
        conn.send(("error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))


def measure(entries: list[str], setup: dict, rounds: int, settle_s: float) -> dict:
    ctx = mp.get_context("spawn")
    procs = {}
    for e in entries:  # built one after another: preparing (NNCF, quantizing) must not overlap timing
        parent, child = ctx.Pipe()
        p = ctx.Process(target=worker, args=(child, e, setup), daemon=True)
        p.start()
        kind, facts = parent.recv()
        print(f"  {e}: {'ready' if kind == 'ready' else 'FAILED'} {facts if kind != 'ready' else facts['what']}", flush=True)
        if kind == "ready":
            procs[e] = (p, parent, facts, [])
    names = list(procs)
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            time.sleep(settle_s)
            procs[name][1].send("go")
            kind, secs = procs[name][1].recv()
            procs[name][3].append(secs)
        print(f"  round {r + 1}/{rounds} done", flush=True)
    for p, conn, _, _ in procs.values():
        conn.send("stop")
        p.join(timeout=30)
    return {name: {**facts, "pass_s": times} for name, (_, _, facts, times) in procs.items()}


# ----------------------------------------------------------------------------- report
def table(results: dict, n_texts: int, baseline_acc) -> tuple[str, dict]:
    import numpy as np

    rate = {k: n_texts / float(np.median(v["pass_s"])) for k, v in results.items()}
    eager = rate.get("eager-padded")
    peers = [k for k in rate if k in PEERS and k != "eager-padded"]
    best = max(peers, key=rate.get) if peers else None
    lines = ["| entry | e2e texts/s (min–max) | × padded eager | × best peer | acc | Δ vs FP32 | compare's figure |",
             "|---|---|---|---|---|---|---|"]
    for k, v in sorted(results.items(), key=lambda kv: -rate[kv[0]]):
        lo, hi = n_texts / max(v["pass_s"]), n_texts / min(v["pass_s"])
        comp = v.get("compare_texts_per_s")
        lines.append(f"| {k} ({v['what']}) | {rate[k]:,.1f} ({lo:,.1f}–{hi:,.1f}) | "
                     f"{rate[k] / eager:.1f} | {rate[k] / rate[best]:.2f} | {v['accuracy']:.4f} | "
                     f"{100 * (v['accuracy'] - baseline_acc):+.2f} | "
                     + (f"{comp:,.1f} (alone/compare {rate[k] / comp:.3f})" if comp else "–") + " |")
    summary = {"texts_per_s": rate, "best_peer": best}
    return "\n".join(lines), summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output-dir", default="saved_models")
    ap.add_argument("--reports-dir", default="reports")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--settle", type=float, default=0.5, help="idle seconds before each timed pass (default 0.5)")
    ap.add_argument("--rows", default="", help="more compare rows to run alone (comma list), e.g. ov-int8,ort-int8")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"which peers (default: {','.join(PEERS)})")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        print("error: --rounds must be >= 1", file=sys.stderr)
        return 1
    from bertopt import artifacts, results
    from bertopt.errors import PipelineError

    try:
        res = results.load(artifacts.results_path(args.reports_dir))
        setup = eval_setup(Path(args.output_dir))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    setup["rows"] = {r["name"]: r for r in res["variants"] if r["status"] == "ok"}
    rec = (res.get("recommendation") or {}).get("variant")
    rows = [rec] * bool(rec) + [r.strip() for r in args.rows.split(",") if r.strip() and r.strip() != rec]
    bad = [r for r in rows if r not in setup["rows"]]
    unknown = [p for p in args.peers.split(",") if p and p not in PEERS]
    if bad or unknown:
        print(f"error: not measured rows of results.json: {bad or '-'}; unknown peers: {unknown or '-'}", file=sys.stderr)
        return 1
    entries = [p for p in args.peers.split(",") if p] + [f"bertopt:{r}" for r in rows]
    from bertopt.artifacts import environment

    env = environment()
    print(f"peers on {env.get('cpu')} ({os.cpu_count()} CPUs), {datetime.now(timezone.utc):%Y-%m-%d}, "
          f"{len(setup['texts'])} texts of {setup['source']}; {args.rounds} rounds", flush=True)
    measured = measure(entries, setup, args.rounds, args.settle)
    text, summary = table(measured, len(setup["texts"]), res.get("baseline_accuracy") or 0.0)
    print(text)
    out = {"created": datetime.now(timezone.utc).isoformat(), "environment": env, "rounds": args.rounds,
           "texts": len(setup["texts"]), "data": setup["source"], "recommended": rec, "entries": measured, **summary}
    artifacts.atomic_write_json(Path(args.reports_dir) / "peers.json", out)
    if rec and summary["best_peer"] and f"bertopt:{rec}" in summary["texts_per_s"]:
        ratio = summary["texts_per_s"][f"bertopt:{rec}"] / summary["texts_per_s"][summary["best_peer"]]
        print(f"recommended {rec}: {ratio:.2f}x the best peer ({summary['best_peer']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
