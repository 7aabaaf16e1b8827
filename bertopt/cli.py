"""Shared command-line plumbing: the flag namespace, config files, error mapping, summary line.

Every script builds its parser here (``allow_abbrev=False``: no prefix matching), so the same flag
means the same thing everywhere and main.py can pass shared flags to every stage. :func:`add`
owns the namespace rule: a flag several stages share is added once; a second definition with a
different meaning (dest, type, action, choices or help) raises :class:`FlagConflict` when the
parser is built. Defaults shown in ``--help`` come from the config dataclasses (``{default}``).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from . import logs
from .errors import ConfigError, PipelineError, first_line


@dataclass
class StageResult:
    """What a stage's run() returns; main.py prints one row per result."""

    stage: str
    status: str  # ok | skipped | up-to-date | failed
    wall_s: float = 0.0
    key_metric: str = ""
    directory: Optional[str] = None
    details: dict = field(default_factory=dict)

    def summary_line(self) -> str:
        metric = f", {self.key_metric}" if self.key_metric else ""
        return f"[{self.stage}] {self.status} in {self.wall_s:.1f}s{metric}"


def _optional_count(text: str):
    """'all' -> 'all' (use everything; the config maps it to None), else a positive int. 0 is refused:
    it used to mean 'all', so a typo for a small number silently trained on every row."""
    if str(text).lower() in ("all", "none"):
        return "all"
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all' (every row), got {text!r}")
    return value


def positive(kind=float):
    """An argparse ``type``: a finite number > 0 of ``kind`` (int or float), else a usage error."""
    what = "a positive integer" if kind is int else "a number > 0"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (0 < value < float("inf")):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in its message
    return parse


def _bool(text: str) -> bool:
    value = str(text).lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _has_option(parser: argparse.ArgumentParser, option: str) -> bool:
    return option in parser._option_string_actions  # argparse keeps this public-ish map


class FlagConflict(Exception):
    """Two stages define one flag with different meanings (a programming error, not a user error)."""


def _meaning(action: argparse.Action) -> tuple:
    return (action.dest, type(action).__name__, getattr(action.type, "__name__", action.type),
            tuple(action.choices or ()), action.help)


def default_text(config_cls, dest: str) -> str:
    """How ``--help`` shows a dataclass field's default."""
    f = {x.name: x for x in dataclasses.fields(config_cls)}.get(dest)
    if f is None or f.default is dataclasses.MISSING:
        return "-"
    v = f.default
    if isinstance(v, bool):
        return "on" if v else "off"
    return "none" if v is None else str(v)


def add(parser, *flags, config=None, **kwargs):
    """add_argument for flags that stages share: added once per parser; a second definition of a
    flag with a different meaning raises FlagConflict. ``config`` (a dataclass) fills ``{default}``
    in the help text from the field of the flag's dest, so defaults are written once."""
    dest = kwargs.get("dest") or flags[0].lstrip("-").replace("-", "_")
    if config is not None and "{default}" in (kwargs.get("help") or ""):
        kwargs["help"] = kwargs["help"].replace("{default}", default_text(config, dest).replace("%", "%%"))
    existing = [parser._option_string_actions[f] for f in flags if _has_option(parser, f)]
    if not existing:
        return parser.add_argument(*flags, **kwargs)
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False).add_argument(*flags, **kwargs)
    for action in existing:
        if _meaning(action) != _meaning(probe):
            raise FlagConflict(f"{'/'.join(flags)} is defined twice with different meanings: "
                               f"{_meaning(action)} vs {_meaning(probe)}; give one of them a distinct name")
    return None


class _Renamed(argparse.Action):
    """An old spelling that became ambiguous: one line naming the new flag, exit 1 (via ConfigError)."""

    def __init__(self, option_strings, dest, message: str = "", **kwargs):
        self.message = message
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs="?", help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        raise ConfigError(f"{option_string} {self.message}")


def renamed(parser, old: str, new: str, message: str | None = None) -> None:
    """Reject ``old`` with a one-line error naming ``new`` (hidden from --help)."""
    if not _has_option(parser, old):
        parser.add_argument(old, action=_Renamed, message=message or f"is now {new}")


