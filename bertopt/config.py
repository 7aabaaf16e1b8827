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

TASKS = ("classification", "multi-label", "regression")  # bertopt.tasks.TASKS (kept import-light)
LONG_TEXT = ("truncate", "head-tail", "chunk")

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_DATA_DIR = "data"  # where named data sets are looked for first
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "amp", "fp16", "bf16")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class CommonConfig:
    """Flags shared by every stage (main.py passes them to all of them)."""

    model: str = DEFAULT_MODEL
    dataset: str = "sst2"
    data_dir: str = DEFAULT_DATA_DIR
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
    wait: bool = False  # another run holds the stage output's lock: wait instead of refusing
    no_header: bool = False
    task: Optional[str] = None  # None = detected from the labels
    metric: Optional[str] = None  # None = the task's GLUE-convention default
    long_text: str = "truncate"
    stride: Optional[int] = None  # chunk overlap in tokens; None = max_length // 4

    def __post_init__(self):
        for name in ("max_train_samples", "max_eval_samples"):  # 'all' = everything (0 is an error)
            if isinstance(getattr(self, name), str) and getattr(self, name).lower() in ("all", "none"):
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
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
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
        if self.task is not None and self.task not in TASKS:
            p.append(f"--task must be one of {', '.join(TASKS)} (got {self.task!r})")
        if self.long_text not in LONG_TEXT:
            p.append(f"--long-text must be one of {', '.join(LONG_TEXT)} (got {self.long_text!r})")
        if self.stride is not None and isinstance(self.max_length, int) and not (
                0 <= self.stride < self.max_length - 2):
            p.append(f"--stride must be >= 0 and smaller than --max-length minus its 2 special tokens "
                     f"(got --stride {self.stride} with --max-length {self.max_length})")
        return p

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SageMakerJobFields:
    """Where a stage runs: here (``sagemaker_instance_type`` None) or as a SageMaker training /
    transform job (bertopt.aws.jobs); the flags are bertopt.cli.add_sagemaker_args."""

    sagemaker_instance_type: Optional[str] = None
    instance_count: int = 1
    image_uri: Optional[str] = None
    aws_region: Optional[str] = None
    aws_profile: Optional[str] = None
    aws_role_arn: Optional[str] = None
    bucket: Optional[str] = None
    s3_prefix: str = "bertopt"
    max_runtime: int = 86400
    detach: bool = False
    spot: bool = False
    max_wait: Optional[int] = None

    def job_problems(self) -> list[str]:
        p = []
        if not self.sagemaker_instance_type:
            return p
        if not str(self.sagemaker_instance_type).startswith("ml."):
            p.append(f"--sagemaker-instance-type must be a SageMaker type such as ml.g5.2xlarge "
                     f"(got {self.sagemaker_instance_type!r})")
        if not self.aws_role_arn:
            p.append("--sagemaker-instance-type needs --aws-role-arn (the job's execution role)")
        for name in ("instance_count", "max_runtime"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                p.append(f"{flag(name)} must be a positive integer (got {value!r})")
        if self.spot and not self.max_wait:
            p.append("--spot needs --max-wait S (seconds to wait for spot capacity plus the run)")
        if self.max_wait is not None and not self.spot:
            p.append("--max-wait applies to --spot training jobs")
        if self.spot and self.max_wait and isinstance(self.max_runtime, int) and self.max_wait < self.max_runtime:
            p.append(f"--max-wait ({self.max_wait}) must be >= --max-runtime ({self.max_runtime})")
        return p


JOB_FIELDS = tuple(f.name for f in dataclasses.fields(SageMakerJobFields))
# fields that do not change what a stage produces (excluded from the skip fingerprint)
NON_RESULT_FIELDS = set(JOB_FIELDS) | {"force", "quiet", "wait", "output_dir", "reports_dir", "num_workers", "pin_memory",
                     # checkpointing and live curves: a resumed run ends with the same weights
                     "save_every", "save_total_limit", "resume", "report_to"}
REPORT_TO = ("none", "tensorboard")
# task options added later: left out of the fingerprint at their defaults, so existing stage
# directories of single-text runs stay current
TASK_DEFAULTS = {"no_header": False, "task": None, "metric": None, "long_text": "truncate", "stride": None,
                 "class_weights": "none", "threshold": None}


def result_config(cfg) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if k not in NON_RESULT_FIELDS
            and not (k in TASK_DEFAULTS and v == TASK_DEFAULTS[k])}


