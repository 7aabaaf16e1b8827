#!/usr/bin/env python
"""FP32 baseline fine-tune: the benchmark every optimization is measured against.

Writes saved_models/baseline/ (a save_pretrained model + tokenizer and manifest.json). With
--trained DIR_OR_HUB_ID it fine-tunes nothing: that already fine-tuned model becomes the baseline
(checked against --dataset and evaluated on it)."""
import sys

from bertopt import cli
from bertopt.config import TrainConfig
from bertopt.stages import BASELINE, TRAINED


def _add_args(parser):
    BASELINE.add_args(parser)
    TRAINED.add_args(parser)


def _build(ns):
    return (TRAINED if ns.trained else BASELINE).build_config(ns)


def _run(cfg):
    return (TRAINED if getattr(cfg, "trained", None) else BASELINE).run(cfg)


def main(argv=None) -> int:
    return cli.stage_main("benchmark", __doc__, TrainConfig, _add_args, _run, argv, distributed_ok=True,
                          build=_build)


if __name__ == "__main__":
    sys.exit(main())
