"""Hostile requests against the real local endpoint (the archive's handler behind the HTTP server on
127.0.0.1): every client mistake is a 4xx with a reason, never a 5xx, and the server stays healthy.

The fuzzed batch is seeded and bounded: FUZZ_REQUESTS requests (random bytes, random JSON shapes,
random Unicode including lone surrogates, NUL and non-characters, odd content types and Accept
headers) plus the two cases reported in issue #35 (a deeply nested array; texts with a lone UTF-16
surrogate or a NUL), each with a 10 s client timeout.
"""
from __future__ import annotations

import json
import random

import pytest

from test_aws_serving import cfg_for, http
from test_aws_support import tiny_stages

FUZZ_REQUESTS = 1200
SEED = 35
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "text/csv", "text/plain", "",
                 "application/x-www-form-urlencoded", "application/octet-stream", "APPLICATION/JSON"]
ACCEPTS = [None, "application/json", "*/*", "text/html", "application/json;q=0.1, text/plain", ""]


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory, tiny_model_dir):
    from bertopt.aws import local

    saved = tiny_stages(tmp_path_factory.getbasetemp() / "fuzz_tiny", tiny_model_dir)
    tmp = tmp_path_factory.mktemp("fuzz_served")
    _, _, handler, model = local.prepare_local(cfg_for(tmp, saved, max_batch=8, max_chars=200))
    server = local.LocalEndpoint(local.InvocationsApp(handler, model), "127.0.0.1", 0, threads=4).start()
    yield server
    server.stop()


def _random_text(rng: random.Random) -> str:
    """Random code points from every plane, with the troublemakers over-represented."""
    special = ["\x00", "\ud800", "\udfff", "\ufffe", "\uffff", "\U0010ffff", "\u202e", "\x1b", "\r\n", "\t",
               "\u0301", "\U0001f600", '"', "\\", ","]
    out = []
    for _ in range(rng.randint(0, 40)):
        r = rng.random()
        if r < 0.2:
            out.append(rng.choice(special))
        elif r < 0.5:
            out.append(chr(rng.randint(0x20, 0x7e)))
        else:
            out.append(chr(rng.randint(0, 0x10ffff)))
    return "".join(out)


