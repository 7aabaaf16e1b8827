"""aws_deploy.py: package the chosen model, upload it to S3 and create a SageMaker real-time (or
serverless) endpoint with plain boto3; ``--prepare`` / ``--finish`` split the work in two;
``--local`` serves the same archive on this machine instead (see :mod:`bertopt.aws.local`).

Every resource is tagged ``bertopt:project`` + ``bertopt:deployment-id`` and recorded in
``saved_models/aws/deployment.json`` before it is created; a failed endpoint is rolled back
(unless ``--keep-on-failure``) with the same deletion code aws_cleanup.py uses.
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Optional
from urllib.parse import quote, urlencode

from .. import artifacts, logs, staging
from ..cli import StageResult, print_config
from ..errors import MissingArtifact, PipelineError
from ..logs import stage_logging
from . import cleanup, instances, operate, packaging, smoke
from .choice import resolve_model
from .config import (DEPLOYMENT_TAG, LOG_GROUP_PREFIX, PROJECT, PROJECT_TAG, AwsDeployConfig, dlc_image_uri,
                     role_account)
from .record import Deployment
from .session import Aws, aws_error, is_not_found, wait

log = logging.getLogger("bertopt.aws.deploy")

STAGE = "aws"
# fields that change what gets deployed (the skip fingerprint)
RESULT_FIELDS = ("aws_region", "aws_account_id", "aws_role_arn", "endpoint_name", "variant", "model_path", "bucket",
                 "s3_prefix", "instance_type", "instance_count", "serverless_memory", "serverless_concurrency",
                 "image_uri", "repository_name", "vendor_wheels", "prepare", "max_batch", "max_chars", "batching",
                 "batch_wait_ms", "batch_max_texts", "min_instances", "max_instances", "target_invocations", "alarms",
                 "alarm_p99_ms", "alarm_5xx")


def tags(deployment_id: str) -> list:
    return [{"Key": PROJECT_TAG, "Value": PROJECT}, {"Key": DEPLOYMENT_TAG, "Value": deployment_id}]


def log_group_url(region: str, endpoint: str) -> str:
    group = quote(quote(LOG_GROUP_PREFIX + endpoint, safe=""), safe="").replace("%", "$")
    return f"https://{region}.console.aws.amazon.com/cloudwatch/home?region={region}#logsV2:log-groups/log-group/{group}"


def _code_digest() -> str:
    h = hashlib.sha256(packaging.HANDLER_SOURCE.read_bytes())
    for name in packaging.vendored_modules():
        h.update((packaging.PACKAGE_DIR / f"{name}.py").read_bytes())
    return h.hexdigest()[:16]


def fingerprint(cfg: AwsDeployConfig, choice) -> str:
    config = {k: getattr(cfg, k) for k in RESULT_FIELDS}
    return artifacts.fingerprint(config, {**choice.inputs, "serving_code": _code_digest()})


def image_uri(cfg: AwsDeployConfig, aws: Aws, account: str) -> str:
    """--image-uri, else --repository-name in this account's ECR (must exist), else the pinned DLC."""
    if cfg.image_uri:
        return cfg.image_uri
    if cfg.repository_name:
        from botocore.exceptions import ClientError

        repo, _, tag = cfg.repository_name.partition(":")
        tag = tag or "latest"
        try:
            aws.client("ecr").describe_images(repositoryName=repo, imageIds=[{"imageTag": tag}])
        except ClientError as exc:
            if is_not_found(exc) or "ImageNotFound" in str(exc):
                raise PipelineError(f"--repository-name {cfg.repository_name}: no such repository/image tag in "
                                    f"ECR of account {account} ({aws.region})") from None
            raise aws_error(exc, f"checking ECR repository {repo}") from None
        domain = "amazonaws.com.cn" if aws.region.startswith("cn-") else "amazonaws.com"
        return f"{account}.dkr.ecr.{aws.region}.{domain}/{repo}:{tag}"
    uri = dlc_image_uri(aws.region, cfg.gpu)
    if uri is None:
        raise PipelineError(f"no Hugging Face inference image is pinned for region {aws.region}; pass --image-uri "
                            "(see https://aws.github.io/deep-learning-containers/reference/available_images/)")
    return uri


