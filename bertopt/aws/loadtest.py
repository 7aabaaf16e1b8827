"""A bounded load test for an endpoint speaking the SageMaker container contract (the local
endpoint): N concurrent keep-alive clients POST /invocations for a fixed time.

    python -m bertopt.aws.loadtest --url http://127.0.0.1:8080 --clients 8 --seconds 30
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

SENTENCES = [
    "a gripping and beautifully acted film", "dull, predictable and far too long",
    "the plot holds together until the last act", "one of the most charming comedies of the year",
    "an overlong mess with nothing to say", "the soundtrack is fine but the dialogue is wooden",
    "a moving, quietly funny story about growing up", "tedious from start to finish",
]


def load_test(url: str, clients: int = 8, seconds: float = 30.0, texts_per_request: int = 1,
              timeout: float = 30.0) -> dict:
    """Requests/s, latency percentiles (ms) and errors (non-200 answers or connection failures)."""
    parts = urlsplit(url)
    deadline = time.perf_counter() + seconds
    latencies, statuses, errors, lock = [], {}, [], threading.Lock()

    def client(idx: int):
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
        i, mine, my_status = idx, [], {}
        while time.perf_counter() < deadline:
            texts = [SENTENCES[(i + k) % len(SENTENCES)] for k in range(texts_per_request)]
            i += 1
            body = json.dumps({"inputs": texts})
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/invocations", body=body,
                             headers={"Content-Type": "application/json", "Accept": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                status = resp.status
                if status == 200 and len(json.loads(data)) != len(texts):
                    status = -1  # wrong answer
            except (OSError, http.client.HTTPException, ValueError) as exc:
                status = -2
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
            mine.append(time.perf_counter() - t0)
            my_status[status] = my_status.get(status, 0) + 1
        conn.close()
        with lock:
            latencies.extend(mine)
            for k, v in my_status.items():
                statuses[k] = statuses.get(k, 0) + v

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    n = len(latencies)
    return {"url": url, "clients": clients, "seconds": round(wall, 2), "texts_per_request": texts_per_request,
            "requests": n, "errors": n - statuses.get(200, 0), "status_counts": {str(k): v for k, v in statuses.items()},
            "requests_per_s": round(n / wall, 1) if wall else 0.0,
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p90_ms": round(float(np.percentile(lat, 90)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2), "first_errors": errors[:5]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bertopt.aws.loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--texts-per-request", type=int, default=1)
    args = p.parse_args(argv)
    result = load_test(args.url, args.clients, args.seconds, args.texts_per_request)
    print(json.dumps(result, indent=2))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
