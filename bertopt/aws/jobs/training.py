"""A training stage (baseline, mixed_precision, pruned) as a SageMaker training job, with plain boto3.

The job runs the project's own code (packed with a requirements file as the script-mode source) on
the PyTorch training DLC: the toolkit installs the requirements and runs ``sagemaker_entry.py`` (a
three-line script written into the archive that calls :mod:`.entry`), under torchrun when there is more than one GPU or node. Local data (or a local model
directory / the baseline a prune starts from) is uploaded as input channels; ``s3://`` data is used
as it is. Managed spot keeps the stage's checkpoints in S3 (CheckpointConfig), so the existing resume
continues after an interruption. On completion the model is downloaded into saved_models/<stage>/
with the manifest the container wrote plus a ``remote`` record; nothing is written locally otherwise."""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile
import time
from pathlib import Path

from ... import artifacts
from ...cli import StageResult
from ...config import JOB_FIELDS, result_config
from ...errors import PipelineError
from ..session import Aws, aws_error
from . import common

log = logging.getLogger("bertopt.aws.jobs")

ROOT = Path(__file__).resolve().parents[3]           # the project: bertopt/ + scripts
ENTRY = "sagemaker_entry.py"                         # written into the source archive (not a project script)
ENTRY_SOURCE = (b'"""bertopt SageMaker training job entry point (the toolkit\'s sagemaker_program)."""\n'
                b"import sys\n\nfrom bertopt.aws.jobs.entry import main\n\n"
                b'if __name__ == "__main__":\n    sys.exit(main())\n')
REQUIREMENTS = "requirements-sagemaker.txt"          # the job's pip installs on top of the DLC (no torch)
CHECKPOINT_LOCAL = "/opt/ml/checkpoints"
POLL_SECONDS = 30.0
# the container's paths replace these local ones in the config it runs with
LOCAL_FIELDS = ("dataset", "data_dir", "model", "output_dir", "reports_dir", "prune_source")


def source_archive() -> bytes:
    """sourcedir.tar.gz: bertopt/ (no caches), the entry script and requirements.txt (the DLC's toolkit
    pip-installs it). Reproducible: sorted members, fixed times."""
    buf = io.BytesIO()
    members = [(p.read_bytes(), p.relative_to(ROOT).as_posix()) for p in sorted((ROOT / "bertopt").rglob("*.py"))]
    members += [(ENTRY_SOURCE, ENTRY), ((ROOT / REQUIREMENTS).read_bytes(), "requirements.txt")]
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for data, name in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 946684800, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _data_channel(cfg) -> tuple[object, str]:
    """(local path or s3:// URI of the data, the file name inside the channel or '')."""
    from ... import data as data_mod

    dataset = str(cfg.dataset)
    if dataset.startswith("s3://"):
        return dataset, "" if dataset.endswith("/") else dataset.rstrip("/").rsplit("/", 1)[1]
    if dataset.lower() in data_mod.HUB:
        local = data_mod._named_local_dir(dataset.lower(), cfg.data_dir)
        if local is None:
            return None, ""  # the container downloads it from the hub
        return local, ""
    path = Path(dataset)
    if path.is_dir():
        return path, ""
    if path.is_file():
        return path, path.name
    raise PipelineError(f"--dataset {dataset}: no such file or directory (or give an s3:// URI)")


def channels(aws: Aws, cfg, stage: str, bucket: str, prefix: str) -> tuple[list, dict]:
    """The job's InputDataConfig and what the entry point needs to know about it."""
    found, file_name = _data_channel(cfg)
    inputs, hps = {}, {}
    if found is not None:
        if str(found).startswith("s3://"):
            inputs["train"] = str(found).rsplit("/", 1)[0] if file_name else str(found)
        else:
            inputs["train"] = upload_prefix(aws, Path(found), bucket, f"{prefix}/input/train")
        hps["bertopt_dataset_file"] = file_name
    model = Path(str(cfg.model))
    if model.is_dir():
        inputs["model"] = upload_prefix(aws, model, bucket, f"{prefix}/input/model")
    if stage == "pruned":
        src = Path(cfg.prune_source) if cfg.prune_source else artifacts.stage_dir(cfg.output_dir, "baseline")
        if not cfg.prune_source:
            artifacts.require_manifest(src, "baseline")
        inputs["source"] = upload_prefix(aws, src, bucket, f"{prefix}/input/source")
    config = [{"ChannelName": name, "DataSource": {"S3DataSource": {
        "S3DataType": "S3Prefix", "S3Uri": uri, "S3DataDistributionType": "FullyReplicated"}}, "InputMode": "File"}
        for name, uri in inputs.items()]
    return config, hps


