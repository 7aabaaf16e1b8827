#!/usr/bin/env python
"""FP32 baseline fine-tune: the benchmark every optimization is measured against.

Writes saved_models/baseline/ (a save_pretrained model + tokenizer and manifest.json)."""
import sys

from bertopt import cli
from bertopt.config import TrainConfig
from bertopt.stages import BASELINE


def main(argv=None) -> int:
    return cli.stage_main("benchmark", __doc__, TrainConfig, BASELINE.add_args,
                          lambda cfg: BASELINE.run(cfg), argv, distributed_ok=True, build=BASELINE.build_config)


if __name__ == "__main__":
    sys.exit(main())
