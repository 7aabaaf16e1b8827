"""SageMaker inference handler for bertopt models (shipped as ``code/inference.py`` in model.tar.gz).

The Hugging Face inference container (SageMaker Hugging Face Inference Toolkit) calls
``model_fn`` once, then ``input_fn`` -> ``predict_fn`` -> ``output_fn`` per request; the local
endpoint (``aws_deploy.py --local``) calls the same four functions from the same archive.

Request:  ``{"inputs": "text"}`` or ``{"inputs": ["t1", "t2"]}`` (application/json), or one text
          per line (text/csv; quote a text that spans lines). Sentence pairs: ``{"inputs": {"text": ...,
          "text_pair": ...}}`` or a list of such. ``"top_k": N`` (or ``"parameters": {"top_k": N}``) returns
          the N best labels per text, ``"top_k": null`` every label's score (as the HF ``pipeline``).
Response: one ``{"label": "positive", "score": 0.97}`` per input text, as a JSON list (with top_k, or
          for multi-label models, a list of such per text: sigmoid scores, every label, best first;
          regression models answer ``{"label": name, "value": 3.2}``). The model's task comes from
          serving.json (``task``) or config.json's ``problem_type``; its long-text strategy
          (``long_text``/``stride``: truncate, head-tail or chunk with windows averaged) from serving.json.
Describe: ``{"describe": true}`` answers ``{"variant", "backend", "precision", "source", "device",
          "providers"}``: what the endpoint actually serves from (the deploy's smoke test checks it).
Limits:   at most ``max_batch`` texts and ``max_chars`` characters per text (serving.json, or the
          BERTOPT_MAX_BATCH / BERTOPT_MAX_CHARS environment variables of the model).
Batching: with ``batch_wait_ms`` >= 0 (BERTOPT_BATCH_WAIT_MS; serving.json) concurrent predict_fn calls
          are micro-batched by :class:`MicroBatcher`: one model run for every request queued while the
          previous batch ran, plus those arriving within ``batch_wait_ms``, up to ``batch_max_texts``
          texts (BERTOPT_BATCH_MAX_TEXTS), on ``batch_runners`` threads (BERTOPT_BATCH_RUNNERS).
          OpenVINO compiles one CPU stream per concurrent model run (``model_streams``, BERTOPT_MODEL_STREAMS).
          ``batch_wait_ms`` < 0 runs each request alone.
Threads:  BERTOPT_THREADS sets ONNX Runtime's / torch's intra-op threads (the deploy derives it from
          the instance's vCPUs); the GIL switch interval is ``gil_switch_ms`` (0.5 ms; BERTOPT_GIL_SWITCH_MS);
          ``ort_spinning`` (BERTOPT_ORT_SPINNING=0/1) lets ONNX Runtime's idle intra-op threads
          busy-wait for the next run or not (unset: ONNX Runtime's default, on).

Request errors raise :class:`RequestError` (a ValueError with an HTTP ``status`` and a JSON
``body()``). The local endpoint answers with that status; the SageMaker toolkit turns every
handler exception into a 400 whose message is ``str(error)``.

Tokenization, batching, predictors, JSON Lines: bertopt's data/runtimes/jsonl, vendored as code/``bertopt_runtime``.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import queue
import sys
import threading
import time
from concurrent.futures import Future

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.isdir(os.path.join(_HERE, "bertopt_runtime")):  # inside model.tar.gz: the vendored copy
    if _HERE not in sys.path:  # the SageMaker toolkit puts code/ first on sys.path; be robust if not
        sys.path.insert(0, _HERE)
    from bertopt_runtime import data as _data, jsonl as _jsonl
    from bertopt_runtime import runtimes as _runtimes
    from bertopt_runtime import tasks as _tasks
else:  # in the project tree (tests, development)
    from bertopt import data as _data, jsonl as _jsonl
    from bertopt import runtimes as _runtimes
    from bertopt import tasks as _tasks

log = logging.getLogger("bertopt.serving")

SETTINGS_FILE = "serving.json"
JSON = "application/json"
CSV = "text/csv"
DEFAULTS = {"max_batch": 64, "max_chars": 10000, "max_length": 128, "batch_wait_ms": -1.0, "batch_max_texts": 64,
            "batch_runners": 1, "model_streams": 1, "gil_switch_ms": 0.5, "ort_spinning": None}
ENV = {"max_batch": "BERTOPT_MAX_BATCH", "max_chars": "BERTOPT_MAX_CHARS", "max_length": "BERTOPT_MAX_LENGTH",
       "batch_wait_ms": "BERTOPT_BATCH_WAIT_MS", "batch_max_texts": "BERTOPT_BATCH_MAX_TEXTS",
       "batch_runners": "BERTOPT_BATCH_RUNNERS", "model_streams": "BERTOPT_MODEL_STREAMS",
       "gil_switch_ms": "BERTOPT_GIL_SWITCH_MS", "ort_spinning": "BERTOPT_ORT_SPINNING"}
FLOAT_SETTINGS = ("batch_wait_ms", "gil_switch_ms")
BOOL_SETTINGS = ("ort_spinning",)
DESCRIBE = object()  # input_fn's answer to {"describe": true}: predict_fn returns the model's description


class RequestError(ValueError):
    """A request the handler refuses: ``status`` is the HTTP status (400, 406, 413, 415)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> str:
        return json.dumps({"error": self.message, "status": self.status})


