"""SageMaker training jobs (bertopt.aws.jobs): the exact CreateTrainingJob request, a completed job's
model installed like a local run's (moto on 127.0.0.1), every unsuccessful end as one line and exit 1,
Ctrl-C stopping the job (botocore Stubber), and the container side: the entry point run as the
training toolkit runs it, alone and under torchrun with 2 processes (gloo)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from test_aws_support import ACCOUNT, REGION, ROLE, aws_env, moto_post, moto_server

from bertopt.errors import PipelineError

ROOT = Path(__file__).resolve().parents[1]
NAME = "bertopt-baseline-20270101-000000"
BUCKET = f"bertopt-{ACCOUNT}-{REGION}"


@pytest.fixture(scope="module")
def moto_url():
    with moto_server() as url:
        yield url


@pytest.fixture
def aws(monkeypatch, moto_url):
    moto_post(moto_url, "/moto-api/reset")
    aws_env(monkeypatch, moto_url)
    from bertopt.aws.jobs import common

    monkeypatch.setattr(common, "job_name", lambda prefix: NAME)
    return moto_url


def _cfg(tmp_path, data_dir, model_dir, **kw):
    from bertopt.config import TrainConfig

    kw = {"sagemaker_instance_type": "ml.g5.2xlarge", "aws_role_arn": ROLE, "aws_region": REGION, **kw}
    return TrainConfig(model=str(model_dir), dataset=str(data_dir), output_dir=str(tmp_path / "saved_models"),
                       reports_dir=str(tmp_path / "reports"), epochs=1, max_length=64, quiet=True, **kw)


def _hps(request):
    return {k: json.loads(v) for k, v in request["HyperParameters"].items()}


def test_the_exact_create_training_job_request(tmp_path, tiny_data_dir, tiny_model_dir):
    from bertopt.aws.jobs.training import container_config, training_request

    cfg = _cfg(tmp_path, tiny_data_dir, tiny_model_dir)
    image = "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.6.0-gpu-py312-cu126-ubuntu22.04-sagemaker"
    inputs = [{"ChannelName": "train", "DataSource": {"S3DataSource": {
        "S3DataType": "S3Prefix", "S3Uri": "s3://b/p/input/train", "S3DataDistributionType": "FullyReplicated"}},
        "InputMode": "File"}]
    request = training_request(cfg, "baseline", NAME, image, "s3://b/p/source/sourcedir.tar.gz", inputs, "b", "p",
                               REGION, {"bertopt_dataset_file": ""})
    assert request == {
        "TrainingJobName": NAME,
        "AlgorithmSpecification": {"TrainingImage": image, "TrainingInputMode": "File"},
        "RoleArn": ROLE,
        "HyperParameters": {k: json.dumps(v) for k, v in {
            "sagemaker_program": "sagemaker_entry.py", "sagemaker_submit_directory": "s3://b/p/source/sourcedir.tar.gz",
            "sagemaker_region": REGION, "sagemaker_container_log_level": 20, "bertopt_stage": "baseline",
            "bertopt_config": container_config(cfg), "bertopt_dataset_file": ""}.items()},
        "OutputDataConfig": {"S3OutputPath": "s3://b/p/output"},
        "ResourceConfig": {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1, "VolumeSizeInGB": 50},
        "StoppingCondition": {"MaxRuntimeInSeconds": 86400},
        "Tags": [{"Key": "bertopt:project", "Value": "bertopt"}, {"Key": "bertopt:job", "Value": "baseline"},
                 {"Key": "bertopt:name", "Value": NAME}],
        "Environment": {"TOKENIZERS_PARALLELISM": "false"},
        "InputDataConfig": inputs,
    }
    assert "sagemaker_instance_type" not in container_config(cfg)  # the container never starts a job itself
    # two nodes, managed spot: torchrun across them, checkpoints synced to S3
    spot = training_request(_cfg(tmp_path, tiny_data_dir, tiny_model_dir, instance_count=2, spot=True, max_wait=7200,
                                 max_runtime=3600), "baseline", NAME, image, "s3://b/s", [], "b", "p", REGION, {})
    assert _hps(spot)["sagemaker_torch_distributed_enabled"] is True
    assert _hps(spot)["sagemaker_instance_type"] == "ml.g5.2xlarge" and spot["ResourceConfig"]["InstanceCount"] == 2
    assert spot["EnableManagedSpotTraining"] is True
    assert spot["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    assert spot["CheckpointConfig"] == {"S3Uri": "s3://b/p/checkpoints", "LocalPath": "/opt/ml/checkpoints"}
    # one node with 4 GPUs: distributed too
    multi = training_request(_cfg(tmp_path, tiny_data_dir, tiny_model_dir, sagemaker_instance_type="ml.g5.12xlarge"),
                             "baseline", NAME, image, "s3://b/s", [], "b", "p", REGION, {})
    assert _hps(multi)["sagemaker_torch_distributed_enabled"] is True and "CheckpointConfig" not in multi


def test_job_flags_are_validated_once(tmp_path, tiny_data_dir, tiny_model_dir):
    from bertopt.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, tiny_data_dir, tiny_model_dir, aws_role_arn=None, spot=True)
    assert "--aws-role-arn" in str(err.value) and "--spot needs --max-wait" in str(err.value)


def _model_tarball(tiny_model_dir) -> bytes:
    """What the entry point leaves in SM_MODEL_DIR, tarred as the toolkit uploads it."""
    from bertopt import artifacts

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in sorted(Path(tiny_model_dir).iterdir()):
            tar.add(f, f"baseline/{f.name}")
        manifest = {"schema_version": artifacts.SCHEMA_VERSION, "stage": "baseline", "status": "ok",
                    "fingerprint": "container", "config": {"dataset": "/opt/ml/input/data/train", "max_length": 64},
                    "metrics": {"best_eval_accuracy": 0.75, "world_size": 1}, "outputs": ["model.safetensors"],
                    "data": {"task": "classification", "label_names": ["0", "1"]}}
        raw = json.dumps(manifest).encode()
        info = tarfile.TarInfo("baseline/manifest.json")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    return buf.getvalue()


def test_a_completed_job_installs_the_model_with_a_local_manifest(aws, tmp_path, tiny_data_dir, tiny_model_dir):
    import boto3

    from bertopt import artifacts
    from bertopt.aws.jobs.training import run_remote
    from bertopt.aws.session import Aws
    from bertopt.compare.discover import discover
    from bertopt.config import result_config

    cfg = _cfg(tmp_path, tiny_data_dir, tiny_model_dir)
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket=BUCKET)
    prefix = f"bertopt/jobs/{NAME}"
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/output/{NAME}/output/model.tar.gz", Body=_model_tarball(tiny_model_dir))
    session = Aws(REGION)
    sent = {}
    session.client("sagemaker").meta.events.register(
        "provide-client-params.sagemaker.CreateTrainingJob", lambda params, **_: sent.update(params))
    result = run_remote(cfg, "baseline", aws=session, poll=0.01)
    assert result.status == "ok" and "training job " + NAME in result.key_metric
    assert sent["HyperParameters"]["sagemaker_submit_directory"] == json.dumps(
        f"s3://{BUCKET}/{prefix}/source/sourcedir.tar.gz")
    assert [c["ChannelName"] for c in sent["InputDataConfig"]] == ["train", "model"]
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert f"{prefix}/input/train/train.tsv" in keys and f"{prefix}/input/model/config.json" in keys
    with tarfile.open(fileobj=io.BytesIO(s3.get_object(Bucket=BUCKET, Key=f"{prefix}/source/sourcedir.tar.gz")[
            "Body"].read())) as tar:
        names = tar.getnames()
    assert {"sagemaker_entry.py", "requirements.txt", "bertopt/aws/jobs/entry.py"} <= set(names)
    d = Path(cfg.output_dir) / "baseline"
    manifest = artifacts.require_manifest(d, "baseline")  # what compare and the ONNX stage read first
    assert manifest["remote"]["job"] == NAME and manifest["remote"]["instances"] == 1
    assert manifest["remote"]["image"].endswith("pytorch-training:2.6.0-gpu-py312-cu126-ubuntu22.04-sagemaker")
    assert manifest["config"]["dataset"] == str(tiny_data_dir)  # local paths, not the container's
    assert manifest["fingerprint"] == artifacts.fingerprint({"stage": "baseline", **result_config(cfg)})
    assert (d / "model.safetensors").is_file() and not list(d.parent.glob(".baseline*"))
    rows, _ = discover(cfg.output_dir)
    assert any(r.name == "torch-fp32" and r.status == "ok" for r in rows)
    from bertopt.onnx_stage import OnnxConfig, resolve_sources

    sources = resolve_sources(OnnxConfig(output_dir=cfg.output_dir, quiet=True))  # the ONNX stage's input check
    assert [s.name for s in sources] == ["baseline"] and sources[0].manifest["remote"]["job"] == NAME


def _stubbed(monkeypatch, statuses, **final):
    """An Aws whose sagemaker client is stubbed (create, then the given describe sequence) and whose
    S3 / STS are moto's."""
    import boto3
    from botocore.stub import Stubber

    from bertopt.aws.session import Aws

    sm = boto3.client("sagemaker", region_name=REGION)
    stub = Stubber(sm)
    stub.add_response("create_training_job", {"TrainingJobArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/x"},
                      None)
    for i, (status, secondary) in enumerate(statuses):
        extra = final if i == len(statuses) - 1 else {}
        stub.add_response("describe_training_job", _description(status, secondary, **extra),
                          {"TrainingJobName": NAME})
    return Aws(REGION, clients={"sagemaker": sm}), stub


