"""``aws_deploy.py --update``: a blue/green update of the live endpoint, without downtime.

New archive upload -> new model -> new endpoint config -> ``UpdateEndpoint`` with a blue/green
DeploymentConfig (all at once or canary, rolled back automatically on the endpoint's alarms) -> wait
until InService *on the new config* -> smoke test -> only then delete the old model, config and
upload. On a failure at any step the endpoint stays on (or is switched back to) the old config and
what the update created is removed. An autoscaling target is deregistered for the update and
registered again afterwards (SageMaker refuses an update that changes the instance type of a
scalable variant; deregistering first keeps the update independent of that). deployment.json keeps
every update in ``updates`` (and the status history).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from .. import artifacts
from ..cli import StageResult
from ..errors import MissingArtifact, PipelineError
from . import cleanup, deploy, operate, packaging, smoke
from .choice import resolve_model
from .record import Deployment
from .session import Aws, aws_error, wait

log = logging.getLogger("bertopt.aws.update")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _load_live(cfg, directory: Path) -> Deployment:
    record = Deployment.load(directory)
    if record is None:
        raise MissingArtifact(Deployment.path_in(directory), "python aws_deploy.py --aws-role-arn ...")
    if record.status != "in-service":
        raise PipelineError(f"--update needs an InService deployment, but {record.path} has status {record.status} "
                            "(deploy first, or remove it with `python aws_cleanup.py`)")
    if cfg.aws_region and record.region and cfg.aws_region != record.region:
        raise PipelineError(f"the deployment is in region {record.region}, not --aws-region {cfg.aws_region}")
    if cfg.endpoint_name != record.data.get("endpoint_name"):
        log.info("--update: endpoint %s from %s", record.data.get("endpoint_name"), record.path)
        cfg.endpoint_name = record.data["endpoint_name"]
    return record


def _current_config(aws: Aws, record: Deployment, endpoint: str) -> str:
    """The endpoint's config now; it must be InService on a config this deployment created."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        d = aws.client("sagemaker").describe_endpoint(EndpointName=endpoint)
    except (ClientError, BotoCoreError) as exc:
        raise aws_error(exc, f"describing endpoint {endpoint}") from None
    if d.get("EndpointStatus") != "InService":
        raise PipelineError(f"endpoint {endpoint} is {d.get('EndpointStatus')}, not InService; update it when it is")
    current = d["EndpointConfigName"]
    if current not in {e["name"] for e in record.live(("endpoint-config",))}:
        raise PipelineError(f"endpoint {endpoint} runs endpoint config {current}, which {record.path} does not "
                            "list; it was changed outside bertopt, so --update will not touch it")
    return current


def _switch(aws: Aws, cfg, endpoint: str, config: str, deployment_config=None) -> None:
    """UpdateEndpoint to ``config`` and wait until the endpoint is InService on it."""
    from botocore.exceptions import BotoCoreError, ClientError

    kwargs = {"EndpointName": endpoint, "EndpointConfigName": config}
    if deployment_config:
        kwargs["DeploymentConfig"] = deployment_config
    try:
        aws.client("sagemaker").update_endpoint(**kwargs)
    except (ClientError, BotoCoreError) as exc:
        raise aws_error(exc, f"updating endpoint {endpoint} to {config}") from None
    res = wait(aws, "endpoint_in_service", timeout=cfg.wait_timeout, poll=cfg.poll_seconds,
               what=f"updating endpoint {endpoint}", EndpointName=endpoint)
    d = aws.client("sagemaker").describe_endpoint(EndpointName=endpoint)
    if res.state == "timeout":
        raise PipelineError(f"endpoint {endpoint} is still {d.get('EndpointStatus')} after {res.elapsed:.0f}s "
                            f"(update to {config}); `python aws_deploy.py --update` again once it settles, or "
                            "`python aws_cleanup.py`")
    if d.get("EndpointStatus") != "InService" or d.get("EndpointConfigName") != config:
        reason = d.get("FailureReason") or res.last.get("FailureReason") or res.reason or "rolled back"
        raise PipelineError(f"the update of endpoint {endpoint} to {config} did not take: it is "
                            f"{d.get('EndpointStatus')} on {d.get('EndpointConfigName')} ({reason})")