class ServingModel:
    """What model_fn returns: tokenizer + predictor + labels + request limits."""

    def __init__(self, tokenizer, predictor, label_names, max_length, max_batch, max_chars, info=None,
                 task="classification", long_text="truncate", stride=None):
        self.task, self.long_text, self.stride = task, long_text, stride
        self.tokenizer = tokenizer
        self.predictor = predictor
        self.label_names = list(label_names)
        self.max_length = int(max_length)
        self.max_batch = int(max_batch)
        self.max_chars = int(max_chars)
        self.pad_id = tokenizer.pad_token_id or 0
        self.with_token_type_ids = "token_type_ids" in tuple(getattr(predictor, "input_names", ()))
        self.info = dict(info or {})
        self.lock = threading.Lock()  # HF fast tokenizers are not safe to call from several threads
        self.batcher = None           # a MicroBatcher when batching is on (model_fn)


class MicroBatcher:
    """Server-side micro-batching: callers block in :meth:`submit`; ``runners`` threads each take
    the first queued request, add every request queued meanwhile plus those arriving within
    ``wait_ms`` of the first, up to ``max_texts`` texts, run the model once and hand each caller its
    own slice of the answer. Several runners keep every vCPU busy with single-threaded model runs
    while the next batch gathers. ``on_batch(requests, texts)`` is called after every model run
    (the local server's /metrics)."""

    def __init__(self, run, max_texts: int, wait_ms: float, on_batch=None, runners: int = 1):
        self.run, self.max_texts, self.wait_s = run, max(1, int(max_texts)), max(0.0, float(wait_ms)) / 1000.0
        self.on_batch = on_batch
        self._queue: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._loop, name=f"bertopt-micro-batcher-{i}", daemon=True)
                         for i in range(max(1, int(runners)))]
        for thread in self._threads:
            thread.start()

    def submit(self, texts: list) -> list:
        future: Future = Future()
        self._queue.put((list(texts), future))
        return future.result()

    def close(self) -> None:
        self._queue.put(None)  # every runner passes it on and stops
        for thread in self._threads:
            thread.join(timeout=10)

    def _collect(self, first) -> tuple[list, object]:
        """The batch that starts with ``first``, and the request that did not fit (or None)."""
        batch, n = [first], len(first[0])
        deadline = time.monotonic() + self.wait_s
        while n < self.max_texts:
            try:
                item = self._queue.get_nowait()  # what queued up while the model ran: no waiting
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is None:
                self._queue.put(None)  # stop after this batch
                break
            if n + len(item[0]) > self.max_texts:
                return batch, item
            batch.append(item)
            n += len(item[0])
        return batch, None

    def _loop(self) -> None:
        carry = None
        while True:
            first, carry = (carry or self._queue.get()), None
            if first is None:
                self._queue.put(None)  # for the other runners
                return
            batch, carry = self._collect(first)
            self._run_batch(batch)

    def _run_batch(self, batch: list) -> None:
        texts = [t for texts, _ in batch for t in texts]
        try:
            preds = self.run(texts)
        except Exception as exc:  # the callers' threads raise it (the server answers 500)
            for _, future in batch:
                future.set_exception(exc)
            return
        start = 0
        for texts_i, future in batch:
            future.set_result(preds[start:start + len(texts_i)])
            start += len(texts_i)
        if self.on_batch is not None:
            try:
                self.on_batch(len(batch), len(texts))
            except Exception:  # metrics must never stop the batch runner
                log.exception("micro-batching: on_batch callback failed")


# ------------------------------------------------------------------------------------ settings
def load_settings(model_dir: str) -> dict:
    """serving.json written by the packager, then environment overrides."""
    path = os.path.join(model_dir, SETTINGS_FILE)
    settings = dict(DEFAULTS)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            settings.update(json.load(fh))
    for key, var in ENV.items():
        if os.environ.get(var):
            settings[key] = _parse_setting(key, os.environ[var])
    return settings