@dataclass
class TrainConfig(SageMakerJobFields, CommonConfig):
    """Fine-tuning (benchmark.py, mixed_precision.py)."""

    lr: Optional[float] = None  # None = chosen from the model's size (modeling.default_lr)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    freeze_layers: int = 0
    precision: str = "fp32"
    log_every: int = 20
    grad_accum_steps: int = 1
    eval_every: int = 0               # 0 = evaluate after each epoch only
    early_stopping_patience: int = 0  # 0 = off
    save_every: int = 0               # 0 = checkpoint at each epoch end only
    save_total_limit: int = 2
    resume: bool = False              # True = a matching checkpoint must exist
    report_to: str = "none"
    class_weights: str = "none"  # none | auto | w1,w2,...
    threshold: Optional[float] = None  # multi-label decision threshold; None = tuned on eval

    def problems(self) -> list[str]:
        p = super().problems()
        if self.lr is not None and not (self.lr > 0):
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
        for name, zero in (("eval_every", "evaluate at epoch ends only"), ("early_stopping_patience", "off"),
                           ("save_every", "checkpoint at epoch ends only")):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                p.append(f"{flag(name)} must be an integer >= 0 (0 = {zero}; got {value!r})")
        if not isinstance(self.save_total_limit, int) or self.save_total_limit < 1:
            p.append(f"--save-total-limit must be >= 1 (got {self.save_total_limit!r})")
        if self.report_to not in REPORT_TO:
            p.append(f"--report-to must be one of {', '.join(REPORT_TO)} (got {self.report_to!r})")
        if self.resume and self.force:
            p.append("--resume continues a checkpoint and --force starts afresh: give only one")
        if class_weight_values(self.class_weights) is False:
            p.append(f"--class-weights must be auto, none or positive numbers w1,w2,... (got {self.class_weights!r})")
        if self.threshold is not None and not (0 < self.threshold < 1):
            p.append(f"--threshold must be in (0, 1) (got {self.threshold})")
        return p + self.job_problems()


def class_weight_values(text):
    """None for auto/none, a list of floats for w1,w2,...; False when malformed."""
    if str(text).lower() in ("auto", "none"):
        return None
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        return False
    return values if values and all(v > 0 for v in values) else False


SENSITIVITY_METHODS = ("removal", "gradient")


@dataclass
class PruneConfig(TrainConfig):
    """Structured layer pruning + re-fine-tuning (prune.py); training fields as TrainConfig."""

    prune_source: Optional[str] = None  # model dir to prune; None = the baseline stage of --output-dir
    prune_layers: Optional[int] = None
    target_layers: Optional[int] = None
    method: str = "removal"
    sensitivity_samples: Optional[int] = None  # eval rows used for sensitivity; None = all
    heads: Optional[int] = None  # attention heads kept per layer (width pruning)
    ffn_width: Optional[int] = None  # FFN neurons kept per layer (width pruning)
    distill: bool = True  # re-fine-tune by distilling from the unpruned model (--no-distill: plain CE)
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0
    compress: str = "none"  # auto = search depth x heads x FFN width (bertopt.compress)
    time_budget: float = 90.0  # seconds of KD fine-tuning per searched shape
    search_accuracy_budget: float = 0.01  # max metric drop (fraction) vs the unpruned model on the search split
    search_rows: int = 1000  # rows of the held-out search split (carved from train)
    max_candidates: int = 6  # shapes fine-tuned at most
    importance_rows: int = 512  # training rows the head / FFN-neuron importance is accumulated over

    def __post_init__(self):
        if isinstance(self.sensitivity_samples, str) and self.sensitivity_samples.lower() in ("all", "none"):
            self.sensitivity_samples = None
        super().__post_init__()

    def problems(self) -> list[str]:
        p = super().problems()
        manual = [n for n in ("prune_layers", "target_layers", "heads", "ffn_width") if getattr(self, n) is not None]
        if self.compress not in ("none", "auto"):
            p.append(f"--compress must be auto or none (got {self.compress!r})")
        elif self.compress == "auto" and manual:
            p.append(f"--compress auto chooses the shape itself: drop {', '.join(flag(n) for n in manual)}")
        elif self.compress == "none" and not manual:
            p.append("give --prune-layers K (layers to remove) or --target-layers N (layers to keep), "
                     "--heads K / --ffn-width W (width), or --compress auto")
        if self.prune_layers is not None and self.target_layers is not None:
            p.append("give only one of --prune-layers and --target-layers")
        if not self.time_budget > 0:
            p.append(f"--time-budget must be > 0 seconds (got {self.time_budget})")
        if not 0 <= self.search_accuracy_budget < 1:
            p.append(f"--search-accuracy-budget must be in [0, 1) (got {self.search_accuracy_budget})")
        for name in ("search_rows", "max_candidates", "importance_rows"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                p.append(f"{flag(name)} must be a positive integer (got {getattr(self, name)!r})")
        for name in ("prune_layers", "target_layers", "heads", "ffn_width"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                p.append(f"{flag(name)} must be a positive integer (got {value!r})")
        if self.method not in SENSITIVITY_METHODS:
            p.append(f"--method must be one of {', '.join(SENSITIVITY_METHODS)} (got {self.method!r})")
        if self.sensitivity_samples is not None and (not isinstance(self.sensitivity_samples, int)
                                                     or self.sensitivity_samples < 1):
            p.append(f"--sensitivity-samples must be a positive integer or 'all' (got {self.sensitivity_samples!r})")
        if not (0.0 <= self.distill_alpha <= 1.0):
            p.append(f"--distill-alpha must be in [0, 1] (got {self.distill_alpha})")
        if not (self.distill_temperature > 0):
            p.append(f"--distill-temperature must be > 0 (got {self.distill_temperature})")
        if self.precision != "fp32":
            p.append(f"prune.py re-fine-tunes in FP32 (got --precision {self.precision})")
        return p
