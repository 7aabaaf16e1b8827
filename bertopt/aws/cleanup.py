"""aws_cleanup.py: delete what aws_deploy.py created, in dependency order, idempotently.

Order: the Application Auto Scaling target (deregistered first) -> CloudWatch alarms -> endpoint
(wait until gone) -> endpoint config -> model -> the endpoint's CloudWatch log group -> ECR repository
(with its images) -> uploaded S3 objects -> the bucket (only if the deploy created it and it is then
empty). Resources come from deployment.json, ``--endpoint-name`` / ``--repository-name`` and, with
``--all``, the ``bertopt:project`` tag. Nothing without that tag is ever deleted (a log group or a
scalable target counts as tagged when its endpoint is). "Not found" counts as done.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

from .. import artifacts
from ..cli import StageResult, print_config
from ..errors import PipelineError
from ..logs import stage_logging
from . import operate
from .config import LOG_GROUP_PREFIX, PROJECT, PROJECT_TAG, AwsCleanupConfig
from .jobs import cleanup as jobs
from .record import ORDER, Deployment
from .session import Aws, aws_error, error_code, error_message, is_not_found, wait

log = logging.getLogger("bertopt.aws.cleanup")

REPORT = "cleanup.json"


@dataclass
class Target:
    type: str
    name: str
    bucket: Optional[str] = None
    source: str = "deployment.json"
    entry: Optional[dict] = None      # the deployment.json entry, when it came from there
    arn: Optional[str] = None
    outcome: str = "pending"          # pending | deleted | already gone | failed | skipped | kept | would delete
    detail: str = ""
    links: dict = field(default_factory=dict)  # endpoint -> config name, config -> model names
    optional: bool = False            # pulled in by its endpoint: dropped (not listed) when it does not exist

    @property
    def key(self) -> tuple:
        return (self.type, self.bucket or "", self.name)

    @property
    def label(self) -> str:
        if self.type == "s3-object":
            return f"s3://{self.bucket}/{self.name}"
        if self.type == "s3-bucket":
            return f"s3://{self.name}"
        return self.name


def _tags_dict(items, key="Key", value="Value") -> dict:
    return {t[key]: t[value] for t in items or []}


def _sm_tags(aws: Aws, arn: str) -> dict:
    sm, tags, kwargs = aws.client("sagemaker"), {}, {"ResourceArn": arn}
    while True:
        resp = sm.list_tags(**kwargs)
        tags.update(_tags_dict(resp.get("Tags")))
        if not resp.get("NextToken"):
            return tags
        kwargs["NextToken"] = resp["NextToken"]


# --------------------------------------------------------------------------------- inspection
def _inspect(aws: Aws, t: Target, add=None) -> Optional[dict]:
    """Tags of an existing resource (None when it does not exist); fills t.arn / t.links."""
    sm = aws.client("sagemaker")
    if t.type in jobs.TYPES:  # SageMaker jobs, their S3 prefixes and log streams (aws/jobs/cleanup.py)
        return jobs.inspect(aws, t, add or (lambda _: None), _job_target)
    if t.type == "endpoint":
        d = sm.describe_endpoint(EndpointName=t.name)
        t.arn, t.links = d["EndpointArn"], {"config": d.get("EndpointConfigName"), "status": d.get("EndpointStatus")}
        return _sm_tags(aws, t.arn)
    if t.type == "endpoint-config":
        d = sm.describe_endpoint_config(EndpointConfigName=t.name)
        t.arn = d["EndpointConfigArn"]
        t.links = {"models": [v["ModelName"] for v in d.get("ProductionVariants", []) if v.get("ModelName")]}
        return _sm_tags(aws, t.arn)
    if t.type == "model":
        t.arn = sm.describe_model(ModelName=t.name)["ModelArn"]
        return _sm_tags(aws, t.arn)
    if t.type == "scalable-target":
        found = aws.client("application-autoscaling").describe_scalable_targets(
            ServiceNamespace=operate.NAMESPACE, ResourceIds=[t.name], ScalableDimension=operate.DIMENSION)
        if not found.get("ScalableTargets"):
            return None
        t.arn = found["ScalableTargets"][0].get("ScalableTargetARN")
        return {}  # ownership comes from the endpoint (see plan)
    if t.type == "alarm":
        cw = aws.client("cloudwatch")
        alarms = cw.describe_alarms(AlarmNames=[t.name]).get("MetricAlarms", [])
        if not alarms:
            return None
        t.arn = alarms[0]["AlarmArn"]
        return _tags_dict(cw.list_tags_for_resource(ResourceARN=t.arn).get("Tags"))
    if t.type == "log-group":
        groups = aws.client("logs").describe_log_groups(logGroupNamePrefix=t.name).get("logGroups", [])
        if not any(g["logGroupName"] == t.name for g in groups):
            return None
        return {}  # ownership comes from the endpoint (see plan)
    if t.type == "ecr-repository":
        ecr = aws.client("ecr")
        repo = ecr.describe_repositories(repositoryNames=[t.name])["repositories"][0]
        t.arn = repo["repositoryArn"]
        t.links = {"images": len(ecr.list_images(repositoryName=t.name).get("imageIds", []))}
        return _tags_dict(ecr.list_tags_for_resource(resourceArn=t.arn).get("tags"))
    if t.type == "s3-object":
        s3 = aws.client("s3")
        s3.head_object(Bucket=t.bucket, Key=t.name)
        return _tags_dict(s3.get_object_tagging(Bucket=t.bucket, Key=t.name).get("TagSet"))
    if t.type == "s3-bucket":
        s3 = aws.client("s3")
        s3.head_bucket(Bucket=t.name)
        try:
            return _tags_dict(s3.get_bucket_tagging(Bucket=t.name).get("TagSet"))
        except Exception as exc:  # botocore ClientError: NoSuchTagSet means untagged
            if error_code(exc) == "NoSuchTagSet":
                return {}
            raise
    raise ValueError(f"unknown resource type {t.type}")  # pragma: no cover


# inspection order: an endpoint before what hangs on it (its scalable target, config, models, log group)
INSPECT_ORDER = jobs.JOB_TYPES + ("endpoint", "endpoint-config", "model", "scalable-target", "alarm", "log-group",
                                  "ecr-repository", "s3-object", "s3-bucket") + jobs.ATTACHED_TYPES
ATTACHED = {"log-group": lambda name: name[len(LOG_GROUP_PREFIX):] if name.startswith(LOG_GROUP_PREFIX) else None,
            "scalable-target": operate.endpoint_of}  # untaggable here: theirs is their endpoint's ownership


def plan(aws: Aws, targets: list, verify_tags: bool = True, owned_endpoints=()) -> list:
    """Inspect every target: already gone / skipped (untagged) / pending; return them in deletion
    order. Tagged endpoints pull in their scalable target, config, models and log group; tagged configs
    their models. A log group or scalable target is ours when its endpoint is (tagged, or in
    ``owned_endpoints``: recorded in deployment.json)."""
    by_key = {}
    for t in targets:
        by_key.setdefault(t.key, t)
    owned_endpoints = set(owned_endpoints)
    ordered = []

    def add(t: Target):
        if t.key not in by_key:
            by_key[t.key] = t

    for type_ in INSPECT_ORDER:
        for t in [x for x in by_key.values() if x.type == type_]:
            if verify_tags and not _plan_one(aws, t, owned_endpoints, add):
                continue
            ordered.append(t)
    return sorted(ordered, key=lambda t: ORDER.index(t.type))


def _plan_one(aws: Aws, t: Target, owned_endpoints: set, add) -> bool:
    """Inspect one target and set its outcome; False drops it (an optional target that does not exist)."""
    from botocore.exceptions import ClientError

    try:
        tags = _inspect(aws, t, add)
    except ClientError as exc:
        if not is_not_found(exc):
            t.outcome, t.detail = "failed", f"cannot inspect: {error_code(exc)}: {error_message(exc)}"
            return True
        tags = None
    if tags is None:
        t.outcome = "already gone"
        return not t.optional
    if t.type in ATTACHED:
        if ATTACHED[t.type](t.name) not in owned_endpoints:
            t.outcome, t.detail = "skipped", "its endpoint is not a bertopt endpoint"
        return True
    if tags.get(PROJECT_TAG) != PROJECT:
        t.outcome, t.detail = "skipped", f"not tagged {PROJECT_TAG}={PROJECT}"
        return True
    if t.type == "endpoint":
        owned_endpoints.add(t.name)
        if t.links.get("config"):
            add(Target("endpoint-config", t.links["config"], source=f"endpoint {t.name}"))
        add(Target("scalable-target", operate.resource_id(t.name), source=f"endpoint {t.name}", optional=True))
        add(Target("log-group", LOG_GROUP_PREFIX + t.name, source=f"endpoint {t.name}"))
    elif t.type == "endpoint-config":
        for m in t.links.get("models", []):
            add(Target("model", m, source=f"endpoint config {t.name}"))
    if t.type == "ecr-repository" and t.links.get("images"):
        t.detail = f"{t.links['images']} image(s)"
    return True


# ----------------------------------------------------------------------------------- deletion
def _delete(aws: Aws, t: Target, timeout: float, poll: float) -> None:
    """Delete one resource; raises ClientError (not-found is handled by the caller)."""
    if t.type in jobs.TYPES:
        return jobs.delete(aws, t)
    if t.type == "scalable-target":  # also deletes its scaling policy (and the alarms target tracking made)
        aws.client("application-autoscaling").deregister_scalable_target(
            ServiceNamespace=operate.NAMESPACE, ResourceId=t.name, ScalableDimension=operate.DIMENSION)
    elif t.type == "alarm":
        aws.client("cloudwatch").delete_alarms(AlarmNames=[t.name])
    elif t.type == "endpoint":
        aws.client("sagemaker").delete_endpoint(EndpointName=t.name)
        res = wait(aws, "endpoint_deleted", timeout=timeout, poll=poll, what=f"deleting endpoint {t.name}",
                   pending_states=("Failed",), EndpointName=t.name)
        if res.state != "success":
            raise PipelineError(f"endpoint {t.name} not deleted: {res.reason}")
    elif t.type == "endpoint-config":
        aws.client("sagemaker").delete_endpoint_config(EndpointConfigName=t.name)
    elif t.type == "model":
        aws.client("sagemaker").delete_model(ModelName=t.name)
    elif t.type == "log-group":
        aws.client("logs").delete_log_group(logGroupName=t.name)
    elif t.type == "ecr-repository":
        aws.client("ecr").delete_repository(repositoryName=t.name, force=True)
    elif t.type == "s3-object":
        s3 = aws.client("s3")
        # parts of an interrupted multipart upload are billed too
        for up in s3.list_multipart_uploads(Bucket=t.bucket, Prefix=t.name).get("Uploads", []) or []:
            if up.get("Key") == t.name:
                s3.abort_multipart_upload(Bucket=t.bucket, Key=t.name, UploadId=up["UploadId"])
        s3.delete_object(Bucket=t.bucket, Key=t.name)
    elif t.type == "s3-bucket":
        s3 = aws.client("s3")
        if s3.list_objects_v2(Bucket=t.name, MaxKeys=1).get("KeyCount", 0):
            t.outcome, t.detail = "kept", "not empty (holds objects bertopt did not upload)"
            return
        s3.delete_bucket(Bucket=t.name)
    t.outcome = "deleted"


def execute(aws: Aws, targets: list, *, timeout: float, poll: float, record: Optional[Deployment] = None) -> list:
    """Delete every pending target in order; each gets an outcome. deployment.json is updated as
    each resource goes."""
    from botocore.exceptions import BotoCoreError, ClientError

    states = {"deleted": "deleted", "already gone": "gone", "failed": "failed", "skipped": "skipped",
              "kept": "kept"}
    for t in targets:
        if t.outcome == "pending":
            try:
                _delete(aws, t, timeout, poll)
                if t.outcome == "pending":  # pragma: no cover - _delete sets it
                    t.outcome = "deleted"
            except ClientError as exc:
                if is_not_found(exc):
                    t.outcome = "already gone"
                else:
                    t.outcome, t.detail = "failed", f"{error_code(exc)}: {error_message(exc)}"
            except (BotoCoreError, PipelineError) as exc:
                t.outcome, t.detail = "failed", str(exc)
            log.info("%s %s: %s%s", t.type, t.label, t.outcome, f" ({t.detail})" if t.detail else "")
        if record is not None and t.entry is not None and t.outcome in states:
            record.mark(t.entry, states[t.outcome], **({"detail": t.detail} if t.detail else {}))
    return targets


# ---------------------------------------------------------------------------------- discovery
def from_record(record: Deployment) -> list:
    targets = []
    for e in record.live():
        targets.append(Target(e["type"], e["name"], bucket=e.get("bucket"), entry=e, arn=e.get("arn")))
    return targets


def discover_tagged(aws: Aws) -> list:
    """Every resource in the region carrying the bertopt:project tag (plus objects in tagged buckets)."""
    sm, found = aws.client("sagemaker"), []
    for op, key, name_key, arn_key, type_ in (
            ("list_endpoints", "Endpoints", "EndpointName", "EndpointArn", "endpoint"),
            ("list_endpoint_configs", "EndpointConfigs", "EndpointConfigName", "EndpointConfigArn", "endpoint-config"),
            ("list_models", "Models", "ModelName", "ModelArn", "model")):
        for page in sm.get_paginator(op).paginate():
            for item in page.get(key, []):
                if _sm_tags(aws, item[arn_key]).get(PROJECT_TAG) == PROJECT:
                    found.append(Target(type_, item[name_key], source="tag", arn=item[arn_key]))
    cw = aws.client("cloudwatch")
    for page in cw.get_paginator("describe_alarms").paginate(AlarmTypes=["MetricAlarm"]):
        for alarm in page.get("MetricAlarms", []):
            if _tags_dict(cw.list_tags_for_resource(ResourceARN=alarm["AlarmArn"]).get("Tags")).get(PROJECT_TAG) == PROJECT:
                found.append(Target("alarm", alarm["AlarmName"], source="tag", arn=alarm["AlarmArn"]))
    ecr = aws.client("ecr")
    for page in ecr.get_paginator("describe_repositories").paginate():
        for repo in page.get("repositories", []):
            tags = _tags_dict(ecr.list_tags_for_resource(resourceArn=repo["repositoryArn"]).get("tags"))
            if tags.get(PROJECT_TAG) == PROJECT:
                found.append(Target("ecr-repository", repo["repositoryName"], source="tag"))
    found += jobs.discover(aws, _job_target)
    found += _discover_s3(aws)
    return found


def _job_target(type_: str, name: str, arn: str, bucket=None, source: str = "tag") -> Target:
    return Target(type_, name, bucket=bucket, source=source, arn=arn, optional=type_ in jobs.ATTACHED_TYPES)


def _discover_s3(aws: Aws) -> list:
    from botocore.exceptions import ClientError

    s3, found = aws.client("s3"), []
    for bucket in s3.list_buckets().get("Buckets", []):
        name = bucket["Name"]
        try:
            location = s3.get_bucket_location(Bucket=name).get("LocationConstraint") or "us-east-1"
            if location != aws.region:
                continue
            tags = _tags_dict(s3.get_bucket_tagging(Bucket=name).get("TagSet"))
        except ClientError:  # untagged (NoSuchTagSet), or not ours to read
            continue
        if tags.get(PROJECT_TAG) != PROJECT:
            continue
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
            for obj in page.get("Contents", []):
                otags = _tags_dict(s3.get_object_tagging(Bucket=name, Key=obj["Key"]).get("TagSet"))
                if otags.get(PROJECT_TAG) == PROJECT:
                    found.append(Target("s3-object", obj["Key"], bucket=name, source="tag"))
        found.append(Target("s3-bucket", name, source="tag"))
    return found


# ------------------------------------------------------------------------------------- output
def table(targets: list) -> str:
    if not targets:
        return "nothing left to delete"
    rows = [("resource", "name", "result", "found via")]
    for t in targets:
        result = t.outcome + (f": {t.detail}" if t.detail else "")
        rows.append((t.type, t.label, result, t.source))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:{widths[0]}}  {r[1]:{widths[1]}}  {r[2]:{widths[2]}}  {r[3]}" for r in rows)


def counts(targets: list) -> dict:
    out = {}
    for t in targets:
        out[t.outcome] = out.get(t.outcome, 0) + 1
    return out


# ---------------------------------------------------------------------------------------- run
def run(cfg: AwsCleanupConfig, aws: Optional[Aws] = None) -> StageResult:
    start = time.perf_counter()
    directory = artifacts.stage_dir(cfg.output_dir, "aws")
    with stage_logging("aws_cleanup", directory if directory.is_dir() else None):
        print_config("aws_cleanup", cfg)
        record = Deployment.load(directory)
        if record is None and not (cfg.cleanup_all or cfg.endpoint_name or cfg.repository_name):
            msg = (f"nothing to clean up: no {Deployment.path_in(directory)} (pass --all to find resources "
                   f"tagged {PROJECT_TAG} in a region)")
            print(msg)
            return StageResult("aws_cleanup", "ok", time.perf_counter() - start, "nothing to delete", str(directory))
        region = cfg.aws_region or (record.region if record else None)
        if record and cfg.aws_region and record.region and cfg.aws_region != record.region:
            raise PipelineError(f"{record.path} is for region {record.region}, not --aws-region {cfg.aws_region}; "
                                "run once per region (without --aws-region for the recorded one)")
        aws = aws or Aws(region, cfg.aws_profile, cfg.max_attempts)
        account = aws.identity()
        if record and record.data.get("account_id") and record.data["account_id"] != account:
            raise PipelineError(f"{record.path} was deployed in account {record.data['account_id']}, but the "
                                f"credentials are for account {account}; use that account's credentials")
        targets = from_record(record) if record else []
        if cfg.endpoint_name:
            targets.append(Target("endpoint", cfg.endpoint_name, source="--endpoint-name"))
        if cfg.repository_name:
            targets.append(Target("ecr-repository", cfg.repository_name.split(":")[0], source="--repository-name"))
        if cfg.cleanup_all:
            targets += discover_tagged(aws)
        try:
            recorded = {e["name"] for e in record.resources if e["type"] == "endpoint"} if record else set()
            targets = plan(aws, targets, owned_endpoints=recorded)
        except PipelineError:
            raise
        except Exception as exc:
            from botocore.exceptions import BotoCoreError, ClientError

            if isinstance(exc, (ClientError, BotoCoreError)):
                raise aws_error(exc, "listing resources to clean up") from None
            raise
        if cfg.dry_run:
            for t in targets:
                if t.outcome == "pending":
                    t.outcome = "would delete"
        else:
            execute(aws, targets, timeout=cfg.wait_timeout, poll=cfg.poll_seconds, record=record)
        text = table(targets)
        print(("dry run, nothing deleted:\n" if cfg.dry_run else "") + text)
        summary = counts(targets)
        if directory.is_dir():
            artifacts.atomic_write_json(directory / REPORT, {
                "dry_run": cfg.dry_run, "region": aws.region, "deployment_id": record.id if record else None,
                "counts": summary,
                "resources": [{"type": t.type, "name": t.label, "result": t.outcome, "detail": t.detail,
                               "found_via": t.source} for t in targets]})
        if record is not None and not cfg.dry_run:
            if not record.live():
                record.update(status="deleted")
                artifacts.manifest_path(directory).unlink(missing_ok=True)  # nothing deployed any more
        metric = ", ".join(f"{k} {v}" for k, v in sorted(summary.items())) or "nothing left to delete"
        failed = [t for t in targets if t.outcome == "failed"]
        if failed:
            raise PipelineError(f"cleanup could not delete {len(failed)} resource(s): "
                                + "; ".join(f"{t.type} {t.label} ({t.detail})" for t in failed)
                                + " - fix the cause and re-run `python aws_cleanup.py` (it is idempotent)")
        return StageResult("aws_cleanup", "ok", time.perf_counter() - start,
                           ("dry run: " if cfg.dry_run else "") + metric, str(directory),
                           details={"counts": summary})
