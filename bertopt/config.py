"""Configuration dataclasses for every stage.

Resolution order: dataclass defaults -> optional ``--config FILE`` (YAML or JSON) -> explicit
flags (see :mod:`bertopt.cli`). Each dataclass validates itself once in ``__post_init__``,
collects every problem and raises a single :class:`ConfigError` that names the CLI flags.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from .errors import ConfigError

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "amp", "fp16", "bf16")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class CommonConfig:
    """Flags shared by every stage (main.py passes them to all of them)."""

    model: str = DEFAULT_MODEL
    dataset: str = "sst2"
    data_dir: str = "data"
    text_column: Optional[str] = None
    label_column: Optional[str] = None
    output_dir: str = "saved_models"
    reports_dir: str = "reports"
    max_length: int = 128
    batch_size: int = 32
    eval_batch_size: int = 128
    epochs: int = 2
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    seed: int = 42
    device: str = "auto"
    num_workers: Optional[int] = None
    pin_memory: Optional[bool] = None
    force: bool = False
    quiet: bool = False

    def __post_init__(self):
        for name in ("max_train_samples", "max_eval_samples"):  # 0 / 'all' = everything
            if getattr(self, name) == 0:
                setattr(self, name, None)
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:
        p = []

        def positive(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                p.append(f"{flag(name)} must be a positive integer (got {value!r})")

        for name in ("max_length", "batch_size", "eval_batch_size", "epochs"):
            positive(name)
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                p.append(f"{flag(name)} must be a positive integer or 'all' (got {value!r})")
        if not self.model:
            p.append("--model must name a hub id or a local directory")
        if not self.dataset:
            p.append("--dataset must be sst2, imdb or a path to a data file/directory")
        dev = self.device
        if not (dev in DEVICES or (isinstance(dev, str) and dev.startswith("cuda:") and dev[5:].isdigit())):
            p.append(f"--device must be auto, cpu, cuda or cuda:N (got {dev!r})")
        if self.num_workers is not None and self.num_workers < 0:
            p.append(f"--num-workers must be >= 0 (got {self.num_workers})")
        return p

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# fields that do not change what a stage produces (excluded from the skip fingerprint)
NON_RESULT_FIELDS = {"force", "quiet", "output_dir", "reports_dir", "num_workers", "pin_memory"}


def result_config(cfg) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if k not in NON_RESULT_FIELDS}


@dataclass
class TrainConfig(CommonConfig):
    """Fine-tuning (benchmark.py, mixed_precision.py)."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    freeze_layers: int = 0
    precision: str = "fp32"
    log_every: int = 20
    grad_accum_steps: int = 1

    def problems(self) -> list[str]:
        p = super().problems()
        if not (self.lr > 0):
            p.append(f"--lr must be > 0 (got {self.lr})")
        if self.weight_decay < 0:
            p.append(f"--weight-decay must be >= 0 (got {self.weight_decay})")
        if not (0 <= self.warmup_ratio < 1):
            p.append(f"--warmup-ratio must be in [0, 1) (got {self.warmup_ratio})")
        if self.max_grad_norm < 0:
            p.append(f"--max-grad-norm must be >= 0 (0 disables clipping; got {self.max_grad_norm})")
        if self.freeze_layers < 0:
            p.append(f"--freeze-layers must be >= 0 (got {self.freeze_layers})")
        if self.precision not in PRECISIONS:
            p.append(f"--precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        if self.log_every < 1:
            p.append(f"--log-every must be >= 1 (got {self.log_every})")
        if self.grad_accum_steps < 1:
            p.append(f"--grad-accum-steps must be >= 1 (got {self.grad_accum_steps})")
        return p
