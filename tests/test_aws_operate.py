"""Operating the endpoint against moto on 127.0.0.1: rollback on a failed smoke test, blue/green
``--update`` (success, and failure at each step), Application Auto Scaling and CloudWatch alarms.

moto has no UpdateEndpoint: a botocore ``before-send`` hook answers it and applies the change to
moto's in-process SageMaker state (or, for the failure cases, answers as SageMaker does when the
update fails or its alarms roll it back); the same kind of hook makes the endpoint answer garbage."""
from __future__ import annotations

import io
import json

import pytest
from botocore.awsrequest import AWSResponse

from test_aws_deploy import (ENDPOINT, EMPTY, aws, cleanup_cfg, client, deploy, deploy_cfg,  # noqa: F401
                             inventory, moto_url, record, saved, sm_tags, untagged_endpoint)
from test_aws_support import ACCOUNT, REGION

from bertopt.errors import PipelineError

RID = f"endpoint/{ENDPOINT}/variant/AllTraffic"
GARBAGE = b'{"oops": true}'


class _Raw(io.BytesIO):
    """A raw HTTP body botocore can both stream (parsed responses) and read (streaming payloads)."""

    def stream(self, **kwargs):
        yield self.getvalue()


def _json(url, status, payload):
    return AWSResponse(url, status, {"Content-Type": "application/x-amz-json-1.1"}, _Raw(json.dumps(payload).encode()))


def _moto_endpoint():
    from moto.sagemaker.models import sagemaker_backends

    return sagemaker_backends[ACCOUNT][REGION].endpoints[ENDPOINT]


def session_with(update=None, garbage=False, fail_config=False):
    """An Aws session on moto whose UpdateEndpoint is answered by ``update`` ('ok' switches the
    endpoint, 'refused' is a ValidationException, 'rolled-back' keeps the old config with a failure
    reason, as SageMaker's auto-rollback does); ``garbage``: the endpoint answers nonsense;
    ``fail_config``: CreateEndpointConfig is refused. Returns (session, captured UpdateEndpoint params)."""
    from bertopt.aws.session import Aws

    session, seen = Aws(REGION), []
    sm = session.client("sagemaker")

    def on_update(request, **kwargs):
        params = json.loads(request.body)
        seen.append(params)
        ep = _moto_endpoint()
        if update == "refused":
            return _json(request.url, 400, {"__type": "ValidationException", "message": "Cannot update endpoint"})
        if update == "rolled-back":
            ep.failure_reason = "Deployment was rolled back: alarm bertopt-sentiment-5xx-errors is in ALARM"
        else:
            ep.endpoint_config_name = params["EndpointConfigName"]
        return _json(request.url, 200, {"EndpointArn": ep.arn})

    sm.meta.events.register("before-send.sagemaker.UpdateEndpoint", on_update)
    if fail_config:
        sm.meta.events.register("before-send.sagemaker.CreateEndpointConfig", lambda request, **kw: _json(
            request.url, 400, {"__type": "ResourceLimitExceeded", "message": "endpoint config limit reached"}))
    if garbage:
        session.client("sagemaker-runtime").meta.events.register(
            "before-send.sagemaker-runtime.InvokeEndpoint",
            lambda request, **kw: AWSResponse(request.url, 200, {"Content-Type": "application/json"}, _Raw(GARBAGE)))
    return session, seen


def scalable_targets():
    return [t["ResourceId"] for t in client("application-autoscaling").describe_scalable_targets(
        ServiceNamespace="sagemaker")["ScalableTargets"]]


def alarms():
    return sorted(a["AlarmName"] for a in client("cloudwatch").describe_alarms()["MetricAlarms"])


def endpoint_config():
    return client("sagemaker").describe_endpoint(EndpointName=ENDPOINT)["EndpointConfigName"]


# ----------------------------------------------------------------------- smoke-test rollback
def test_failed_smoke_test_rolls_back_everything(aws, tmp_path, saved):
    from bertopt.aws import deploy as deploy_mod

    session, _ = session_with(garbage=True)
    with pytest.raises(PipelineError) as err:
        deploy_mod.run(deploy_cfg(tmp_path, saved, alarms=True, max_instances=2), aws=session)
    msg = str(err.value)
    assert "InService but the smoke test" in msg and "rolled back everything this run created" in msg
    assert inventory() == EMPTY and scalable_targets() == [] and alarms() == []
    rec = record(tmp_path)
    assert rec["status"] == "rolled-back" and "oops" in rec["smoke_test"]["error"]
    assert {r["type"]: r["state"] for r in rec["resources"] if r["type"] != "log-group"} == {
        "s3-bucket": "deleted", "s3-object": "deleted", "model": "deleted", "endpoint-config": "deleted",
        "endpoint": "deleted"}  # the smoke test failed before alarms/autoscaling were set up


