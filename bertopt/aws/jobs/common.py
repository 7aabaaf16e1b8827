"""What the SageMaker training and transform jobs share: the pinned training image table, a pinned
price table for the cost estimate, tags, S3 transfers, and :func:`watch`, the loop that follows a
job to its end (status and secondary-status transitions, billable seconds), turns every
unsuccessful end into one line, and stops the job on Ctrl-C / SIGTERM unless ``--detach``."""
from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ... import logs
from ...errors import PipelineError
from ..config import PROJECT, PROJECT_TAG
from ..session import Aws, aws_error, error_code, error_message

log = logging.getLogger("bertopt.aws.jobs")

JOB_TAG = "bertopt:job"  # value: the stage (baseline, mixed_precision, pruned) or "transform"
# The PyTorch training Deep Learning Container (SageMaker training toolkit: script mode, torchrun).
# Pinned; --image-uri overrides. Registry accounts per region as the inference DLC (aws/config.py).
TRAINING_REPOSITORY = "pytorch-training"
TRAINING_TAGS = {"cpu": "2.6.0-cpu-py312-ubuntu22.04-sagemaker",
                 "gpu": "2.6.0-gpu-py312-cu126-ubuntu22.04-sagemaker"}
# GPUs per instance for the types a user is likely to pick (others: 1 on ml.g*/ml.p*, else 0)
GPUS = {"ml.g4dn.12xlarge": 4, "ml.g4dn.metal": 8, "ml.g5.12xlarge": 4, "ml.g5.24xlarge": 4, "ml.g5.48xlarge": 8,
        "ml.g6.12xlarge": 4, "ml.g6.24xlarge": 4, "ml.g6.48xlarge": 8, "ml.g6e.12xlarge": 4, "ml.g6e.24xlarge": 4,
        "ml.g6e.48xlarge": 8, "ml.p3.8xlarge": 4, "ml.p3.16xlarge": 8, "ml.p3dn.24xlarge": 8,
        "ml.p4d.24xlarge": 8, "ml.p4de.24xlarge": 8, "ml.p5.48xlarge": 8}
# On-demand USD per instance-hour, us-east-1 SageMaker training / batch transform list prices as pinned
# for the estimate (2026-12; other regions differ by up to ~30%: check the SageMaker pricing page)
PRICES = {"ml.m5.large": 0.115, "ml.m5.xlarge": 0.23, "ml.m5.2xlarge": 0.461, "ml.m5.4xlarge": 0.922,
          "ml.c5.xlarge": 0.204, "ml.c5.2xlarge": 0.408, "ml.c7i.large": 0.107, "ml.c7i.xlarge": 0.214,
          "ml.c7i.2xlarge": 0.428, "ml.c7i.4xlarge": 0.857, "ml.g4dn.xlarge": 0.736, "ml.g4dn.2xlarge": 0.94,
          "ml.g4dn.12xlarge": 4.89, "ml.g5.xlarge": 1.408, "ml.g5.2xlarge": 1.515, "ml.g5.4xlarge": 2.03,
          "ml.g5.12xlarge": 7.09, "ml.g5.48xlarge": 20.36, "ml.g6.xlarge": 1.006, "ml.g6.2xlarge": 1.222,
          "ml.p3.2xlarge": 3.825, "ml.p3.16xlarge": 28.152, "ml.p4d.24xlarge": 37.688}
TERMINAL = ("Completed", "Failed", "Stopped")


def gpu_count(instance_type: str) -> int:
    from ..config import is_gpu_instance

    return GPUS.get(instance_type, 1 if is_gpu_instance(instance_type) else 0)


def training_image(region: str, instance_type: str) -> Optional[str]:
    """The pinned PyTorch training image for a region (None where no registry account is pinned)."""
    from ..config import dlc_image_uri

    inference = dlc_image_uri(region, gpu_count(instance_type) > 0)
    if inference is None:
        return None
    registry = inference.split("/")[0]
    return f"{registry}/{TRAINING_REPOSITORY}:{TRAINING_TAGS['gpu' if gpu_count(instance_type) else 'cpu']}"