_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _parse_setting(key: str, value: str):
    """An environment override, or a ValueError that names the variable."""
    kind = "0 or 1" if key in BOOL_SETTINGS else "a number" if key in FLOAT_SETTINGS else "an integer"
    try:
        if key in BOOL_SETTINGS:
            return _BOOLS[value.strip().lower()]
        return (float if key in FLOAT_SETTINGS else int)(value)
    except (KeyError, ValueError):
        raise ValueError(f"{ENV[key]}={value!r}: expected {kind}") from None


def _label_names(model_dir: str, settings: dict, num_labels: int | None = None) -> list[str]:
    if settings.get("label_names"):
        return list(settings["label_names"])
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
            id2label = json.load(fh).get("id2label") or {}
        return [id2label[k] for k in sorted(id2label, key=int)]
    except (OSError, ValueError, KeyError):
        return [f"LABEL_{i}" for i in range(num_labels or 2)]


def _providers(settings: dict):
    """ONNX Runtime providers: BERTOPT_PROVIDERS (comma-separated), else CUDA first where the archive
    targets a GPU, else CPU. A GPU archive always asks for the CUDA EP, so a container whose
    onnxruntime cannot start it fails to load (OrtPredictor refuses a silent CPU fallback) instead
    of serving from the CPU of a GPU instance."""
    env = os.environ.get("BERTOPT_PROVIDERS")
    if env:
        return [p.strip() for p in env.split(",") if p.strip()]
    if settings.get("device") == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return None  # CPU


def _threads():
    return int(os.environ["BERTOPT_THREADS"]) if os.environ.get("BERTOPT_THREADS") else None