def test_failed_smoke_test_keep_on_failure(aws, tmp_path, saved):
    from bertopt.aws import deploy as deploy_mod

    session, _ = session_with(garbage=True)
    with pytest.raises(PipelineError, match="kept what was created .--keep-on-failure."):
        deploy_mod.run(deploy_cfg(tmp_path, saved, keep_on_failure=True), aws=session)
    assert inventory()["endpoints"] == [ENDPOINT] and record(tmp_path)["status"] == "failed"


# --------------------------------------------------------------------- autoscaling and alarms
def test_autoscaling_and_alarms_are_tagged_and_removed_by_cleanup(aws, tmp_path, saved, capsys):
    from bertopt.aws import cleanup

    res = deploy(tmp_path, saved, instance_count=1, min_instances=1, max_instances=3, target_invocations=250,
                 alarms=True, alarm_p99_ms=300)
    assert scalable_targets() == [RID]
    aas = client("application-autoscaling")
    target = aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"][0]
    assert (target["MinCapacity"], target["MaxCapacity"]) == (1, 3)
    policy = aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"][0]
    tracking = policy["TargetTrackingScalingPolicyConfiguration"]
    assert policy["PolicyType"] == "TargetTrackingScaling" and tracking["TargetValue"] == 250
    assert tracking["PredefinedMetricSpecification"]["PredefinedMetricType"] == "SageMakerVariantInvocationsPerInstance"
    cw = client("cloudwatch")
    found = {a["AlarmName"]: a for a in cw.describe_alarms()["MetricAlarms"]}
    latency, errors = found[f"{ENDPOINT}-p99-model-latency"], found[f"{ENDPOINT}-5xx-errors"]
    assert (latency["MetricName"], latency["ExtendedStatistic"], latency["Threshold"]) == ("ModelLatency", "p99", 300000)
    assert (errors["MetricName"], errors["Statistic"]) == ("Invocation5XXErrors", "Sum")
    assert {d["Name"]: d["Value"] for d in latency["Dimensions"]} == {"EndpointName": ENDPOINT, "VariantName": "AllTraffic"}
    dep_id = record(tmp_path)["deployment_id"]
    for alarm in (latency, errors):
        tags = {t["Key"]: t["Value"] for t in cw.list_tags_for_resource(ResourceARN=alarm["AlarmArn"])["Tags"]}
        assert tags == {"bertopt:project": "bertopt", "bertopt:deployment-id": dep_id}
    assert set(res.details["alarms"]) == set(found)
    assert res.details["autoscaling"][0]["max_capacity"] == 3

    capsys.readouterr()
    out = cleanup.run(cleanup_cfg(tmp_path))
    table = capsys.readouterr().out
    assert out.details["counts"] == {"deleted": 9}
    order = [line.split()[0] for line in table.strip().splitlines()[1:]]
    assert order[:3] == ["scalable-target", "alarm", "alarm"] and order[3] == "endpoint"  # deregistered first
    assert inventory() == EMPTY and scalable_targets() == [] and alarms() == []
    assert cleanup.run(cleanup_cfg(tmp_path)).key_metric == "nothing left to delete"  # a second cleanup is clean


