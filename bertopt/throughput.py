"""Throughput mode: several model calls at once for a batch workload (a whole eval set, a file to
score), where one call at a time leaves cores idle.

On short texts (SST-2: 25 tokens on average) one model call cannot keep every core busy: its
matrices are too small to split well across threads, and the Python between calls (padding, the
argmax) runs on one core while the others wait. Running N single-threaded calls side by side is
how the runtimes' own docs reach their throughput figures: OpenVINO's ``THROUGHPUT`` hint (N CPU
streams of one thread each, one infer request per calling thread), ONNX Runtime's thread-safe
``InferenceSession.run`` with one intra-op thread, called from N threads (the GIL is released
during a run). PyTorch's intra-op pool is process-wide (``torch.set_num_threads``), so its rows
stay one call at a time.

:func:`map_batches` keeps the batches' order: the caller gets each batch's output in the order it
handed them in, whatever order the streams finished them, so predictions are the same as one call
at a time (the same batches, so the same per-batch dynamic quantization too).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Optional

STREAM_BACKENDS = ("onnxruntime", "openvino")
STREAMS_ENV = "BERTOPT_STREAMS"


def streams_refusal(backend: str, device: str = "cpu") -> Optional[str]:
    """Why a row has no throughput mode, or None."""
    if device != "cpu":
        return "GPU rows run one call at a time (the device is already parallel)"
    if backend == "torch":
        return "PyTorch's intra-op thread pool is process-wide: its rows run one call at a time"
    if backend not in STREAM_BACKENDS:
        return f"no throughput mode for {backend}"
    return None


def host_streams(threads: int, env: Optional[dict] = None) -> tuple[int, str]:
    """How many concurrent single-threaded calls a batch workload runs here, and why: one per core
    the measurement uses (``threads``), unless ``BERTOPT_STREAMS`` says otherwise (1 turns the mode
    off). A bad value is a :class:`bertopt.errors.ConfigError` naming the variable."""
    from .errors import ConfigError

    raw = (os.environ if env is None else env).get(STREAMS_ENV)
    if raw is None or raw.strip() == "":
        n = max(1, int(threads))
        return n, f"one single-threaded stream per core used ({n} thread(s))"
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if not 1 <= n <= 256:
        raise ConfigError(f"{STREAMS_ENV} must be an integer from 1 to 256 (got {raw!r}); 1 = one call at a time")
    return n, f"set by {STREAMS_ENV}={n}"


def open_streams(spec, path, n: int, *, name: Optional[str] = None):
    """The predictor of a registered variant opened for ``n`` concurrent single-threaded calls: an
    ONNX Runtime session with one intra-op thread (thread-safe, shared by the callers), or an
    OpenVINO model compiled with ``n`` CPU streams of one thread each."""
    from . import variants
    from .runtimes import OpenVinoPredictor, open_predictor

    if isinstance(spec, str):
        spec = variants.get(spec)
    why = streams_refusal(spec.backend, spec.devices[0])
    if why:
        raise ValueError(f"{spec.name}: {why}")
    if spec.backend == "openvino":
        return OpenVinoPredictor(path, name=name or spec.name, precision=spec.precision, threads=1, streams=n)
    return open_predictor(spec, path, threads=1, name=name)


def map_batches(fn: Callable, batches: Iterable, streams: int = 1) -> Iterator:
    """``fn(batch)`` for every batch, in order; ``streams`` > 1 runs that many calls at once (each
    worker takes the next batch as it finishes one, so long and short batches balance out)."""
    if streams <= 1:
        for b in batches:
            yield fn(b)
        return
    with ThreadPoolExecutor(max_workers=streams, thread_name_prefix="bertopt-stream") as pool:
        yield from pool.map(fn, batches)
