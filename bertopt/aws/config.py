"""Configuration of aws_deploy.py / aws_cleanup.py: dataclasses, flags, pinned container images.

No boto3 here: this module is imported by ``--help`` and by main.py's stage table."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .. import cli
from ..config import CommonConfig

PROJECT = "bertopt"
PROJECT_TAG = "bertopt:project"
DEPLOYMENT_TAG = "bertopt:deployment-id"
DEFAULT_ENDPOINT = "bertopt-sentiment"
LOG_GROUP_PREFIX = "/aws/sagemaker/Endpoints/"

# The Hugging Face PyTorch inference DLC (SageMaker Hugging Face Inference Toolkit: it runs
# code/inference.py's model_fn/input_fn/predict_fn/output_fn). Pinned; --image-uri overrides.
# Source: https://aws.github.io/deep-learning-containers/reference/available_images/
IMAGE_REPOSITORY = "huggingface-pytorch-inference"
IMAGE_TAGS = {
    "cpu": "2.6.0-transformers5.5.3-cpu-py312-ubuntu22.04",
    "gpu": "2.6.0-transformers5.5.3-gpu-py312-cu124-ubuntu22.04",
}
CONTAINER_PYTHON = "3.12"  # the DLC's Python: vendored wheels must fit it (cp312 / py3 / abi3)
# The GPU image above is CUDA 12.4 + cuDNN 9. onnxruntime-gpu on PyPI is a CUDA 13 build from 1.27 on
# (the machine's own version, e.g. 1.31, would not start its CUDA EP there and the endpoint would
# serve from the CPU), so the GPU archive pins a CUDA 12.x / cuDNN 9 build for Python 3.12.
GPU_ORT_REQUIREMENT = "onnxruntime-gpu==1.20.2"
# ECR registry account of the Deep Learning Containers per region (763104351884 unless listed)
DLC_STANDARD_ACCOUNT = "763104351884"
DLC_STANDARD_REGIONS = (
    "us-east-1", "us-east-2", "us-west-1", "us-west-2", "ca-central-1", "sa-east-1",
    "eu-central-1", "eu-north-1", "eu-west-1", "eu-west-2", "eu-west-3",
    "ap-northeast-1", "ap-northeast-2", "ap-south-1", "ap-southeast-1", "ap-southeast-2",
)
DLC_OTHER_ACCOUNTS = {
    "af-south-1": "626614931356",
    "ap-east-1": "871362719292",
    "ap-northeast-3": "364406365360",
    "eu-south-1": "692866216735",
    "me-south-1": "217643126080",
    "cn-north-1": "727897471807",
    "cn-northwest-1": "727897471807",
}
SERVERLESS_MEMORY = (1024, 2048, 3072, 4096, 5120, 6144)
TRAFFIC_MODES = ("all-at-once", "canary")
GPU_INSTANCE_FAMILIES = ("ml.g", "ml.p")

_ACCOUNT = re.compile(r"^\d{12}$")
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::(\d{12}):role/[\w+=,.@/-]{1,512}$")
_SM_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REPO = re.compile(r"^(?:[a-z0-9]+(?:[._-][a-z0-9]+)*/)*[a-z0-9]+(?:[._-][a-z0-9]+)*$")
NAME_SUFFIX_LEN = 16  # "-YYYYmmdd-HHMMSS" appended to model / endpoint-config names


def is_gpu_instance(instance_type: str) -> bool:
    return instance_type.startswith(GPU_INSTANCE_FAMILIES)


def dlc_image_uri(region: str, gpu: bool) -> str | None:
    """The pinned Hugging Face inference image for a region, or None if none is pinned there."""
    if region in DLC_STANDARD_REGIONS:
        account = DLC_STANDARD_ACCOUNT
    elif region in DLC_OTHER_ACCOUNTS:
        account = DLC_OTHER_ACCOUNTS[region]
    else:
        return None
    domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"{account}.dkr.ecr.{region}.{domain}/{IMAGE_REPOSITORY}:{IMAGE_TAGS['gpu' if gpu else 'cpu']}"


def role_account(role_arn: str) -> str | None:
    m = _ROLE_ARN.match(role_arn or "")
    return m.group(1) if m else None


@dataclass
class AwsConfig(CommonConfig):
    """Flags shared by aws_deploy.py and aws_cleanup.py."""

    aws_region: Optional[str] = None
    aws_profile: Optional[str] = None
    max_attempts: int = 8          # botocore "standard" retry mode: attempts per API call
    wait_timeout: float = 1800.0   # seconds to wait for InService / deletion
    poll_seconds: float = 15.0     # seconds between status checks while waiting

    def problems(self) -> list[str]:
        p = super().problems()
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            p.append(f"--max-attempts must be a positive integer (got {self.max_attempts!r})")
        if not (self.wait_timeout > 0):
            p.append(f"--wait-timeout must be > 0 seconds (got {self.wait_timeout})")
        if not (self.poll_seconds > 0):
            p.append(f"--poll-seconds must be > 0 (got {self.poll_seconds})")
        if self.aws_region is not None and not re.match(r"^[a-z]{2}(-[a-z]+)+-\d$", self.aws_region):
            p.append(f"--aws-region {self.aws_region!r} is not a region name like us-east-1")
        return p


@dataclass
class AwsDeployConfig(AwsConfig):
    """aws_deploy.py: package the chosen model, upload it and create a SageMaker endpoint."""

    aws_account_id: Optional[str] = None
    aws_role_arn: Optional[str] = None
    endpoint_name: str = DEFAULT_ENDPOINT
    variant: Optional[str] = None       # e.g. ort-int8 / int8 / baseline:int8 / torch
    model_path: Optional[str] = None    # an .onnx file, OpenVINO .xml or model directory (aws_deploy.py --model-path)
    bucket: Optional[str] = None        # default bertopt-<account>-<region>
    s3_prefix: str = "bertopt"
    instance_type: str = "ml.m5.large"
    instance_count: int = 1
    serverless_memory: Optional[int] = None
    serverless_concurrency: int = 5
    image_uri: Optional[str] = None
    repository_name: Optional[str] = None  # an ECR repository of your account holding the image
    vendor_wheels: Optional[str] = None
    keep_on_failure: bool = False
    prepare: bool = False
    finish: bool = False
    local: bool = False
    host: str = "127.0.0.1"
    port: int = 8080
    local_threads: Optional[int] = None  # default: from the vCPUs (instances.thread_plan)
    smoke_test: bool = True
    max_batch: int = 64
    max_chars: int = 10000
    batching: bool = True                # local server: micro-batch concurrent requests
    batch_wait_ms: float = 0.0          # what queued while a batch ran joins the next; > 0 also waits
    batch_max_texts: int = 64
    # blue/green update of the live endpoint
    update: bool = False
    traffic: str = "all-at-once"
    canary_percent: int = 10
    canary_wait: int = 300
    # Application Auto Scaling (target tracking) and CloudWatch alarms
    min_instances: Optional[int] = None
    max_instances: Optional[int] = None
    target_invocations: float = 100.0    # SageMakerVariantInvocationsPerInstance (per minute)
    alarms: bool = False
    alarm_p99_ms: float = 1000.0
    alarm_5xx: int = 5                   # Invocation5XXErrors per minute

    def problems(self) -> list[str]:
        p = super().problems()
        if self.aws_account_id is not None and not _ACCOUNT.match(str(self.aws_account_id)):
            p.append(f"--aws-account-id must be a 12-digit AWS account id (got {self.aws_account_id!r})")
        if self.aws_role_arn is not None:
            acct = role_account(self.aws_role_arn)
            if acct is None:
                p.append(f"--aws-role-arn must be an IAM role ARN like arn:aws:iam::123456789012:role/NAME "
                         f"(got {self.aws_role_arn!r})")
            elif self.aws_account_id and acct != str(self.aws_account_id):
                p.append(f"--aws-role-arn belongs to account {acct}, not --aws-account-id {self.aws_account_id}")
        elif not (self.prepare or self.local):
            p.append("--aws-role-arn is required: the SageMaker execution role the endpoint runs as "
                     "(never created implicitly; see README 'Deploy to SageMaker')")
        name = self.endpoint_name or ""
        if not _SM_NAME.match(name) or len(name) > 63 - NAME_SUFFIX_LEN:
            p.append(f"--endpoint-name must be letters, digits and hyphens, at most {63 - NAME_SUFFIX_LEN} "
                     f"characters (got {name!r})")
        if sum(bool(x) for x in (self.prepare, self.finish, self.local)) > 1:
            p.append("give only one of --prepare, --finish and --local")
        if self.variant and self.model_path:
            p.append("give only one of --variant and --model-path")
        if not str(self.instance_type).startswith("ml."):
            p.append(f"--instance-type must be a SageMaker instance type like ml.m5.large (got {self.instance_type!r})")
        if not isinstance(self.instance_count, int) or self.instance_count < 1:
            p.append(f"--instance-count must be a positive integer (got {self.instance_count!r})")
        if self.serverless_memory is not None and self.serverless_memory not in SERVERLESS_MEMORY:
            p.append(f"--serverless-memory must be one of {', '.join(map(str, SERVERLESS_MEMORY))} MB "
                     f"(got {self.serverless_memory})")
        if not isinstance(self.serverless_concurrency, int) or not 1 <= self.serverless_concurrency <= 200:
            p.append(f"--serverless-concurrency must be 1..200 (got {self.serverless_concurrency!r})")
        if self.bucket is not None and (not _BUCKET.match(self.bucket) or ".." in self.bucket):
            p.append(f"--bucket {self.bucket!r} is not a valid S3 bucket name (3-63 lowercase letters, digits, "
                     "dots, hyphens)")
        if self.repository_name is not None and not _REPO.match(self.repository_name.split(":")[0]):
            p.append(f"--repository-name {self.repository_name!r} is not a valid ECR repository name")
        if self.image_uri is not None and self.repository_name is not None:
            p.append("give only one of --image-uri and --repository-name")
        if self.vendor_wheels is not None and not Path(self.vendor_wheels).is_dir():
            p.append(f"--vendor-wheels {self.vendor_wheels}: no such directory")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            p.append(f"--port must be 0..65535 (got {self.port!r})")
        for name in ("local_threads", "max_batch", "max_chars", "batch_max_texts", "canary_wait", "alarm_5xx",
                     "min_instances", "max_instances"):
            value = getattr(self, name)
            if value is None and name in ("local_threads", "min_instances", "max_instances"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                p.append(f"--{name.replace('_', '-')} must be a positive integer (got {value!r})")
        p += self._operate_problems()
        if not (self.s3_prefix or "").strip("/"):
            p.append("--s3-prefix must not be empty")
        return p

    def _operate_problems(self) -> list[str]:
        p = []
        if not (isinstance(self.batch_wait_ms, (int, float)) and 0 <= self.batch_wait_ms <= 1000):
            p.append(f"--batch-wait-ms must be 0..1000 ms (got {self.batch_wait_ms!r})")
        if self.traffic not in TRAFFIC_MODES:
            p.append(f"--traffic must be one of {', '.join(TRAFFIC_MODES)} (got {self.traffic!r})")
        if not isinstance(self.canary_percent, int) or not 1 <= self.canary_percent <= 50:
            p.append(f"--canary-percent must be 1..50 (got {self.canary_percent!r})")
        if self.update and (self.prepare or self.finish or self.local):
            p.append("--update replaces the model of the live endpoint; it does not combine with --prepare, "
                     "--finish or --local")
        if self.autoscaling:
            if self.serverless:
                p.append("--min-instances/--max-instances are for instance endpoints (serverless scales itself)")
            lo, hi = self.min_instances or self.instance_count, self.max_instances or self.instance_count
            if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
                p.append(f"--min-instances {lo} is above --max-instances {hi}")
        if not (isinstance(self.target_invocations, (int, float)) and self.target_invocations > 0):
            p.append(f"--target-invocations must be > 0 per instance and minute (got {self.target_invocations!r})")
        if not (isinstance(self.alarm_p99_ms, (int, float)) and self.alarm_p99_ms > 0):
            p.append(f"--alarm-p99-ms must be > 0 (got {self.alarm_p99_ms!r})")
        if self.alarms and self.serverless:
            p.append("--alarms watch instance endpoints' ModelLatency; not available with --serverless-memory")
        return p

    @property
    def autoscaling(self) -> bool:
        return self.min_instances is not None or self.max_instances is not None

    @property
    def serverless(self) -> bool:
        return self.serverless_memory is not None

    @property
    def gpu(self) -> bool:
        return not self.serverless and is_gpu_instance(self.instance_type)


@dataclass
class AwsCleanupConfig(AwsConfig):
    """aws_cleanup.py: delete what aws_deploy.py created (and, with --all, anything tagged)."""

    endpoint_name: Optional[str] = None    # also remove this endpoint (and its config/model) if tagged
    repository_name: Optional[str] = None  # also remove this ECR repository if tagged
    cleanup_all: bool = False
    dry_run: bool = False
    cleanup_aws: bool = False  # main.py's switch for this stage

    def problems(self) -> list[str]:
        p = super().problems()
        if self.endpoint_name is not None and not _SM_NAME.match(self.endpoint_name):
            p.append(f"--endpoint-name {self.endpoint_name!r} is not a valid SageMaker endpoint name")
        if self.repository_name is not None and not _REPO.match(self.repository_name.split(":")[0]):
            p.append(f"--repository-name {self.repository_name!r} is not a valid ECR repository name")
        return p


# ----------------------------------------------------------------------------------------- flags
def _add_aws_common(parser) -> None:
    g = parser.add_argument_group("AWS (credentials come from the standard boto3 chain: "
                                  "AWS_PROFILE / environment / instance role)")
    cli.add_aws_flag(g, "--aws-region")
    cli.add_aws_flag(g, "--aws-profile")
    cli.add(g, "--endpoint-name", "--model-name", "--model_name", dest="endpoint_name", metavar="NAME",
            help=f"SageMaker endpoint name (deploy default: {DEFAULT_ENDPOINT}); model and endpoint-config "
                 "names add a timestamp")
    cli.add(g, "--repository-name", "--repository_name", dest="repository_name", metavar="REPO[:TAG]",
            help="deploy: use this ECR repository of your account as the image; cleanup: also delete it "
                 "(only if tagged bertopt:project)")
    cli.add(g, "--max-attempts", type=int, metavar="N",
            help="attempts per AWS call, botocore standard retry mode with backoff (default: 8)")
    cli.add(g, "--wait-timeout", type=float, metavar="S",
            help="seconds to wait for InService / deletion (default: 1800)")
    cli.add(g, "--poll-seconds", type=float, metavar="S", help="seconds between status checks (default: 15)")


def add_deploy_args(parser) -> None:
    cli.add_common_args(parser)
    _add_aws_common(parser)
    g = parser.add_argument_group("deploy")
    cli.add(g, "--aws-account-id", "--aws_account_id", dest="aws_account_id", metavar="ID",
            help="expected AWS account id (checked against the credentials before anything is created; "
                 "main.py: enables the aws_deploy stage)")
    cli.add_aws_flag(g, "--aws-role-arn")
    cli.add(g, "--variant", dest="variant", metavar="NAME",
            help="deploy this variant instead of compare.py's recommendation: ort-int8 / int8 / "
                 "baseline:int8 (ONNX variant of a trained stage) or torch / baseline:torch")
    cli.add_aws_flag(g, "--bucket")
    cli.add_aws_flag(g, "--s3-prefix")
    cli.add(g, "--instance-type", metavar="TYPE", help="real-time instance type (default: ml.m5.large)")
    cli.add_aws_flag(g, "--instance-count")
    cli.add(g, "--serverless-memory", type=int, metavar="MB",
            help="create a serverless endpoint with this memory (1024..6144) instead of instances")
    cli.add(g, "--serverless-concurrency", type=int, metavar="N", help="serverless max concurrency (default: 5)")
    cli.add_aws_flag(g, "--image-uri")
    cli.add(g, "--vendor-wheels", metavar="DIR",
            help="ship the wheels in DIR inside model.tar.gz; the endpoint installs with --no-index")
    cli.add(g, "--keep-on-failure", action="store_true", default=None,
            help="keep what this run created when the endpoint fails (default: roll back)")
    cli.add(g, "--prepare", action="store_true", default=None, help="two-step mode: package and upload only")
    cli.add(g, "--finish", action="store_true", default=None,
            help="two-step mode: create model, endpoint config and endpoint from the --prepare upload")
    cli.add(g, "--no-smoke-test", dest="smoke_test", action="store_false", default=None,
            help="do not invoke the endpoint after it is InService")
    cli.add(g, "--max-batch", type=int, metavar="N", help="max texts per request (default: 64)")
    cli.add(g, "--max-chars", type=int, metavar="N", help="max characters per text (default: 10000)")
    g = parser.add_argument_group("operate the endpoint (blue/green update, autoscaling, alarms)")
    cli.add(g, "--update", action="store_true", default=None,
            help="blue/green update of the live endpoint: new model + endpoint config, UpdateEndpoint, wait, "
                 "smoke test, then delete the old model/config; on any failure it stays on the old config")
    cli.add(g, "--traffic", choices=TRAFFIC_MODES,
            help="--update traffic shifting: all-at-once (default) or canary (--canary-percent first)")
    cli.add(g, "--canary-percent", type=int, metavar="P",
            help="canary: share of the capacity that gets the new model first (default: 10)")
    cli.add(g, "--canary-wait", type=int, metavar="S",
            help="seconds between traffic shifts, watching the rollback alarms (default: 300)")
    cli.add(g, "--min-instances", type=int, metavar="N",
            help="autoscaling: register the variant with Application Auto Scaling (default min: --instance-count)")
    cli.add(g, "--max-instances", type=int, metavar="N", help="autoscaling: most instances (default: --instance-count)")
    cli.add(g, "--target-invocations", type=float, metavar="N",
            help="autoscaling target: invocations per instance and minute (default: 100)")
    cli.add(g, "--alarms", action="store_true", default=None,
            help="create CloudWatch alarms on ModelLatency p99 and 5XX errors (tagged; rollback alarms of --update)")
    cli.add(g, "--alarm-p99-ms", type=float, metavar="MS", help="ModelLatency p99 alarm threshold (default: 1000)")
    cli.add(g, "--alarm-5xx", type=int, metavar="N", help="5XX errors per minute that raise the alarm (default: 5)")
    g = parser.add_argument_group("local endpoint (no AWS account needed)")
    cli.add(g, "--local", action="store_true", default=None,
            help="serve model.tar.gz locally over the SageMaker container contract (GET /ping, POST /invocations)")
    cli.add(g, "--host", metavar="ADDR", help="local endpoint address (default: 127.0.0.1)")
    cli.add(g, "--port", type=int, metavar="N", help="local endpoint port (default: 8080; 0 = any free port)")
    cli.add(g, "--local-threads", type=int, metavar="N",
            help="local endpoint HTTP threads (default: from the vCPUs; 4 x vCPUs, at least 32, with batching)")
    cli.add(g, "--no-batching", dest="batching", action="store_false", default=None,
            help="local endpoint: run each request alone (default: micro-batch concurrent requests)")
    cli.add(g, "--batch-wait-ms", type=float, metavar="MS",
            help="micro-batching: also wait up to MS for more requests after the first (default: 0: a batch is "
                 "what queued while the previous one ran)")
    cli.add(g, "--batch-max-texts", type=int, metavar="N", help="micro-batching: most texts per batch (default: 64)")


def add_cleanup_args(parser) -> None:
    cli.add_common_args(parser)
    _add_aws_common(parser)
    g = parser.add_argument_group("cleanup")
    cli.add(g, "--all", dest="cleanup_all", action="store_true", default=None,
            help="also find resources by the bertopt:project tag (in the region), not only deployment.json")
    cli.add(g, "--dry-run", action="store_true", default=None, help="list what would be deleted; delete nothing")
    cli.add(g, "--cleanup-aws", "--cleanup_aws", dest="cleanup_aws", action="store_true", default=None,
            help="main.py: run the aws_cleanup stage")


def build_deploy(ns, standalone: bool = False) -> AwsDeployConfig:
    """From parsed flags. In aws_deploy.py, --model/--model-path names the model to deploy; in main.py
    it is the base model of the fine-tune, so there the deploy uses compare.py's recommendation."""
    overrides = {}
    if standalone and getattr(ns, "model", None):
        overrides["model_path"] = ns.model
    return cli.build_config(AwsDeployConfig, ns, **overrides)


def build_cleanup(ns) -> AwsCleanupConfig:
    return cli.build_config(AwsCleanupConfig, ns)


def deploy_enabled(ns) -> bool:
    return bool(getattr(ns, "aws_account_id", None) or getattr(ns, "aws_role_arn", None))


def cleanup_enabled(ns) -> bool:
    return bool(getattr(ns, "cleanup_aws", None))
