"""Operating a live endpoint: Application Auto Scaling (target tracking on
``SageMakerVariantInvocationsPerInstance``) and CloudWatch alarms (``ModelLatency`` p99 and
``Invocation5XXErrors``). Each resource is recorded in deployment.json before it is created, tagged
``bertopt:project`` / ``bertopt:deployment-id``, and removed by aws_cleanup.py (the scalable target
first: deregistering it also deletes its scaling policy and the alarms target tracking made)."""
from __future__ import annotations

import logging

from .config import DEPLOYMENT_TAG, PROJECT, PROJECT_TAG
from .record import Deployment
from .session import Aws, aws_error

log = logging.getLogger("bertopt.aws.operate")

VARIANT = "AllTraffic"
NAMESPACE = "sagemaker"
DIMENSION = "sagemaker:variant:DesiredInstanceCount"
METRIC_NAMESPACE = "AWS/SageMaker"
SCALE_IN_COOLDOWN, SCALE_OUT_COOLDOWN = 300, 60


def resource_id(endpoint: str, variant: str = VARIANT) -> str:
    return f"endpoint/{endpoint}/variant/{variant}"


def endpoint_of(resource: str) -> str | None:
    """The endpoint name of a scalable-target resource id."""
    parts = resource.split("/")
    return parts[1] if len(parts) == 4 and parts[0] == "endpoint" and parts[2] == "variant" else None


def alarm_names(endpoint: str) -> dict:
    return {"latency": f"{endpoint}-p99-model-latency", "errors": f"{endpoint}-5xx-errors"}


def _tag_list(deployment_id: str) -> list:
    return [{"Key": PROJECT_TAG, "Value": PROJECT}, {"Key": DEPLOYMENT_TAG, "Value": deployment_id}]


def setup_autoscaling(aws: Aws, cfg, record: Deployment, created: list, endpoint: str, settings=None) -> dict:
    """Register the endpoint's variant and attach the target-tracking policy. ``settings`` (min,
    max, target) re-registers a recorded target (after a blue/green update)."""
    from botocore.exceptions import BotoCoreError, ClientError

    lo, hi, target = settings or (cfg.min_instances or cfg.instance_count, cfg.max_instances or cfg.instance_count,
                                  float(cfg.target_invocations))
    rid = resource_id(endpoint)
    entry = record.add("scalable-target", rid, min_capacity=lo, max_capacity=hi, target_invocations=target)
    created.append(entry)
    aas = aws.client("application-autoscaling")
    try:
        resp = aas.register_scalable_target(
            ServiceNamespace=NAMESPACE, ResourceId=rid, ScalableDimension=DIMENSION, MinCapacity=lo, MaxCapacity=hi,
            Tags={t["Key"]: t["Value"] for t in _tag_list(record.id)})
        record.mark(entry, "created", arn=resp.get("ScalableTargetARN"))
        aas.put_scaling_policy(
            PolicyName=f"{endpoint}-invocations-per-instance", ServiceNamespace=NAMESPACE, ResourceId=rid,
            ScalableDimension=DIMENSION, PolicyType="TargetTrackingScaling",
            TargetTrackingScalingPolicyConfiguration={
                "TargetValue": target, "ScaleInCooldown": SCALE_IN_COOLDOWN, "ScaleOutCooldown": SCALE_OUT_COOLDOWN,
                "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"}})
    except (ClientError, BotoCoreError) as exc:
        if entry["state"] == "creating":
            record.mark(entry, "not-created")
        raise aws_error(exc, f"setting up autoscaling for {rid}") from None
    log.info("autoscaling %s: %d..%d instances, target %.0f invocations/instance/minute", rid, lo, hi, target)
    return entry


def setup_alarms(aws: Aws, cfg, record: Deployment, created: list, endpoint: str) -> list:
    """The ModelLatency p99 and 5XX alarms of the endpoint's variant (tagged); also the rollback
    alarms of a blue/green ``--update``."""
    from botocore.exceptions import BotoCoreError, ClientError

    cw = aws.client("cloudwatch")
    names = alarm_names(endpoint)
    dims = [{"Name": "EndpointName", "Value": endpoint}, {"Name": "VariantName", "Value": VARIANT}]
    specs = (
        (names["latency"], {"MetricName": "ModelLatency", "ExtendedStatistic": "p99",
                            "Threshold": float(cfg.alarm_p99_ms) * 1000.0,  # ModelLatency is in microseconds
                            "AlarmDescription": f"bertopt: p99 model latency of {endpoint} above {cfg.alarm_p99_ms} ms"}),
        (names["errors"], {"MetricName": "Invocation5XXErrors", "Statistic": "Sum", "Threshold": float(cfg.alarm_5xx),
                           "AlarmDescription": f"bertopt: more than {cfg.alarm_5xx} 5XX errors a minute on {endpoint}"}),
    )
    entries = []
    for name, spec in specs:
        entry = record.add("alarm", name, arn=aws.arn("cloudwatch", f"alarm:{name}"))
        created.append(entry)
        try:
            cw.put_metric_alarm(AlarmName=name, Namespace=METRIC_NAMESPACE, Dimensions=dims, Period=60,
                                EvaluationPeriods=2, DatapointsToAlarm=2, ComparisonOperator="GreaterThanThreshold",
                                TreatMissingData="notBreaching", Tags=_tag_list(record.id), **spec)
        except (ClientError, BotoCoreError) as exc:
            record.mark(entry, "not-created")
            raise aws_error(exc, f"creating CloudWatch alarm {name}") from None
        record.mark(entry, "created")
        entries.append(entry)
        log.info("created alarm %s", name)
    return entries


def setup(aws: Aws, cfg, record: Deployment, created: list, endpoint: str) -> None:
    """What --min/--max-instances and --alarms ask for, after the endpoint is InService."""
    if cfg.alarms:
        setup_alarms(aws, cfg, record, created, endpoint)
    if cfg.autoscaling:
        setup_autoscaling(aws, cfg, record, created, endpoint)


def live_alarms(record: Deployment) -> list:
    return [e["name"] for e in record.live(("alarm",))]


def deployment_config(cfg, alarms: list) -> dict:
    """UpdateEndpoint's blue/green DeploymentConfig: all at once or a canary share first, rolled
    back automatically when one of ``alarms`` fires."""
    if cfg.traffic == "canary":
        routing = {"Type": "CANARY", "WaitIntervalInSeconds": int(cfg.canary_wait),
                   "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": int(cfg.canary_percent)}}
    else:
        routing = {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0}
    timeout = int(min(14400, max(600, cfg.wait_timeout)))
    config = {"BlueGreenUpdatePolicy": {"TrafficRoutingConfiguration": routing, "TerminationWaitInSeconds": 0,
                                        "MaximumExecutionTimeoutInSeconds": timeout}}
    if alarms:
        config["AutoRollbackConfiguration"] = {"Alarms": [{"AlarmName": a} for a in alarms]}
    elif cfg.traffic == "canary":
        log.warning("--traffic canary without alarms: nothing can roll the canary back automatically (add --alarms)")
    return config

