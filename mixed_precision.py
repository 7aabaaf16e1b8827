#!/usr/bin/env python
"""Mixed-precision (AMP) fine-tune: fp16 + GradScaler or bf16 autocast on CUDA, bf16 autocast on
CPUs with native bf16 math. Elsewhere it records status "skipped" with the reason (--force runs it).

Writes saved_models/mixed_precision/ (model + tokenizer + manifest.json)."""
import sys

from bertopt import cli
from bertopt.config import TrainConfig
from bertopt.stages import MIXED_PRECISION


def main(argv=None) -> int:
    return cli.stage_main("mixed_precision", __doc__, TrainConfig, MIXED_PRECISION.add_args,
                          lambda cfg: MIXED_PRECISION.run(cfg), argv, distributed_ok=True, build=MIXED_PRECISION.build_config)


if __name__ == "__main__":
    sys.exit(main())
