"""Shared command-line plumbing: flag definitions, config files, error mapping, summary line.

Every script builds its parser here, so the same flag means the same thing everywhere and
main.py can pass shared flags to every stage.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from . import logs
from .errors import ConfigError, PipelineError


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
    """'all' -> 0 (use everything; the config maps 0 to None), else an int."""
    if str(text).lower() in ("all", "none"):
        return 0
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None


def _bool(text: str) -> bool:
    value = str(text).lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _has_option(parser: argparse.ArgumentParser, option: str) -> bool:
    return option in parser._option_string_actions  # argparse keeps this public-ish map


def add(parser, *flags, **kwargs):
    """add_argument that silently keeps the first definition of a flag (stages share flags)."""
    if any(_has_option(parser, f) for f in flags):
        return None
    return parser.add_argument(*flags, **kwargs)


def add_common_args(parser: argparse.ArgumentParser, defaults=None) -> None:
    from .config import CommonConfig

    d = defaults or CommonConfig.__dataclass_fields__
    g = parser.add_argument_group("common options (shared by every stage)")
    add(g, "--config", metavar="FILE", help="YAML or JSON file of option values (flags override it)")
    add(g, "--model", "--model-path", "--model_path", dest="model", metavar="ID|DIR",
        help="Hugging Face model id or local model directory (default: the packaged "
             "sentence-transformers/all-MiniLM-L6-v2)")
    add(g, "--dataset", metavar="NAME|PATH",
        help="sst2 (default), imdb, or a local CSV/TSV/JSONL/Parquet file or directory")
    add(g, "--data-dir", metavar="DIR", help="where named data sets are looked for (default: data)")
    add(g, "--text-column", metavar="COL", help="text column of a local data set (auto-detected)")
    add(g, "--label-column", metavar="COL", help="label column of a local data set (auto-detected)")
    add(g, "--output-dir", metavar="DIR", help="artifact root (default: saved_models)")
    add(g, "--reports-dir", metavar="DIR", help="report directory (default: reports)")
    add(g, "--max-length", type=int, metavar="N", help="max tokens per text (default: 128)")
    add(g, "--batch-size", type=int, metavar="N", help="training batch size (default: 32)")
    add(g, "--eval-batch-size", type=int, metavar="N", help="evaluation batch size (default: 128)")
    add(g, "--epochs", type=int, metavar="N", help="training epochs (default: 2)")
    add(g, "--max-train-samples", type=_optional_count, metavar="N|all",
        help="seeded, stratified training subset (default: all)")
    add(g, "--max-eval-samples", type=_optional_count, metavar="N|all",
        help="seeded, stratified evaluation subset (default: all)")
    add(g, "--seed", type=int, metavar="N", help="random seed (default: 42)")
    add(g, "--device", metavar="DEV", help="auto (default), cpu, cuda or cuda:N")
    add(g, "--num-workers", type=int, metavar="N", help="DataLoader workers (default: 0 on CPU, 2 on CUDA)")
    add(g, "--pin-memory", type=_bool, metavar="BOOL", help="pin DataLoader memory (default: true on CUDA)")
    add(g, "--force", action="store_true", default=None, help="re-run even if the output is up to date")
    add(g, "--quiet", action="store_true", default=None, help="no progress bars or info logs")


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
                          f"({str(exc).splitlines()[0]})") from None
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
    parser = argparse.ArgumentParser(prog=f"{stage}.py",
                                     description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