def _check_endpoint_absent(aws: Aws, name: str) -> None:
    """Never create a duplicate silently: an existing endpoint of that name stops the deploy."""
    from botocore.exceptions import ClientError

    try:
        d = aws.client("sagemaker").describe_endpoint(EndpointName=name)
    except ClientError as exc:
        if is_not_found(exc):
            return
        raise aws_error(exc, f"checking whether endpoint {name} exists") from None
    owner = ""
    try:
        t = cleanup._sm_tags(aws, d["EndpointArn"])
        owner = (f" (bertopt deployment {t.get(DEPLOYMENT_TAG)})" if t.get(PROJECT_TAG) == PROJECT
                 else " (not created by bertopt)")
    except ClientError:
        pass
    raise PipelineError(f"endpoint {name} already exists in {aws.region}{owner}, status {d.get('EndpointStatus')}; "
                        "choose another --endpoint-name, or remove it first with `python aws_cleanup.py "
                        f"--endpoint-name {name}`")


def _check_previous(record: Optional[Deployment]) -> list:
    """A previous deployment with live resources blocks a new one; leftover log groups (kept for
    debugging after a rollback) are carried over so cleanup still finds them."""
    if record is None:
        return []
    live = record.live()
    blocking = [e for e in live if e["type"] != "log-group"]
    if blocking:
        names = ", ".join(f"{e['type']} {e['name']}" for e in blocking[:4])
        finish = " (or create its endpoint with `--finish`)" if record.status == "prepared" else ""
        raise PipelineError(f"{record.path} records deployment {record.id} (status {record.status}) whose resources "
                            f"may still exist ({names}{', ...' if len(blocking) > 4 else ''}); remove them first "
                            f"with `python aws_cleanup.py`{finish}, replace its model with `python aws_deploy.py --update ...`, "
                            "or deploy with another --output-dir")
    return [dict(e) for e in live]


def _upload(aws: Aws, cfg: AwsDeployConfig, record: Deployment, archive, created: list, revision: str = "") -> str:
    """Upload model.tar.gz (creating the bucket if needed); ``revision`` keeps an update's archive
    beside the live one."""
    from botocore.exceptions import ClientError

    s3 = aws.client("s3")
    bucket = cfg.bucket or f"bertopt-{aws.account}-{aws.region}"
    tag_list = tags(record.id)
    try:
        s3.head_bucket(Bucket=bucket, ExpectedBucketOwner=aws.account)
        bucket_created = False
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code"))
        if code in ("403", "AccessDenied", "Forbidden"):
            raise PipelineError(f"S3 bucket {bucket} exists but belongs to another account or denies access; "
                                "choose another --bucket") from None
        if not is_not_found(exc):
            raise aws_error(exc, f"checking S3 bucket {bucket}") from None
        entry = record.add("s3-bucket", bucket, arn=f"arn:{aws.partition}:s3:::{bucket}", created_by="bertopt")
        created.append(entry)
        kwargs = {"Bucket": bucket}
        if aws.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": aws.region}
        try:
            s3.create_bucket(**kwargs)
        except ClientError as exc2:
            record.mark(entry, "not-created")
            raise aws_error(exc2, f"creating S3 bucket {bucket}") from None
        record.mark(entry, "created")
        s3.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": tag_list})
        bucket_created = True
        log.info("created S3 bucket %s", bucket)
    key = "/".join(p for p in (cfg.s3_prefix.strip("/"), record.id, revision, packaging.ARCHIVE_NAME) if p)
    uri = f"s3://{bucket}/{key}"
    entry = record.add("s3-object", key, bucket=bucket, arn=f"arn:{aws.partition}:s3:::{bucket}/{key}")
    created.append(entry)
    record.update(bucket={"name": bucket, "created": bucket_created}, s3_uri=uri)
    size = archive.size_bytes
    with logs.progress(total=size, desc=f"uploading {uri}", unit="B", unit_scale=True) as bar:
        try:
            s3.upload_file(str(archive.path), bucket, key,
                           ExtraArgs={"Tagging": urlencode({t["Key"]: t["Value"] for t in tag_list})},
                           Callback=bar.update)
        except Exception as exc:
            from boto3.exceptions import S3UploadFailedError

            if isinstance(exc, (ClientError, S3UploadFailedError)):
                raise PipelineError(f"uploading {archive.path} to {uri} failed: {exc}") from None
            raise
    record.mark(entry, "created", size_bytes=size, sha256=archive.sha256)
    log.info("uploaded %s (%.1f MB)", uri, size / 1e6)
    return uri