def _remove(aws: Aws, cfg, record: Deployment, entries: list) -> list:
    targets = [cleanup.Target(e["type"], e["name"], bucket=e.get("bucket"), entry=e, source="update")
               for e in entries if e.get("state") in ("creating", "created")]
    targets = cleanup.plan(aws, targets, verify_tags=False)
    cleanup.execute(aws, targets, timeout=cfg.wait_timeout, poll=cfg.poll_seconds, record=record)
    return [t for t in targets if t.outcome == "failed"]


def _pause_autoscaling(aws: Aws, cfg, record: Deployment) -> tuple | None:
    """Deregister the recorded scalable target (if any); returns its settings to register again."""
    live = record.live(("scalable-target",))
    if not live:
        return None
    entry = live[0]
    if _remove(aws, cfg, record, [entry]):
        raise PipelineError(f"could not deregister the scalable target {entry['name']} before the update")
    return entry.get("min_capacity"), entry.get("max_capacity"), entry.get("target_invocations")


def _blue_green(aws, cfg, record, choice, image, old_config, created, update) -> list:
    """The update's steps; raises PipelineError on a failure (the caller rolls back)."""
    endpoint = cfg.endpoint_name
    archive = packaging.build_archive(choice, cfg, Path(record.path).parent / packaging.ARCHIVE_NAME)
    s3_uri = deploy._upload(aws, cfg, record, archive, created, revision=update["revision"])
    steps = deploy.create_model_steps(aws, cfg, record, image, s3_uri, update["revision"])
    deploy.run_steps(record, steps, created, PipelineError)
    new_config = update["to_config"] = steps[1][1]
    if cfg.alarms and not operate.live_alarms(record):
        operate.setup_alarms(aws, cfg, record, created, endpoint)
    config = operate.deployment_config(cfg, operate.live_alarms(record))
    update["deployment_config"] = config
    record.save()
    _switch(aws, cfg, endpoint, new_config, config)
    update["switched"] = True
    if cfg.smoke_test:
        smoke.smoke_test(aws, endpoint, choice.label_names, smoke.serving_device(cfg))
    return [archive, s3_uri]


def _revision(record: Deployment, endpoint: str) -> str:
    """A timestamp that names no recorded model/config yet (names carry seconds)."""
    names = {e["name"] for e in record.resources}
    while True:
        revision = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        if f"{endpoint}-{revision}" not in names:
            return revision
        time.sleep(0.25)


