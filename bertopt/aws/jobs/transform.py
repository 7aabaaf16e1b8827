"""predict.py's Batch Transform: score a local or s3:// file with the endpoint's model archive and
handler (code/inference.py speaks JSON Lines, :mod:`bertopt.jsonl`) on ``--instance-count`` instances.

The input is read with predict.py's reader (same column detection, bad rows, ``--on-error``) and split
into at least N JSON Lines files of ``{"id", "text"[, "text_pair"]}`` records, so N instances share the
work; ``JoinSource: Input`` keeps each record's id beside its answer. The outputs (``<part>.out``) are
downloaded and reassembled in input order into predict.py's own format. Same watch, failure and
Ctrl-C rules as training jobs (a stopped transform job discards its output)."""
from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from ... import tasks
from ...errors import PipelineError
from ..session import Aws, aws_error
from . import common

log = logging.getLogger("bertopt.aws.jobs")

MEDIA = "application/jsonlines"
MAX_PAYLOAD_MB = 6          # per request (limit 100; MaxConcurrentTransforms x MaxPayloadInMB <= 100)
CONCURRENT = 1              # requests in flight per instance: one model-server worker using every vCPU
ROWS_PER_PART = 50000       # parts beyond the N instances: smaller files retry faster
POLL_SECONDS = 20.0


def write_parts(cfg, scorer_info, work: Path) -> tuple[list[Path], list]:
    """The input as JSON Lines parts (ids kept) and the bad rows predict.py's reader found."""
    from ...predict.files import InputReader

    reader = InputReader(cfg.input, rows=cfg.chunk_rows, text_column=cfg.text_column,
                         trained_columns=scorer_info.text_columns, pairs=scorer_info.pairs, id_column=cfg.id_column,
                         no_header=cfg.no_header, on_error=cfg.on_error)
    records = work / "all.jsonl"
    n = 0
    with open(records, "w", encoding="utf-8") as fh:
        for chunk in reader:
            for k, (i, t) in enumerate(zip(chunk.ids, chunk.texts)):
                rec = {"id": i, "text": t}
                if chunk.pairs is not None:
                    rec["text_pair"] = chunk.pairs[k]
                fh.write(json.dumps(rec) + "\n")
                n += 1
    if n == 0:
        raise PipelineError(f"{cfg.input}: no rows to score")
    parts = max(cfg.instance_count, math.ceil(n / ROWS_PER_PART))
    per = math.ceil(n / parts)
    paths = []
    with open(records, encoding="utf-8") as src:
        for p in range(parts):
            path = work / "input" / f"part-{p:05d}.jsonl"
            path.parent.mkdir(exist_ok=True)
            with open(path, "w", encoding="utf-8") as out:
                for _ in range(per):
                    line = src.readline()
                    if not line:
                        break
                    out.write(line)
            if path.stat().st_size:
                paths.append(path)
            else:
                path.unlink()
    records.unlink()
    return paths, reader.bad


def transform_request(cfg, name: str, model: str, input_uri: str, output_uri: str) -> dict:
    """The exact CreateTransformJob request."""
    return {
        "TransformJobName": name, "ModelName": model,
        "MaxConcurrentTransforms": CONCURRENT, "MaxPayloadInMB": MAX_PAYLOAD_MB, "BatchStrategy": "MultiRecord",
        "ModelClientConfig": {"InvocationsTimeoutInSeconds": 3600, "InvocationsMaxRetries": 1},
        "TransformInput": {"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": input_uri}},
                           "ContentType": MEDIA, "CompressionType": "None", "SplitType": "Line"},
        "TransformOutput": {"S3OutputPath": output_uri, "Accept": MEDIA, "AssembleWith": "Line"},
        "TransformResources": {"InstanceType": cfg.sagemaker_instance_type, "InstanceCount": cfg.instance_count},
        "DataProcessing": {"InputFilter": "$", "JoinSource": "Input", "OutputFilter": "$['id','SageMakerOutput']"},
        "Environment": {"BERTOPT_TRANSFORM": "1"},
        "Tags": common.tags("transform", name),
    }


def model_environment(cfg, region: str) -> dict:
    from .. import instances

    env = {"SAGEMAKER_PROGRAM": "inference.py", "SAGEMAKER_REGION": region, "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
           "BERTOPT_BATCH_WAIT_MS": "-1", "SAGEMAKER_MODEL_SERVER_TIMEOUT": "3600"}
    plan = instances.instance_plan(cfg.sagemaker_instance_type)
    if plan:
        env.update(plan.container_env())
    env["SAGEMAKER_MODEL_SERVER_WORKERS"] = "1"   # one request at a time per instance, all vCPUs for it
    if plan:
        env["BERTOPT_THREADS"] = env["OMP_NUM_THREADS"] = str(plan.vcpus)
    return env


def _scores_row(output, scorer) -> list:
    """A handler answer (every label, best first; or the regression value) as a score row in label order."""
    if scorer.task == tasks.REGRESSION:
        return [float(output["value"])]
    by_name = {a["label"]: float(a["score"]) for a in output}
    return [by_name.get(n, 0.0) for n in scorer.label_names]


