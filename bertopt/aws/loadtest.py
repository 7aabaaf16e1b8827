"""Open-loop load tests of an endpoint speaking the SageMaker container contract (the local
endpoint), bounded in request count and time, to 127.0.0.1 only by default.

Open loop: request i is due at ``start + i / rate`` whatever the server does; ``clients`` keep-alive
connections send the requests (request i on connection i mod clients) as soon as they are due and
the connection is free, and a request's latency runs from its *due* time. A server that falls behind
therefore shows its queueing in the latency (a closed-loop client, which waits for each answer
before sending the next request, hides it).

    python -m bertopt.aws.loadtest --url http://127.0.0.1:8080 --rate 200 --seconds 10
    python -m bertopt.aws.loadtest --url http://127.0.0.1:8080 --sweep --p99-target-ms 100
    python -m bertopt.aws.loadtest --compare --model-path saved_models/onnx/baseline/model.int8.onnx

``--compare`` starts the local endpoint twice from the same archive (per-request serving, then
micro-batching), sweeps the arrival rate on each and writes ``reports/loadtest.json``: requests/s at
the p99 target and cost per million requests on ``--instance-type`` (pinned price table,
:mod:`bertopt.aws.instances`); compare.py's report shows it.
"""
from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from urllib.parse import urlsplit

import numpy as np

from ..cli import positive

SENTENCES = [
    "a gripping and beautifully acted film", "dull, predictable and far too long",
    "the plot holds together until the last act", "one of the most charming comedies of the year",
    "an overlong mess with nothing to say", "the soundtrack is fine but the dialogue is wooden",
    "a moving, quietly funny story about growing up", "tedious from start to finish",
]
MAX_TEXTS = 100_000      # texts read from --texts (the first ones)
MAX_REQUESTS = 200_000   # bound on one step, whatever rate x seconds asks for
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def load_texts(path=None, column=None) -> list[str]:
    """The request texts: the built-in sentences, or ``path``: a .txt file (one text per line) or a
    CSV/TSV/JSONL/Parquet table's ``column`` (default: its ``sentence`` or ``text`` column, else the
    first). Raises ValueError with one line on a missing file, column or an empty result."""
    if path is None:
        return list(SENTENCES)
    from pathlib import Path

    from ..errors import DataError
    from ..tables import read_table

    p = Path(path)
    if p.suffix.lower() in (".txt", ""):
        if not p.is_file():
            raise ValueError(f"--texts {path}: no such file")
        texts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    else:
        try:
            df = read_table(p)
        except DataError as exc:
            raise ValueError(f"--texts {path}: {exc}") from None
        col = column or next((c for c in ("sentence", "text") if c in df.columns), df.columns[0])
        if col not in df.columns:
            raise ValueError(f"--texts {path}: no column {col!r} (columns: {', '.join(map(str, df.columns))})")
        texts = [str(t).strip() for t in df[col]]
    texts = [t for t in texts if t][:MAX_TEXTS]
    if not texts:
        raise ValueError(f"--texts {path}: no texts in it")
    return texts


def _check_url(url: str, allow_remote: bool = False):
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"--url {url!r}: expected http://HOST:PORT")
    if parts.hostname not in LOOPBACK and not allow_remote:
        raise ValueError(f"--url {url!r}: load tests send traffic to 127.0.0.1 only (--allow-remote overrides)")
    return parts