def upload_prefix(aws: Aws, path: Path, bucket: str, prefix: str) -> str:
    uri = common.upload(aws, path, bucket, prefix)
    return uri.rsplit("/", 1)[0] if path.is_file() else uri


def container_config(cfg) -> dict:
    """The stage's config as the container runs it: no job fields (it runs there, not again remotely)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in JOB_FIELDS}


def hyperparameters(cfg, stage: str, source_uri: str, region: str, extra: dict) -> dict:
    """Script-mode hyperparameters, JSON-encoded as the SageMaker SDK writes them."""
    hps = {"sagemaker_program": ENTRY, "sagemaker_submit_directory": source_uri, "sagemaker_region": region,
           "sagemaker_container_log_level": 20, "bertopt_stage": stage, "bertopt_config": container_config(cfg),
           **extra}
    if cfg.instance_count > 1 or common.gpu_count(cfg.sagemaker_instance_type) > 1:
        hps["sagemaker_torch_distributed_enabled"] = True   # the toolkit launches the entry under torchrun
        hps["sagemaker_instance_type"] = cfg.sagemaker_instance_type
    return {k: json.dumps(v) for k, v in hps.items()}


def training_request(cfg, stage: str, name: str, image: str, source_uri: str, inputs: list, bucket: str,
                     prefix: str, region: str, extra_hps: dict) -> dict:
    """The exact CreateTrainingJob request."""
    request = {
        "TrainingJobName": name,
        "AlgorithmSpecification": {"TrainingImage": image, "TrainingInputMode": "File"},
        "RoleArn": cfg.aws_role_arn,
        "HyperParameters": hyperparameters(cfg, stage, source_uri, region, extra_hps),
        "OutputDataConfig": {"S3OutputPath": f"s3://{bucket}/{prefix}/output"},
        "ResourceConfig": {"InstanceType": cfg.sagemaker_instance_type, "InstanceCount": cfg.instance_count,
                           "VolumeSizeInGB": 50},
        "StoppingCondition": {"MaxRuntimeInSeconds": cfg.max_runtime},
        "Tags": common.tags(stage, name),
        "Environment": {"TOKENIZERS_PARALLELISM": "false"},
    }
    if inputs:
        request["InputDataConfig"] = inputs
    if cfg.spot:
        request["EnableManagedSpotTraining"] = True
        request["StoppingCondition"]["MaxWaitTimeInSeconds"] = cfg.max_wait
        request["CheckpointConfig"] = {"S3Uri": f"s3://{bucket}/{prefix}/checkpoints", "LocalPath": CHECKPOINT_LOCAL}
    return request


def remote_record(desc: dict, cfg, image: str) -> dict:
    billable = desc.get("BillableTimeInSeconds")
    training = desc.get("TrainingTimeInSeconds")
    record = {"job": desc.get("TrainingJobName"), "arn": desc.get("TrainingJobArn"), "image": image,
              "instance_type": cfg.sagemaker_instance_type, "instances": cfg.instance_count, "spot": bool(cfg.spot),
              "training_seconds": training, "billable_seconds": billable,
              "estimated_cost_usd": common.estimated_cost(cfg.sagemaker_instance_type, billable, cfg.instance_count),
              "price_basis": "pinned us-east-1 on-demand list price x billable seconds x instances",
              "model_artifact": (desc.get("ModelArtifacts") or {}).get("S3ModelArtifacts")}
    if cfg.spot and billable and training:
        record["spot_savings"] = round(1 - billable / training, 4)
    return record


def install_model(archive: Path, cfg, stage: str, record: dict) -> dict:
    """Unpack the job's model.tar.gz beside the stage directory, give its manifest the local config,
    fingerprint and the ``remote`` record (written last), then swap it in for the stage directory."""
    directory = artifacts.stage_dir(cfg.output_dir, stage)
    work = directory.with_name(f".{directory.name}.remote")
    shutil.rmtree(work, ignore_errors=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(work, filter="data")
        unpacked = work / directory.name
        manifest = artifacts.read_manifest(unpacked)
        if not manifest or manifest.get("status") not in ("ok", "skipped"):
            raise PipelineError(f"{record['job']}: the job's model.tar.gz holds no complete {directory.name}/ "
                                "(no manifest); nothing was written locally")
        config = {**manifest.get("config", {}), **{k: v for k, v in cfg.to_dict().items() if k in LOCAL_FIELDS}}
        manifest = {**manifest, "config": config, "remote": record}
        if stage != "pruned":  # the fingerprint a local run of the same config computes (prune: the job's)
            key = {"stage": stage, **result_config(cfg)}
            world = (manifest.get("metrics") or {}).get("world_size") or 1
            if world > 1:
                key["world_size"] = world
            manifest["fingerprint"] = artifacts.fingerprint(key)
        artifacts.atomic_write_json(artifacts.manifest_path(unpacked), manifest)
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if directory.exists():
            os.replace(directory, old)
        os.replace(unpacked, directory)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def _start(aws: Aws, cfg, stage: str) -> tuple[str, str]:
    from botocore.exceptions import ClientError

    aws.identity()
    image = cfg.image_uri or common.training_image(aws.region, cfg.sagemaker_instance_type)
    if image is None:
        raise PipelineError(f"no PyTorch training image is pinned for {aws.region}; pass --image-uri")
    name = common.job_name(stage)
    bucket = common.ensure_bucket(aws, cfg.bucket)
    prefix = f"{cfg.s3_prefix.strip('/')}/jobs/{name}"
    source = common.upload_bytes(aws, source_archive(), bucket, f"{prefix}/source/sourcedir.tar.gz")
    inputs, extra = channels(aws, cfg, stage, bucket, prefix)
    request = training_request(cfg, stage, name, image, source, inputs, bucket, prefix, aws.region, extra)
    try:
        aws.client("sagemaker").create_training_job(**request)
    except ClientError as exc:
        raise aws_error(exc, f"creating training job {name}") from None
    log.info("created training job %s on %d x %s%s (image %s)", name, cfg.instance_count, cfg.sagemaker_instance_type,
             " (managed spot)" if cfg.spot else "", image)
    return name, image


def run_remote(cfg, stage: str, aws: Aws | None = None, poll: float = POLL_SECONDS) -> StageResult:
    """Run ``stage`` as a training job and install its model like a local run would."""
    start = time.perf_counter()
    aws = aws or Aws(cfg.aws_region, cfg.aws_profile)
    name, image = _start(aws, cfg, stage)
    if cfg.detach:
        log.info("detached: follow it with `aws sagemaker describe-training-job --training-job-name %s`; its model "
                 "lands in s3 under the job's output path", name)
        return StageResult(stage, "detached", time.perf_counter() - start, f"training job {name}")
    desc = common.watch(aws, common.TRAINING, name, poll=poll)
    record = remote_record(desc, cfg, image)
    directory = artifacts.stage_dir(cfg.output_dir, stage)
    tmp = directory.with_name(f".{directory.name}.model.tar.gz")
    try:
        common.download(aws, record["model_artifact"], tmp)
        manifest = install_model(tmp, cfg, stage, record)
    finally:
        tmp.unlink(missing_ok=True)
    metric = (manifest.get("metrics") or {}).get("best_eval_metric", (manifest.get("metrics") or {}).get(
        "best_eval_accuracy"))
    cost = record["estimated_cost_usd"]
    return StageResult(stage, "ok", time.perf_counter() - start,
                       f"training job {name}: {record['billable_seconds']} billable s"
                       + (f", ~${cost:.2f}" if cost is not None else "")
                       + (f", best eval {metric:.4f}" if isinstance(metric, (int, float)) else ""), str(directory))