def _description(status, secondary, **extra):
    import datetime

    now = datetime.datetime(2027, 1, 1)
    return {"TrainingJobName": NAME, "TrainingJobArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/x",
            "TrainingJobStatus": status, "SecondaryStatus": secondary, "CreationTime": now,
            "AlgorithmSpecification": {"TrainingInputMode": "File"}, "ModelArtifacts": {"S3ModelArtifacts": "s3://x/y"},
            "ResourceConfig": {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1, "VolumeSizeInGB": 50},
            "StoppingCondition": {"MaxRuntimeInSeconds": 60}, **extra}


@pytest.mark.parametrize("status,secondary,reason,shown", [
    ("Failed", "Failed", "AlgorithmError: ExecuteUserScriptError: error: data set 'x' not found", "ended Failed: "
     "AlgorithmError: ExecuteUserScriptError"),
    ("Stopped", "Stopped", None, "ended Stopped: stopped"),
    ("Stopped", "MaxRuntimeExceeded", "Training job runtime exceeded MaxRuntimeInSeconds", "ended MaxRuntimeExceeded"),
    ("Stopped", "MaxWaitTimeExceeded", "Spot capacity not available within MaxWaitTimeInSeconds",
     "ended MaxWaitTimeExceeded: Spot capacity"),
])
def test_every_unsuccessful_end_is_one_line_and_exit_1(aws, monkeypatch, tmp_path, tiny_data_dir, tiny_model_dir,
                                                       capsys, status, secondary, reason, shown):
    import logging

    from bertopt import cli
    from bertopt.aws.jobs import training

    # a console handler an earlier test bound to its (now closed) captured stderr would print "Logging error"
    root = logging.getLogger("bertopt")
    monkeypatch.setattr(root, "handlers", [h for h in root.handlers if not getattr(h, "_bertopt_console", False)])
    extra = {"FailureReason": reason} if reason else {}
    session, stub = _stubbed(monkeypatch, [("InProgress", "Starting"), ("InProgress", "Training"),
                                           (status, secondary)], **extra)
    monkeypatch.setattr(training, "POLL_SECONDS", 0.01)
    cfg = _cfg(tmp_path, tiny_data_dir, tiny_model_dir)
    with stub:
        code, result = cli.run_stage("baseline", lambda c: training.run_remote(c, "baseline", aws=session, poll=0.01),
                                     cfg)
        stub.assert_no_pending_responses()
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("error: "))
    assert code == 1 and result is None and shown in line and "nothing was written locally" in line
    assert "Traceback" not in err and not (Path(cfg.output_dir) / "baseline").exists()