def _make_predictor(model_dir: str, settings: dict):
    backend = settings.get("backend", "onnxruntime")
    name = settings.get("variant")
    path = os.path.join(model_dir, settings.get("model_file") or "model.onnx")
    if backend == "onnxruntime":
        return _runtimes.OrtPredictor(path, name=name, providers=_providers(settings),
                                      intra_op_threads=_threads(), precision=settings.get("precision", "fp32"),
                                      spinning=settings.get("ort_spinning"))
    if backend == "openvino":  # Intel CPU hosts; the archive pins openvino in code/requirements.txt
        s = {**DEFAULTS, **settings}
        streams = max(int(s["model_streams"]), int(s["batch_runners"]) if float(s["batch_wait_ms"]) >= 0 else 1)
        return _runtimes.OpenVinoPredictor(path, name=name or "ov-fp32", precision=settings.get("precision", "fp32"),
                                           threads=_threads(), streams=streams, float_precision=settings.get("float_math"))
    if backend == "torch":
        device = "cpu"
        if settings.get("device") == "cuda":
            import torch

            if not torch.cuda.is_available():  # never serve a GPU archive from the CPU
                raise RuntimeError("this archive serves from a GPU, but torch sees no CUDA device "
                                   f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
            device = "cuda"
        precision = settings.get("precision") or "fp32"
        if device == "cpu" and precision == "fp16":  # no fast fp16 math on CPUs
            precision = "fp32"
        return _runtimes.TorchPredictor(model_dir, name=name or f"torch-{precision}", device=device,
                                        precision=precision, threads=_threads())
    raise ValueError(f"{SETTINGS_FILE}: unknown backend {backend!r} (expected onnxruntime, openvino or torch)")


# ---------------------------------------------------------------------------------- the hooks
def _set_gil_switch(ms: float) -> None:
    """A thread coming back from a model run (which releases the GIL) waits up to Python's switch
    interval (5 ms) for the HTTP threads to hand the GIL over; a server process wants it short
    (measured on 2 vCPUs, INT8 MiniLM, 16 clients, requests/s at p99 <= 100 ms: per-request at 2
    threads a run 332 -> 437, micro-batching 547 -> 609). ``gil_switch_ms`` <= 0 keeps the
    interpreter's setting."""
    if ms > 0:
        sys.setswitchinterval(ms / 1000.0)


class Texts(list):
    """input_fn's answer: the texts (str or (text, text_pair)) and the request's ``top_k``
    (0 = not asked; None = every label)."""

    top_k = 0


def _task(model_dir: str, settings: dict) -> str:
    if settings.get("task"):
        return settings["task"]
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
            kind = json.load(fh).get("problem_type")
    except (OSError, ValueError):
        kind = None
    return {v: k for k, v in _tasks.PROBLEM_TYPES.items()}.get(kind, _tasks.CLASSIFICATION)


def model_fn(model_dir, context=None):
    """Load tokenizer + predictor from the extracted model.tar.gz directory."""
    from transformers import AutoTokenizer

    settings = load_settings(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    predictor = _make_predictor(model_dir, settings)
    model = ServingModel(tokenizer, predictor, _label_names(model_dir, settings), settings["max_length"],
                         settings["max_batch"], settings["max_chars"],
                         info={**{k: settings.get(k) for k in ("variant", "backend", "precision", "source")},
                               "device": getattr(predictor, "device", "cpu"),
                               "providers": list(getattr(predictor, "providers", None) or []) or None},
                         task=_task(model_dir, settings), long_text=settings.get("long_text") or "truncate",
                         stride=settings.get("stride"))
    if hasattr(predictor, "warm_up"):  # OpenVINO: first-use cost per input shape, paid before the first request
        log.info("warmed up batch-1 inputs of 2..%d tokens in %.1f s", model.max_length,
                 predictor.warm_up(model.max_length))
    _set_gil_switch(float(settings["gil_switch_ms"]))
    if float(settings["batch_wait_ms"]) >= 0:
        model.batcher = MicroBatcher(lambda texts: _rows(texts, model), settings["batch_max_texts"],
                                     settings["batch_wait_ms"], runners=settings["batch_runners"])
    log.info("loaded %s (%s, %s) labels %s, max batch %d, max chars %d, micro-batching %s, threads %s",
             settings.get("variant"), settings.get("backend"), settings.get("precision"), model.label_names,
             model.max_batch, model.max_chars,
             f"{settings['batch_wait_ms']} ms / {settings['batch_max_texts']} texts / {settings['batch_runners']} runners"
             if model.batcher else "off",
             _threads() or "default")
    return model


def _media_type(value) -> str:
    return str(value or "").split(";")[0].strip().lower()


def _as_text(input_data) -> str:
    if isinstance(input_data, (bytes, bytearray)):
        try:
            return bytes(input_data).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(400, "request body is not valid UTF-8") from None
    if isinstance(input_data, str):
        return input_data
    raise RequestError(400, f"unsupported request body type {type(input_data).__name__}")


def _pair(i: int, item: dict) -> tuple:
    text, pair = item.get("text"), item.get("text_pair")
    if not isinstance(text, str) or not isinstance(pair, str) or not text.strip() or not pair.strip():
        raise RequestError(400, f"input {i}: a pair is {{\"text\": \"...\", \"text_pair\": \"...\"}} "
                                "with two non-empty strings")
    return (text, pair)


def _top_k(payload: dict):
    params = payload.get("parameters") if isinstance(payload.get("parameters"), dict) else {}
    where = payload if "top_k" in payload else params
    if "top_k" not in where:
        return 0
    k = where["top_k"]
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise RequestError(400, f"top_k must be a positive integer or null (every label); got {k!r}")
    return k


def _check_texts(texts, top_k=0) -> list:
    if not texts:
        raise RequestError(400, "no input texts (send {\"inputs\": \"text\"} or {\"inputs\": [\"t1\", \"t2\"]})")
    texts = [_pair(i, t) if isinstance(t, dict) else t for i, t in enumerate(texts)]
    out = Texts(texts)
    out.top_k = top_k
    for i, t in enumerate(texts):
        if (bad := _data.bad_code_point(t)):  # a lone surrogate or NUL: refused, naming the input
            raise RequestError(400, f"input {i} contains {bad}; send valid Unicode text")
        if isinstance(t, tuple):
            continue
        if not isinstance(t, str):
            raise RequestError(400, f"input {i} is {type(t).__name__}, expected a string")
        if not t.strip():
            raise RequestError(400, f"input {i} is empty")
    return out


def input_fn(input_data, content_type):
    """Request body -> list of texts. JSON: {"inputs": str | [str, ...]}; CSV: one text per line."""
    media = _media_type(content_type)
    if media == JSON:
        text = _as_text(input_data)
        if not text.strip():
            raise RequestError(400, "empty request body")
        try:  # nesting capped before decoding; huge integers and recursion refused (issue #35)
            payload = _data.decode_request_json(text)
        except ValueError as exc:
            raise RequestError(400, str(exc)) from None
        if payload == {"describe": True}:  # what the endpoint serves from (the deploy's smoke test asks)
            return DESCRIBE
        if not isinstance(payload, dict) or "inputs" not in payload:
            raise RequestError(400, "expected a JSON object with an \"inputs\" key")
        inputs = payload["inputs"]
        if isinstance(inputs, (str, dict)):
            inputs = [inputs]
        elif not isinstance(inputs, list):
            raise RequestError(400, "\"inputs\" must be a string or a list of strings or of {\"text\", \"text_pair\"} objects")
        return _check_texts(inputs, _top_k(payload))
    if media == CSV:
        text = _as_text(input_data)
        try:
            rows = list(csv.reader(io.StringIO(text)))
        except csv.Error as exc:
            raise RequestError(400, f"malformed CSV: {exc}") from None
        # one text per row; unquoted commas split a row into fields, so join them back
        return _check_texts([",".join(row) for row in rows if any(field.strip() for field in row)])
    if not media:
        raise RequestError(415, f"missing Content-Type (use {JSON} or {CSV})")
    raise RequestError(415, f"unsupported Content-Type {media!r} (use {JSON} or {CSV})")


def predict_fn(data, model: ServingModel):
    """Texts -> [{"label": ..., "score": ...}] with the project's tokenization, padding and predictor."""
    if data is DESCRIBE:
        return dict(model.info)
    texts = list(data)
    if len(texts) > model.max_batch:
        raise RequestError(413, f"{len(texts)} texts in one request; the limit is {model.max_batch}")
    for i, t in enumerate(texts):
        n = sum(map(len, t)) if isinstance(t, tuple) else len(t)
        if n > model.max_chars:
            raise RequestError(413, f"input {i} has {n} characters; the limit is {model.max_chars}")
    rows = model.batcher.submit(texts) if model.batcher is not None else _rows(texts, model)
    return [_answer(row, model, getattr(data, "top_k", 0)) for row in rows]


def _predict(texts: list, model: ServingModel, top_k=0) -> list:
    """One model run over ``texts`` and the answers (what predict_fn returns)."""
    return [_answer(row, model, top_k) for row in _rows(texts, model)]


def _scores(texts: list, model: ServingModel) -> np.ndarray:
    """One row of logits per text (pairs as text/text_pair; chunk windows averaged, max for multi-label)."""
    pairs = [t[1] for t in texts] if texts and isinstance(texts[0], tuple) else None
    firsts = [t[0] for t in texts] if pairs is not None else texts
    if pairs is not None and not all(isinstance(t, tuple) for t in texts):
        raise RequestError(400, "a request mixes single texts and pairs")
    with model.lock:
        seqs, owners = _data.encode(firsts, model.tokenizer, model.max_length, pairs,
                                    model.long_text if pairs is None else "truncate", model.stride)
    sep = model.tokenizer.sep_token_id if pairs is not None else None
    rows = [None] * len(seqs)
    for group in _data.length_groups([len(s) for s in seqs]):  # mixed lengths: a run per similar-length group
        batch = _data.pad_batch([seqs[i] for i in group], model.pad_id, model.with_token_type_ids, sep_id=sep)
        for i, row in zip(group, np.asarray(model.predictor.predict_logits(batch), dtype=np.float64)):
            rows[i] = row
    return _tasks.aggregate(np.stack(rows), owners, model.task)


def _rows(texts: list, model: ServingModel) -> list:
    """One model run over ``texts`` (one request, or a micro-batch of several): a score row per
    text (softmax probabilities, sigmoid scores for multi-label, the value for regression)."""
    logits = _scores(texts, model)
    if model.task == _tasks.REGRESSION:
        return list(logits)
    if model.task == _tasks.MULTI_LABEL:
        return list(1.0 / (1.0 + np.exp(-logits)))
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return list(probs)


def _answer(row: np.ndarray, model: ServingModel, top_k):
    """One text's answer: the best label (as before), or with ``top_k`` (and for multi-label) the
    ranked labels; regression: the value."""
    names = model.label_names

    def name(k):
        return names[k] if k < len(names) else f"LABEL_{k}"
    if model.task == _tasks.REGRESSION:
        return {"label": name(0), "value": round(float(row[0]), 6)}
    if top_k == 0 and model.task != _tasks.MULTI_LABEL:
        k = int(row.argmax())
        return {"label": name(k), "score": round(float(row[k]), 6)}
    order = np.argsort(-row, kind="stable")[:top_k or None]
    return [{"label": name(int(k)), "score": round(float(row[k]), 6)} for k in order]


def output_fn(prediction, accept):
    """Predictions -> JSON text (the only response type)."""
    types = [_media_type(t) for t in str(accept or "").split(",") if t.strip()]
    if types and not any(t in (JSON, "*/*", "application/*") for t in types):
        raise RequestError(406, f"unsupported Accept {accept!r} (responses are {JSON})")
    return json.dumps(prediction)


input_fn, predict_fn, output_fn = _jsonl.with_json_lines(input_fn, predict_fn, output_fn, _check_texts, RequestError)