def _rollback(aws: Aws, cfg: AwsDeployConfig, record: Deployment, created: list) -> list:
    """Delete what this run created (log groups stay: they hold the failure's logs)."""
    targets = [cleanup.Target(e["type"], e["name"], bucket=e.get("bucket"), entry=e, source="this run")
               for e in created if e["type"] != "log-group" and e.get("state") in ("creating", "created")]
    targets = cleanup.plan(aws, targets, verify_tags=False)
    cleanup.execute(aws, targets, timeout=cfg.wait_timeout, poll=cfg.poll_seconds, record=record)
    print("rollback:\n" + cleanup.table(targets))
    return targets


def _fail(aws, cfg, record, created, message: str) -> PipelineError:
    """Roll back (unless --keep-on-failure) and return the error to raise."""
    if cfg.keep_on_failure:
        record.update(status="failed")
        return PipelineError(f"{message}; kept what was created (--keep-on-failure): it may be billed until "
                             "you run `python aws_cleanup.py`")
    targets = _rollback(aws, cfg, record, created)
    failed = [t for t in targets if t.outcome == "failed"]
    record.update(status="rolled-back" if not failed else "rollback-failed")
    if failed:
        return PipelineError(f"{message}; rollback could not delete {', '.join(t.label for t in failed)}: "
                             "run `python aws_cleanup.py`")
    return PipelineError(f"{message}; rolled back everything this run created")


def container_env(cfg: AwsDeployConfig, region: str) -> dict:
    """The inference container's environment: handler, limits and, for a known instance type,
    model-server workers and model threads from its vCPUs (instances.thread_plan)."""
    env = {"SAGEMAKER_PROGRAM": "inference.py", "SAGEMAKER_REGION": region,
           "SAGEMAKER_CONTAINER_LOG_LEVEL": "20", "BERTOPT_MAX_BATCH": str(cfg.max_batch),
           "BERTOPT_MAX_CHARS": str(cfg.max_chars),
           # the model server hands each worker one request at a time: micro-batching must not wait there
           "BERTOPT_BATCH_WAIT_MS": "0"}
    plan = None if cfg.serverless else instances.instance_plan(cfg.instance_type, gpu=cfg.gpu)
    if plan:
        env.update(plan.container_env())
    elif not cfg.serverless:
        log.warning("no vCPU count known for %s: the container keeps its default workers and threads",
                    cfg.instance_type)
    return env


def create_model_steps(aws: Aws, cfg: AwsDeployConfig, record: Deployment, image: str, s3_uri: str,
                       stamp: str) -> tuple:
    """(type, name, create call) for the model and the endpoint config of one revision."""
    sm = aws.client("sagemaker")
    tag_list = tags(record.id)
    model_name = config_name = f"{cfg.endpoint_name}-{stamp}"
    variant = {"VariantName": operate.VARIANT, "ModelName": model_name}
    if cfg.serverless:
        variant["ServerlessConfig"] = {"MemorySizeInMB": cfg.serverless_memory,
                                       "MaxConcurrency": cfg.serverless_concurrency}
    else:
        variant.update(InstanceType=cfg.instance_type, InitialInstanceCount=cfg.instance_count,
                       InitialVariantWeight=1.0)
    env = container_env(cfg, aws.region)
    return (
        ("model", model_name, lambda: sm.create_model(
            ModelName=model_name, ExecutionRoleArn=cfg.aws_role_arn, Tags=tag_list,
            PrimaryContainer={"Image": image, "ModelDataUrl": s3_uri, "Environment": env})["ModelArn"]),
        ("endpoint-config", config_name, lambda: sm.create_endpoint_config(
            EndpointConfigName=config_name, ProductionVariants=[variant], Tags=tag_list)["EndpointConfigArn"]),
    )


