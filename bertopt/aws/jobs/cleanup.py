"""What aws_cleanup.py knows about SageMaker jobs: tagged training and transform jobs (running ones are
stopped; finished training jobs deleted where the API allows, finished transform jobs cannot be), their
S3 prefixes (source, inputs, checkpoints, outputs) and their CloudWatch log streams. The S3 prefix and
the log streams are bertopt's when their job is tagged (as an endpoint's log group is). Called from
:mod:`bertopt.aws.cleanup` (which owns targets, plans and the table); this module never imports it."""
from __future__ import annotations

import logging

from ..config import PROJECT, PROJECT_TAG
from ..session import Aws, error_code
from . import common

log = logging.getLogger("bertopt.aws.cleanup")

JOB_TYPES = ("training-job", "transform-job")
ATTACHED_TYPES = ("s3-prefix", "log-streams")
TYPES = JOB_TYPES + ATTACHED_TYPES
LOG_GROUPS = {"training-job": "/aws/sagemaker/TrainingJobs", "transform-job": "/aws/sagemaker/TransformJobs"}
RUNNING = ("InProgress", "Stopping")
_LIST = {"training-job": ("list_training_jobs", "TrainingJobSummaries", "TrainingJobName", "TrainingJobArn"),
         "transform-job": ("list_transform_jobs", "TransformJobSummaries", "TransformJobName", "TransformJobArn")}


def _tags(aws: Aws, arn: str) -> dict:
    sm, tags, kwargs = aws.client("sagemaker"), {}, {"ResourceArn": arn}
    while True:
        resp = sm.list_tags(**kwargs)
        tags.update({t["Key"]: t["Value"] for t in resp.get("Tags") or []})
        if not resp.get("NextToken"):
            return tags
        kwargs["NextToken"] = resp["NextToken"]


def discover(aws: Aws, make) -> list:
    """``make(type, name, arn)`` for every job in the region tagged bertopt:project."""
    sm, found = aws.client("sagemaker"), []
    for type_, (op, key, name_key, arn_key) in _LIST.items():
        for page in sm.get_paginator(op).paginate():
            for item in page.get(key, []):
                if _tags(aws, item[arn_key]).get(PROJECT_TAG) == PROJECT:
                    found.append(make(type_, item[name_key], item[arn_key]))
    return found


def _describe(aws: Aws, type_: str, name: str) -> dict:
    sm = aws.client("sagemaker")
    if type_ == "training-job":
        return sm.describe_training_job(TrainingJobName=name)
    return sm.describe_transform_job(TransformJobName=name)


def job_prefix(type_: str, desc: dict):
    """(bucket, prefix) of everything bertopt put in S3 for the job: its output path's parent."""
    out = (desc.get("OutputDataConfig") or desc.get("TransformOutput") or {}).get("S3OutputPath") or ""
    if not out.startswith("s3://") or "/jobs/" not in out:
        return None
    bucket, key = common.split_s3(out.rstrip("/"))
    return bucket, key.rsplit("/", 1)[0]


def inspect(aws: Aws, t, add, make):
    """The tags deciding whether ``t`` is ours (None: it does not exist); a tagged job pulls in its S3
    prefix and log streams through ``add(make(type, name, arn, bucket=..., links=...))``."""
    if t.type in JOB_TYPES:
        desc = _describe(aws, t.type, t.name)
        t.arn = desc.get("TrainingJobArn") or desc.get("TransformJobArn") or t.arn
        status = desc.get("TrainingJobStatus") or desc.get("TransformJobStatus")
        t.links = {"status": status}
        tags = _tags(aws, t.arn)
        t.detail = f"{status}, will be stopped" if status in RUNNING else str(status)
        if tags.get(PROJECT_TAG) == PROJECT:
            where = job_prefix(t.type, desc)
            if where:
                add(make("s3-prefix", where[1], t.arn, bucket=where[0], source=f"{t.type} {t.name}"))
            add(make("log-streams", f"{LOG_GROUPS[t.type]}:{t.name}/", t.arn, source=f"{t.type} {t.name}"))
        return tags
    if t.type == "s3-prefix":
        listed = aws.client("s3").list_objects_v2(Bucket=t.bucket, Prefix=t.name + "/")
        if not listed.get("KeyCount"):
            return None
        t.detail = f"{listed['KeyCount']}{'+' if listed.get('IsTruncated') else ''} object(s)"
        return _tags(aws, t.arn)
    group, prefix = t.name.split(":", 1)
    streams = _streams(aws, group, prefix)
    if not streams:
        return None
    t.detail = f"{len(streams)} stream(s)"
    return _tags(aws, t.arn)


def _streams(aws: Aws, group: str, prefix: str) -> list:
    from botocore.exceptions import ClientError

    try:
        pages = aws.client("logs").get_paginator("describe_log_streams").paginate(
            logGroupName=group, logStreamNamePrefix=prefix)
        return [s["logStreamName"] for page in pages for s in page.get("logStreams", [])]
    except ClientError as exc:
        if error_code(exc) == "ResourceNotFoundException":
            return []
        raise


def delete(aws: Aws, t) -> None:
    """Stop / delete one job, empty one S3 prefix or delete one job's log streams; sets t.outcome."""
    from botocore.exceptions import ClientError

    if t.type in JOB_TYPES:
        kind = common.TRAINING if t.type == "training-job" else common.TRANSFORM
        if t.links.get("status") in RUNNING:
            common.stop_job(aws, kind, t.name)
            t.outcome, t.detail = "deleted", "stopped"
            return
        if t.type == "transform-job":
            t.outcome, t.detail = "kept", "a finished transform job cannot be deleted (it costs nothing)"
            return
        try:
            aws.client("sagemaker").delete_training_job(TrainingJobName=t.name)
        except ClientError as exc:
            if error_code(exc) not in ("ValidationException", "InvalidAction", "NotImplemented", "500"):
                raise
            t.outcome, t.detail = "kept", f"finished training job stays listed ({error_code(exc)}; it costs nothing)"
            return
        t.outcome = "deleted"
    elif t.type == "s3-prefix":
        s3 = aws.client("s3")
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=t.bucket, Prefix=t.name + "/"):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                s3.delete_objects(Bucket=t.bucket, Delete={"Objects": keys, "Quiet": True})
        t.outcome = "deleted"
    else:
        group, prefix = t.name.split(":", 1)
        for stream in _streams(aws, group, prefix):
            aws.client("logs").delete_log_stream(logGroupName=group, logStreamName=stream)
        t.outcome = "deleted"