def new_parser(prog: str, description: str | None = None, epilog: str | None = None) -> argparse.ArgumentParser:
    """Every script's parser: no prefix matching (``--variant`` never silently means ``--variants``)."""
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, allow_abbrev=False,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_common_args(parser: argparse.ArgumentParser, defaults=None) -> None:
    from .config import CommonConfig

    g = parser.add_argument_group("common options (shared by every stage)")
    a = functools.partial(add, g, config=defaults or CommonConfig)
    a("--config", metavar="FILE", help="YAML or JSON file of option values (flags override it)")
    a("--model", "--model-path", "--model_path", dest="model", metavar="ID|DIR",
        help="Hugging Face model id or local model directory (default: the packaged "
             "sentence-transformers/all-MiniLM-L6-v2)")
    a("--dataset", metavar="NAME|PATH",
        help="sst2 (default), imdb, or a local CSV/TSV/JSONL/Parquet file or directory")
    a("--data-dir", metavar="DIR", help="where named data sets are looked for (default: {default})")
    a("--text-column", metavar="COL[,COL2]",
      help="text column of a local data set, a name or an index; two (a,b) for sentence pairs "
           "(auto-detected, pairs included: sentence1/sentence2, #1 String/#2 String, ...)")
    a("--label-column", metavar="COL[,...]",
      help="label column, a name or an index; several 0/1 columns (a,b,c) for multi-label (auto-detected)")
    a("--no-header", action="store_true", default=None,
      help="the CSV/TSV files have no header row (detected when the first row looks like data)")
    a("--task", choices=("classification", "multi-label", "regression"),
      help="task type (default: detected from the labels: lists = multi-label, real numbers = regression)")
    a("--metric", metavar="NAME",
      help="metric that picks the best epoch, gates quantized variants and ranks the recommendation: "
           "accuracy|f1|macro_f1|mcc, micro_f1|macro_f1|subset_accuracy (multi-label), pearson|spearman|"
           "neg_mse (regression); default: GLUE convention per task, printed at start")
    a("--long-text", choices=("truncate", "head-tail", "chunk"),
      help="texts longer than --max-length: truncate (default), head-tail (first quarter + last three "
           "quarters of the tokens) or chunk (overlapping windows, logits averaged per text)")
    a("--stride", type=int, metavar="N", help="--long-text chunk: tokens shared by neighbouring windows "
                                               "(default: max-length // 4)")
    a("--output-dir", metavar="DIR", help="artifact root (default: {default})")
    a("--reports-dir", metavar="DIR", help="report directory (default: {default})")
    a("--max-length", type=int, metavar="N", help="max tokens per text (default: {default})")
    a("--batch-size", type=int, metavar="N", help="training batch size (default: {default})")
    a("--eval-batch-size", type=int, metavar="N", help="evaluation batch size (default: {default})")
    a("--epochs", type=int, metavar="N", help="training epochs (default: {default})")
    a("--max-train-samples", type=_optional_count, metavar="N|all",
        help="seeded, stratified training subset (default: all)")
    a("--max-eval-samples", type=_optional_count, metavar="N|all",
        help="seeded, stratified evaluation subset (default: all)")
    a("--seed", type=int, metavar="N", help="random seed (default: {default})")
    a("--device", metavar="DEV", help="auto (default), cpu, cuda or cuda:N")
    a("--num-workers", type=int, metavar="N", help="DataLoader workers (default: 0 on CPU, 2 on CUDA)")
    a("--pin-memory", type=_bool, metavar="BOOL", help="pin DataLoader memory (default: true on CUDA)")
    a("--force", action="store_true", default=None, help="re-run even if the output is up to date")
    a("--quiet", action="store_true", default=None, help="no progress bars or info logs")
    a("--wait", action="store_true", default=None,
      help="when another run is writing the same stage output, wait for it instead of refusing")


