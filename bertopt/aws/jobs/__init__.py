"""SageMaker jobs: the training stages as training jobs (:mod:`.training`, container side
:mod:`.entry`), predict.py's Batch Transform (:mod:`.transform`), and what they share (:mod:`.common`:
images, prices, tags, S3 transfers, the watch loop with its failure and Ctrl-C rules)."""
