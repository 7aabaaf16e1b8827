"""aws_deploy.py / aws_cleanup.py against a moto server on 127.0.0.1 over HTTP (S3, SageMaker,
CloudWatch Logs, ECR, STS), plus botocore Stubber / injected HTTP responses for what moto cannot
do (an endpoint that ends Failed, throttling)."""
from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
from botocore.stub import ANY

from test_aws_support import ACCOUNT, REGION, ROLE, SECRET, aws_env, moto_post, moto_server, tiny_stages, write_results

from bertopt.errors import PipelineError

ENDPOINT = "bertopt-sentiment"
DESCRIBE_ANSWER = {"variant": "ort-fp32", "backend": "onnxruntime", "precision": "fp32", "source": "baseline",
                   "device": "cpu", "providers": ["CPUExecutionProvider"]}
SMOKE_ANSWER = [{"label": "positive", "score": 0.91}, {"label": "negative", "score": 0.88},
                {"label": "positive", "score": 0.55}]


@pytest.fixture(scope="module")
def moto_url():
    with moto_server() as url:
        yield url


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model_dir) -> Path:
    return tiny_stages(tmp_path_factory.getbasetemp() / "aws_tiny", tiny_model_dir)


@pytest.fixture
def aws(monkeypatch, moto_url):
    """A fresh moto state, boto3 pointed at it, and the endpoint's canned smoke-test answer."""
    moto_post(moto_url, "/moto-api/reset")
    aws_env(monkeypatch, moto_url)
    result = {"Body": json.dumps(SMOKE_ANSWER), "ContentType": "application/json",
              "InvokedProductionVariant": "AllTraffic", "CustomAttributes": ""}
    # moto answers a request it has seen before with the same result, a new one with the next:
    # the smoke test's predictions, then its {"describe": true}, then users' requests
    moto_post(moto_url, "/moto-api/static/sagemaker/endpoint-results",
              {"results": [result, dict(result, Body=json.dumps(DESCRIBE_ANSWER))] + [result] * 8,
               "region": REGION, "account_id": ACCOUNT})
    return moto_url


def deploy_cfg(tmp_path, saved, **kw):
    from bertopt.aws.config import AwsDeployConfig

    write_results(tmp_path / "reports", saved)
    kw.setdefault("aws_role_arn", ROLE)
    kw.setdefault("aws_account_id", ACCOUNT)
    return AwsDeployConfig(output_dir=str(tmp_path / "out"), reports_dir=str(tmp_path / "reports"),
                           aws_region=REGION, poll_seconds=0.01, wait_timeout=10, quiet=True, **kw)


def cleanup_cfg(tmp_path, **kw):
    from bertopt.aws.config import AwsCleanupConfig

    return AwsCleanupConfig(output_dir=str(tmp_path / "out"), poll_seconds=0.01, wait_timeout=10, quiet=True, **kw)


def client(name):
    import boto3

    return boto3.client(name, region_name=REGION, aws_access_key_id="AKIATESTBERTOPT00000",
                        aws_secret_access_key=SECRET)


