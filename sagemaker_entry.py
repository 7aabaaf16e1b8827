#!/usr/bin/env python
"""Entry point of a bertopt SageMaker training job (the toolkit's sagemaker_program): runs the stage
named in the job's hyperparameters with the project's own code; see bertopt/aws/jobs/entry.py."""
import sys

from bertopt.aws.jobs.entry import main

if __name__ == "__main__":
    sys.exit(main())