def _send(conn, texts):
    body = json.dumps({"inputs": texts})
    conn.request("POST", "/invocations", body=body,
                 headers={"Content-Type": "application/json", "Accept": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status == 200 and len(json.loads(data)) != len(texts):
        return -1  # a wrong answer counts as an error
    if resp.status != 200:
        from .answers import describe  # the local {"error"} or SageMaker's {"code","type","message"}

        conn.refusal = describe(resp.status, data)  # the client loop keeps the first few
    return resp.status


def open_loop(url: str, rate: float, seconds: float, clients: int = 16, texts_per_request: int = 1,
              timeout: float = 10.0, allow_remote: bool = False, texts=SENTENCES) -> dict:
    """One constant-arrival-rate step: ``rate`` requests/s for ``seconds``. Requests still unsent
    ``seconds + 2 * timeout`` after the start are dropped and counted as errors (bounded in time)."""
    parts = _check_url(url, allow_remote)
    n = min(MAX_REQUESTS, max(1, int(round(rate * seconds))))
    latencies = np.full(n, np.nan)
    status = np.zeros(n, dtype=np.int32)
    errors: list = []
    start = time.perf_counter() + 0.05
    give_up = start + seconds + 2 * timeout

    def client(idx: int):
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
        for i in range(idx, n, clients):
            due = start + i / rate
            now = time.perf_counter()
            if now > give_up:
                status[i] = -3  # dropped: the server never caught up
                continue
            if due > now:
                time.sleep(due - now)
            body = [texts[(i * texts_per_request + k) % len(texts)] for k in range(texts_per_request)]
            try:
                status[i] = _send(conn, body)
                if getattr(conn, "refusal", None) and len(errors) < 5:
                    errors.append(conn.refusal)
                    conn.refusal = None
            except (OSError, http.client.HTTPException, ValueError) as exc:
                status[i] = -2
                if len(errors) < 5:
                    errors.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
            latencies[i] = time.perf_counter() - due
        conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(min(clients, n))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    done = latencies[~np.isnan(latencies)] * 1000
    ok = int((status == 200).sum())
    counts = {str(k): int(v) for k, v in zip(*np.unique(status, return_counts=True))}
    pct = (lambda q: round(float(np.percentile(done, q)), 2)) if done.size else (lambda q: None)
    return {"offered_rps": round(rate, 1), "seconds": round(wall, 2), "clients": clients,
            "texts_per_request": texts_per_request, "requests": n, "ok": ok, "errors": n - ok,
            "status_counts": counts, "achieved_rps": round(ok / wall, 1) if wall > 0 else 0.0,
            "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
            "max_ms": round(float(done.max()), 2) if done.size else None, "first_errors": errors}


def passes(step: dict, p99_target_ms: float) -> bool:
    """Sustained: no errors, at least 95% of the offered rate served, p99 within the target."""
    return (step["errors"] == 0 and step["p99_ms"] is not None and step["p99_ms"] <= p99_target_ms
            and step["achieved_rps"] >= 0.95 * step["offered_rps"])


def sweep(url: str, *, clients: int = 16, p99_target_ms: float = 100.0, seconds: float = 4.0,
          start_rate: float = 50.0, factor: float = 1.25, max_rate: float = 5000.0, refine: int = 2,
          texts_per_request: int = 1, progress=None, texts=SENTENCES) -> dict:
    """Raise the arrival rate geometrically until a step fails :func:`passes`, then bisect
    ``refine`` times between the last passing and the first failing rate. Returns the steps and the
    best passing step (the requests/s at the p99 target)."""
    steps, rate, best, failed = [], start_rate, None, None
    run = lambda r: open_loop(url, r, seconds, clients, texts_per_request, texts=texts)  # noqa: E731
    while rate <= max_rate:
        step = run(rate)
        step["passed"] = passes(step, p99_target_ms)
        steps.append(step)
        if progress:
            progress(step)
        if not step["passed"]:
            failed = rate
            break
        best, rate = step, rate * factor
    lo = best["offered_rps"] if best else 0.0
    for _ in range(refine if failed and best else 0):
        mid = (lo + failed) / 2
        step = run(mid)
        step["passed"] = passes(step, p99_target_ms)
        steps.append(step)
        if progress:
            progress(step)
        if step["passed"]:
            best, lo = step, mid
        else:
            failed = mid
    return {"p99_target_ms": p99_target_ms, "clients": clients, "seconds_per_step": seconds, "steps": steps,
            "best": best, "requests_per_s_at_target": best["achieved_rps"] if best else 0.0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bertopt.aws.loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8080", help="endpoint (default: http://127.0.0.1:8080)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url (your own server only)")
    p.add_argument("--clients", type=positive(int), default=16, help="keep-alive connections (default: 16)")
    p.add_argument("--rate", type=positive(), default=100.0, help="arrival rate, requests/s (default: 100)")
    p.add_argument("--seconds", type=positive(), default=None, help="seconds per step (default: 10; sweep/compare: 4)")
    p.add_argument("--texts-per-request", type=positive(int), default=1, help="texts in each request (default: 1)")
    p.add_argument("--texts", metavar="FILE", help="request texts, cycled: a .txt file (one per line) or a "
                   "CSV/TSV/JSONL/Parquet table, e.g. ../shared/data/sst2/dev.tsv (default: 8 built-in sentences)")
    p.add_argument("--text-column", metavar="COL", help="--texts table column (default: sentence, text, or the first)")
    p.add_argument("--sweep", action="store_true", help="find the requests/s at --p99-target-ms")
    p.add_argument("--p99-target-ms", type=positive(), default=100.0, help="sweep/compare p99 target (default: 100)")
    p.add_argument("--start-rate", type=positive(), default=50.0, help="first sweep rate (default: 50)")
    p.add_argument("--compare", action="store_true",
                   help="serve --model-path twice (per request, micro-batching), sweep both, write --out")
    p.add_argument("--model-path", help="--compare: the model to serve (.onnx file or model directory)")
    p.add_argument("--instance-type", default="ml.m5.large", help="--compare: price the result (default: ml.m5.large)")
    p.add_argument("--out", default=None, help="--compare: results file (default: reports/loadtest.json, which "
                   "compare.py's report shows)")
    args = p.parse_args(argv)
    if args.out is None:
        from ..report import LOADTEST_FILE

        args.out = f"reports/{LOADTEST_FILE}"
    try:
        args.text_list = load_texts(args.texts, args.text_column)
        if args.compare:
            from .loadcompare import run_compare

            result = run_compare(args)
        elif args.sweep:
            result = sweep(_check_url(args.url, args.allow_remote).geturl(), clients=args.clients,
                           p99_target_ms=args.p99_target_ms, seconds=args.seconds or 4.0,
                           start_rate=args.start_rate, texts_per_request=args.texts_per_request,
                           progress=lambda s: print(_line(s), file=sys.stderr, flush=True), texts=args.text_list)
        else:
            result = open_loop(args.url, args.rate, args.seconds or 10.0, args.clients, args.texts_per_request,
                               allow_remote=args.allow_remote, texts=args.text_list)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    unreachable = _unreachable(result)
    if unreachable:
        print(f"error: nothing answered at {args.url} ({unreachable}): start the endpoint first, "
              "e.g. `python aws_deploy.py --local`", file=sys.stderr)
    return 0 if result.get("errors", 0) == 0 and not unreachable else 1


def _unreachable(result: dict):
    """The first connection error when no request of a step or sweep got any HTTP answer (no server)."""
    steps = result.get("steps") or [result]
    if any(int(code) > 0 for step in steps for code in step.get("status_counts", {})):
        return None
    errors = [e for step in steps for e in step.get("first_errors", [])]
    return errors[0] if errors else None


def _line(step: dict) -> str:
    return (f"  offered {step['offered_rps']:7.1f}/s  served {step['achieved_rps']:7.1f}/s  p50 {step['p50_ms']} ms  "
            f"p99 {step['p99_ms']} ms  errors {step['errors']}  {'ok' if step.get('passed') else 'over target'}")


if __name__ == "__main__":
    sys.exit(main())
