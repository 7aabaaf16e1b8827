"""Measurement: timing statistics, the interleaved round-robin protocol, FLOP counting, the
machine's CPU matmul peak, and peak memory of a fresh process running one variant (its GPU
figures, the GPU timer and the per-compute-type GPU peaks live in :mod:`bertopt.gpu_measure`).

Everything here is independent of *what* is measured: bertopt.compare builds the workloads
(tokenize + predict closures) and hands them to these functions. Timing is never asserted in
tests; the statistics and the protocol are (with synthetic clocks and timings).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

log = logging.getLogger("bertopt.benchmarking")

PERCENTILES = (50, 90, 99)


# ----------------------------------------------------------------------------- statistics
def percentiles(values: Sequence[float], qs: Iterable[int] = PERCENTILES, scale: float = 1.0) -> dict:
    """p50/p90/p99 (linear interpolation between order statistics), mean, min, max and n of
    ``values`` multiplied by ``scale`` (e.g. 1000 for seconds -> ms). Empty input -> None."""
    arr = np.asarray(list(values), dtype=float) * scale
    if arr.size == 0:
        return None
    out = {f"p{q}": float(np.percentile(arr, q)) for q in qs}
    out.update(mean=float(arr.mean()), min=float(arr.min()), max=float(arr.max()), n=int(arr.size))
    return out


def spread(values: Sequence[float], scale: float = 1.0, keep_values: bool = True) -> dict | None:
    """Median with min-max range (the form every repeated measurement is reported in)."""
    arr = np.asarray(list(values), dtype=float) * scale
    if arr.size == 0:
        return None
    out = {"median": float(np.median(arr)), "min": float(arr.min()), "max": float(arr.max()), "n": int(arr.size)}
    if keep_values:
        out["values"] = [float(v) for v in arr]
    return out


def rates(count: float, seconds: Sequence[float]) -> list[float]:
    """Per-repeat throughput: ``count`` items per measured duration."""
    return [count / s if s > 0 else float("inf") for s in seconds]


# ----------------------------------------------------------------------------- protocol
def round_robin_order(names: Sequence[str], rounds: int) -> list[list[str]]:
    """The order variants run in, round by round: every round runs each variant once, and the
    starting variant rotates so that no variant is always first (or always right after a
    particular neighbour's cache pollution) while the machine drifts."""
    names = list(names)
    n = len(names)
    if n == 0:
        return [[] for _ in range(rounds)]
    return [names[r % n:] + names[:r % n] for r in range(rounds)]


def _guarded_round(tasks, order, timed, guard, max_share: float, retries_left: int, min_guarded_s: float):
    """One timed round, measured again (up to ``retries_left`` times) while other processes took
    more than ``max_share`` of the CPU; returns (durations, other share, retries used)."""
    used = 0
    while True:
        watch = guard() if guard else None
        got = {name: timed(name) for name in order}
        share = watch() if watch else None
        if (share is not None and share > max_share and used < retries_left
                and sum(got.values()) >= min_guarded_s):  # shorter rounds: too few clock ticks
            used += 1
            for name in order:  # tasks that keep their own records drop the discarded call
                getattr(tasks[name], "discard_last", lambda: None)()
            log.info("other processes took %.0f%% of the CPU during a timed round: measuring it again", 100 * share)
            continue
        return got, share, used


def _dominated(results: Mapping[str, Sequence[float]], keep: set, already: set) -> list[str]:
    """Tasks (outside ``keep`` and ``already``) whose fastest call is slower than the slowest call
    of the task with the lowest median duration."""
    live = {n: t for n, t in results.items() if t and n not in already}
    if len(live) < 2:
        return []
    leader = min(live, key=lambda n: float(np.median(live[n])))
    worst = max(live[leader])
    return [n for n, t in live.items() if n != leader and n not in keep and min(t) > worst]


def _settled(results: Mapping[str, Sequence[float]], rounds: int, tolerance: Optional[float],
             keep: Optional[Iterable[str]], dominated: dict) -> bool:
    """After round ``rounds``: record newly dominated tasks in ``dominated`` (when ``keep`` is
    given); True once every task still timed has its spread within ``tolerance``."""
    if keep is not None:
        dominated.update(dict.fromkeys(_dominated(results, set(keep), set(dominated)), rounds))
    return tolerance is not None and all(relative_spread(t) <= tolerance
                                         for n, t in results.items() if n not in dominated)


def relative_spread(values: Sequence[float]) -> float:
    """(max - min) / median of a sample (inf for an empty one or a zero median)."""
    if not len(values):
        return float("inf")
    med = float(np.median(values))
    return (max(values) - min(values)) / med if med > 0 else float("inf")


def run_interleaved(tasks: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1,
                    clock: Callable[[], float] = time.perf_counter,
                    timers: Optional[Mapping[str, Callable[[Callable[[], object]], float]]] = None,
                    progress: Optional[Callable[[str, int], None]] = None, settle_s: float = 0.0,
                    prime_below_s: Optional[float] = None,
                    sleep: Callable[[float], None] = time.sleep,
                    guard: Optional[Callable[[], Callable[[], float]]] = None, max_share: float = 0.10,
                    max_retries: int = 2, min_guarded_s: float = 0.2,
                    stats: Optional[dict] = None, min_repeats: Optional[int] = None,
                    tolerance: Optional[float] = None, keep: Optional[Iterable[str]] = None) -> dict[str, list[float]]:
    """Run every task ``warmup`` times (unrecorded), then ``repeats`` recorded times, interleaved
    round-robin (see :func:`round_robin_order`). Returns the recorded durations in seconds per
    task, in the order they were taken.

    Several runtimes in one process each keep a worker-thread pool that spins for a while after
    a call; on a machine with few cores the previous variant's spinning threads would steal the
    CPU from the next one (doubling batch-1 latencies on 2 cores). So when the variant changes
    the CPU idles ``settle_s`` seconds first, and a call that took less than ``prime_below_s``
    the previous time is preceded by one untimed call of the same task (its own pool awake,
    caches warm; the first warm-up call needs no primer).

    ``guard()`` (optional, e.g. :class:`CpuShare`) starts watching the machine and returns a
    function giving the CPU share other processes took since; a timed round (of at least
    ``min_guarded_s``) in which they took more than ``max_share`` is measured again, at most
    ``max_retries`` times per call (a task with ``discard_last()`` forgets its discarded call);
    ``stats`` (a dict) receives ``retried_rounds`` and the ``other_cpu_share`` of every kept round.

    ``timers[name]`` (optional) times one call itself, e.g. with CUDA events; otherwise the call
    is timed with ``clock``. ``progress(name, round)`` is called after each recorded call.
    ``min_repeats`` + ``tolerance``: stop after round ``min_repeats`` or later once every spread
    (max - min) / median is within ``tolerance`` (``stats['rounds']``). ``keep`` (tasks doing the same
    work): from round ``min_repeats`` a task outside ``keep`` slower in its fastest call than the
    leader in its slowest is not timed again (``stats['dominated']``: task -> last round)."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    timers = timers or {}
    last = {"name": None}
    took: dict[str, float] = {}

    def timed(name):
        fn = tasks[name]
        if settle_s > 0 and last["name"] not in (None, name):
            sleep(settle_s)
        if prime_below_s is not None and name in took and took[name] < prime_below_s:
            fn()
        if name in timers:
            d = float(timers[name](fn))
        else:
            t0 = clock()
            fn()
            d = clock() - t0
        last["name"] = name
        took[name] = d
        return d

    names = list(tasks)
    for order in round_robin_order(names, warmup):
        for name in order:
            timed(name)
    results: dict[str, list[float]] = {name: [] for name in names}
    retries, shares, dominated = 0, [], {}
    for r, order in enumerate(round_robin_order(names, repeats)):
        order = [n for n in order if n not in dominated]
        got, share, retried = _guarded_round(tasks, order, timed, guard, max_share, max_retries - retries,
                                             min_guarded_s)
        retries += retried
        shares.append(share)
        for name in order:
            results[name].append(got[name])
            if progress:
                progress(name, r)
        if min_repeats is not None and min_repeats <= r + 1 < repeats \
                and _settled(results, r + 1, tolerance, keep, dominated):
            break
    if stats is not None:
        stats["dominated"] = dict(dominated)
        stats["retried_rounds"] = stats.get("retried_rounds", 0) + retries
        stats.setdefault("other_cpu_share", []).extend(round(x, 3) for x in shares if x is not None)
        stats["rounds"] = len(shares)
    return results


class CpuShare:
    """CPU time other processes used since creation, as a share of the whole machine
    (system-wide busy time minus this process and its finished children). ``CpuShare`` itself
    is a valid ``guard`` for :func:`run_interleaved`: ``CpuShare().others`` is the watch."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        import psutil

        sys_t = psutil.cpu_times()
        busy = sum(sys_t) - sys_t.idle - getattr(sys_t, "iowait", 0.0)
        me = psutil.Process().cpu_times()
        return time.perf_counter(), busy, me.user + me.system + me.children_user + me.children_system

    def others(self) -> float:
        import psutil

        (t0, b0, m0), (t1, b1, m1) = self.start, self._sample()
        capacity = (t1 - t0) * (psutil.cpu_count() or 1)
        return max(0.0, min(1.0, ((b1 - b0) - (m1 - m0)) / capacity)) if capacity > 0 else 0.0

    @classmethod
    def guard(cls) -> Callable[[], float]:
        return cls().others


# ----------------------------------------------------------------------------- FLOPs
def _cfg(config, *names, default=None):
    for n in names:
        v = config.get(n) if isinstance(config, Mapping) else getattr(config, n, None)
        if v is not None:
            return v
    return default


def model_shape(config) -> dict:
    """hidden / layers / intermediate / labels of a BERT-family config (dict or PretrainedConfig)."""
    hidden = int(_cfg(config, "hidden_size", "dim", "d_model"))
    labels = _cfg(config, "num_labels")
    if labels is None:
        id2label = _cfg(config, "id2label")
        labels = len(id2label) if id2label else 2
    return {
        "hidden": hidden,
        "layers": int(_cfg(config, "num_hidden_layers", "n_layers", "num_layers")),
        "intermediate": int(_cfg(config, "intermediate_size", "hidden_dim", default=4 * hidden)),
        "labels": int(labels),
        "has_pooler": _cfg(config, "model_type", default="bert") not in ("distilbert",),
    }


def sequence_flops(shape: Mapping, length: int) -> float:
    """FLOPs (a multiply-add = 2) of one forward pass over one sequence of ``length`` tokens:
    per layer Q/K/V and output projections 8·L·H², the FFN 4·L·H·I, attention scores and the
    weighted sum 4·L²·H; plus pooler 2·H² and classifier 2·H·C. Embedding look-ups, layer norms,
    softmax and GELU are not counted (they are O(L·H), a few percent)."""
    H, N, I, C = shape["hidden"], shape["layers"], shape["intermediate"], shape["labels"]
    L = int(length)
    per_layer = 8 * L * H * H + 4 * L * H * I + 4 * L * L * H
    head = (2 * H * H if shape.get("has_pooler", True) else 0) + 2 * H * C
    return float(N * per_layer + head)


def forward_flops(config, lengths: Iterable[int]) -> float:
    """Useful FLOPs of classifying sequences of the given (real, unpadded) token lengths."""
    shape = model_shape(config)
    return float(sum(sequence_flops(shape, L) for L in lengths))


def efficiency(flops: float, seconds: float, peak_flops: float | None) -> dict:
    """Achieved FLOP/s and its fraction of the measured peak."""
    achieved = flops / seconds if seconds > 0 else float("nan")
    return {"gflops": achieved / 1e9,
            "fraction_of_peak": (achieved / peak_flops) if peak_flops else None}


# ----------------------------------------------------------------------------- matmul peak
def matmul_peak(threads: int | None = None, sizes: Sequence[int] = (1024, 2048), repeats: int = 5,
                device: str = "cpu", dtype: str = "float32", budget_s: float = 10.0) -> dict:
    """This machine's measured dense matmul rate: the best of ``repeats`` timed square matmuls at
    each size (torch's BLAS / oneDNN, same thread count as the benchmarks). Returned in GFLOP/s
    (GOP/s for int8: ``torch._int_mm``, int8 x int8 -> int32, the kernel class INT8 models run).

    Bounded to about ``budget_s`` seconds of matmul calls: a type the CPU has no kernel for runs
    torch's scalar fallback (fp16 on an AMD EPYC without AVX512-FP16: 1.0 GFLOP/s, 43 s a 2048
    call, 277 s of compare's 668), so it gets fewer repeats and skips the sizes that would not fit;
    each run records its ``repeats`` and ``skipped_sizes`` lists what was left out."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    runs, skipped, start = [], [], time.perf_counter()
    for n in sizes:
        if runs and _predicted_s(runs[-1], n) * 2 > budget_s - (time.perf_counter() - start):
            skipped.append(n)  # a warm-up and one timed call would not fit
            continue
        runs.append(_time_matmul(torch, _square_matmul(torch, n, dtype, device), n, repeats, device,
                                 budget_s - (time.perf_counter() - start)))
    peak = max(r["gflops"] for r in runs)
    call = "torch._int_mm" if dtype == "int8" else "torch.matmul"
    method = f"best of {repeats} {call} calls of n x n {dtype} at n in {list(sizes)}"
    if skipped or any(r["repeats"] < repeats for r in runs):
        method += f" (cut to a {budget_s:g} s budget: " + ", ".join(f"n={r['n']} x{r['repeats']}" for r in runs) + (
            f", n={skipped} skipped" if skipped else "") + ")"
    return {"gflops": peak, "dtype": dtype, "device": device, "threads": torch.get_num_threads(),
            "method": method, "runs": runs, "skipped_sizes": skipped}


def _predicted_s(run: dict, n: int) -> float:
    """The seconds one n x n call would take at ``run``'s rate (matmul work grows with n cubed)."""
    return run["best_s"] * (n / run["n"]) ** 3


def _time_matmul(torch, op, n: int, repeats: int, device: str, budget_s: float) -> dict:
    """One size: a warm-up call (allocations, BLAS thread pool, oneDNN kernel choice), then the best of
    ``repeats`` timed calls, fewer where ``budget_s`` would not hold them (at least one)."""
    def timed() -> float:
        if device != "cpu":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        op()
        if device != "cpu":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    warm = timed()
    reps = max(1, min(repeats, int((budget_s - warm) / warm))) if warm > 0 else repeats
    best = min(timed() for _ in range(reps))
    return {"n": n, "best_s": best, "gflops": 2 * n ** 3 / best / 1e9, "repeats": reps}


def _square_matmul(torch, n: int, dtype: str, device: str):
    if dtype == "int8":
        a = torch.randint(-64, 64, (n, n), dtype=torch.int8, device=device)
        b = torch.randint(-64, 64, (n, n), dtype=torch.int8, device=device)
        return lambda: torch._int_mm(a, b)
    a = torch.randn(n, n, dtype=getattr(torch, dtype), device=device)
    b = torch.randn(n, n, dtype=getattr(torch, dtype), device=device)
    return lambda: a @ b


CPU_PEAK_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "int8": "int8"}   # fp32 is matmul_peak's default


