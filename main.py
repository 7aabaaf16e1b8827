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

# defaults of the end-to-end run, sized to finish in about 10 minutes on a 2-core CPU: a training
# subset, plus each stage's own pipeline_defaults (bertopt.stages; e.g. compare's fast protocol);
# the stage scripts alone default to the full data and the full protocol
MAIN_DEFAULTS = {"max_train_samples": 12000, "epochs": 1}


def build_parser() -> argparse.ArgumentParser:
    parser = cli.new_parser("main.py", __doc__)
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
    replaced = {s.name for s in STAGES if s.replaced_by and s.replaced_by(ns)}
    if ns.stages:
        chosen = set(_names(ns.stages, known))
        if chosen & replaced:
            raise ConfigError(f"--trained replaces the training stage(s) {', '.join(sorted(chosen & replaced))}: "
                              "drop them from --stages (the trained stage writes the baseline)")
        return [s for s in STAGES if s.name in chosen and s.name not in skip]
    return [s for s in STAGES if s.name not in skip | replaced
            and (not s.optional or (s.enabled_by and s.enabled_by(ns)))]


def _apply_defaults(parser, ns, values: dict) -> list[str]:
    """Set the flags the user left unset; returns what was applied, as flags."""
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    applied = []
    for key, value in values.items():
        if hasattr(ns, key) and getattr(ns, key) is None:
            setattr(ns, key, value)
            applied.append(f"{flags.get(key, key)} {value}")
    return applied


def main(argv=None) -> int:
    parser = build_parser()
    try:
        distributed.refuse_under_torchrun("main.py")
        ns = cli.parse(parser, argv)
        if ns.list:
            for s in STAGES:
                print(f"{s.name:18s} {s.script:20s} {s.description}{' (optional)' if s.optional else ''}")
            return 0
        stages = select(ns)
        running = {st.name for st in stages}
        trains = not getattr(ns, "trained", None) or "prune" in running  # --trained alone fine-tunes nothing
        applied = _apply_defaults(parser, ns, MAIN_DEFAULTS) if trains else []
        for st in stages:
            if st.pipeline_defaults:
                applied += _apply_defaults(parser, ns, st.pipeline_defaults(ns, running))
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
              "--max-train-samples all for the full training set, --protocol full for compare's full "
              "protocol, --source baseline,mixed_precision to export the mixed-precision model to ONNX too)")
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
