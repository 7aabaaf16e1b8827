"""compare.py's configuration: the measurement protocols (full / fast / quick), the row names and
cells every compare module shares, CompareConfig (validated once) and the stage's flags."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from ..config import CommonConfig
from ..errors import PipelineError

OPTIMIZE_FOR = ("throughput", "latency")
TARGETS = ("cpu", "gpu")
REFERENCE = "torch-fp32-padded"   # the naive reference users start from
BASELINE_ROW = "torch-fp32"       # the FP32 baseline accuracy deltas are measured against
PADDED_LENGTH, PADDED_BATCH = 128, 16
SOURCE_PREFIX = {"baseline": "", "mixed_precision": "mp-", "pruned": "pruned-"}
TIE_TOLERANCE = 0.01  # scores within 1% of the best are run-to-run noise: ties
FIRST_USE_RATIO = 1.5  # a first pass this many times a warm one is called out (report, recommendation)
EFFICIENCY_CELL = (32, 128)
LATENCY_CELL = (1, 128)
# settle_s: CPU idle time before a timed call when the variant changes (the previous runtime's
# worker threads stop spinning); prime_below_s: calls shorter than this get one untimed call first
FULL_PROTOCOL = {"repeats": 5, "warmup": 2, "latency_requests": 200, "sweep_batches": (1, 8, 32, 64),
                 "sweep_seqs": (32, 64, 128, 256), "matmul_sizes": (1024, 2048), "max_eval_samples": None,
                 "settle_s": 0.1, "prime_below_s": 0.25, "guard": True}
QUICK_PROTOCOL = {"repeats": 3, "warmup": 1, "latency_requests": 24, "sweep_batches": (1, 32),
                  "sweep_seqs": (32, 128), "matmul_sizes": (1024,), "max_eval_samples": 200,
                  "settle_s": 0.02, "prime_below_s": 0.25, "guard": False}
# fast (main.py's default): the full protocol's repeats, requests and eval set, except that a timed
# measurement stops after 3 rounds once every variant's spread (max - min) / median is within 5 %,
# one warm-up round instead of two (a round is a whole pass over the eval set), the sweep holds only
# the cells the headline, targets and plots use (batch 1 and 32 at 32 and 128 tokens), batch-1
# accuracy is measured only for rows that quantize activations at run time (ORT int8/int4: their
# predictions depend on what shares a batch; other rows' do not beyond float noise), and the
# fresh-process memory probes run only for variants the recommendation can choose; from round 3 a
# row whose fastest call is slower than the leader's slowest is not timed again (it can neither win
# nor tie; the padded reference and the FP32 baseline always get every round)
FAST_PROTOCOL = {**FULL_PROTOCOL, "warmup": 1, "sweep_batches": (1, 32), "sweep_seqs": (32, 128), "min_repeats": 3,
                 "spread_tolerance": 0.05, "memory_only_eligible": True, "batch1_only_batch_dependent": True,
                 "drop_dominated": True}
PROTOCOLS = {"full": FULL_PROTOCOL, "fast": FAST_PROTOCOL, "quick": QUICK_PROTOCOL}


def _int_list(value) -> Optional[tuple]:
    if value is None:
        return None
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
    else:
        parts = list(value)
    try:
        return tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        return ("invalid", value)


@dataclass
class CompareConfig(CommonConfig):
    """compare.py: what to measure and how to choose the recommended variant."""

    optimize_for: str = "throughput"
    target: str = "cpu"
    accuracy_budget: float = 0.01
    quick: bool = False
    protocol_name: str = "full"  # full | fast | quick (--quick = --protocol quick)
    threads: Optional[int] = None
    repeats: Optional[int] = None
    warmup: Optional[int] = None
    latency_requests: Optional[int] = None
    sweep_batches: Optional[tuple] = None
    sweep_seqs: Optional[tuple] = None
    skip_memory: bool = False
    report_only: bool = False

    def __post_init__(self):
        self.sweep_batches = _int_list(self.sweep_batches)
        self.sweep_seqs = _int_list(self.sweep_seqs)
        if self.quick:
            self.protocol_name = "quick"
        self.quick = self.protocol_name == "quick"
        super().__post_init__()

    def problems(self) -> list[str]:
        p = super().problems()
        if self.protocol_name not in PROTOCOLS:
            p.append(f"--protocol must be one of {', '.join(PROTOCOLS)} (got {self.protocol_name!r})")
        if self.optimize_for not in OPTIMIZE_FOR:
            p.append(f"--optimize-for must be throughput or latency (got {self.optimize_for!r})")
        if self.target not in TARGETS:
            p.append(f"--target must be cpu or gpu (got {self.target!r})")
        try:  # the throughput mode's stream count (an environment setting; see bertopt.throughput)
            from ..throughput import host_streams

            host_streams(1)
        except PipelineError as exc:
            p.append(str(exc))
        if not isinstance(self.accuracy_budget, (int, float)) or not (0 <= self.accuracy_budget < 1):
            p.append(f"--accuracy-budget must be a fraction in [0, 1), e.g. 0.01 = 1 point "
                     f"(got {self.accuracy_budget!r})")
        for name, least in (("threads", 1), ("repeats", 1), ("warmup", 0), ("latency_requests", 1)):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < least):
                p.append(f"--{name.replace('_', '-')} must be an integer >= {least} (got {v!r})")
        if self.repeats is not None and isinstance(self.repeats, int) and 1 <= self.repeats < 5 and not self.quick:
            p.append(f"--repeats must be >= 5 for a full run (got {self.repeats}); use --quick for a reduced protocol")
        for name in ("sweep_batches", "sweep_seqs"):
            v = getattr(self, name)
            if v is not None and (not v or v[0] == "invalid" or any(x < 1 for x in v)):
                p.append(f"--{name.replace('_', '-')} must be comma-separated positive integers "
                         f"(got {v[1] if v and v[0] == 'invalid' else v!r})")
        return p

    def protocol(self) -> dict:
        """The resolved measurement protocol (explicit flags over the protocol's defaults)."""
        base = {"min_repeats": None, "spread_tolerance": None, "memory_only_eligible": False,
                **PROTOCOLS.get(self.protocol_name, FULL_PROTOCOL), "name": self.protocol_name}
        for key in ("repeats", "warmup", "latency_requests", "sweep_batches", "sweep_seqs"):
            if getattr(self, key) is not None:
                base[key] = getattr(self, key)
        base["sweep_batches"] = tuple(sorted(set(base["sweep_batches"])))
        base["sweep_seqs"] = tuple(sorted(set(base["sweep_seqs"])))
        base["threads"] = self.threads or usable_cores()
        base["quick"] = self.quick
        return base


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _csv(values) -> str:
    return ",".join(map(str, values))


def add_compare_args(parser) -> None:
    from functools import partial

    from .. import cli

    cli.add_common_args(parser)
    g = parser.add_argument_group("comparison options")
    add = partial(cli.add, g, config=CompareConfig)
    full, quick, fast = FULL_PROTOCOL, QUICK_PROTOCOL, FAST_PROTOCOL
    add("--optimize-for", choices=OPTIMIZE_FOR,
        help="recommend the highest end-to-end throughput or the lowest p50 latency (default: {default})")
    add("--target", choices=TARGETS, help="deploy target the recommendation must run on (default: {default})")
    add("--accuracy-budget", type=float, metavar="F",
        help="largest accuracy drop vs the FP32 baseline a recommended variant may have, as a "
             "fraction (default: {default}; the ONNX stage's rejection budget is --onnx-accuracy-budget)")
    add("--protocol", dest="protocol_name", choices=tuple(PROTOCOLS),
        help=f"full (default for compare.py): {full['repeats']} timed repeats, a {_csv(full['sweep_batches'])} x "
             f"{_csv(full['sweep_seqs'])} sweep, memory of every variant; fast (main.py's default): stop after "
             f"{fast['min_repeats']} repeats once every spread is within {100 * fast['spread_tolerance']:.0f}%%, "
             "the sweep cells the headline and plots use, memory of recommendable variants only; quick: --quick")
    add("--quick", action="store_true", default=None,
        help=f"reduced protocol for CI/smoke runs: {quick['repeats']} repeats, {quick['max_eval_samples']} eval "
             f"texts, {quick['latency_requests']} latency requests, a {_csv(quick['sweep_batches'])} x "
             f"{_csv(quick['sweep_seqs'])} sweep")
    add("--threads", type=int, metavar="N",
        help="CPU threads for every variant (fixed and recorded; default: all usable cores)")
    add("--repeats", type=int, metavar="N",
        help=f"timed repeats per measurement (default: {full['repeats']}; >= 5 unless --quick)")
    add("--warmup", type=int, metavar="N", help=f"untimed warm-up rounds (default: {full['warmup']})")
    add("--latency-requests", type=int, metavar="N",
        help=f"single requests timed per variant for the latency percentiles (default: {full['latency_requests']})")
    add("--sweep-batches", metavar="A,B", help=f"sweep batch sizes (default: {_csv(full['sweep_batches'])})")
    add("--sweep-seqs", metavar="A,B", help=f"sweep sequence lengths (default: {_csv(full['sweep_seqs'])}; "
                                            "clamped to the model's maximum positions)")
    add("--skip-memory", action="store_true", default=None,
        help="do not start a fresh process per variant to measure peak memory and load time")
    add("--report-only", action="store_true", default=None,
        help="re-render summary.md and the HTML report from the existing results.json (with other "
             "--optimize-for/--target/--accuracy-budget values: recommend again from those measurements)")


def build_compare(ns) -> CompareConfig:
    from .. import cli

    return cli.build_config(CompareConfig, ns)