def test_all_removes_tagged_alarms_and_spares_untagged_lookalikes(aws, tmp_path, saved, capsys):
    import aws_cleanup

    deploy(tmp_path, saved, max_instances=2, alarms=True)
    cw, aas = client("cloudwatch"), client("application-autoscaling")
    look = untagged_endpoint("bertopt-sentiment-copy")
    aas.register_scalable_target(ServiceNamespace="sagemaker", ResourceId=f"endpoint/{look}/variant/AllTraffic",
                                 ScalableDimension="sagemaker:variant:DesiredInstanceCount", MinCapacity=1, MaxCapacity=2)
    cw.put_metric_alarm(AlarmName=f"{look}-p99-model-latency", Namespace="AWS/SageMaker", MetricName="ModelLatency",
                        ExtendedStatistic="p99", Period=60, EvaluationPeriods=1, Threshold=1.0,
                        ComparisonOperator="GreaterThanThreshold")
    (tmp_path / "out" / "aws" / "deployment.json").unlink()  # found by tag alone

    code = aws_cleanup.main(["--all", "--aws_region", REGION, "--model_name", look, "--output-dir",
                             str(tmp_path / "out"), "--poll-seconds", "0.01", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert alarms() == [f"{look}-p99-model-latency"] and scalable_targets() == [f"endpoint/{look}/variant/AllTraffic"]
    assert inventory()["endpoints"] == [look]
    rows = {line.split()[1]: line for line in out.strip().splitlines()[1:]}
    assert "deleted" in rows[RID] and "deleted" in rows[f"{ENDPOINT}-5xx-errors"]
    assert "skipped: not tagged" in rows[look]


# ------------------------------------------------------------------------- blue/green update
def _deploy_then_update_cfg(tmp_path, saved, **deploy_kw):
    deploy(tmp_path, saved, **deploy_kw)
    before = {**inventory(), "scalable": scalable_targets(), "alarms": alarms()}
    return before, record(tmp_path)


def _update(tmp_path, saved, session, **kw):
    from bertopt.aws import deploy as deploy_mod

    kw.setdefault("model_path", str(saved / "baseline"))  # the torch model instead of the deployed ort-fp32
    return deploy_mod.run(deploy_cfg(tmp_path, saved, update=True, **kw), aws=session)


def test_update_success_moves_to_the_new_config_and_removes_the_old(aws, tmp_path, saved, capsys):
    from bertopt.aws import cleanup

    before, rec0 = _deploy_then_update_cfg(tmp_path, saved, alarms=True, max_instances=2)
    old_config = before["configs"][0]
    session, seen = session_with(update="ok")
    res = _update(tmp_path, saved, session, traffic="canary", canary_percent=20, canary_wait=120, max_instances=2)
    assert res.status == "ok" and "updated to torch-fp32" in res.key_metric
    inv = inventory()
    assert inv["endpoints"] == [ENDPOINT] and len(inv["configs"]) == len(inv["models"]) == 1
    new_config = inv["configs"][0]
    assert new_config != old_config and endpoint_config() == new_config and old_config not in inv["models"]
    assert len(inv["objects"]) == 1 and inv["objects"] != before["objects"]  # the new upload only
    policy = seen[0]["DeploymentConfig"]
    assert seen[0]["EndpointConfigName"] == new_config
    assert policy["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"] == {
        "Type": "CANARY", "WaitIntervalInSeconds": 120, "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 20}}
    assert sorted(a["AlarmName"] for a in policy["AutoRollbackConfiguration"]["Alarms"]) == before["alarms"]
    assert scalable_targets() == [RID]  # registered again after the update
    assert sm_tags(client("sagemaker").describe_endpoint_config(EndpointConfigName=new_config)["EndpointConfigArn"])[
        "bertopt:deployment-id"] == rec0["deployment_id"]
    rec = record(tmp_path)
    assert rec["status"] == "in-service" and rec["model"]["variant"] == "torch-fp32"
    (upd,) = rec["updates"]
    assert (upd["status"], upd["from_config"], upd["to_config"]) == ("done", old_config, new_config)
    assert [h["status"] for h in rec["history"]][-2:] == ["updating", "in-service"]
    states = {(r["type"], r["name"]): r["state"] for r in rec["resources"]}
    assert states[("model", old_config)] == states[("endpoint-config", old_config)] == "deleted"
    assert states[("endpoint-config", new_config)] == "created"
    cleanup.run(cleanup_cfg(tmp_path))
    assert inventory() == EMPTY and scalable_targets() == [] and alarms() == []


@pytest.mark.parametrize("step,kw,fragment", [
    ("config creation", {"fail_config": True}, "endpoint config limit reached"),
    ("UpdateEndpoint", {"update": "refused"}, "Cannot update endpoint"),
    ("wait (auto-rollback)", {"update": "rolled-back"}, "did not take: it is InService on"),
    ("smoke test", {"update": "ok", "garbage": True}, "smoke test"),
])
def test_update_failure_stays_on_the_old_config_and_leaves_nothing_new(aws, tmp_path, saved, step, kw, fragment):
    before, rec0 = _deploy_then_update_cfg(tmp_path, saved, alarms=True)
    session, seen = session_with(**kw)
    with pytest.raises(PipelineError) as err:
        _update(tmp_path, saved, session)
    msg = str(err.value)
    assert fragment in msg and f"stays on {before['configs'][0]}" in msg and "created is removed" in msg
    assert endpoint_config() == before["configs"][0]
    assert {**inventory(), "scalable": scalable_targets(), "alarms": alarms()} == before  # nothing new left
    rec = record(tmp_path)
    assert rec["status"] == "in-service" and rec["model"] == rec0["model"] and rec["s3_uri"] == rec0["s3_uri"]
    assert rec["updates"][-1]["status"] == "rolled-back" and fragment in rec["updates"][-1]["error"]
    if step == "smoke test":  # switched to the new config, then back
        assert [p["EndpointConfigName"] for p in seen][-1] == before["configs"][0]


def test_update_needs_a_live_deployment_on_its_own_config(aws, tmp_path, saved):
    from bertopt.aws import deploy as deploy_mod

    with pytest.raises(PipelineError, match="aws_deploy.py"):
        deploy_mod.run(deploy_cfg(tmp_path, saved, update=True))
    assert inventory() == EMPTY
    deploy(tmp_path, saved)
    untagged_endpoint("someone-elses")
    _moto_endpoint().endpoint_config_name = "someone-elses"  # changed outside bertopt
    before = inventory()
    with pytest.raises(PipelineError, match="changed outside bertopt"):
        _update(tmp_path, saved, session_with(update="ok")[0])
    assert inventory() == before