@pytest.mark.parametrize("already_ended", [False, True])
def test_ctrl_c_stops_the_job(aws, monkeypatch, tmp_path, tiny_data_dir, tiny_model_dir, already_ended):
    from bertopt.aws.jobs import common, training

    session, stub = _stubbed(monkeypatch, [("InProgress", "Training")])
    if already_ended:
        stub.add_client_error("stop_training_job", "ValidationException",
                              f"The request was rejected because the training job is in status Completed.",
                              expected_params={"TrainingJobName": NAME})
    else:
        stub.add_response("stop_training_job", {}, {"TrainingJobName": NAME})

    def interrupt(_):
        raise KeyboardInterrupt

    monkeypatch.setattr(common.time, "sleep", interrupt)
    with stub, pytest.raises(PipelineError, match=f"interrupted .*stopped training job {NAME}"):
        training.run_remote(_cfg(tmp_path, tiny_data_dir, tiny_model_dir), "baseline", aws=session, poll=0.01)
    stub.assert_no_pending_responses()


def test_detach_leaves_the_job_running(aws, monkeypatch, tmp_path, tiny_data_dir, tiny_model_dir):
    from bertopt.aws.jobs import training

    session, stub = _stubbed(monkeypatch, [])
    with stub:
        result = training.run_remote(_cfg(tmp_path, tiny_data_dir, tiny_model_dir, detach=True), "baseline",
                                     aws=session)
    stub.assert_no_pending_responses()  # no describe, no stop
    assert result.status == "detached" and NAME in result.key_metric