def run_steps(record: Deployment, steps, created: list, on_fail) -> None:
    """Record each resource, create it, mark it; a failed call raises ``on_fail(message)`` (which
    rolls back)."""
    from botocore.exceptions import BotoCoreError, ClientError

    for type_, name, call in steps:
        entry = record.add(type_, name)
        created.append(entry)
        try:
            arn = call()
        except (ClientError, BotoCoreError) as exc:
            record.mark(entry, "not-created")
            raise on_fail(str(aws_error(exc, f"creating {type_} {name}"))) from None
        record.mark(entry, "created", arn=arn)
        log.info("created %s %s", type_, name)


def _create(aws: Aws, cfg: AwsDeployConfig, record: Deployment, image: str, s3_uri: str, created: list) -> dict:
    """Create model -> endpoint config -> endpoint, wait for InService; returns describe_endpoint."""
    sm = aws.client("sagemaker")
    endpoint = cfg.endpoint_name
    steps = create_model_steps(aws, cfg, record, image, s3_uri, record.data["stamp"])
    config_name = steps[1][1]
    steps += (("endpoint", endpoint, lambda: sm.create_endpoint(
        EndpointName=endpoint, EndpointConfigName=config_name, Tags=tags(record.id))["EndpointArn"]),)
    record.update(status="creating", image=image, endpoint_name=endpoint,
                  hosting={"serverless": cfg.serverless, "instance_type": None if cfg.serverless else cfg.instance_type,
                           "instance_count": None if cfg.serverless else cfg.instance_count,
                           "serverless_memory": cfg.serverless_memory,
                           "serverless_concurrency": cfg.serverless_concurrency if cfg.serverless else None})
    run_steps(record, steps, created, lambda msg: _fail(aws, cfg, record, created, msg))
    # SageMaker creates the endpoint's log group; record it so cleanup removes it too
    created.append(record.add("log-group", LOG_GROUP_PREFIX + endpoint, state="created", created_by="sagemaker"))
    res = wait(aws, "endpoint_in_service", timeout=cfg.wait_timeout, poll=cfg.poll_seconds,
               what=f"endpoint {endpoint}", EndpointName=endpoint)
    if res.state == "success":
        return sm.describe_endpoint(EndpointName=endpoint)
    group = LOG_GROUP_PREFIX + endpoint
    if res.state == "timeout":
        record.update(status="creating")
        raise PipelineError(f"endpoint {endpoint} is not InService after {res.elapsed:.0f}s ({res.reason}); it keeps "
                            f"starting and is billed once InService. Watch it in the SageMaker console (logs: "
                            f"CloudWatch log group {group}) or remove it with `python aws_cleanup.py`")
    reason = res.last.get("FailureReason") or res.reason
    log.error("endpoint %s failed: %s", endpoint, reason)
    log.error("container logs: CloudWatch log group %s  %s", group, log_group_url(aws.region, endpoint))
    record.update(status="failed", failure_reason=reason)
    raise _fail(aws, cfg, record, created, f"endpoint {endpoint} failed: {reason} (logs: CloudWatch log group "
                                           f"{group}, kept for reading)")


# ---------------------------------------------------------------------------------------- run
def _new_record(directory: Path, cfg, aws: Aws, choice, archive, carried: list) -> Deployment:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return Deployment.create(
        directory, deployment_id=f"{cfg.endpoint_name}-{stamp}", stamp=stamp, region=aws.region,
        account_id=aws.account, endpoint_name=cfg.endpoint_name, model=choice.describe(),
        archive={"path": str(archive.path), "sha256": archive.sha256, "size_bytes": archive.size_bytes,
                 "members": archive.members},
        resources=[{**e, "carried_over": True} for e in carried])