def inventory() -> dict:
    sm, s3 = client("sagemaker"), client("s3")
    buckets = [b["Name"] for b in s3.list_buckets().get("Buckets", [])]
    return {
        "endpoints": sorted(e["EndpointName"] for e in sm.list_endpoints()["Endpoints"]),
        "configs": sorted(c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"]),
        "models": sorted(m["ModelName"] for m in sm.list_models()["Models"]),
        "buckets": sorted(buckets),
        "objects": sorted(f"{b}/{o['Key']}" for b in buckets for o in s3.list_objects_v2(Bucket=b).get("Contents", [])),
        "log_groups": sorted(g["logGroupName"] for g in client("logs").describe_log_groups()["logGroups"]),
        "repos": sorted(r["repositoryName"] for r in client("ecr").describe_repositories()["repositories"]),
    }


EMPTY = {"endpoints": [], "configs": [], "models": [], "buckets": [], "objects": [], "log_groups": [], "repos": []}


def record(tmp_path) -> dict:
    return json.loads((tmp_path / "out" / "aws" / "deployment.json").read_text())


def sm_tags(arn) -> dict:
    return {t["Key"]: t["Value"] for t in client("sagemaker").list_tags(ResourceArn=arn)["Tags"]}


def deploy(tmp_path, saved, **kw):
    from bertopt.aws import deploy as deploy_mod

    result = deploy_mod.run(deploy_cfg(tmp_path, saved, **kw))
    # SageMaker creates the endpoint's log group when the container starts; moto does not
    client("logs").create_log_group(logGroupName=f"/aws/sagemaker/Endpoints/{ENDPOINT}")
    return result


# --------------------------------------------------------------------------- full round trip
def test_full_deploy_invoke_and_cleanup(aws, tmp_path, saved, capsys):
    from bertopt import artifacts
    from bertopt.aws import cleanup

    result = deploy(tmp_path, saved)
    out = capsys.readouterr().out
    assert result.status == "ok" and f"endpoint {ENDPOINT} InService (ort-fp32)" == result.key_metric
    rec = record(tmp_path)
    dep_id = rec["deployment_id"]
    assert rec["status"] == "in-service" and dep_id.startswith(ENDPOINT + "-")
    assert [(r["type"], r["state"]) for r in rec["resources"]] == [
        ("s3-bucket", "created"), ("s3-object", "created"), ("model", "created"), ("endpoint-config", "created"),
        ("endpoint", "created"), ("log-group", "created")]
    assert all(r["arn"].startswith("arn:aws:sagemaker:us-east-1:123456789012:") for r in rec["resources"][2:5])
    assert rec["smoke_test"] == SMOKE_ANSWER and "0.910  A gripping" in out and "billed until" in out
    assert "serving from cpu (onnxruntime, ort-fp32)" in out

    inv = inventory()
    bucket = f"bertopt-{ACCOUNT}-{REGION}"
    key = f"bertopt/{dep_id}/model.tar.gz"
    assert inv["endpoints"] == [ENDPOINT] and inv["buckets"] == [bucket] and inv["objects"] == [f"{bucket}/{key}"]
    assert inv["models"] == inv["configs"] == [f"{ENDPOINT}-{rec['stamp']}"]
    expected_tags = {"bertopt:project": "bertopt", "bertopt:deployment-id": dep_id}
    for r in rec["resources"][2:5]:
        assert sm_tags(r["arn"]) == expected_tags
    s3 = client("s3")
    assert {t["Key"]: t["Value"] for t in s3.get_bucket_tagging(Bucket=bucket)["TagSet"]} == expected_tags
    assert {t["Key"]: t["Value"] for t in s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]} == expected_tags
    import hashlib

    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == rec["archive"]["sha256"]
    sm = client("sagemaker")
    container = sm.describe_model(ModelName=inv["models"][0])["PrimaryContainer"]
    assert container["ModelDataUrl"] == f"s3://{bucket}/{key}"
    assert container["Image"].startswith("763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-inference:")
    variant = sm.describe_endpoint_config(EndpointConfigName=inv["configs"][0])["ProductionVariants"][0]
    assert (variant["InstanceType"], variant["InitialInstanceCount"]) == ("ml.m5.large", 1)
    manifest = artifacts.read_manifest(tmp_path / "out" / "aws")
    assert manifest["status"] == "ok" and manifest["metrics"]["endpoint_name"] == ENDPOINT

    # the invoke path users take
    resp = client("sagemaker-runtime").invoke_endpoint(EndpointName=ENDPOINT, ContentType="application/json",
                                                       Body=json.dumps({"inputs": ["a fine film"]}))
    assert json.loads(resp["Body"].read()) == SMOKE_ANSWER

    res = cleanup.run(cleanup_cfg(tmp_path))
    table = capsys.readouterr().out
    assert res.status == "ok" and res.details["counts"] == {"deleted": 6}
    assert inventory() == EMPTY
    lines = [line.split()[0] for line in table.strip().splitlines()[1:]]
    assert lines == ["endpoint", "endpoint-config", "model", "log-group", "s3-object", "s3-bucket"]
    assert record(tmp_path)["status"] == "deleted"
    assert artifacts.read_manifest(tmp_path / "out" / "aws") is None  # nothing is deployed any more
    report = json.loads((tmp_path / "out" / "aws" / "cleanup.json").read_text())
    assert report["counts"] == {"deleted": 6} and not report["dry_run"]

    again = cleanup.run(cleanup_cfg(tmp_path))  # idempotent: nothing left
    assert again.key_metric == "nothing left to delete" and "nothing left to delete" in capsys.readouterr().out
    assert inventory() == EMPTY


