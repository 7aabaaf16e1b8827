#!/usr/bin/env python
"""Score a file with any optimized variant: compare.py's recommendation (reports/results.json) by
default, or --variant NAME. Reads CSV/TSV/JSONL/Parquet in chunks (the text column(s) detected as
in training, sentence pairs included) and writes CSV or JSON Lines with each row's id, label and
scores (probabilities; the multi-label set at its threshold; the regression value) in input order.

With --sagemaker-instance-type the file (local or s3://) is scored by a SageMaker Batch Transform
job with the endpoint's model archive and handler instead."""
import sys

from bertopt import cli
from bertopt.predict.config import PredictConfig, add_predict_args, build_predict

EPILOG = """examples:
  python predict.py data/sst2/dev.tsv                                  # -> reports/predictions/dev.csv
  python predict.py reviews.parquet --output scored.jsonl --variant ov-int8 --on-error skip
  python predict.py s3://my-bucket/reviews.jsonl --sagemaker-instance-type ml.c7i.xlarge --instance-count 2 \\
      --aws-role-arn arn:aws:iam::123456789012:role/SageMakerRole"""


def _run(cfg):
    from bertopt.predict.stage import run

    return run(cfg)


def main(argv=None) -> int:
    return cli.stage_main("predict", __doc__, PredictConfig, add_predict_args, _run, argv, epilog=EPILOG,
                          build=build_predict)


if __name__ == "__main__":
    sys.exit(main())
