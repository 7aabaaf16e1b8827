#!/usr/bin/env python
"""Run the bertopt pipeline: every registered stage in order, sharing one set of flags.

Stages (in order): see --list. Each stage is skipped when its output is up to date (--force
re-runs). The default run fine-tunes on a subset sized to finish in minutes on a laptop CPU;
pass --max-train-samples all for the full training set."""
import argparse
import sys
import time

from bertopt import cli, distributed, logs
from bertopt.errors import ConfigError
from bertopt.stages import STAGES, by_name

# defaults of the end-to-end run, sized to finish in about 15 minutes on a 2-core CPU: a training
# subset and a 2x2 compare sweep holding the batch-1 and batch-32 cells at 128 tokens that the
# headline figures use (the stage scripts alone default to the full data and the full 4x4 sweep)
MAIN_DEFAULTS = {"max_train_samples": 12000, "epochs": 1, "sweep_batches": "1,32", "sweep_seqs": "32,128"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="main.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("pipeline")
    g.add_argument("--stages", metavar="A,B", help="run only these stages (comma-separated)")
    g.add_argument("--skip", metavar="A,B", default="", help="skip these stages")
    g.add_argument("--list", action="store_true", help="list the stages and exit")
    for stage in STAGES:
        stage.add_args(parser)
    return parser


def _names(text: str, known: dict) -> list[str]:
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown stage(s) {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def select(ns) -> list:
    known = by_name()
    skip = set(_names(ns.skip, known))
    if ns.stages:
        chosen = set(_names(ns.stages, known))
        return [s for s in STAGES if s.name in chosen and s.name not in skip]
    return [s for s in STAGES if s.name not in skip and (not s.optional or (s.enabled_by and s.enabled_by(ns)))]


def main(argv=None) -> int:
    parser = build_parser()
    try:
        distributed.refuse_under_torchrun("main.py")
        ns = cli.parse(parser, argv)
        if ns.list:
            for s in STAGES:
                print(f"{s.name:18s} {s.script:20s} {s.description}{' (optional)' if s.optional else ''}")
            return 0
        applied = []
        for key, value in MAIN_DEFAULTS.items():
            if hasattr(ns, key) and getattr(ns, key) is None:
                setattr(ns, key, value)
                applied.append(f"--{key.replace('_', '-')} {value}")
        stages = select(ns)
        if hasattr(ns, "source") and ns.source is None and any(s.name == "onnx_tensorrt" for s in stages):
            # the ONNX graphs of the mixed-precision model are the baseline's graphs with other weights
            # (same speed); exporting and timing them again would double the default run's compare
            ns.source = ",".join(["baseline"] + (["pruned"] if any(s.name == "prune" for s in stages) else []))
            applied.append(f"--source {ns.source}")
        problems, configs = [], []
        for s in stages:
            try:
                configs.append(s.build_config(ns))
            except ConfigError as exc:
                problems += [p for p in exc.problems if p not in problems]
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    logs.configure(quiet=bool(ns.quiet))
    if applied:
        print(f"main.py defaults: {', '.join(applied)} (override with the same flags; "
              "--max-train-samples all for the full training set, --sweep-batches 1,8,32,64 "
              "--sweep-seqs 32,64,128,256 for the full sweep, --source baseline,mixed_precision to export "
              "the mixed-precision model to ONNX too)")
    rows, code, start = [], 0, time.perf_counter()
    for s, cfg in zip(stages, configs):
        code, result = cli.run_stage(s.name, s.run, cfg)
        if result is None:
            rows.append((s.name, "failed", 0.0, "see error above"))
            break
        print(result.summary_line())
        rows.append((result.stage, result.status, result.wall_s, result.key_metric))
    print()
    print(f"{'stage':18s} {'status':11s} {'time':>8s}  key metric")
    for name, status, wall, metric in rows:
        print(f"{name:18s} {status:11s} {wall:7.1f}s  {metric}")
    print(f"pipeline {'failed' if code else 'ok'} in {time.perf_counter() - start:.1f}s")
    return code


if __name__ == "__main__":
    sys.exit(main())