# ------------------------------------------------------------------------------ the container side
def _container(tmp_path, data_dir, model_dir, **config) -> dict:
    """A /opt/ml-like tree holding the job's source archive unpacked in code/ (as the toolkit does with
    sagemaker_submit_directory), and the SM_* environment the training toolkit gives the entry point."""
    from bertopt.aws.jobs.training import hyperparameters, source_archive
    from bertopt.config import TrainConfig

    ml = tmp_path / "opt" / "ml"
    with tarfile.open(fileobj=io.BytesIO(source_archive()), mode="r:gz") as tar:
        tar.extractall(ml / "code", filter="data")
    (ml / "input" / "config").mkdir(parents=True)
    (ml / "model").mkdir()
    (ml / "checkpoints").mkdir()
    train = ml / "input" / "data" / "train"
    train.mkdir(parents=True)
    for f in Path(data_dir).iterdir():
        (train / f.name).write_bytes(f.read_bytes())
    cfg = TrainConfig(model="local-path-replaced-by-the-channel", dataset="data/local", epochs=1, max_length=64,
                      batch_size=16, lr=1e-2, warmup_ratio=0.0, seed=0, device="cpu", max_train_samples=96,
                      sagemaker_instance_type="ml.m5.xlarge", aws_role_arn=ROLE, **config)
    hps = {k: v for k, v in hyperparameters(cfg, "baseline", "s3://b/s.tar.gz", REGION, {"bertopt_dataset_file": ""})
           .items()}
    (ml / "input" / "config" / "hyperparameters.json").write_text(json.dumps(hps))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update({"SM_INPUT_CONFIG_DIR": str(ml / "input" / "config"), "SM_CHANNEL_TRAIN": str(train),
                "SM_CHANNEL_MODEL": str(model_dir), "SM_MODEL_DIR": str(ml / "model"),
                "BERTOPT_CHECKPOINT_DIR": str(ml / "checkpoints"), "SM_HOSTS": json.dumps(["algo-1"]),
                "SM_CURRENT_HOST": "algo-1", "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})
    return env


def _job(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc


def test_the_entry_point_runs_as_the_toolkit_runs_it(tmp_path, tiny_data_dir, tiny_model_dir):
    env = _container(tmp_path, tiny_data_dir, tiny_model_dir)
    code = tmp_path / "opt" / "ml" / "code"
    _job([sys.executable, "sagemaker_entry.py"], code, env)  # the toolkit runs the program from the code dir
    model = Path(env["SM_MODEL_DIR"]) / "baseline"
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["config"]["dataset"] == env["SM_CHANNEL_TRAIN"]
    assert (model / "model.safetensors").is_file() and not (model / "checkpoints").exists()


def test_the_entry_point_under_torchrun_trains_data_parallel(tmp_path, tiny_data_dir, tiny_model_dir):
    env = _container(tmp_path, tiny_data_dir, tiny_model_dir)
    _job([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          "sagemaker_entry.py"], tmp_path / "opt" / "ml" / "code", env)
    manifest = json.loads((Path(env["SM_MODEL_DIR"]) / "baseline" / "manifest.json").read_text())
    assert manifest["metrics"]["world_size"] == 2 and manifest["metrics"]["distributed_backend"] == "gloo"


# ------------------------------------------------------------------------------------------ cleanup
def _moto_job(s3, sm, logs, name: str, tagged: bool, transform: bool = False) -> None:
    prefix = f"bertopt/jobs/{name}"
    for key in ("source/sourcedir.tar.gz", "input/train/train.tsv", "output/model.tar.gz"):
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{key}", Body=b"x")
    tags = [{"Key": "bertopt:project", "Value": "bertopt"}] if tagged else [{"Key": "team", "Value": "other"}]
    if transform:
        sm.create_model(ModelName=name, ExecutionRoleArn=ROLE, PrimaryContainer={"Image": "i"})
        sm.create_transform_job(TransformJobName=name, ModelName=name, Tags=tags,
                                TransformInput={"DataSource": {"S3DataSource": {
                                    "S3DataType": "S3Prefix", "S3Uri": f"s3://{BUCKET}/{prefix}/input"}}},
                                TransformOutput={"S3OutputPath": f"s3://{BUCKET}/{prefix}/output"},
                                TransformResources={"InstanceType": "ml.c7i.xlarge", "InstanceCount": 1})
        group = "/aws/sagemaker/TransformJobs"
    else:
        sm.create_training_job(TrainingJobName=name, RoleArn=ROLE, Tags=tags,
                               AlgorithmSpecification={"TrainingImage": "i", "TrainingInputMode": "File"},
                               OutputDataConfig={"S3OutputPath": f"s3://{BUCKET}/{prefix}/output"},
                               ResourceConfig={"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1,
                                               "VolumeSizeInGB": 50},
                               StoppingCondition={"MaxRuntimeInSeconds": 60})
        group = "/aws/sagemaker/TrainingJobs"
    try:
        logs.create_log_group(logGroupName=group)
    except logs.exceptions.ResourceAlreadyExistsException:
        pass
    logs.create_log_stream(logGroupName=group, logStreamName=f"{name}/algo-1-1700000000")


def test_cleanup_finds_jobs_by_tag_and_an_untagged_look_alike_survives(aws, tmp_path):
    import boto3

    from bertopt.aws.cleanup import run
    from bertopt.aws.config import AwsCleanupConfig

    s3, sm = boto3.client("s3", region_name=REGION), boto3.client("sagemaker", region_name=REGION)
    logs = boto3.client("logs", region_name=REGION)
    s3.create_bucket(Bucket=BUCKET)
    _moto_job(s3, sm, logs, "bertopt-baseline-20270101-000000", tagged=True)
    _moto_job(s3, sm, logs, "bertopt-transform-20270101-000000", tagged=True, transform=True)
    _moto_job(s3, sm, logs, "bertopt-baseline-20270101-111111", tagged=False)  # the look-alike
    cfg = dict(output_dir=str(tmp_path / "out"), aws_region=REGION, cleanup_all=True, quiet=True, poll_seconds=0.01)

    def keys():
        return {o["Key"].split("/")[2] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])}

    dry = run(AwsCleanupConfig(dry_run=True, **cfg))
    assert dry.details["counts"].get("would delete", 0) >= 4
    assert keys() == {"bertopt-baseline-20270101-000000", "bertopt-transform-20270101-000000",
                      "bertopt-baseline-20270101-111111"}
    run(AwsCleanupConfig(**cfg))
    assert keys() == {"bertopt-baseline-20270101-111111"}  # the tagged jobs' prefixes are gone
    streams = [s["logStreamName"] for g in ("/aws/sagemaker/TrainingJobs", "/aws/sagemaker/TransformJobs")
               for s in logs.describe_log_streams(logGroupName=g)["logStreams"]]
    assert streams == ["bertopt-baseline-20270101-111111/algo-1-1700000000"]
    report = json.loads((tmp_path / "out" / "aws" / "cleanup.json").read_text()) if (
        tmp_path / "out" / "aws" / "cleanup.json").is_file() else None
    assert report is None or all("111111" not in r["name"] for r in report["resources"])


def test_cleanup_stops_a_running_job(monkeypatch, aws):
    """moto has no StopTrainingJob: a Stubber-wrapped client plays a running, tagged job."""
    import boto3
    from botocore.stub import Stubber

    from bertopt.aws import cleanup
    from bertopt.aws.session import Aws

    sm = boto3.client("sagemaker", region_name=REGION)
    arn = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/x"
    stub = Stubber(sm)
    desc = _description("InProgress", "Training", OutputDataConfig={"S3OutputPath": "s3://b/bertopt/jobs/x/output"})
    stub.add_response("describe_training_job", desc, {"TrainingJobName": NAME})
    stub.add_response("list_tags", {"Tags": [{"Key": "bertopt:project", "Value": "bertopt"}]}, {"ResourceArn": arn})
    stub.add_response("stop_training_job", {}, {"TrainingJobName": NAME})
    session = Aws(REGION, clients={"sagemaker": sm})
    target = cleanup.Target("training-job", NAME, arn=arn)
    with stub:
        planned = [t for t in cleanup.plan(session, [target]) if t.type == "training-job"]
        cleanup.execute(session, planned, timeout=1, poll=0.01)
    stub.assert_no_pending_responses()
    assert planned[0].outcome == "deleted" and planned[0].detail == "stopped"