def add_train_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training options")
    add(g, "--lr", type=float, metavar="LR",
        help="peak learning rate (default: by model size, 1e-4 below 50M parameters, 3e-5 below 200M, "
             "2e-5 above; printed at start)")
    add(g, "--weight-decay", type=float, metavar="W", help="AdamW weight decay (default: 0.01)")
    add(g, "--warmup-ratio", type=float, metavar="R", help="linear warm-up share of steps (default: 0.06)")
    add(g, "--max-grad-norm", type=float, metavar="N", help="gradient clipping norm, 0 = off (default: 1.0)")
    add(g, "--freeze-layers", type=int, metavar="N",
        help="freeze the embeddings and the lowest N encoder layers (default: 0)")
    add(g, "--log-every", type=int, metavar="N", help="record the loss every N steps (default: 20)")
    add(g, "--grad-accum-steps", type=int, metavar="N", help="gradient accumulation steps (default: 1)")
    add(g, "--eval-every", type=int, metavar="N",
        help="also evaluate every N optimizer steps; the best evaluation's weights are kept (default: 0 = "
             "after each epoch only)")
    add(g, "--early-stopping-patience", type=int, metavar="P",
        help="stop after P evaluations without a better eval accuracy (default: 0 = off)")
    add(g, "--save-every", type=int, metavar="N",
        help="also checkpoint every N optimizer steps (always at each epoch end; default: 0)")
    add(g, "--save-total-limit", type=int, metavar="K", help="checkpoints kept (the last K; default: 2)")
    add(g, "--resume", action="store_true", default=None,
        help="continue from the stage's newest checkpoint and fail if there is none or its config differs "
             "(without the flag a matching checkpoint is resumed automatically)")
    add(g, "--report-to", choices=("none", "tensorboard"),
        help="also write live curves for TensorBoard to <stage dir>/tensorboard (default: none)")
    add(g, "--class-weights", metavar="auto|none|W1,W2,...",
        help="cross-entropy class weights: auto = inverse class frequency, none (default), or one per class")
    add(g, "--threshold", type=float, metavar="T",
        help="multi-label decision threshold on sigmoid scores (default: tuned on the eval split)")
    add_sagemaker_args(parser, job="training")


def add_trained_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("a model fine-tuned elsewhere")
    add(g, "--trained", metavar="DIR|HUB_ID",
        help="start from this fine-tuned classifier (a save_pretrained directory or a Hugging Face id): it "
             "becomes the FP32 reference (saved_models/baseline) and the training stages are skipped; its "
             "labels, task and max length come from its config, checked against --dataset (a single file = "
             "evaluation rows only)")
    add(g, "--label-map", metavar="MODEL=DATA,...",
        help="--trained: map the model's label names (config.id2label, or ids) to the data's label names, "
             "e.g. NEG=negative,POS=positive")


def load_config_file(path: str) -> dict:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read ({exc.strerror or exc})") from None
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:  # parse errors of either format
        raise ConfigError(f"--config {path}: not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'JSON'} "
                          f"({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse flags on top of an optional --config file; unknown keys in the file are errors."""
    pre, _ = parser.parse_known_args(argv)
    if getattr(pre, "config", None):
        values = load_config_file(pre.config)
        dests = {a.dest for a in parser._actions}
        unknown = sorted(k for k in values if k not in dests)
        if unknown:
            raise ConfigError([f"--config {pre.config}: unknown option {k!r}" for k in unknown])
        parser.set_defaults(**values)
    return parser.parse_args(argv)


def build_config(cls, ns: argparse.Namespace, **overrides):
    """Instantiate a config dataclass from parsed flags (None = keep the dataclass default)."""
    values = {}
    for f in dataclasses.fields(cls):
        v = overrides.get(f.name, getattr(ns, f.name, None))
        if v is not None:
            values[f.name] = v
    try:
        return cls(**values)
    except TypeError as exc:  # wrong type in a config file, e.g. a string for an int
        raise ConfigError(str(exc)) from None


def print_config(stage: str, cfg) -> None:
    import logging

    log = logging.getLogger("bertopt.cli")
    items = ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items())
    log.info("%s config: %s", stage, items)


