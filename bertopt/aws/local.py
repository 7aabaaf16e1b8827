"""The local endpoint: ``aws_deploy.py --local`` builds the same model.tar.gz a deploy uploads,
unpacks it like SageMaker does and serves its ``code/inference.py`` over the SageMaker container
contract (``GET /ping``, ``POST /invocations``) with waitress, a production WSGI server, plus
``GET /metrics`` (Prometheus text: requests by status, request latency, requests and texts per model
run). The handler micro-batches concurrent requests (see ``MicroBatcher`` in serving/inference.py);
HTTP and model threads come from the vCPUs (:func:`bertopt.aws.instances.thread_plan`).

Request errors get their own status (400 malformed/empty, 406 Accept, 413 too large, 415
Content-Type) and a JSON body ``{"error": ..., "status": ...}``; a handler bug is a 500 with a JSON
body and a logged traceback, never a dropped connection.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from .. import artifacts
from ..cli import StageResult
from ..errors import BackendUnavailable, PipelineError
from . import instances, packaging
from .choice import resolve_model

log = logging.getLogger("bertopt.aws.local")

MAX_BODY_BYTES = 6 * 1024 * 1024  # SageMaker real-time invocation payload limit
LOOPBACK = ("127.0.0.1", "localhost", "::1")
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable",
            413: "Payload Too Large", 415: "Unsupported Media Type", 500: "Internal Server Error"}
_load_count = 0
_load_lock = threading.Lock()


def load_handler(model_dir: Path):
    """Import ``<model_dir>/code/inference.py`` the way the SageMaker toolkit does (code/ first on
    sys.path, so its vendored ``bertopt_runtime`` is the one imported) and call its ``model_fn``.
    Returns (module, model)."""
    global _load_count
    model_dir = Path(model_dir)
    code_dir = model_dir / "code"
    handler_file = code_dir / "inference.py"
    if not handler_file.is_file():
        raise PipelineError(f"{model_dir}: no code/inference.py (not a bertopt model.tar.gz)")
    with _load_lock:
        _load_count += 1
        for name in [m for m in sys.modules if m == packaging.VENDORED_PACKAGE
                     or m.startswith(packaging.VENDORED_PACKAGE + ".")]:
            del sys.modules[name]  # each archive brings its own copy
        sys.path.insert(0, str(code_dir))
        try:
            spec = importlib.util.spec_from_file_location(f"bertopt_archive_handler_{_load_count}", handler_file)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(code_dir))
    try:
        model = module.model_fn(str(model_dir))
    except Exception as exc:  # whatever the handler raises: say which archive and why
        raise PipelineError(f"model_fn could not load the model from {model_dir}: {type(exc).__name__}: {exc}") from None
    return module, model


class ServerMetrics:
    """The local endpoint's Prometheus metrics (one registry per app)."""

    def __init__(self):
        try:
            from prometheus_client import CollectorRegistry, Counter, Histogram
        except ImportError:
            raise BackendUnavailable("the local endpoint's /metrics needs prometheus-client "
                                     "(pip install -r requirements.txt)") from None
        self.registry = CollectorRegistry()
        self.requests = Counter("bertopt_requests", "POST /invocations requests by HTTP status", ["status"],
                                registry=self.registry)
        self.latency = Histogram("bertopt_request_latency_seconds", "POST /invocations time in the server",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_requests = Histogram("bertopt_batch_requests", "requests per model run", buckets=BATCH_BUCKETS,
                                        registry=self.registry)
        self.batch_texts = Histogram("bertopt_batch_texts", "texts per model run", buckets=BATCH_BUCKETS,
                                     registry=self.registry)
        self.queue_depth = None

    def watch_queue(self, depth) -> None:
        """``bertopt_http_queue_depth``: requests waiting for an HTTP thread (``depth()`` at scrape time)."""
        from prometheus_client import Gauge

        if self.queue_depth is None:
            self.queue_depth = Gauge("bertopt_http_queue_depth", "requests waiting for a free HTTP thread",
                                     registry=self.registry)
        self.queue_depth.set_function(depth)

    def observe_batch(self, requests: int, texts: int) -> None:
        self.batch_requests.observe(requests)
        self.batch_texts.observe(texts)

    def observe_request(self, status: int, seconds: float) -> None:
        self.requests.labels(status=str(status)).inc()
        self.latency.observe(seconds)

    def render(self) -> tuple[str, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry).decode("utf-8"), CONTENT_TYPE_LATEST


class InvocationsApp:
    """WSGI app speaking the SageMaker container contract, plus GET /metrics."""

    def __init__(self, handler, model, max_body_bytes: int = MAX_BODY_BYTES):
        self.handler, self.model, self.max_body_bytes = handler, model, max_body_bytes
        self.metrics = ServerMetrics()
        self.batched = getattr(model, "batcher", None) is not None
        if self.batched:
            model.batcher.on_batch = self.metrics.observe_batch

    def _respond(self, start_response, status: int, body: str, content_type="application/json"):
        data = body.encode("utf-8")
        start_response(f"{status} {_REASONS.get(status, '')}",
                       [("Content-Type", content_type), ("Content-Length", str(len(data)))])
        return [data]

    def _error(self, start_response, status: int, message: str):
        return self._respond(start_response, status, json.dumps({"error": message, "status": status}))

    def __call__(self, environ, start_response):
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET")
        if path == "/ping":
            if method not in ("GET", "HEAD"):
                return self._error(start_response, 405, "use GET /ping")
            return self._respond(start_response, 200, json.dumps({"status": "healthy"}))
        if path == "/metrics":
            if method not in ("GET", "HEAD"):
                return self._error(start_response, 405, "use GET /metrics")
            text, content_type = self.metrics.render()
            return self._respond(start_response, 200, text, content_type)
        if path != "/invocations":
            return self._error(start_response, 404, f"no route {path} (GET /ping, POST /invocations, GET /metrics)")
        if method != "POST":
            return self._error(start_response, 405, "use POST /invocations")
        start = time.perf_counter()
        status = [500]

        def timed_start(status_line, headers, exc_info=None):
            status[0] = int(status_line.split()[0])
            return start_response(status_line, headers, exc_info)

        try:
            return self._invocations(environ, timed_start)
        finally:
            self.metrics.observe_request(status[0], time.perf_counter() - start)

    def _invocations(self, environ, start_response):
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return self._error(start_response, 400, "bad Content-Length")
        if length > self.max_body_bytes:
            return self._error(start_response, 413, f"request body of {length} bytes; the limit is {self.max_body_bytes}")
        body = environ["wsgi.input"].read(length) if length else b""
        error_cls = getattr(self.handler, "RequestError", ())
        try:
            data = self.handler.input_fn(body, environ.get("CONTENT_TYPE"))
            prediction = self.handler.predict_fn(data, self.model)
            if not self.batched and isinstance(data, list):  # one request is one model run
                self.metrics.observe_batch(1, len(data))
            out = self.handler.output_fn(prediction, environ.get("HTTP_ACCEPT") or "application/json")
        except Exception as exc:
            if error_cls and isinstance(exc, error_cls):
                return self._respond(start_response, exc.status, exc.body())
            log.exception("handler error")
            return self._error(start_response, 500, f"internal error: {type(exc).__name__}: {exc}")
        return self._respond(start_response, 200, out if isinstance(out, str) else out.decode("utf-8"))


class LocalEndpoint:
    """A waitress server around :class:`InvocationsApp`; ``port=0`` picks a free port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 8080, threads: int = 4):
        try:
            from waitress.server import create_server
        except ImportError:
            raise BackendUnavailable("the local endpoint needs waitress (pip install waitress)") from None
        try:
            self.server = create_server(app, host=host, port=port, threads=threads, ident="bertopt-local",
                                        max_request_body_size=MAX_BODY_BYTES + 1024, channel_timeout=60)
        except OSError as exc:
            raise PipelineError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (choose another --port)") from None
        # waitress warns once per request that finds every thread busy (3,382 lines in 8 s at 600/s):
        # under load that is normal, so the depth goes to /metrics instead
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)
        dispatcher = self.server.task_dispatcher
        if isinstance(getattr(app, "metrics", None), ServerMetrics):
            app.metrics.watch_queue(lambda: len(dispatcher.queue))
        self.host, self.port = host, self.server.effective_port
        self._thread = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        self.server.run()

    def start(self) -> "LocalEndpoint":
        self._thread = threading.Thread(target=self.server.run, name="bertopt-local-endpoint", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.close()
        if self._thread is not None:
            self._thread.join(timeout=10)


def local_dir(output_dir) -> Path:
    """Where the local endpoint builds and unpacks its archive: ``<output_dir>/aws/local/``
    (model.tar.gz, and the unpacked archive in ``model/``)."""
    return artifacts.stage_dir(output_dir, "aws") / "local"


def server_env(plan: instances.ThreadPlan) -> dict:
    """The environment the local server's handler loads with: model threads, batch runners and
    OpenVINO streams from the thread plan (model_fn reads them), plus :data:`instances.SERVING_ENV`."""
    return {"BERTOPT_THREADS": str(plan.model_threads), "BERTOPT_BATCH_RUNNERS": str(plan.batch_runners),
            "BERTOPT_MODEL_STREAMS": str(plan.concurrent_runs), **instances.SERVING_ENV}


def prepare_local(cfg, directory: Path | None = None):
    """Build model.tar.gz into ``<output_dir>/aws/local/``, unpack it, load its handler.
    Returns (archive info, model dir, handler module, model)."""
    choice = resolve_model(cfg)
    directory = Path(directory or local_dir(cfg.output_dir))
    archive = packaging.build_archive(choice, cfg, directory / packaging.ARCHIVE_NAME)
    model_dir = directory / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    packaging.extract_archive(archive.path, model_dir)
    handler, model = load_handler(model_dir)
    return archive, model_dir, handler, model


def run_local(cfg) -> StageResult:
    """aws_deploy.py --local: serve until Ctrl-C."""
    start = time.perf_counter()
    plan = instances.thread_plan(instances.local_vcpus(), batching=cfg.batching)
    for key, value in server_env(plan).items():
        os.environ.setdefault(key, value)  # read by the handler's model_fn and the tokenizer
    archive, model_dir, handler, model = prepare_local(cfg)
    threads = cfg.local_threads or plan.http_threads
    endpoint = LocalEndpoint(InvocationsApp(handler, model), cfg.host, cfg.port, threads)
    log.info("local endpoint: %d vCPUs, %d HTTP threads, %s model threads, micro-batching %s", plan.vcpus, threads,
             os.environ["BERTOPT_THREADS"], f"up to {cfg.batch_max_texts} texts, {cfg.batch_wait_ms} ms wait, "
             f"{os.environ['BERTOPT_BATCH_RUNNERS']} runners" if cfg.batching else "off")
    if cfg.host not in LOOPBACK:
        log.warning("the local endpoint listens on %s: other machines can reach it", cfg.host)
    print(f"serving {model.info.get('variant')} from {archive.path} (sha256 {archive.sha256[:12]}) on {endpoint.url}\n"
          f"  curl {endpoint.url}/ping\n"
          f"  curl -H 'Content-Type: application/json' -d '{{\"inputs\": [\"a great film\"]}}' "
          f"{endpoint.url}/invocations\n"
          "Ctrl-C stops it.", flush=True)
    try:
        endpoint.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        endpoint.server.close()
    return StageResult("aws_deploy", "ok", time.perf_counter() - start, f"local endpoint {endpoint.url} stopped",
                       str(model_dir))
