#!/usr/bin/env python
"""Structured layer pruning: layer sensitivity, greedy iterative layer removal and re-fine-tuning.

Measures how much each encoder layer of the fine-tuned baseline (or --source DIR) matters,
removes the least important layers one at a time (re-measuring after each removal) until
--prune-layers K are gone or --target-layers N remain, re-fine-tunes the smaller model with the
shared training loop (--distill: KL on the unpruned model's soft targets + CE) and writes
saved_models/pruned/: a plain smaller save_pretrained model + tokenizer, sensitivity.json,
sensitivity.png and manifest.json."""
import sys

from bertopt import cli
from bertopt.config import PruneConfig
from bertopt.stages import PRUNE, add_prune_args

EPILOG = """examples:
  python prune.py --target-layers 4                 # 6-layer MiniLM -> 4 layers, 2 epochs re-fine-tune
  python prune.py --prune-layers 2 --distill --epochs 1
  python prune.py --prune-layers 8 --method gradient --source path/to/bert-large-finetuned"""


def main(argv=None) -> int:
    return cli.stage_main("prune", __doc__, PruneConfig, lambda p: add_prune_args(p, standalone=True),
                          lambda cfg: PRUNE.run(cfg), argv, epilog=EPILOG, build=PRUNE.build_config)


if __name__ == "__main__":
    sys.exit(main())