def run_stage(stage: str, run: Callable, cfg) -> tuple[int, Optional[StageResult]]:
    """Call ``run(cfg)``; map PipelineError to one 'error:' line and exit code 1."""
    start = time.perf_counter()
    try:
        result = run(cfg)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(f"[{stage}] failed in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        return 1, None
    except KeyboardInterrupt:
        print(f"error: interrupted; {stage} left no manifest, so its output will not be used", file=sys.stderr)
        return 130, None
    return 0, result


def stage_main(stage: str, description: str, config_cls, add_args: Callable, run: Callable,
               argv=None, epilog: str | None = None, build: Callable | None = None,
               distributed_ok: bool = False) -> int:
    """The whole body of a stage script's main(): parse, configure logging, run, summarize."""
    parser = new_parser(f"{stage}.py", description, epilog)
    add_args(parser)
    try:
        if not distributed_ok:  # only the training stages are data-parallel under torchrun
            from .distributed import refuse_under_torchrun

            refuse_under_torchrun(f"{stage}.py")
        ns = parse(parser, argv)
        cfg = build(ns) if build else build_config(config_cls, ns)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    logs.configure(quiet=bool(getattr(cfg, "quiet", False)))
    code, result = run_stage(stage, run, cfg)
    if result is not None:
        print(result.summary_line())
    return code


# ----------------------------------------------------------------------------- SageMaker jobs
# AWS flags that the deploy and the SageMaker jobs share: defined once here (aws/config.py uses them too)
AWS_FLAGS = {
    "--aws-region": (("--aws-region", "--aws_region"), dict(
        dest="aws_region", metavar="REGION",
        help="AWS region (default: the boto3 chain, e.g. AWS_REGION or the profile's region)")),
    "--aws-profile": (("--aws-profile", "--aws_profile"), dict(
        dest="aws_profile", metavar="NAME", help="named profile from ~/.aws/config (default: the boto3 chain)")),
    "--aws-role-arn": (("--aws-role-arn", "--aws_role_arn"), dict(
        dest="aws_role_arn", metavar="ARN", help="SageMaker execution role ARN (required; never created implicitly)")),
    "--bucket": (("--bucket",), dict(
        metavar="NAME", help="S3 bucket (default: bertopt-<account>-<region>, created if missing)")),
    "--s3-prefix": (("--s3-prefix",), dict(metavar="PREFIX", help="S3 key prefix (default: bertopt)")),
    "--instance-count": (("--instance-count",), dict(
        type=int, metavar="N", help="instances behind the endpoint, or running the training / transform job "
                                    "(default: 1)")),
    "--image-uri": (("--image-uri",), dict(
        metavar="URI", help="container image (default: the pinned Deep Learning Container: Hugging Face PyTorch "
                            "inference for endpoints and transform jobs, PyTorch training for training jobs)")),
}


def add_aws_flag(group, name: str):
    flags, kwargs = AWS_FLAGS[name]
    return add(group, *flags, **kwargs)


def add_sagemaker_args(parser, job: str = "training") -> None:
    """--sagemaker-instance-type and the job options: the training stages (``job='training'``) and
    predict.py's Batch Transform (``job='transform'``)."""
    g = parser.add_argument_group(f"SageMaker {job} job (runs this stage on SageMaker instead of here)")
    add(g, "--sagemaker-instance-type", metavar="TYPE",
        help="run on SageMaker: a training job for the training stages (e.g. ml.g5.2xlarge), a Batch Transform "
             "job for predict.py (e.g. ml.c7i.xlarge)")
    for name in ("--instance-count", "--image-uri", "--aws-region", "--aws-profile", "--aws-role-arn", "--bucket",
                 "--s3-prefix"):
        add_aws_flag(g, name)
    add(g, "--max-runtime", type=int, metavar="S", help="SageMaker job: stop it after S seconds (default: 86400)")
    add(g, "--detach", action="store_true", default=None,
        help="SageMaker job: start it, print how to follow it and return (Ctrl-C then leaves it running)")
    if job == "training":
        add(g, "--spot", action="store_true", default=None,
            help="training job: managed spot capacity (checkpoints in S3 resume an interrupted job; needs --max-wait)")
        add(g, "--max-wait", type=int, metavar="S",
            help="training job with --spot: most seconds to wait for spot capacity plus run (>= --max-runtime)")
