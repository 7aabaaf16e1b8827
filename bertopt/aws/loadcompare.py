"""``python -m bertopt.aws.loadtest --compare``: per-request serving against micro-batching, one run.

Starts the local endpoint (``aws_deploy.py --local``, a separate process on 127.0.0.1, so the load
generator's Python threads do not share the server's interpreter) from the same model, first with
``--no-batching`` and then with micro-batching; sweeps each with the open-loop generator; then offers
the batching server twice the per-request server's best rate, to compare p99 at that load. Writes
``reports/loadtest.json`` (atomically) for compare.py's report.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .. import artifacts
from . import instances
from .loadtest import SENTENCES, _line, open_loop, passes, sweep

SCHEMA = "bertopt.loadtest/2"  # /2: model_only as each server runs the model; cpu_ms_per_request
ROOT = Path(__file__).resolve().parents[2]
MODES = {"per-request": ["--no-batching"], "micro-batching": []}
_URL = re.compile(r"on (http://127\.0\.0\.1:\d+)")


class LocalServer:
    """``aws_deploy.py --local --port 0`` in a child process; ``url`` once it serves."""

    def __init__(self, model_path: str, extra: list, workdir: str, timeout: float = 180.0):
        cmd = [sys.executable, str(ROOT / "aws_deploy.py"), "--local", "--host", "127.0.0.1", "--port", "0",
               "--model-path", model_path, "--output-dir", workdir, "--quiet", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        deadline, lines = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                break
            lines.append(line)
            m = _URL.search(line)
            if m:
                self.url = m.group(1)
                # keep reading its output so a full pipe never blocks the server
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()
                return
        self.stop()
        raise RuntimeError("the local endpoint did not start:\n" + "".join(lines[-20:]))

    def cpu_seconds(self) -> float:
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _measure(model_path: str, mode: str, args, workdir: str, check_rate: float | None = None) -> dict:
    from ..benchmarking import CpuShare

    server, texts = LocalServer(model_path, MODES[mode], os.path.join(workdir, mode)), _texts(args)
    try:
        warm = open_loop(server.url, 100, 2.0, args.clients, texts=texts)  # loads the session, fills the caches
        print(f"{mode}: warm-up {warm['ok']}/{warm['requests']} ok; sweep (p99 target {args.p99_target_ms} ms)",
              file=sys.stderr, flush=True)
        share, cpu0, gen0 = CpuShare(), server.cpu_seconds(), time.process_time()
        result = sweep(server.url, clients=args.clients, p99_target_ms=args.p99_target_ms,
                       seconds=args.seconds or 4.0, start_rate=args.start_rate,
                       progress=lambda s: print(_line(s), file=sys.stderr, flush=True), texts=texts)
        if check_rate:
            step = open_loop(server.url, check_rate, args.seconds or 4.0, args.clients, texts=texts)
            step["passed"] = passes(step, args.p99_target_ms)
            print(f"{mode} at 2x the per-request rate:\n{_line(step)}", file=sys.stderr, flush=True)
            result["at_2x_per_request"] = step
        elapsed, server_cpu = time.perf_counter() - share.start[0], server.cpu_seconds() - cpu0
        server_share = server_cpu / (elapsed * (os.cpu_count() or 1))
        result["other_cpu_share"] = round(max(0.0, share.others() - server_share), 3)
        result["cpu_ms_per_request"] = _cpu_per_request(result, server_cpu, time.process_time() - gen0)
    finally:
        server.stop()
    return result


def _cpu_per_request(result: dict, server_cpu: float, generator_cpu: float) -> dict:
    """CPU milliseconds per answered request over the whole sweep, in the server process and in the
    load generator (this process). Both come out of the same vCPUs, so ``bound_rps`` = ``vcpus *
    1000 / (server + generator)`` is the requests/s those vCPUs allow at that average cost (idle
    time counts for nothing; batched requests get cheaper as the load, and so the batches, grow)."""
    done = sum(s["ok"] for s in result["steps"]) + result.get("at_2x_per_request", {}).get("ok", 0)
    if not done:
        return {}
    server, generator = 1000 * server_cpu / done, 1000 * generator_cpu / done
    return {"server": round(server, 3), "load_generator": round(generator, 3),
            "bound_rps": round(instances.local_vcpus() * 1000 / (server + generator), 1)}


def _texts(args) -> list:
    return getattr(args, "text_list", None) or list(SENTENCES)


def model_ceiling(model_path: str, batch: int, seconds: float = 1.5, texts=SENTENCES) -> dict:
    """The bare model's texts/s (no HTTP, no JSON) on the load test's sentences, run the way each
    server runs it (:func:`instances.thread_plan`): per request, batch 1 on as many concurrent runs
    as the plan has vCPUs for; micro-batching, batches of ``batch`` on the plan's batch runners. The
    ratio is the most micro-batching can gain over per-request serving, whatever the HTTP side costs."""
    from .. import modeling, runtimes

    openvino = str(model_path).endswith(".xml")
    if not (openvino or str(model_path).endswith(".onnx")):
        return {"skipped": "the model-only ceiling is measured for .onnx models and OpenVINO IR"}
    vcpus = instances.local_vcpus()
    per, batched = instances.thread_plan(vcpus, batching=False), instances.thread_plan(vcpus, batching=True)
    tokenizer = modeling.load_tokenizer(str(Path(model_path).parent))
    out = {"seconds_each": seconds}
    for key, plan, b in (("per_request", per, 1), ("micro_batching", batched, batch)):
        runs = plan.concurrent_runs
        predictor = (runtimes.OpenVinoPredictor(model_path, threads=plan.model_threads, streams=runs) if openvino
                     else runtimes.OrtPredictor(model_path, intra_op_threads=plan.model_threads))
        out[key] = {"batch": b, "concurrent_runs": runs, "threads_per_run": plan.model_threads,
                    "texts_per_s": _texts_per_s(predictor, tokenizer, b, runs, seconds, texts)}
    out["ratio"] = round(out["micro_batching"]["texts_per_s"] / out["per_request"]["texts_per_s"], 2)
    return out


def _feeds(predictor, tokenizer, batch: int, texts) -> list:
    """The load test's texts in arrival order, cut into batches of ``batch`` and each batch into the
    runs the handler makes of it (:func:`data.length_groups`, each padded to its longest): at most
    512 texts, cycled up to one whole batch."""
    from .. import data

    pool = [texts[i % len(texts)] for i in range(min(512, max(len(texts), batch)))]
    tt, pad = "token_type_ids" in predictor.input_names, tokenizer.pad_token_id or 0
    feeds = []
    for i in range(0, len(pool) - batch + 1, batch):
        seqs = data.tokenize(pool[i:i + batch], tokenizer, 128)
        feeds += [data.pad_batch([seqs[k] for k in g], pad, tt) for g in data.length_groups([len(q) for q in seqs])]
    return feeds


def _texts_per_s(predictor, tokenizer, batch: int, runs: int, seconds: float, texts=SENTENCES) -> float:
    """``runs`` threads cycling through the batches of :func:`_feeds` on one model for ``seconds``
    (ONNX Runtime and OpenVINO release the GIL and allow concurrent runs of one model)."""
    feeds = _feeds(predictor, tokenizer, batch, texts)
    for feed in feeds:  # every shape once: OpenVINO prepares each new one on first use (20-70 ms)
        predictor.predict_logits(feed)
    counts, stop = [0] * runs, time.perf_counter() + seconds

    def loop(k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            feed = feeds[i % len(feeds)]
            predictor.predict_logits(feed)
            counts[k] += len(feed["input_ids"])
            i += runs

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(runs)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return round(sum(counts) / (time.perf_counter() - start), 1)


def run_compare(args) -> dict:
    if not args.model_path:
        raise ValueError("--compare needs --model-path (e.g. saved_models/onnx/baseline/model.int8.onnx)")
    if not Path(args.model_path).exists():
        raise ValueError(f"--model-path {args.model_path}: not found (run `python onnx_tensorrt.py --variants int8`)")
    ceiling = model_ceiling(args.model_path, 32, texts=_texts(args))
    print(f"model only (no HTTP): {ceiling}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="bertopt-loadtest-") as workdir:
        per = _measure(args.model_path, "per-request", args, workdir)
        batched = _measure(args.model_path, "micro-batching", args, workdir,
                           check_rate=2 * per["requests_per_s_at_target"] or None)
    modes = {"per-request": per, "micro-batching": batched}
    price = instances.PRICE_PER_HOUR.get(args.instance_type)
    result = {
        "schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model_path": str(args.model_path),
        "machine": {"cpu": platform.processor() or platform.machine(), "vcpus": instances.local_vcpus()},
        "protocol": {"open_loop": True, "clients": args.clients, "p99_target_ms": args.p99_target_ms,
                     "seconds_per_step": args.seconds or 4.0, "texts_per_request": 1, "sentences": len(_texts(args)),
                     "texts_from": getattr(args, "texts", None) or "8 built-in sentences",
                     "pass": "0 errors, >= 95% of the offered rate served, p99 <= target"},
        "modes": modes,
        "model_only": ceiling,
        "speedup": round(batched["requests_per_s_at_target"] / per["requests_per_s_at_target"], 2)
        if per["requests_per_s_at_target"] else None,
        "pricing": {"instance_type": args.instance_type, "usd_per_hour": price, "as_of": instances.PRICES_AS_OF,
                    "region": instances.PRICES_REGION, "source": instances.PRICES_SOURCE,
                    "note": f"measured on this machine ({instances.local_vcpus()} vCPUs), priced as if one "
                            f"{args.instance_type} served the same requests/s"},
        "cost_per_million": {m: instances.cost_per_million(r["requests_per_s_at_target"], args.instance_type)
                             for m, r in modes.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write_json(out, result)
    print(f"wrote {out}: per-request {per['requests_per_s_at_target']}/s, micro-batching "
          f"{batched['requests_per_s_at_target']}/s at p99 <= {args.p99_target_ms} ms ({result['speedup']}x)",
          file=sys.stderr)
    return {"errors": 0, **result}