def run_update(cfg, directory: Path, aws: Aws | None, start: float) -> StageResult:
    record = _load_live(cfg, directory)
    choice = resolve_model(cfg)
    if not cfg.force and artifacts.is_current(directory, deploy.fingerprint(cfg, choice)):
        log.info("endpoint %s already serves this model and configuration (--force updates anyway)", cfg.endpoint_name)
        return StageResult("aws_deploy", "up-to-date", time.perf_counter() - start,
                           f"endpoint {cfg.endpoint_name} in-service", str(directory))
    aws = aws or Aws(record.region, cfg.aws_profile, cfg.max_attempts)
    account = aws.identity()
    if record.data.get("account_id") != account:
        raise PipelineError(f"{record.path} was deployed in account {record.data.get('account_id')}, but the "
                            f"credentials are for account {account}")
    cfg.bucket = (record.data.get("bucket") or {}).get("name") or cfg.bucket
    endpoint = cfg.endpoint_name
    old_config = _current_config(aws, record, endpoint)
    image = deploy.image_uri(cfg, aws, account)
    old = [e for e in record.live(("model", "endpoint-config", "s3-object"))]
    saved = {k: record.data.get(k) for k in ("bucket", "s3_uri", "archive", "model", "image")}
    update = {"started": _now(), "revision": _revision(record, endpoint), "from_config": old_config,
              "variant": choice.variant, "traffic": cfg.traffic, "status": "running"}
    record.data.setdefault("updates", []).append(update)
    record.update(status="updating")
    created: list = []
    scaling = None
    try:
        scaling = _pause_autoscaling(aws, cfg, record)
        archive, s3_uri = _blue_green(aws, cfg, record, choice, image, old_config, created, update)
    except PipelineError as exc:
        raise _roll_back(aws, cfg, record, created, update, saved, scaling, str(exc)) from None
    failed = _remove(aws, cfg, record, [e for e in old if e["name"] != update["to_config"]])
    if scaling:
        operate.setup_autoscaling(aws, cfg, record, [], endpoint, settings=scaling)
    update.update(status="done", finished=_now(), removed=[f"{e['type']} {e['name']}" for e in old],
                  remove_failed=[t.label for t in failed])
    record.update(status="in-service", image=image, s3_uri=s3_uri, model=choice.describe(),
                  bucket=saved["bucket"], archive={"path": str(archive.path), "sha256": archive.sha256,
                                                   "size_bytes": archive.size_bytes, "members": archive.members})
    artifacts.write_manifest(directory, stage=deploy.STAGE, status="ok", config=cfg.to_dict(),
                             fingerprint=deploy.fingerprint(cfg, choice),
                             outputs=[packaging.ARCHIVE_NAME, "deployment.json"],
                             metrics={"deployment_id": record.id, "endpoint_name": endpoint, "variant": choice.variant,
                                      "endpoint_config": update["to_config"], "previous_config": old_config,
                                      "updates": len(record.data["updates"]), "region": aws.region})
    note = f"; could not delete {', '.join(t.label for t in failed)} (`python aws_cleanup.py`)" if failed else ""
    print(f"endpoint {endpoint} now serves {choice.variant} ({update['to_config']}); removed {old_config}{note}")
    return StageResult("aws_deploy", "ok", time.perf_counter() - start,
                       f"endpoint {endpoint} updated to {choice.variant}", str(directory))


def _roll_back(aws, cfg, record, created, update, saved, scaling, message: str) -> PipelineError:
    """Back on the old config; the update's resources removed; autoscaling registered again."""
    endpoint, old_config = cfg.endpoint_name, update["from_config"]
    notes = []
    if update.get("switched") or update.get("to_config"):
        try:
            if _current_config_name(aws, endpoint) != old_config:
                _switch(aws, cfg, endpoint, old_config)
                notes.append(f"switched back to {old_config}")
        except PipelineError as exc:
            notes.append(f"could not switch back: {exc}")
    on_old = _current_config_name(aws, endpoint) == old_config
    failed = _remove(aws, cfg, record, created) if on_old else []
    if scaling:
        try:
            operate.setup_autoscaling(aws, cfg, record, [], endpoint, settings=scaling)
        except PipelineError as exc:
            notes.append(f"autoscaling not registered again: {exc}")
    record.data.update({k: v for k, v in saved.items()})
    update.update(status="rolled-back" if on_old and not failed else "rollback-incomplete", finished=_now(),
                  error=message, notes=notes)
    record.update(status="in-service" if on_old else "updating")
    if not on_old:
        return PipelineError(f"update failed: {message}; the endpoint is not back on {old_config} "
                             f"({'; '.join(notes)}); the new resources are kept in {record.path} for `python aws_cleanup.py`")
    left = f"; could not delete {', '.join(t.label for t in failed)}: run `python aws_cleanup.py`" if failed else ""
    return PipelineError(f"update failed: {message}; endpoint {endpoint} stays on {old_config} and what the update "
                         f"created is removed{left}")


def _current_config_name(aws: Aws, endpoint: str) -> str | None:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return aws.client("sagemaker").describe_endpoint(EndpointName=endpoint).get("EndpointConfigName")
    except (ClientError, BotoCoreError):
        return None