def reassemble(parts: list[Path], outputs: Path, scorer, dest: Path) -> int:
    """The downloaded ``<part>.out`` files, in part order and line order, in predict.py's format."""
    import numpy as np

    from ...predict.files import Writer
    from ...predict.scoring import answer

    writer, n = Writer(dest), 0
    try:
        for part in parts:
            out = outputs / f"{part.name}.out"
            if not out.is_file():
                raise PipelineError(f"the transform job wrote no {out.name} for {part.name}")
            expected = sum(1 for _ in open(part, encoding="utf-8"))
            lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines() if line.strip()]
            if len(lines) != expected:
                raise PipelineError(f"{out.name}: {len(lines)} answers for {expected} records")
            writer.write([{"id": r["id"], **answer(np.asarray(_scores_row(r["SageMakerOutput"], scorer)), scorer)}
                          for r in lines])
            n += len(lines)
        writer.commit()
    except BaseException:
        writer.discard()
        raise
    return n


def _create(aws: Aws, cfg, choice, work: Path, parts: list[Path]) -> tuple[str, str, str]:
    """Upload the archive and the parts, create the model and the transform job; (job, bucket, prefix)."""
    from botocore.exceptions import ClientError

    from .. import packaging
    from ..config import dlc_image_uri, is_gpu_instance

    gpu = is_gpu_instance(cfg.sagemaker_instance_type)
    image = cfg.image_uri or dlc_image_uri(aws.region, gpu)
    if image is None:
        raise PipelineError(f"no inference image is pinned for {aws.region}; pass --image-uri")
    archive_cfg = SimpleNamespace(max_batch=64, max_chars=10000, batch_wait_ms=-1.0, batching=False,
                                  batch_max_texts=64, gpu=gpu, output_dir=cfg.output_dir, vendor_wheels=None)
    archive = packaging.build_archive(choice, archive_cfg, work / packaging.ARCHIVE_NAME)
    name = common.job_name("transform")
    bucket = common.ensure_bucket(aws, cfg.bucket)
    prefix = f"{cfg.s3_prefix.strip('/')}/jobs/{name}"
    model_uri = common.upload(aws, archive.path, bucket, prefix)
    for part in parts:
        common.upload(aws, part, bucket, f"{prefix}/input")
    sm = aws.client("sagemaker")
    try:
        sm.create_model(ModelName=name, ExecutionRoleArn=cfg.aws_role_arn, Tags=common.tags("transform", name),
                        PrimaryContainer={"Image": image, "ModelDataUrl": model_uri,
                                          "Environment": model_environment(cfg, aws.region)})
        sm.create_transform_job(**transform_request(cfg, name, name, f"s3://{bucket}/{prefix}/input",
                                                    f"s3://{bucket}/{prefix}/output"))
    except ClientError as exc:
        raise aws_error(exc, f"creating transform job {name}") from None
    log.info("created transform job %s: %d part(s) on %d x %s (%s, image %s)", name, len(parts), cfg.instance_count,
             cfg.sagemaker_instance_type, choice.variant, image)
    return name, bucket, prefix


def run_transform(cfg, dest: Path, aws: Aws | None = None, poll: float = POLL_SECONDS) -> dict:
    """Score ``cfg.input`` with a Batch Transform job; write ``dest`` as predict.py does locally."""
    from ...predict.scoring import choose, scorer_info

    from ..config import is_gpu_instance

    start = time.perf_counter()
    choice = choose(cfg, gpu=is_gpu_instance(cfg.sagemaker_instance_type))
    info = scorer_info(cfg, choice)
    aws = aws or Aws(cfg.aws_region, cfg.aws_profile)
    aws.identity()
    work = Path(tempfile.mkdtemp(prefix="bertopt-transform-"))
    try:
        if str(cfg.input).startswith("s3://"):
            local = common.download(aws, cfg.input, work / "source" / cfg.input.rsplit("/", 1)[1])
            cfg = SimpleNamespace(**{**cfg.to_dict(), "input": str(local)})
        parts, bad = write_parts(cfg, info, work)
        name, bucket, prefix = _create(aws, cfg, choice, work, parts)
        if cfg.detach:
            log.info("detached: transform job %s writes s3://%s/%s/output/", name, bucket, prefix)
            return {"rows": 0, "job": name, "bad_rows": [row for row, _ in bad]}
        desc = common.watch(aws, common.TRANSFORM, name, poll=poll)
        outputs = work / "output"
        for part in parts:
            common.download(aws, f"s3://{bucket}/{prefix}/output/{part.name}.out", outputs / f"{part.name}.out")
        n = reassemble(parts, outputs, info, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - start
    billable = _billable(desc)
    return {"rows": n, "job": name, "seconds": round(seconds, 1), "bad_rows": [row for row, _ in bad],
            "billable_instance_seconds": billable,
            "estimated_cost_usd": common.estimated_cost(cfg.sagemaker_instance_type, billable, 1)}


def _billable(desc: dict):
    """Instance-seconds the job ran (start to end x instances; transform jobs report no billable time)."""
    start, end = desc.get("TransformStartTime"), desc.get("TransformEndTime")
    if not start or not end:
        return None
    count = (desc.get("TransformResources") or {}).get("InstanceCount") or 1
    return round((end - start).total_seconds() * count, 1)