def _random_value(rng: random.Random, depth: int = 0):
    kinds = ["str", "int", "float", "bool", "null", "list", "dict"]
    kind = rng.choice(kinds if depth < 4 else kinds[:5])
    if kind == "str":
        return _random_text(rng)
    if kind == "int":
        return rng.randint(-10**6, 10**6)
    if kind == "float":
        return rng.choice([0.5, -1e308, 1e-300, float("inf"), float("nan")])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 10))]
    keys = ["inputs", "text", "text_pair", "top_k", "parameters", "describe", _random_text(rng)]
    return {rng.choice(keys): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _json_body(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.5:
        payload = {"inputs": _random_value(rng)}
        if rng.random() < 0.3:
            payload[rng.choice(["top_k", "parameters", "describe"])] = _random_value(rng, 3)
    elif r < 0.8:
        payload = {"inputs": [_random_text(rng) for _ in range(rng.randint(1, 10))]}
    else:
        payload = _random_value(rng)
    text = json.dumps(payload, ensure_ascii=rng.random() < 0.7, allow_nan=True)  # \ud800 escapes or raw
    return text.encode("utf-8", "surrogatepass" if rng.random() < 0.5 else "replace")


def _fuzz_requests(n: int):
    rng = random.Random(SEED)
    for i in range(n):
        r = rng.random()
        if r < 0.25:
            body = rng.randbytes(rng.randint(0, 300))
        elif r < 0.35:
            text = _json_body(rng).decode("utf-8", "replace")
            cut = rng.randint(0, len(text))
            body = text[:cut].encode("utf-8", "replace")  # truncated JSON
        elif r < 0.42:
            depth = rng.choice([20, 200, 5000, 100000])
            body = ('{"inputs": ' + "[" * depth + '"x"' + "]" * depth + "}").encode()
        elif r < 0.45:  # an integer past Python's int-digits limit (its own ValueError while decoding)
            body = ('{"inputs": ["x"], "top_k": ' + "9" * rng.randint(20, 6000) + "}").encode()
        else:
            body = _json_body(rng)
        ctype = rng.choice(CONTENT_TYPES) if rng.random() < 0.4 else "application/json"
        yield body, ctype, rng.choice(ACCEPTS)


REPORTED = [  # issue #35: these two answered 500
    (('{"inputs": ' + "[" * 100000 + "]" * 100000 + "}").encode(), "nested"),
    (b'{"inputs": ["fine", "lone \\ud800 surrogate"]}', "input 1 contains a lone UTF-16 surrogate"),
    (b'{"inputs": ["nul \\u0000 here"]}', "input 0 contains NUL"),
    (b'{"inputs": {"text": "a", "text_pair": "\\udc00"}}', "input 0 contains a lone UTF-16 surrogate"),
    (b'{"inputs": ' + b"1" * 5000 + b"}", "malformed JSON"),
]


@pytest.mark.parametrize("body, fragment", REPORTED)
def test_reported_hostile_requests_are_400_with_a_reason(endpoint, body, fragment):
    status, ctype, text = http(endpoint.url, "/invocations", body)
    assert status == 400 and ctype.startswith("application/json"), text
    assert fragment in json.loads(text)["error"]


def test_fuzzed_requests_never_get_a_5xx_and_the_server_stays_healthy(endpoint):
    statuses: dict[int, int] = {}
    fives = []
    for body, ctype, accept in _fuzz_requests(FUZZ_REQUESTS):
        status, _, text = http(endpoint.url, "/invocations", body, content_type=ctype or None, accept=accept)
        statuses[status] = statuses.get(status, 0) + 1
        if status >= 500:
            fives.append((status, body[:120], text[:200]))
        elif status != 200:
            assert 400 <= status < 500 and json.loads(text)["error"], text  # a 4xx says why
    assert sum(statuses.values()) == FUZZ_REQUESTS >= 1000
    assert fives == [], f"{len(fives)} answers in 5xx, first: {fives[:3]}"
    assert statuses.get(400, 0) > FUZZ_REQUESTS // 3  # mostly refused, as malformed input should be
    assert http(endpoint.url, "/ping", None, content_type=None, method="GET")[0] == 200
    ok, _, answer = http(endpoint.url, "/invocations", b'{"inputs": ["a fine film"]}')
    assert ok == 200 and len(json.loads(answer)) == 1


# ------------------------------------------------------------------------------------ both answer shapes
MMS_REFUSAL = {"code": 400, "type": "InternalServerException", "message": "9 texts in one request; the limit is 8"}


def test_refusals_read_in_the_local_and_the_sagemaker_shape():
    from bertopt.aws import answers

    local = answers.refusal(json.dumps({"error": "9 texts in one request; the limit is 8", "status": 413}))
    mms = answers.refusal(json.dumps(MMS_REFUSAL).encode())
    assert local == {"status": 413, "message": "9 texts in one request; the limit is 8", "shape": "local"}
    assert mms["status"] == 400 and mms["shape"] == "sagemaker" and mms["message"] == local["message"]
    assert answers.refusal("[1, 2]") is None and answers.refusal(b"\xff") is None
    assert answers.describe(502, b"<html>bad gateway</html>") == "HTTP 502: <html>bad gateway</html>"
    assert all(answers.SAGEMAKER_STATUS[code] == 400 for code in (400, 406, 413, 415))


def test_the_load_test_reports_a_refusals_reason_in_both_shapes(endpoint):
    import http.server

    from bertopt.aws import loadtest

    step = loadtest.open_loop(endpoint.url, rate=20, seconds=0.2, clients=2, texts=["y" * 201])
    assert step["errors"] == step["requests"] and step["status_counts"] == {"413": step["requests"]}
    assert step["first_errors"][0] == "HTTP 413: input 0 has 201 characters; the limit is 200"

    class Mms(http.server.BaseHTTPRequestHandler):  # what the SageMaker HF container answers instead
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps(MMS_REFUSAL).encode()
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Mms)
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        step = loadtest.open_loop(f"http://127.0.0.1:{server.server_port}", rate=20, seconds=0.2, clients=2)
    finally:
        server.shutdown()
    assert step["status_counts"] == {"400": step["requests"]}
    assert step["first_errors"][0] == "HTTP 400: 9 texts in one request; the limit is 8"


def test_the_smoke_test_names_the_reason_of_a_sagemaker_refusal(monkeypatch):
    import boto3
    from botocore.stub import Stubber

    from bertopt.aws import smoke
    from bertopt.aws.session import Aws
    from bertopt.errors import PipelineError

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    rt = boto3.client("sagemaker-runtime", region_name="us-east-1")
    stub = Stubber(rt)
    stub.add_client_error("invoke_endpoint", service_error_code="ModelError", http_status_code=424,
                          service_message="Received client error (400) from primary",
                          modeled_fields={"OriginalStatusCode": 400, "OriginalMessage": json.dumps(MMS_REFUSAL)})
    stub.activate()
    aws = Aws("us-east-1", clients={"sagemaker-runtime": rt})
    with pytest.raises(PipelineError, match=r"refused the request: HTTP 400: 9 texts in one request; the limit is 8"):
        smoke.smoke_test(aws, "ep", ["negative", "positive"])
