"""Measurement statistics and protocol on synthetic timings (no timing is asserted)."""
from __future__ import annotations

import itertools
import textwrap

import time

import numpy as np
import pytest

from bertopt import benchmarking as bm


# ----------------------------------------------------------------------------- statistics
def test_percentiles_match_linear_interpolation_and_scale():
    values = [float(v) for v in range(1, 101)]  # 1..100
    p = bm.percentiles(values)
    assert p["p50"] == pytest.approx(50.5)
    assert p["p90"] == pytest.approx(90.1)
    assert p["p99"] == pytest.approx(99.01)
    assert p["mean"] == pytest.approx(50.5)
    assert (p["min"], p["max"], p["n"]) == (1.0, 100.0, 100)
    ms = bm.percentiles([0.001, 0.002, 0.003], scale=1000)
    assert ms["p50"] == pytest.approx(2.0) and ms["max"] == pytest.approx(3.0)


def test_percentiles_order_independent_and_empty():
    rng = np.random.default_rng(0)
    values = rng.exponential(size=501).tolist()
    shuffled = list(rng.permutation(values))
    assert bm.percentiles(values) == bm.percentiles(shuffled)
    p = bm.percentiles(values)
    assert p["min"] <= p["p50"] <= p["p90"] <= p["p99"] <= p["max"]
    assert bm.percentiles([]) is None


