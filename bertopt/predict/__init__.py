"""predict.py: score a file with any optimized variant, locally (length-grouped batches through the
runtimes' predictors) or with SageMaker Batch Transform (:mod:`bertopt.aws.transform`)."""