def cpu_matmul_peaks(ctypes: Iterable[str], threads: int | None = None, sizes: Sequence[int] = (1024, 2048),
                     repeats: int = 5) -> dict:
    """The CPU's matmul peak for each non-fp32 compute type in ``ctypes`` (bf16, fp16, int8), so a
    bf16 or INT8 row is measured against what the CPU does in its own type: with AMX an int8
    matmul runs ~9x the fp32 rate, and dividing by the fp32 peak put such rows far above 100%.
    A type the CPU or torch cannot run gets ``gflops: None`` and the error (no fraction then)."""
    peaks = {}
    for ctype in sorted(set(ctypes) & set(CPU_PEAK_DTYPES)):
        try:
            peaks[ctype] = matmul_peak(threads, sizes=sizes, repeats=repeats, dtype=CPU_PEAK_DTYPES[ctype])
        except Exception as exc:  # e.g. an int8 matmul this torch build has no CPU kernel for
            peaks[ctype] = {"gflops": None, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    return peaks


# ----------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss_bytes() -> int:
    """This process's resident-set high-water mark. On Linux from /proc (VmHWM belongs to the
    address space, so it starts afresh at exec; getrusage's ru_maxrss would carry the parent's
    peak over fork + exec)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return v if sys.platform == "darwin" else v * 1024


def _import(dotted: str):
    import importlib

    module, _, attr = dotted.partition(":")
    return getattr(importlib.import_module(module), attr)


def synthetic_batch(batch: int, seq: int, vocab_size: int = 30522, with_token_type_ids: bool = True,
                    seed: int = 0, low: int = 1000) -> dict[str, np.ndarray]:
    """A full (unpadded) batch of random token ids for model-only timing."""
    rng = np.random.default_rng(seed)
    lo = min(low, vocab_size // 2)  # skip the special/unused ids at the start of BERT vocabularies
    ids = rng.integers(lo, vocab_size, size=(batch, seq), dtype=np.int64)
    out = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if with_token_type_ids:
        out["token_type_ids"] = np.zeros_like(ids)
    return out


def probe_memory(spec: Mapping) -> dict:
    """Runs IN the fresh process: build the predictor with ``spec['factory']`` and run one
    ``batch`` x ``seq`` batch ``runs`` times; report load time and memory."""
    import_start = time.perf_counter()
    factory = _import(spec["factory"])
    device = spec.get("device", "cpu")
    cuda = device.startswith("cuda")
    if cuda:
        import torch

        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_bytes()
    t0 = time.perf_counter()
    predictor = factory(dict(spec["predictor"]))
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_bytes()
    batch = synthetic_batch(spec["batch"], spec["seq"], spec.get("vocab_size", 30522),
                            spec.get("with_token_type_ids", True))
    names = getattr(predictor, "input_names", None)
    if names:
        batch = {k: v for k, v in batch.items() if k in names}
    for _ in range(int(spec.get("runs", 2))):
        predictor.predict_logits(batch)
    out = {
        "import_s": round(t0 - import_start, 3),
        "load_time_s": load_s,
        "rss_before_load_mb": rss_before / 2**20,
        "rss_after_load_mb": rss_loaded / 2**20,
        "peak_rss_mb": _peak_rss_bytes() / 2**20,
        "batch": [spec["batch"], spec["seq"]],
    }
    out["model_rss_mb"] = out["peak_rss_mb"] - out["rss_before_load_mb"]
    if cuda:
        from .gpu_measure import gpu_memory

        out.update(gpu_memory(predictor, device))
    return out


def fresh_process_memory(spec: Mapping, timeout: float = 900.0, env: Optional[Mapping] = None) -> dict:
    """Peak memory and load time of a fresh Python process that only loads one variant and runs
    it (so the parent's other models and allocator history do not count). ``spec`` holds
    ``factory`` ("module:function" taking ``spec['predictor']``), ``predictor``, ``batch``,
    ``seq``, ``device``. Returns the probe's dict, or ``{"error": ...}``."""
    cmd = [sys.executable, "-m", "bertopt.benchmarking", "--memory-probe", json.dumps(dict(spec))]
    child_env = dict(os.environ, **(env or {}))
    child_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child_env["PYTHONPATH"] = root + (os.pathsep + child_env["PYTHONPATH"] if child_env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env)
    except subprocess.TimeoutExpired:
        return {"error": f"memory probe timed out after {timeout:.0f}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return {"error": f"memory probe exited {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def _probe_main(argv: Sequence[str]) -> int:
    if len(argv) != 2 or argv[0] != "--memory-probe":
        print("usage: python -m bertopt.benchmarking --memory-probe SPEC_JSON", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no import just to silence it
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    result = probe_memory(json.loads(argv[1]))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_probe_main(sys.argv[1:]))