def test_dry_run_deletes_nothing(aws, tmp_path, saved, capsys):
    from bertopt.aws import cleanup

    deploy(tmp_path, saved)
    before = inventory()
    capsys.readouterr()
    res = cleanup.run(cleanup_cfg(tmp_path, dry_run=True))
    out = capsys.readouterr().out
    assert inventory() == before
    assert out.startswith("dry run, nothing deleted") and out.count("would delete") == 6
    assert res.details["counts"] == {"would delete": 6}
    assert {r["state"] for r in record(tmp_path)["resources"]} == {"created"}


def untagged_endpoint(name: str) -> str:
    """An endpoint (with its config and model) that bertopt did not create: no tags."""
    sm = client("sagemaker")
    sm.create_model(ModelName=name, ExecutionRoleArn=ROLE, PrimaryContainer={"Image": "x", "ModelDataUrl": "s3://b/k"})
    sm.create_endpoint_config(EndpointConfigName=name, ProductionVariants=[
        {"VariantName": "AllTraffic", "ModelName": name, "InstanceType": "ml.m5.large", "InitialInstanceCount": 1}])
    sm.create_endpoint(EndpointName=name, EndpointConfigName=name)
    return name


def test_all_spares_untagged_lookalikes(aws, tmp_path, saved, capsys):
    import aws_cleanup

    deploy(tmp_path, saved)
    s3, ecr = client("s3"), client("ecr")
    look = untagged_endpoint("bertopt-sentiment-copy")
    s3.create_bucket(Bucket="bertopt-lookalike")
    s3.put_object(Bucket="bertopt-lookalike", Key="bertopt/x/model.tar.gz", Body=b"x")
    client("logs").create_log_group(logGroupName=f"/aws/sagemaker/Endpoints/{look}")
    ecr.create_repository(repositoryName="bertopt-serving", tags=[{"Key": "bertopt:project", "Value": "bertopt"}])
    ecr.create_repository(repositoryName="someone-elses")
    (tmp_path / "out" / "aws" / "deployment.json").unlink()  # found by tag alone

    code = aws_cleanup.main(["--all", "--aws_region", REGION, "--model_name", look, "--repository_name",
                             "someone-elses", "--output-dir", str(tmp_path / "out"), "--poll-seconds", "0.01",
                             "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert inventory() == {"endpoints": [look], "configs": [look], "models": [look], "buckets": ["bertopt-lookalike"],
                           "objects": ["bertopt-lookalike/bertopt/x/model.tar.gz"],
                           "log_groups": [f"/aws/sagemaker/Endpoints/{look}"], "repos": ["someone-elses"]}
    rows = {line.split()[1]: line for line in out.strip().splitlines()[1:]}
    assert "skipped: not tagged bertopt:project=bertopt" in rows[look]
    assert "skipped: not tagged" in rows["someone-elses"]
    assert "deleted" in rows["bertopt-serving"] and "deleted" in rows[ENDPOINT]


def test_two_step_prepare_then_finish(aws, tmp_path, saved, capsys):
    from bertopt import artifacts
    from bertopt.aws import cleanup
    from bertopt.aws import deploy as deploy_mod

    res = deploy_mod.run(deploy_cfg(tmp_path, saved, prepare=True, aws_role_arn=None))
    assert res.status == "ok" and res.key_metric.startswith("prepared s3://")
    rec = record(tmp_path)
    assert rec["status"] == "prepared" and [r["type"] for r in rec["resources"]] == ["s3-bucket", "s3-object"]
    inv = inventory()
    assert inv["endpoints"] == inv["models"] == [] and len(inv["objects"]) == 1
    assert artifacts.read_manifest(tmp_path / "out" / "aws")["metrics"]["prepared"] is True
    with pytest.raises(PipelineError, match="--finish"):  # a full deploy now would duplicate the upload
        deploy_mod.run(deploy_cfg(tmp_path, saved))

    res = deploy_mod.run(deploy_cfg(tmp_path, saved, finish=True))
    assert res.status == "ok"
    rec = record(tmp_path)
    assert rec["status"] == "in-service" and rec["deployment_id"] == res.details["deployment_id"]
    assert [r["type"] for r in rec["resources"]] == ["s3-bucket", "s3-object", "model", "endpoint-config",
                                                     "endpoint", "log-group"]
    assert inventory()["endpoints"] == [ENDPOINT]
    cleanup.run(cleanup_cfg(tmp_path))
    assert inventory() == EMPTY
    with pytest.raises(PipelineError, match="needs a prepared upload"):
        deploy_mod.run(deploy_cfg(tmp_path, saved, finish=True))


def test_no_credentials_fails_before_anything_is_created(monkeypatch, moto_url, tmp_path, saved, capsys):
    import aws_deploy

    moto_post(moto_url, "/moto-api/reset")
    aws_env(monkeypatch, moto_url, credentials=False)
    write_results(tmp_path / "reports", saved)
    code = aws_deploy.main(["--aws_account_id", ACCOUNT, "--aws_role_arn", ROLE, "--aws_region", REGION,
                            "--output-dir", str(tmp_path / "out"), "--reports-dir", str(tmp_path / "reports"),
                            "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.splitlines()[0].startswith("error: no AWS credentials found") and "Traceback" not in err
    assert inventory() == EMPTY
    assert not (tmp_path / "out" / "aws" / "model.tar.gz").exists()
    assert not (tmp_path / "out" / "aws" / "deployment.json").exists()


def test_wrong_account_or_existing_endpoint_stop_before_creating(aws, tmp_path, saved):
    from bertopt.aws import deploy as deploy_mod

    with pytest.raises(PipelineError, match="credentials are for account 123456789012, not --aws-account-id"):
        deploy_mod.run(deploy_cfg(tmp_path, saved, aws_account_id="999999999999",
                                  aws_role_arn="arn:aws:iam::999999999999:role/r"))
    sm = client("sagemaker")
    sm.create_model(ModelName="m", ExecutionRoleArn=ROLE, PrimaryContainer={"Image": "x", "ModelDataUrl": "s3://b/k"})
    sm.create_endpoint_config(EndpointConfigName="c", ProductionVariants=[
        {"VariantName": "AllTraffic", "ModelName": "m", "InstanceType": "ml.m5.large", "InitialInstanceCount": 1}])
    sm.create_endpoint(EndpointName=ENDPOINT, EndpointConfigName="c")
    with pytest.raises(PipelineError, match=f"endpoint {ENDPOINT} already exists .*not created by bertopt"):
        deploy_mod.run(deploy_cfg(tmp_path, saved))
    inv = inventory()
    assert inv["buckets"] == [] and inv["models"] == ["m"]
    assert not (tmp_path / "out" / "aws" / "deployment.json").exists()


def test_rerun_is_up_to_date_and_a_second_deploy_is_refused(aws, tmp_path, saved):
    from bertopt.aws import deploy as deploy_mod

    deploy(tmp_path, saved)
    again = deploy_mod.run(deploy_cfg(tmp_path, saved))
    assert again.status == "up-to-date"
    with pytest.raises(PipelineError, match=r"records deployment .* remove them first with `python aws_cleanup.py`"):
        deploy_mod.run(deploy_cfg(tmp_path, saved, instance_type="ml.c5.large"))
    assert inventory()["endpoints"] == [ENDPOINT] and len(inventory()["models"]) == 1


def test_serverless_endpoint_config(aws, tmp_path, saved):
    deploy(tmp_path, saved, serverless_memory=2048, serverless_concurrency=3)
    cfg_name = inventory()["configs"][0]
    variant = client("sagemaker").describe_endpoint_config(EndpointConfigName=cfg_name)["ProductionVariants"][0]
    assert variant["ServerlessConfig"] == {"MemorySizeInMB": 2048, "MaxConcurrency": 3}
    assert "InstanceType" not in variant


def test_secrets_never_reach_files_or_output(aws, tmp_path, saved, capsys):
    from bertopt.aws import cleanup

    deploy(tmp_path, saved)
    cleanup.run(cleanup_cfg(tmp_path))
    captured = capsys.readouterr()
    texts = [captured.out, captured.err] + [p.read_text(errors="replace") for p in (tmp_path / "out").rglob("*")
                                            if p.is_file() and p.suffix in (".json", ".log", ".txt")]
    assert len(texts) >= 5
    for text in texts:
        assert SECRET not in text and "AKIATESTBERTOPT00000" not in text


def test_main_py_runs_deploy_then_cleanup(aws, tmp_path, saved):
    import main as main_script

    from bertopt import cli

    parser = main_script.build_parser()
    names = lambda argv: [s.name for s in main_script.select(cli.parse(parser, argv)) if s.optional]  # noqa: E731
    assert names(["--aws_account_id", ACCOUNT]) == ["aws_deploy"]
    assert names(["--aws-role-arn", ROLE]) == ["aws_deploy"]
    assert names(["--cleanup_aws"]) == ["aws_cleanup"]
    assert names([]) == []

    write_results(tmp_path / "reports", saved)
    code = main_script.main(["--stages", "aws_deploy,aws_cleanup", "--aws_account_id", ACCOUNT, "--aws_role_arn", ROLE,
                             "--aws_region", REGION, "--cleanup_aws", "--output-dir", str(tmp_path / "out"),
                             "--reports-dir", str(tmp_path / "reports"), "--poll-seconds", "0.01", "--quiet"])
    assert code == 0
    assert record(tmp_path)["status"] == "deleted" and inventory() == EMPTY


# ----------------------------------------------------------------------- what moto cannot do
def _endpoint_description(status, **extra):
    now = datetime.datetime(2026, 1, 1)
    return {"EndpointName": ENDPOINT, "EndpointArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/{ENDPOINT}",
            "EndpointConfigName": f"{ENDPOINT}-cfg", "EndpointStatus": status, "CreationTime": now,
            "LastModifiedTime": now, **extra}


def _stub_until_failed(stub):
    arn = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}"
    stub.add_client_error("describe_endpoint", "ValidationException", f'Could not find endpoint "{ENDPOINT}".',
                          expected_params={"EndpointName": ENDPOINT})
    stub.add_response("create_model", {"ModelArn": f"{arn}:model/m"},
                      {"ModelName": ANY, "ExecutionRoleArn": ROLE, "PrimaryContainer": ANY, "Tags": ANY})
    stub.add_response("create_endpoint_config", {"EndpointConfigArn": f"{arn}:endpoint-config/c"},
                      {"EndpointConfigName": ANY, "ProductionVariants": ANY, "Tags": ANY})
    stub.add_response("create_endpoint", {"EndpointArn": f"{arn}:endpoint/{ENDPOINT}"},
                      {"EndpointName": ENDPOINT, "EndpointConfigName": ANY, "Tags": ANY})
    stub.add_response("describe_endpoint", _endpoint_description("Creating"))
    stub.add_response("describe_endpoint", _endpoint_description(
        "Failed", FailureReason="The primary container for production variant AllTraffic did not pass the ping "
                                "health check."))


def _stubbed_aws():
    import boto3
    from botocore.stub import Stubber

    from bertopt.aws.session import Aws

    sm = boto3.client("sagemaker", region_name=REGION)
    return Aws(REGION, clients={"sagemaker": sm}), Stubber(sm)


def _stubbed_runtime(*bodies):
    import io

    import boto3
    from botocore.response import StreamingBody
    from botocore.stub import Stubber

    from bertopt.aws.session import Aws

    rt = boto3.client("sagemaker-runtime", region_name=REGION)
    stub = Stubber(rt)
    for body in bodies:
        raw = json.dumps(body).encode()
        stub.add_response("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(raw), len(raw)),
                                              "ContentType": "application/json"})
    stub.activate()
    return Aws(REGION, clients={"sagemaker-runtime": rt}), stub


def test_smoke_test_fails_when_a_gpu_endpoint_serves_from_the_cpu(monkeypatch):
    """The smoke test asks the endpoint what it serves from; a GPU deploy answered from the CPU
    (or by a handler that does not describe itself) fails it, so the deploy rolls back."""
    from bertopt.aws import smoke

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    aws, stub = _stubbed_runtime(SMOKE_ANSWER, DESCRIBE_ANSWER)
    with pytest.raises(PipelineError, match=r"serves from cpu \(providers \['CPUExecutionProvider'\]\), but it "
                                            r"was deployed for cuda"):
        smoke.smoke_test(aws, ENDPOINT, ["negative", "positive"], device="cuda")
    stub.assert_no_pending_responses()
    aws, _ = _stubbed_runtime(SMOKE_ANSWER, SMOKE_ANSWER)
    with pytest.raises(PipelineError, match="did not describe its model"):
        smoke.smoke_test(aws, ENDPOINT, ["negative", "positive"], device="cpu")
    aws, _ = _stubbed_runtime(SMOKE_ANSWER, dict(DESCRIBE_ANSWER, device="cuda"))
    assert smoke.smoke_test(aws, ENDPOINT, ["negative", "positive"], device="cuda") == SMOKE_ANSWER


def test_failed_endpoint_prints_reason_and_rolls_back(aws, tmp_path, saved):
    from bertopt.aws import cleanup
    from bertopt.aws import deploy as deploy_mod

    session, stub = _stubbed_aws()
    _stub_until_failed(stub)
    stub.add_response("delete_endpoint", {}, {"EndpointName": ENDPOINT})
    stub.add_client_error("describe_endpoint", "ValidationException", f'Could not find endpoint "{ENDPOINT}".')
    stub.add_response("delete_endpoint_config", {}, {"EndpointConfigName": ANY})
    stub.add_response("delete_model", {}, {"ModelName": ANY})
    with stub, pytest.raises(PipelineError) as err:
        deploy_mod.run(deploy_cfg(tmp_path, saved), aws=session)
        stub.assert_no_pending_responses()
    stub.assert_no_pending_responses()
    msg = str(err.value)
    assert "did not pass the ping health check" in msg and f"/aws/sagemaker/Endpoints/{ENDPOINT}" in msg
    assert "rolled back everything this run created" in msg
    assert inventory() == EMPTY  # the bucket and the upload are gone too
    rec = record(tmp_path)
    assert rec["status"] == "rolled-back" and "ping health check" in rec["failure_reason"]
    assert {r["type"]: r["state"] for r in rec["resources"]} == {
        "s3-bucket": "deleted", "s3-object": "deleted", "model": "deleted", "endpoint-config": "deleted",
        "endpoint": "deleted", "log-group": "created"}  # the logs stay readable
    log_text = (tmp_path / "out" / "aws" / "stage.log").read_text()
    assert "failed: The primary container" in log_text and "CloudWatch log group" in log_text
    # the kept log group does not block a new deploy, and cleanup treats it as done when gone
    assert cleanup.run(cleanup_cfg(tmp_path)).details["counts"] == {"already gone": 1}


def test_failed_endpoint_keep_on_failure(aws, tmp_path, saved):
    from bertopt.aws import deploy as deploy_mod

    session, stub = _stubbed_aws()
    _stub_until_failed(stub)
    with stub, pytest.raises(PipelineError, match="kept what was created .--keep-on-failure."):
        deploy_mod.run(deploy_cfg(tmp_path, saved, keep_on_failure=True), aws=session)
    stub.assert_no_pending_responses()
    assert len(inventory()["objects"]) == 1
    assert record(tmp_path)["status"] == "failed"


class _Raw:
    def __init__(self, body: bytes):
        self.body = body

    def stream(self, **kwargs):
        yield self.body


def test_throttling_is_retried_with_backoff(aws, tmp_path, saved):
    """The first two DeleteEndpoint calls are throttled (HTTP 400 ThrottlingException, injected before
    the request is sent); botocore's standard retry mode retries and cleanup succeeds."""
    from botocore.awsrequest import AWSResponse

    from bertopt.aws import cleanup
    from bertopt.aws.session import Aws

    deploy(tmp_path, saved)
    session = Aws(REGION, max_attempts=4)
    calls = []

    def throttle(request, **kwargs):
        calls.append(request.url)
        if len(calls) <= 2:
            body = b'{"__type": "ThrottlingException", "message": "Rate exceeded"}'
            return AWSResponse(request.url, 400, {"Content-Type": "application/x-amz-json-1.1"}, _Raw(body))
        return None

    session.client("sagemaker").meta.events.register("before-send.sagemaker.DeleteEndpoint", throttle)
    res = cleanup.run(cleanup_cfg(tmp_path), aws=session)
    assert len(calls) == 3 and res.details["counts"] == {"deleted": 6}
    assert inventory() == EMPTY


def test_persistent_throttling_is_reported_as_failed(aws, tmp_path, saved, capsys):
    """Stubber: DeleteEndpoint keeps answering ThrottlingException (retries exhausted): the table says
    so, the other resources are still deleted, and the run fails (non-zero exit)."""
    from bertopt.aws import cleanup

    deploy(tmp_path, saved)
    rec = record(tmp_path)
    names = {r["type"]: r for r in rec["resources"]}
    session, stub = _stubbed_aws()
    tags = {"Tags": [{"Key": "bertopt:project", "Value": "bertopt"}]}
    now = datetime.datetime(2026, 1, 1)
    stub.add_response("describe_endpoint", _endpoint_description("InService", EndpointConfigName=names["endpoint-config"]["name"]))
    stub.add_response("list_tags", tags)
    stub.add_response("describe_endpoint_config", {
        "EndpointConfigName": names["endpoint-config"]["name"], "EndpointConfigArn": names["endpoint-config"]["arn"],
        "ProductionVariants": [{"VariantName": "AllTraffic", "ModelName": names["model"]["name"]}], "CreationTime": now})
    stub.add_response("list_tags", tags)
    stub.add_response("describe_model", {"ModelName": names["model"]["name"], "ModelArn": names["model"]["arn"],
                                         "CreationTime": now})
    stub.add_response("list_tags", tags)
    stub.add_client_error("delete_endpoint", "ThrottlingException", "Rate exceeded", http_status_code=400)
    stub.add_response("delete_endpoint_config", {})
    stub.add_response("delete_model", {})
    with stub, pytest.raises(PipelineError, match=r"could not delete 1 resource\(s\): endpoint bertopt-sentiment "
                                                  r"\(ThrottlingException: Rate exceeded\)"):
        cleanup.run(cleanup_cfg(tmp_path), aws=session)
    stub.assert_no_pending_responses()
    out = capsys.readouterr().out
    assert "failed: ThrottlingException: Rate exceeded" in out
    states = {r["type"]: r["state"] for r in record(tmp_path)["resources"]}
    assert states == {"s3-bucket": "deleted", "s3-object": "deleted", "model": "deleted", "endpoint-config": "deleted",
                      "endpoint": "failed", "log-group": "deleted"}



def test_image_from_an_ecr_repository_of_the_account(aws, tmp_path, saved):
    from bertopt.aws import deploy as deploy_mod

    ecr = client("ecr")
    ecr.create_repository(repositoryName="bertopt-serving")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 1,
                           "digest": "sha256:" + "0" * 64}, "layers": []}
    ecr.put_image(repositoryName="bertopt-serving", imageManifest=json.dumps(manifest), imageTag="v1")
    with pytest.raises(PipelineError, match="no such repository/image tag"):
        deploy_mod.run(deploy_cfg(tmp_path, saved, repository_name="bertopt-serving:v2"))
    assert inventory()["buckets"] == []  # checked before anything was created
    deploy(tmp_path, saved, repository_name="bertopt-serving:v1")
    model = client("sagemaker").describe_model(ModelName=inventory()["models"][0])
    assert model["PrimaryContainer"]["Image"] == f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/bertopt-serving:v1"