def estimated_cost(instance_type: str, billable_s, count: int) -> Optional[float]:
    """USD at the pinned on-demand price: billable seconds x instances (spot bills fewer seconds)."""
    price = PRICES.get(instance_type)
    if price is None or billable_s is None:
        return None
    return round(price * float(billable_s) * int(count) / 3600.0, 4)


def tags(kind: str, name: str) -> list[dict]:
    return [{"Key": PROJECT_TAG, "Value": PROJECT}, {"Key": JOB_TAG, "Value": kind},
            {"Key": "bertopt:name", "Value": name}]


def job_name(prefix: str) -> str:
    """``bertopt-<prefix>-YYYYmmdd-HHMMSS`` (at most 63 characters, SageMaker's limit)."""
    return f"bertopt-{prefix.replace('_', '-')}"[:47] + time.strftime("-%Y%m%d-%H%M%S", time.gmtime())


# ------------------------------------------------------------------------------------------ S3
def split_s3(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise PipelineError(f"{uri}: expected s3://bucket/key")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def ensure_bucket(aws: Aws, bucket: Optional[str]) -> str:
    """The given bucket, or bertopt-<account>-<region> (created and tagged if missing)."""
    from botocore.exceptions import ClientError

    name = bucket or f"bertopt-{aws.account}-{aws.region}"
    s3 = aws.client("s3")
    try:
        s3.head_bucket(Bucket=name)
        return name
    except ClientError as exc:
        if bucket or error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
            raise aws_error(exc, f"checking S3 bucket {name}") from None
    try:
        kwargs = {"Bucket": name}
        if aws.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": aws.region}
        s3.create_bucket(**kwargs)
        s3.put_bucket_tagging(Bucket=name, Tagging={"TagSet": [{"Key": PROJECT_TAG, "Value": PROJECT}]})
    except ClientError as exc:
        raise aws_error(exc, f"creating S3 bucket {name}") from None
    log.info("created S3 bucket %s", name)
    return name


def upload(aws: Aws, path: Path, bucket: str, prefix: str) -> str:
    """A file (to prefix/<name>) or a directory (under prefix/) to S3; returns the S3 URI."""
    from botocore.exceptions import ClientError

    s3 = aws.client("s3")
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    try:
        for f in logs.progress(files, desc=f"upload {path.name}", unit="file"):
            key = f"{prefix}/{f.name}" if path.is_file() else f"{prefix}/{f.relative_to(path).as_posix()}"
            s3.upload_file(str(f), bucket, key)
    except ClientError as exc:
        raise aws_error(exc, f"uploading {path} to s3://{bucket}/{prefix}") from None
    return f"s3://{bucket}/{prefix}/{path.name}" if path.is_file() else f"s3://{bucket}/{prefix}"


def download(aws: Aws, uri: str, dest: Path) -> Path:
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        aws.client("s3").download_file(bucket, key, str(dest))
    except ClientError as exc:
        raise aws_error(exc, f"downloading {uri}") from None
    return dest


# ---------------------------------------------------------------------------------- the watch loop
@dataclass
class JobKind:
    """How to describe and stop one kind of job (training or transform)."""

    noun: str                 # "training job" / "transform job"
    describe: Callable        # (client, name) -> description
    stop: Callable            # (client, name) -> None
    status_key: str           # TrainingJobStatus / TransformJobStatus
    stopped_note: str         # what a stopped job leaves behind


TRAINING = JobKind("training job", lambda c, n: c.describe_training_job(TrainingJobName=n),
                   lambda c, n: c.stop_training_job(TrainingJobName=n), "TrainingJobStatus",
                   "its checkpoints stay in S3; the model of an unfinished job is lost")
TRANSFORM = JobKind("transform job", lambda c, n: c.describe_transform_job(TransformJobName=n),
                    lambda c, n: c.stop_transform_job(TransformJobName=n), "TransformJobStatus",
                    "a stopped transform job discards its output")


class _Interrupted(Exception):
    pass


def _on_signal(signum, frame):
    raise _Interrupted(signal.Signals(signum).name)


def stop_job(aws: Aws, kind: JobKind, name: str) -> None:
    """Stop a job; one that already ended (a ValidationException) is fine."""
    from botocore.exceptions import ClientError

    try:
        kind.stop(aws.client("sagemaker"), name)
        log.warning("stopping %s %s (%s)", kind.noun, name, kind.stopped_note)
    except ClientError as exc:
        if error_code(exc) != "ValidationException":
            raise aws_error(exc, f"stopping {kind.noun} {name}") from None
        log.info("%s %s had already ended: %s", kind.noun, name, error_message(exc))


def _log_transitions(desc: dict, seen: int) -> int:
    transitions = desc.get("SecondaryStatusTransitions") or []
    for t in transitions[seen:]:
        log.info("  %s: %s", t.get("Status"), t.get("StatusMessage") or "")
    return len(transitions)


def failure(kind: JobKind, name: str, desc: dict) -> Optional[str]:
    """None for Completed, else the one line a failed / stopped / timed-out job ends with."""
    status = desc.get(kind.status_key)
    if status == "Completed":
        return None
    secondary = desc.get("SecondaryStatus")
    what = secondary if secondary in ("MaxRuntimeExceeded", "MaxWaitTimeExceeded") else status
    reason = desc.get("FailureReason") or ("stopped" if status == "Stopped" else "no reason given")
    return f"{kind.noun} {name} ended {what}: {reason} ({kind.stopped_note}; nothing was written locally)"


def watch(aws: Aws, kind: JobKind, name: str, *, poll: float, detach: bool = False) -> dict:
    """Follow a job to its end and return its last description; PipelineError for any end but
    Completed; Ctrl-C / SIGTERM stop the job (unless ``detach``: then they only stop watching)."""
    client = aws.client("sagemaker")
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    in_main = True
    try:
        for s in old:
            signal.signal(s, _on_signal)
    except ValueError:  # not the main thread: Ctrl-C arrives as KeyboardInterrupt only
        in_main = False
    status, seen, start = None, 0, time.monotonic()
    try:
        with logs.progress(desc=f"{kind.noun} {name}", unit="s", bar_format="{desc}: {postfix}") as bar:
            while True:
                desc = kind.describe(client, name)
                seen = _log_transitions(desc, seen)
                now = (desc.get(kind.status_key), desc.get("SecondaryStatus"))
                if now != status:
                    log.info("%s %s: %s%s (%.0fs)", kind.noun, name, now[0], f" / {now[1]}" if now[1] else "",
                             time.monotonic() - start)
                    status = now
                billable = desc.get("BillableTimeInSeconds")
                bar.set_postfix_str(f"{now[0]} {now[1] or ''}" + (f", billable {billable}s" if billable else ""))
                if now[0] in TERMINAL:
                    break
                time.sleep(poll)
    except (KeyboardInterrupt, _Interrupted) as exc:
        if detach:
            raise PipelineError(f"stopped watching; {kind.noun} {name} keeps running (--detach)") from None
        stop_job(aws, kind, name)
        raise PipelineError(f"interrupted ({exc or 'SIGINT'}): stopped {kind.noun} {name} "
                            f"({kind.stopped_note}; nothing was written locally)") from None
    finally:
        if in_main:
            for s, handler in old.items():
                signal.signal(s, handler)
    problem = failure(kind, name, desc)
    if problem:
        raise PipelineError(problem)
    return desc


def upload_bytes(aws: Aws, data: bytes, bucket: str, key: str) -> str:
    from botocore.exceptions import ClientError

    try:
        aws.client("s3").put_object(Bucket=bucket, Key=key, Body=data)
    except ClientError as exc:
        raise aws_error(exc, f"uploading s3://{bucket}/{key}") from None
    return f"s3://{bucket}/{key}"
