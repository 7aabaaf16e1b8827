"""The stage table main.py runs, in order. Later stages register themselves here."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

from . import cli
from .config import TrainConfig


@dataclass(frozen=True)
class Stage:
    name: str
    script: str
    description: str
    add_args: Callable[[argparse.ArgumentParser], None]
    build_config: Callable[[argparse.Namespace], object]
    run: Callable[[object], cli.StageResult]
    optional: bool = False  # optional stages run only when enabled_by(ns) says so
    enabled_by: Callable[[argparse.Namespace], bool] | None = None


def _run_baseline(cfg):
    from .train_stage import run_baseline

    return run_baseline(cfg)


def _run_mixed(cfg):
    from .train_stage import run_mixed_precision

    return run_mixed_precision(cfg)


def add_baseline_args(parser):
    cli.add_common_args(parser)
    cli.add_train_args(parser)


def add_mixed_args(parser):
    add_baseline_args(parser)
    g = parser.add_argument_group("mixed precision")
    cli.add(g, "--precision", choices=("amp", "fp16", "bf16"),
            help="amp (default) = bf16 where the device has native bf16 math, else fp16 + GradScaler on CUDA")


def build_baseline(ns):
    return cli.build_config(TrainConfig, ns, precision="fp32")


def build_mixed(ns):
    return cli.build_config(TrainConfig, ns, precision=getattr(ns, "precision", None) or "amp")


BASELINE = Stage("baseline", "benchmark.py", "FP32 baseline fine-tune (the reference every variant is measured against)",
                 add_baseline_args, build_baseline, _run_baseline)
MIXED_PRECISION = Stage("mixed_precision", "mixed_precision.py",
                        "mixed-precision (AMP) fine-tune; skipped where the hardware has no fast half-precision math",
                        add_mixed_args, build_mixed, _run_mixed)

STAGES: list[Stage] = [BASELINE, MIXED_PRECISION]


def by_name() -> dict[str, Stage]:
    return {s.name: s for s in STAGES}
