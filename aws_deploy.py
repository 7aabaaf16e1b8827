#!/usr/bin/env python
"""Deploy the recommended model (compare.py's reports/results.json, or --variant / --model-path) to
a SageMaker real-time endpoint with plain boto3, or serve it locally with --local.

Writes saved_models/aws/: model.tar.gz (the SageMaker archive: model + tokenizer +
code/inference.py), deployment.json (every resource created, written as it is created) and
manifest.json. A running endpoint is billed until `python aws_cleanup.py` removes it."""
import sys

from bertopt import cli
from bertopt.aws.config import AwsDeployConfig, add_deploy_args, build_deploy

EPILOG = """examples:
  python aws_deploy.py --local                          # test the handler on http://127.0.0.1:8080 first
  python aws_deploy.py --aws-account-id 123456789012 --aws-role-arn arn:aws:iam::123456789012:role/SageMakerRole
  python aws_deploy.py --variant int8 --serverless-memory 2048 --aws-role-arn ...
  python aws_deploy.py --prepare ...  then  python aws_deploy.py --finish --aws-role-arn ...
  python aws_cleanup.py                                 # delete everything the deploy created

Here --model / --model-path name the model to deploy (an .onnx file or a model directory)."""


def _run(cfg):
    from bertopt.aws.deploy import run

    return run(cfg)


def main(argv=None) -> int:
    return cli.stage_main("aws_deploy", __doc__, AwsDeployConfig, add_deploy_args, _run, argv, epilog=EPILOG,
                          build=lambda ns: build_deploy(ns, standalone=True))


if __name__ == "__main__":
    sys.exit(main())