def test_spread_reports_median_with_range():
    s = bm.spread([3.0, 1.0, 2.0, 10.0, 4.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (3.0, 1.0, 10.0, 5)
    assert s["values"] == [3.0, 1.0, 2.0, 10.0, 4.0]
    assert "values" not in bm.spread([1.0], keep_values=False)
    assert bm.spread([]) is None


def test_rates_are_items_per_second():
    assert bm.rates(100, [0.5, 2.0]) == [200.0, 50.0]


# ----------------------------------------------------------------------------- protocol
def test_round_robin_rotates_the_start_and_runs_everyone_each_round():
    names = ["a", "b", "c"]
    order = bm.round_robin_order(names, 6)
    assert all(sorted(r) == names for r in order)
    assert [r[0] for r in order] == ["a", "b", "c", "a", "b", "c"]
    # cyclic order is kept, so each variant's predecessor is always the same neighbour set
    assert order[1] == ["b", "c", "a"]
    assert bm.round_robin_order([], 2) == [[], []]


class FakeClock:
    """Time advances only when a task 'works'."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_run_interleaved_records_only_timed_rounds_interleaved():
    clock = FakeClock()
    log = []
    durations = {"fast": itertools.count(1), "slow": itertools.count(100)}

    def task(name):
        def go():
            log.append(name)
            clock.now += next(durations[name]) / 1000
        return go

    times = bm.run_interleaved({"fast": task("fast"), "slow": task("slow")}, repeats=4, warmup=2, clock=clock)
    # 2 warm-up rounds + 4 timed rounds, each running every task once
    assert len(log) == 12
    for r in range(6):
        assert sorted(log[2 * r:2 * r + 2]) == ["fast", "slow"]
    # warm-up durations (1, 2 and 100, 101 ms) are not recorded
    assert times["fast"] == pytest.approx([0.003, 0.004, 0.005, 0.006])
    assert times["slow"] == pytest.approx([0.102, 0.103, 0.104, 0.105])
    # the starting task alternates between rounds
    firsts = [log[2 * r] for r in range(2, 6)]
    assert firsts == ["fast", "slow", "fast", "slow"]


def test_run_interleaved_settles_between_variants_and_primes_short_calls():
    clock = FakeClock()
    log, sleeps = [], []

    def task(name, ms):
        def go():
            log.append(name)
            clock.now += ms / 1000
        return go

    def sleep(s):
        sleeps.append(s)
        clock.now += s  # idle time passes but is never part of a measurement

    times = bm.run_interleaved({"short": task("short", 5), "long": task("long", 500)}, repeats=2, warmup=1,
                               clock=clock, settle_s=0.1, prime_below_s=0.25, sleep=sleep)
    assert times == {"short": pytest.approx([0.005, 0.005]), "long": pytest.approx([0.5, 0.5])}
    # warm-up: short, long | round 0: short, long | round 1: long, short -> the CPU idles at each of
    # the 4 switches; timed short calls (5 ms < 250 ms) get one untimed call of their own first
    assert log == ["short", "long", "short", "short", "long", "long", "short", "short"]
    assert sleeps == [0.1] * 4


def test_run_interleaved_custom_timer_and_progress():
    seen = []
    times = bm.run_interleaved({"x": lambda: None}, repeats=3, warmup=0,
                               timers={"x": lambda fn: (fn(), 0.25)[1]},
                               progress=lambda name, r: seen.append((name, r)))
    assert times == {"x": [0.25, 0.25, 0.25]}
    assert seen == [("x", 0), ("x", 1), ("x", 2)]
    with pytest.raises(ValueError):
        bm.run_interleaved({"x": lambda: None}, repeats=0)


# ----------------------------------------------------------------------------- FLOPs / efficiency
def test_sequence_flops_by_hand():
    shape = {"hidden": 4, "layers": 1, "intermediate": 8, "labels": 2, "has_pooler": True}
    # per layer: 8*L*H^2 = 384, 4*L*H*I = 384, 4*L^2*H = 144; head: 2*H^2 + 2*H*C = 48
    assert bm.sequence_flops(shape, 3) == 384 + 384 + 144 + 48
    shape2 = dict(shape, layers=2, has_pooler=False)
    assert bm.sequence_flops(shape2, 3) == 2 * (384 + 384 + 144) + 16


def test_forward_flops_bert_base_is_about_22_gflop_per_128_tokens():
    from transformers import BertConfig

    cfg = BertConfig()  # bert-base: 768 hidden, 12 layers, 3072 intermediate
    gflops = bm.forward_flops(cfg, [128]) / 1e9
    assert 21 < gflops < 24  # ~2 x 86M non-embedding parameters x 128 tokens + attention
    # real (unpadded) lengths: the sum of the per-sequence counts
    assert bm.forward_flops(cfg, [10, 20]) == pytest.approx(
        bm.forward_flops(cfg, [10]) + bm.forward_flops(cfg, [20]))
    # dict configs (config.json) and DistilBERT names work too
    d = {"dim": 768, "n_layers": 6, "hidden_dim": 3072, "model_type": "distilbert", "id2label": {0: "a", 1: "b"}}
    shape = bm.model_shape(d)
    assert shape == {"hidden": 768, "layers": 6, "intermediate": 3072, "labels": 2, "has_pooler": False}


def test_efficiency_arithmetic():
    e = bm.efficiency(flops=6e9, seconds=0.5, peak_flops=24e9)
    assert e["gflops"] == pytest.approx(12.0)
    assert e["fraction_of_peak"] == pytest.approx(0.5)
    assert bm.efficiency(1e9, 1.0, None)["fraction_of_peak"] is None


def test_matmul_peak_structure():
    peak = bm.matmul_peak(threads=1, sizes=(32, 64), repeats=2)
    assert peak["gflops"] == max(r["gflops"] for r in peak["runs"]) > 0
    assert [r["n"] for r in peak["runs"]] == [32, 64]
    assert peak["threads"] == 1 and peak["dtype"] == "float32"


def test_matmul_peak_cuts_a_type_without_a_fast_kernel_to_its_time_budget(monkeypatch):
    """fp16 on a CPU without a native kernel ran torch's fallback at 1 GFLOP/s: 43 s a 2048 call,
    277 s of compare; the peak now takes fewer repeats and skips the sizes that would not fit."""
    calls = []

    def slow(torch, n, dtype, device):
        def op():
            calls.append(n)
            time.sleep(0.2)
        return op

    monkeypatch.setattr(bm, "_square_matmul", slow)
    peak = bm.matmul_peak(threads=1, sizes=(32, 64), repeats=5, dtype="float16", budget_s=0.7)
    assert [r["n"] for r in peak["runs"]] == [32] and peak["skipped_sizes"] == [64]
    assert peak["runs"][0]["repeats"] == 2 and calls == [32, 32, 32]   # a warm-up and 2 timed calls
    assert "cut to a 0.7 s budget" in peak["method"] and "n=[64] skipped" in peak["method"]
    fast = bm.matmul_peak(threads=1, sizes=(32, 64), repeats=2)           # a real kernel: untouched
    assert fast["skipped_sizes"] == [] and [r["repeats"] for r in fast["runs"]] == [2, 2]
    assert "budget" not in fast["method"]


def test_cpu_matmul_peaks_per_compute_type(monkeypatch):
    peaks = bm.cpu_matmul_peaks({"fp32", "bf16", "int8"}, threads=1, sizes=(32, 64), repeats=2)
    assert set(peaks) == {"bf16", "int8"}   # fp32 is matmul_peak's own figure, measured before and after
    assert peaks["int8"]["dtype"] == "int8" and "torch._int_mm" in peaks["int8"]["method"]
    assert all(e["gflops"] == max(r["gflops"] for r in e["runs"]) > 0 for e in peaks.values())

    import torch

    def no_int8(*a, **k):
        raise RuntimeError("no int8 kernel on this CPU\nsecond line")

    monkeypatch.setattr(torch, "_int_mm", no_int8)
    failed = bm.cpu_matmul_peaks({"int8"}, threads=1, sizes=(32,), repeats=1)["int8"]
    assert failed == {"gflops": None, "error": "RuntimeError: no int8 kernel on this CPU"}


def test_synthetic_batch_shapes():
    b = bm.synthetic_batch(3, 7, vocab_size=500, with_token_type_ids=False)
    assert set(b) == {"input_ids", "attention_mask"}
    assert b["input_ids"].shape == (3, 7) and b["input_ids"].dtype == np.int64
    assert b["attention_mask"].all() and b["input_ids"].max() < 500


# ----------------------------------------------------------------------------- memory
FACTORY = textwrap.dedent('''
    import numpy as np

    class Fake:
        input_names = ("input_ids",)

        def __init__(self, mb):
            self.weights = np.ones(mb * 2**20 // 8)  # really resident

        def predict_logits(self, batch):
            return np.zeros((batch["input_ids"].shape[0], 2), dtype=np.float32)

    def make(spec):
        if spec.get("fail"):
            raise RuntimeError("cannot open " + spec["path"])
        return Fake(spec["mb"])
''')


def test_fresh_process_memory_measures_the_child_only(tmp_path):
    (tmp_path / "fake_factory.py").write_text(FACTORY)
    ballast = np.ones(300 * 2**20 // 8)  # the parent holds 300 MB the child must not report
    spec = {"factory": "fake_factory:make", "predictor": {"mb": 64}, "batch": 2, "seq": 8, "device": "cpu"}
    mem = bm.fresh_process_memory(spec, env={"PYTHONPATH": str(tmp_path)})
    assert "error" not in mem, mem
    assert mem["rss_after_load_mb"] - mem["rss_before_load_mb"] >= 60
    assert mem["peak_rss_mb"] >= mem["rss_after_load_mb"]
    assert mem["model_rss_mb"] >= 60
    assert mem["peak_rss_mb"] < 300  # not the parent's high-water mark
    assert mem["load_time_s"] >= 0 and mem["batch"] == [2, 8]
    del ballast


def test_fresh_process_memory_reports_a_failing_variant(tmp_path):
    (tmp_path / "fake_factory.py").write_text(FACTORY)
    spec = {"factory": "fake_factory:make", "predictor": {"fail": True, "path": "model.bad.onnx"},
            "batch": 1, "seq": 4}
    mem = bm.fresh_process_memory(spec, env={"PYTHONPATH": str(tmp_path)})
    assert "error" in mem and "cannot open model.bad.onnx" in mem["error"]


class Recorder:
    def __init__(self, log, name, clock):
        self.log, self.name, self.clock, self.discarded = log, name, clock, 0

    def __call__(self):
        self.log.append(self.name)
        self.clock.now += 0.15

    def discard_last(self):
        self.discarded += 1


def test_run_interleaved_repeats_rounds_disturbed_by_other_processes():
    shares = iter([0.5, 0.02, 0.9, 0.9, 0.03])  # per watched round, in order
    clock = FakeClock()

    def guard():
        share = next(shares)
        return lambda: share

    log, stats = [], {}
    tasks = {"a": Recorder(log, "a", clock), "b": Recorder(log, "b", clock)}  # 0.3 s rounds: guarded
    times = bm.run_interleaved(tasks, repeats=3, warmup=0, clock=clock, guard=guard, max_share=0.1,
                               max_retries=2, stats=stats)
    # round 0 disturbed (0.5) -> again (0.02, kept); round 1 disturbed twice (0.9, 0.9) -> retries
    # exhausted, kept at 0.9; round 2 (0.03) kept
    assert stats["retried_rounds"] == 2 and stats["other_cpu_share"] == [0.02, 0.9, 0.03]
    assert len(log) == 2 * 5 and times == {"a": pytest.approx([0.15] * 3), "b": pytest.approx([0.15] * 3)}
    # rounds shorter than min_guarded_s are never repeated (too few clock ticks to judge)
    shares = iter([0.9] * 3)
    stats = {}
    bm.run_interleaved(tasks, repeats=3, warmup=0, clock=clock, guard=guard, min_guarded_s=1.0, stats=stats)
    assert stats["retried_rounds"] == 0
    assert tasks["a"].discarded == tasks["b"].discarded == 2


def test_cpu_share_is_a_fraction():
    watch = bm.CpuShare.guard()
    sum(i * i for i in range(200000))  # our own work does not count
    assert 0.0 <= watch() <= 1.0


def test_run_interleaved_stops_early_only_once_every_spread_is_within_tolerance():
    def runner(ms_per_call):
        clock, stats = FakeClock(), {}
        calls = {n: iter(v) for n, v in ms_per_call.items()}

        def task(name):
            def go():
                clock.now += next(calls[name]) / 1000
            return go

        times = bm.run_interleaved({n: task(n) for n in ms_per_call}, repeats=5, warmup=0, clock=clock,
                                   stats=stats, min_repeats=3, tolerance=0.05)
        return times, stats

    times, stats = runner({"a": [10, 10.1, 10.2, 50, 50], "b": [20, 20, 20.3, 90, 90]})
    assert stats["rounds"] == 3 and len(times["a"]) == len(times["b"]) == 3  # stable: stop at the minimum
    times, stats = runner({"a": [10, 10, 10, 10, 10], "b": [20, 30, 20, 20, 20]})
    assert stats["rounds"] == 5 and times["b"] == pytest.approx([0.02, 0.03, 0.02, 0.02, 0.02])  # b is noisy
    times, stats = runner({"a": [10, 10, 10, 10, 10], "b": [20, 20, 20, 20, 20]})
    assert bm.relative_spread(times["a"]) == pytest.approx(0.0) and bm.relative_spread([]) == float("inf")


def test_run_interleaved_stops_timing_a_dominated_task_but_never_a_kept_one():
    """From round min_repeats on, a task whose fastest call is slower than the leader's slowest
    is dropped; the kept ones (the headline's denominators) and close contenders get every round."""
    clock = FakeClock()
    calls = {n: 0 for n in ("leader", "close", "slow", "reference")}
    # noisy leader (8-12 ms), a contender overlapping it (11-15 ms), a clearly slower one (30 ms),
    # and the even slower reference that must be kept
    pattern = {"leader": [8, 12, 10, 9, 11], "close": [13, 15, 11, 12, 14], "slow": [30] * 5, "reference": [90] * 5}

    def task(name):
        def go():
            clock.now += pattern[name][calls[name]] / 1000
            calls[name] += 1
        return go

    stats: dict = {}
    times = bm.run_interleaved({n: task(n) for n in pattern}, repeats=5, warmup=0, clock=clock, stats=stats,
                               min_repeats=3, tolerance=0.05, keep=("reference",))
    assert len(times["slow"]) == 3 and stats["dominated"] == {"slow": 3}
    assert len(times["leader"]) == len(times["close"]) == len(times["reference"]) == 5
    calls.update(dict.fromkeys(calls, 0))
    full = bm.run_interleaved({n: task(n) for n in pattern}, repeats=5, warmup=0, clock=clock,
                              min_repeats=3, tolerance=0.05)
    assert all(len(t) == 5 for t in full.values())  # without keep= nothing is dropped
