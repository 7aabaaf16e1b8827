"""``python -m bertopt.aws.loadtest --compare``: per-request serving against micro-batching, one run.

Starts the local endpoint (``aws_deploy.py --local``, a separate process on 127.0.0.1, so the load
generator's Python threads do not share the server's interpreter) from the same model, first with
``--no-batching`` and then with micro-batching; sweeps each with the open-loop generator; then offers
the batching server twice the per-request server's best rate, to compare p99 at that load. Beside
the served figures it measures the bare model as each server runs it (``model_only``) and each
archive's handler called in this process without HTTP (``handler_only``), which split the served
ratio into the model's, the handler's and the HTTP side's shares. Writes ``reports/loadtest.json``
(atomically) for compare.py's report.
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .. import artifacts
from . import instances
from .loadtest import SENTENCES, _line, open_loop, passes, sweep

SCHEMA = "bertopt.loadtest/3"  # /2: model_only as each server runs the model; cpu_ms_per_request; /3: handler_only
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
    ratio is what batches gain in the model itself. It is not a bound on the served ratio: batching
    also shares the handler's per-run work (tokenizer call, padding, softmax) among a batch's requests
    and queues requests differently near saturation (AMD EPYC, 2 vCPUs: bare 1.27x, served 0.95-1.48x)."""
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

    wall = _run_threads(loop, runs)  # before the sum: the threads fill counts
    return round(sum(counts) / wall, 1)


def _run_threads(loop, n: int) -> float:
    """``loop(k)`` on ``n`` threads at once, k = 0..n-1; returns the wall seconds until all ended."""
    threads = [threading.Thread(target=loop, args=(k,)) for k in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def handler_ceiling(model_dir: Path, batching: bool, callers: int, seconds: float = 3.0, texts=SENTENCES) -> dict:
    """The served handler without HTTP: ``callers`` threads each send one text at a time through the
    archive's own ``input_fn -> predict_fn -> output_fn`` in this process (JSON, validation,
    tokenization, the model, the answers; micro-batched when the archive batches) for ``seconds``,
    after a quarter of that as warm-up. Loaded with the environment the local server gives it
    (:func:`local.server_env`); ``requests_per_s`` and this process's CPU ms per request, and for a
    batching handler its mean texts per model run. Against the served figures it tells the handler's
    share of the ratio from the HTTP server's and the load generator's."""
    from . import local

    plan = instances.thread_plan(instances.local_vcpus(), batching=batching)
    bodies = [json.dumps({"inputs": [t]}).encode() for t in texts[:512]]
    switch = sys.getswitchinterval()
    with _environment(local.server_env(plan)):
        handler, model = local.load_handler(model_dir)
    batch_texts: list = []  # texts per model run (micro-batching); list.append is safe from the runner threads
    if getattr(model, "batcher", None) is not None:
        model.batcher.on_batch = lambda n_requests, n_texts: batch_texts.append(n_texts)
    try:
        _handler_calls(handler, model, bodies, callers, seconds / 4)  # warm-up: sessions, caches, shapes
        batch_texts.clear()
        cpu0 = time.process_time()
        done, wall = _handler_calls(handler, model, bodies, callers, seconds)
        cpu = time.process_time() - cpu0
    finally:
        sys.setswitchinterval(switch)  # model_fn shortens it for a server process
        if getattr(model, "batcher", None) is not None:
            model.batcher.close()
    out = {"callers": callers, "requests_per_s": round(done / wall, 1), "cpu_ms_per_request": round(1000 * cpu / done, 3)}
    if batch_texts:
        out["texts_per_model_run"] = round(sum(batch_texts) / len(batch_texts), 2)
    return out


@contextmanager
def _environment(values: dict):
    """``values`` set in os.environ for the block, the previous values back afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _handler_calls(handler, model, bodies: list, callers: int, seconds: float) -> tuple[int, float]:
    """``callers`` threads calling the handler one request after another for ``seconds``; returns
    (requests answered, wall seconds). A handler error stops the measurement (it is a bug here)."""
    counts, errors, stop = [0] * callers, [], time.perf_counter() + seconds

    def loop(k: int) -> None:
        i = k
        try:
            while time.perf_counter() < stop:
                data = handler.input_fn(bodies[i % len(bodies)], "application/json")
                handler.output_fn(handler.predict_fn(data, model), "application/json")
                counts[k] += 1
                i += callers
        except Exception as exc:  # noqa: BLE001 - reported below, in the caller's thread
            errors.append(exc)

    wall = _run_threads(loop, callers)
    if errors:
        raise RuntimeError(f"the handler failed without HTTP: {type(errors[0]).__name__}: {errors[0]}")
    return sum(counts), wall


def _handler_only(workdir: str, clients: int, seconds: float, texts) -> dict:
    """:func:`handler_ceiling` for both modes, on the archives their servers unpacked in ``workdir``,
    each with as many callers as its server answers at once (its HTTP threads, at most ``clients``)."""
    from . import local

    out = {"seconds_each": seconds}
    for mode, key in (("per-request", "per_request"), ("micro-batching", "micro_batching")):
        batching = mode == "micro-batching"
        callers = min(clients, instances.thread_plan(instances.local_vcpus(), batching=batching).http_threads)
        out[key] = handler_ceiling(local.local_dir(Path(workdir) / mode) / "model", batching, callers, seconds, texts)
    out["ratio"] = round(out["micro_batching"]["requests_per_s"] / out["per_request"]["requests_per_s"], 2)
    return out


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
        handler_only = _handler_only(workdir, args.clients, 3.0, _texts(args))
        print(f"handler only (no HTTP): {handler_only}", file=sys.stderr, flush=True)
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
        "handler_only": handler_only,
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
