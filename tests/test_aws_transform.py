"""predict.py's Batch Transform: the handler on a JSON Lines payload as Batch Transform sends it, the
exact CreateTransformJob request, and a whole run against moto on 127.0.0.1 whose transform job is
played by the real handler (JoinSource: Input), reassembled in input order into predict.py's format."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from test_aws_support import ACCOUNT, REGION, ROLE, aws_env, moto_post, moto_server, tiny_stages, write_results

NAME = "bertopt-transform-20270101-000000"
BUCKET = f"bertopt-{ACCOUNT}-{REGION}"
SST2_DEV = Path(__file__).resolve().parents[1] / "data" / "sst2" / "dev.tsv"


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model_dir) -> Path:
    return tiny_stages(tmp_path_factory.getbasetemp() / "aws_tiny", tiny_model_dir)


@pytest.fixture(scope="module")
def handler():
    from bertopt.aws.serving import inference

    return inference


@pytest.fixture(scope="module")
def model(handler, saved):
    return handler.model_fn(str(saved / "onnx" / "baseline"))


def _texts(n: int) -> list[str]:
    with open(SST2_DEV, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"].strip() for r in rows[:n]]


def test_the_handler_answers_json_lines_one_line_per_record_in_order(handler, model):
    texts = _texts(150)  # more than max_batch (64): the request is scored a slice at a time
    body = "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)).encode()
    data = handler.input_fn(body, "application/jsonlines")
    out = handler.output_fn(handler.predict_fn(data, model), "application/jsonlines")
    lines = out.splitlines()
    assert len(lines) == 150
    expected = [handler._predict([t], model, None)[0] for t in texts]
    assert [json.loads(x) for x in lines] == expected
    assert all(isinstance(a, list) and {x["label"] for x in a} == {"negative", "positive"} for a in expected)
    with pytest.raises(handler.RequestError, match="line 2: malformed JSON"):
        handler.input_fn(b'{"text": "ok"}\n{not json\n', "application/jsonlines")
    with pytest.raises(handler.RequestError, match="input 1 is empty"):
        handler.input_fn(b'{"text": "ok"}\n{"text": "  "}\n', "application/jsonlines")
    # JSON requests are unchanged
    assert handler.output_fn(handler.predict_fn(handler.input_fn(b'{"inputs": "fine"}', "application/json"), model),
                             "application/json").startswith('[{"label"')


def _cfg(tmp_path, saved, src, **kw):
    from bertopt.predict.config import PredictConfig

    write_results(tmp_path / "reports", saved)
    kw = {"output": str(tmp_path / "pred.csv"), "sagemaker_instance_type": "ml.c7i.xlarge", "aws_role_arn": ROLE,
          "aws_region": REGION, **kw}
    return PredictConfig(input=str(src), output_dir=str(saved), reports_dir=str(tmp_path / "reports"), quiet=True,
                         max_length=64, **kw)


def test_the_exact_create_transform_job_request(tmp_path, saved):
    from bertopt.aws.jobs.transform import transform_request

    req = transform_request(_cfg(tmp_path, saved, "x.csv", instance_count=3), NAME, NAME, "s3://b/p/input",
                            "s3://b/p/output")
    assert req == {
        "TransformJobName": NAME, "ModelName": NAME, "MaxConcurrentTransforms": 1, "MaxPayloadInMB": 6,
        "BatchStrategy": "MultiRecord",
        "ModelClientConfig": {"InvocationsTimeoutInSeconds": 3600, "InvocationsMaxRetries": 1},
        "TransformInput": {"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": "s3://b/p/input"}},
                           "ContentType": "application/jsonlines", "CompressionType": "None", "SplitType": "Line"},
        "TransformOutput": {"S3OutputPath": "s3://b/p/output", "Accept": "application/jsonlines",
                            "AssembleWith": "Line"},
        "TransformResources": {"InstanceType": "ml.c7i.xlarge", "InstanceCount": 3},
        "DataProcessing": {"InputFilter": "$", "JoinSource": "Input", "OutputFilter": "$['id','SageMakerOutput']"},
        "Environment": {"BERTOPT_TRANSFORM": "1"},
        "Tags": [{"Key": "bertopt:project", "Value": "bertopt"}, {"Key": "bertopt:job", "Value": "transform"},
                 {"Key": "bertopt:name", "Value": NAME}],
    }
    assert req["MaxConcurrentTransforms"] * req["MaxPayloadInMB"] <= 100


@pytest.fixture(scope="module")
def moto_url():
    with moto_server() as url:
        yield url


def _play_the_job(handler, model, seen: list):
    """A CreateTransformJob hook that does what Batch Transform does with our handler: each input part's
    lines through input_fn/predict_fn/output_fn, joined with the input record, kept fields filtered."""
    import boto3

    def play(params, **_):
        s3 = boto3.client("s3", region_name=REGION)
        seen.append(params)
        bucket, prefix = params["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"][5:].split("/", 1)
        out_bucket, out_prefix = params["TransformOutput"]["S3OutputPath"][5:].split("/", 1)
        for obj in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]:
            body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            answers = handler.output_fn(handler.predict_fn(handler.input_fn(body, "application/jsonlines"), model),
                                        "application/jsonlines").splitlines()
            joined = [json.dumps({"id": json.loads(rec)["id"], "SageMakerOutput": json.loads(a)})
                      for rec, a in zip(body.decode().splitlines(), answers)]
            s3.put_object(Bucket=out_bucket, Key=f"{out_prefix}/{obj['Key'].rsplit('/', 1)[1]}.out",
                          Body="\n".join(joined).encode())

    return play


def test_a_transform_run_reassembles_predict_output_in_input_order(monkeypatch, moto_url, tmp_path, saved, handler,
                                                                   model):
    import boto3

    from bertopt.aws.jobs import common, transform
    from bertopt.aws.session import Aws
    from bertopt.predict.stage import run

    moto_post(moto_url, "/moto-api/reset")
    aws_env(monkeypatch, moto_url)
    monkeypatch.setattr(common, "job_name", lambda prefix: NAME)
    monkeypatch.setattr(transform, "ROWS_PER_PART", 40)
    texts = _texts(130)
    src = tmp_path / "in.csv"
    with open(src, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "sentence"])
        w.writerows([(f"r{i}", t) for i, t in enumerate(texts)])
    session = Aws(REGION)
    seen = []
    session.client("sagemaker").meta.events.register("provide-client-params.sagemaker.CreateTransformJob",
                                                     _play_the_job(handler, model, seen))
    monkeypatch.setattr(transform, "Aws", lambda *a, **k: session)
    result = run(_cfg(tmp_path, saved, src, instance_count=2))
    assert seen and seen[0]["TransformResources"]["InstanceCount"] == 2
    s3 = boto3.client("s3", region_name=REGION)
    parts = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"bertopt/jobs/{NAME}/input")["Contents"]]
    assert len(parts) == 4  # ceil(130 / 40) >= 2 instances
    with open(tmp_path / "pred.csv", newline="") as fh:
        remote = list(csv.DictReader(fh))
    assert [r["id"] for r in remote] == [f"r{i}" for i in range(130)] and result.details["rows"] == 130
    local = run(_cfg(tmp_path, saved, src, sagemaker_instance_type=None, output=str(tmp_path / "local.csv"),
                     variant="ort-fp32"))
    with open(tmp_path / "local.csv", newline="") as fh:
        here = list(csv.DictReader(fh))
    assert [r["label"] for r in remote] == [r["label"] for r in here] and local.details["rows"] == 130
    assert all(abs(float(a["score_positive"]) - float(b["score_positive"])) < 1e-4 for a, b in zip(remote, here))
    sm = boto3.client("sagemaker", region_name=REGION)
    tags = sm.list_tags(ResourceArn=sm.describe_transform_job(TransformJobName=NAME)["TransformJobArn"])["Tags"]
    assert {"Key": "bertopt:project", "Value": "bertopt"} in tags


def test_a_stopped_transform_job_is_one_line_that_says_its_output_is_discarded(monkeypatch):
    import datetime

    import boto3
    from botocore.stub import Stubber

    from bertopt.aws.jobs import common
    from bertopt.aws.session import Aws
    from bertopt.errors import PipelineError

    aws_env(monkeypatch, None)
    sm = boto3.client("sagemaker", region_name=REGION)
    stub = Stubber(sm)
    now = datetime.datetime(2027, 1, 1)
    base = {"TransformJobName": NAME, "TransformJobArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:transform-job/x",
            "ModelName": NAME, "CreationTime": now,
            "TransformInput": {"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": "s3://b/i"}}},
            "TransformResources": {"InstanceType": "ml.c7i.xlarge", "InstanceCount": 1}}
    stub.add_response("describe_transform_job", {**base, "TransformJobStatus": "InProgress"}, {"TransformJobName": NAME})
    stub.add_response("describe_transform_job", {**base, "TransformJobStatus": "Stopped"}, {"TransformJobName": NAME})
    monkeypatch.setattr(common.time, "sleep", lambda s: None)
    with stub, pytest.raises(PipelineError) as err:
        common.watch(Aws(REGION, clients={"sagemaker": sm}), common.TRANSFORM, NAME, poll=0)
    assert str(err.value).count("\n") == 0 and "ended Stopped" in str(err.value)
    assert "a stopped transform job discards its output" in str(err.value)
