#!/usr/bin/env python
"""Delete every AWS resource aws_deploy.py created: endpoint (waits until gone) -> endpoint config
-> model -> the endpoint's CloudWatch log group -> ECR repository (if one was created or named) ->
uploaded S3 objects -> the bucket (only if the deploy created it and it is then empty).

Resources come from saved_models/aws/deployment.json and, with --all, from the bertopt:project
tag; nothing without that tag is deleted. Idempotent: "not found" counts as done. Ends with a table
of what was deleted, already gone, skipped or failed; exits 1 if anything failed."""
import sys

from bertopt import cli
from bertopt.aws.config import AwsCleanupConfig, add_cleanup_args, build_cleanup

EPILOG = """examples:
  python aws_cleanup.py --dry-run        # list what would be deleted
  python aws_cleanup.py                  # delete what saved_models/aws/deployment.json lists
  python aws_cleanup.py --all --aws-region us-east-1   # also everything tagged bertopt:project there
  python aws_cleanup.py --aws_region us-east-1 --model_name my-endpoint --repository_name my-repo"""


def _run(cfg):
    from bertopt.aws.cleanup import run

    return run(cfg)


def main(argv=None) -> int:
    return cli.stage_main("aws_cleanup", __doc__, AwsCleanupConfig, add_cleanup_args, _run, argv, epilog=EPILOG,
                          build=build_cleanup)


if __name__ == "__main__":
    sys.exit(main())
