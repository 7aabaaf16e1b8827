"""SageMaker deployment: packaging (model.tar.gz), deploy/cleanup with plain boto3, the serving
handler (``serving/inference.py``, shipped inside the archive) and a local endpoint that serves the
same archive over the SageMaker container contract.

boto3 is imported lazily inside the functions that call AWS, so ``--help``, packaging and the local
endpoint work without it."""