def _finish_result(cfg, aws, record, directory, fp, start, described, preds) -> StageResult:
    metrics = {"deployment_id": record.id, "endpoint_name": cfg.endpoint_name, "endpoint_arn": described.get("EndpointArn"),
               "region": aws.region, "status": described.get("EndpointStatus"), "variant": record.data["model"]["variant"],
               "image": record.data.get("image"), "s3_uri": record.data.get("s3_uri"),
               "archive_sha256": record.data["archive"]["sha256"], "hosting": record.data.get("hosting"),
               "log_group": LOG_GROUP_PREFIX + cfg.endpoint_name, "smoke_test": preds,
               "alarms": operate.live_alarms(record),
               "autoscaling": [{k: e.get(k) for k in ("name", "min_capacity", "max_capacity", "target_invocations")}
                               for e in record.live(("scalable-target",))]}
    record.update(status="in-service", endpoint_arn=described.get("EndpointArn"), smoke_test=preds)
    artifacts.write_manifest(directory, stage=STAGE, status="ok", config=cfg.to_dict(), fingerprint=fp,
                             outputs=[packaging.ARCHIVE_NAME, "deployment.json"], metrics=metrics)
    hosting = (f"serverless {cfg.serverless_memory} MB" if cfg.serverless
               else f"{cfg.instance_count} x {cfg.instance_type}")
    print(f"endpoint {cfg.endpoint_name} is InService in {aws.region} ({hosting}) - it is billed until you run "
          "`python aws_cleanup.py`")
    return StageResult("aws_deploy", "ok", time.perf_counter() - start,
                       f"endpoint {cfg.endpoint_name} InService ({record.data['model']['variant']})", str(directory),
                       details=metrics)


def run(cfg: AwsDeployConfig, aws: Optional[Aws] = None) -> StageResult:
    start = time.perf_counter()
    if cfg.local:
        from .local import run_local

        return run_local(cfg)
    directory = artifacts.stage_dir(cfg.output_dir, STAGE)
    # one deploy/update/finish at a time on one aws/ dir: a second refuses naming the first's pid (--wait queues)
    with staging.locked(directory, "aws_deploy", cfg.wait), stage_logging("aws_deploy", directory):
        print_config("aws_deploy", cfg)
        if cfg.finish:
            return _run_finish(cfg, directory, aws, start)
        if cfg.update:
            from .update import run_update

            return run_update(cfg, directory, aws, start)
        choice = resolve_model(cfg)
        log.info("model: %s (%s, %s) from %s", choice.variant, choice.backend, choice.precision, choice.origin)
        fp = fingerprint(cfg, choice)
        record = Deployment.load(directory)
        current = None if cfg.force else artifacts.is_current(directory, fp)
        if current and record and record.status == ("prepared" if cfg.prepare else "in-service"):
            log.info("deployment %s is up to date (%s); remove it with `python aws_cleanup.py`", record.id,
                     record.status)
            return StageResult("aws_deploy", "up-to-date", time.perf_counter() - start,
                               f"endpoint {record.data.get('endpoint_name')} {record.status}", str(directory))
        carried = _check_previous(record)
        # every check that can fail runs before anything is created
        aws = aws or Aws(cfg.aws_region, cfg.aws_profile, cfg.max_attempts)
        account = aws.identity()
        if cfg.aws_account_id and str(cfg.aws_account_id) != account:
            raise PipelineError(f"the credentials are for account {account}, not --aws-account-id "
                                f"{cfg.aws_account_id}; nothing was created")
        if cfg.aws_role_arn and role_account(cfg.aws_role_arn) != account:
            raise PipelineError(f"--aws-role-arn is a role of account {role_account(cfg.aws_role_arn)}, but the "
                                f"credentials are for account {account}; nothing was created")
        image = image_uri(cfg, aws, account)
        if not cfg.prepare:
            _check_endpoint_absent(aws, cfg.endpoint_name)
        artifacts.begin_stage(directory)
        archive = packaging.build_archive(choice, cfg, directory / packaging.ARCHIVE_NAME)
        record = _new_record(directory, cfg, aws, choice, archive, carried)
        record.update(image=image, status="uploading")
        created: list = []
        try:
            s3_uri = _upload(aws, cfg, record, archive, created)
        except PipelineError as exc:
            raise _fail(aws, cfg, record, created, str(exc)) from None
        if cfg.prepare:
            record.update(status="prepared")
            artifacts.write_manifest(directory, stage=STAGE, status="ok", config=cfg.to_dict(), fingerprint=fp,
                                     outputs=[packaging.ARCHIVE_NAME, "deployment.json"],
                                     metrics={"prepared": True, "deployment_id": record.id, "s3_uri": s3_uri,
                                              "image": image, "variant": choice.variant,
                                              "archive_sha256": archive.sha256})
            print(f"prepared {s3_uri}; create the endpoint with `python aws_deploy.py --finish --aws-role-arn ...`")
            return StageResult("aws_deploy", "ok", time.perf_counter() - start, f"prepared {s3_uri}", str(directory))
        described = _create(aws, cfg, record, image, s3_uri, created)
        preds = _smoke_and_operate(cfg, aws, record, choice.label_names, created)
        return _finish_result(cfg, aws, record, directory, fp, start, described, preds)


def _smoke_and_operate(cfg, aws, record, label_names, created):
    """Smoke-test the InService endpoint, then set up its alarms and autoscaling. A failure rolls
    back everything this run created (``--keep-on-failure`` keeps it)."""
    preds = None
    if cfg.smoke_test:
        try:
            preds = smoke.smoke_test(aws, cfg.endpoint_name, label_names, smoke.serving_device(cfg))
        except PipelineError as exc:
            record.update(smoke_test={"error": str(exc)})
            raise _fail(aws, cfg, record, created, f"endpoint {cfg.endpoint_name} is InService but the {exc} (logs: "
                                                   f"CloudWatch log group {LOG_GROUP_PREFIX}{cfg.endpoint_name})") from None
    try:
        operate.setup(aws, cfg, record, created, cfg.endpoint_name)
    except PipelineError as exc:
        raise _fail(aws, cfg, record, created, str(exc)) from None
    return preds


def _run_finish(cfg: AwsDeployConfig, directory: Path, aws: Optional[Aws], start: float) -> StageResult:
    """Two-step mode, step 2: create the endpoint from the upload ``--prepare`` recorded."""
    from botocore.exceptions import ClientError

    record = Deployment.load(directory)
    if record is None:
        raise MissingArtifact(Deployment.path_in(directory), "python aws_deploy.py --prepare")
    if record.status not in ("prepared", "rolled-back"):
        raise PipelineError(f"--finish needs a prepared upload, but {record.path} has status {record.status} "
                            "(run `python aws_deploy.py --prepare` first)")
    if cfg.aws_region and record.region and cfg.aws_region != record.region:
        raise PipelineError(f"the prepared upload is in region {record.region}, not --aws-region {cfg.aws_region}")
    if cfg.endpoint_name != record.data.get("endpoint_name"):
        log.info("--finish: using endpoint name %s from the prepared deployment", record.data.get("endpoint_name"))
        cfg.endpoint_name = record.data["endpoint_name"]
    aws = aws or Aws(record.region, cfg.aws_profile, cfg.max_attempts)
    account = aws.identity()
    if record.data.get("account_id") != account:
        raise PipelineError(f"the upload was prepared in account {record.data.get('account_id')}, but the "
                            f"credentials are for account {account}")
    if role_account(cfg.aws_role_arn) != account:
        raise PipelineError(f"--aws-role-arn is a role of account {role_account(cfg.aws_role_arn)}, not {account}")
    s3_uri = record.data.get("s3_uri") or ""
    bucket, _, key = s3_uri[len("s3://"):].partition("/")
    try:
        aws.client("s3").head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if is_not_found(exc):
            raise PipelineError(f"the prepared upload {s3_uri} is gone; run `python aws_deploy.py --prepare` again") from None
        raise aws_error(exc, f"checking {s3_uri}") from None
    image = cfg.image_uri or record.data.get("image") or image_uri(cfg, aws, account)
    _check_endpoint_absent(aws, cfg.endpoint_name)
    created: list = []
    described = _create(aws, cfg, record, image, s3_uri, created)
    preds = _smoke_and_operate(cfg, aws, record, record.data["model"]["label_names"], created)
    manifest = artifacts.read_manifest(directory) or {}
    return _finish_result(cfg, aws, record, directory, manifest.get("fingerprint", ""), start, described, preds)
