"""SageMaker instance facts the deploy and the load test use: vCPUs per instance type, the serving
thread plan derived from them, and a pinned, dated on-demand price table (cost per million requests).

No boto3 and no network here: prices are pinned (AWS has no price API without credentials and the
numbers must be reproducible in the report). Check https://aws.amazon.com/sagemaker/pricing/ before
relying on them; update PRICES_AS_OF with the table."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

# vCPUs of the real-time inference instance types (EC2 instance facts)
VCPUS = {
    "ml.t2.medium": 2, "ml.t3.medium": 2,
    "ml.m5.large": 2, "ml.m5.xlarge": 4, "ml.m5.2xlarge": 8, "ml.m5.4xlarge": 16,
    "ml.c5.large": 2, "ml.c5.xlarge": 4, "ml.c5.2xlarge": 8, "ml.c5.4xlarge": 16,
    "ml.c6i.large": 2, "ml.c6i.xlarge": 4, "ml.c6i.2xlarge": 8,
    "ml.g4dn.xlarge": 4, "ml.g5.xlarge": 4, "ml.g5.2xlarge": 8,
}

# SageMaker real-time inference, on demand, us-east-1, USD per instance-hour
PRICES_AS_OF = "2025-10"
PRICES_REGION = "us-east-1"
PRICES_SOURCE = ("SageMaker real-time inference on-demand list prices, us-east-1, as of 2025-10 "
                 "(ml.m5.xlarge $0.269/h and ml.g5.xlarge $1.41/h as published; the other m5 sizes scale "
                 "linearly with size in the m5 family); verify at https://aws.amazon.com/sagemaker/pricing/")
PRICE_PER_HOUR = {
    "ml.m5.large": 0.1345, "ml.m5.xlarge": 0.269, "ml.m5.2xlarge": 0.538, "ml.m5.4xlarge": 1.076,
    "ml.g5.xlarge": 1.41,
}
# CloudWatch: a standard-resolution metric alarm, USD per alarm-month (us-east-1); Application Auto
# Scaling itself is free, but target tracking creates two such alarms and the instances it adds are billed
ALARM_PRICE_PER_MONTH = 0.10


# every server process: the tokenizer's own thread pool only competes with the model and HTTP threads
# for a request's few short texts
SERVING_ENV = {"TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class ThreadPlan:
    """How a server uses the vCPUs: model-server worker processes, intra-op threads per model run
    (ONNX Runtime / torch), HTTP threads (local server) and micro-batch runner threads (local
    server with batching: concurrent model runs in one process)."""

    vcpus: int
    workers: int
    model_threads: int
    http_threads: int
    batch_runners: int = 1

    @property
    def concurrent_runs(self) -> int:
        """Model runs one local server process makes at once (its HTTP threads per request, or its
        batch runners): OpenVINO compiles that many CPU streams (BERTOPT_MODEL_STREAMS)."""
        return max(1, self.vcpus // self.model_threads)

    def container_env(self) -> dict:
        """The SageMaker container's environment: the Hugging Face toolkit's model server starts
        ``SAGEMAKER_MODEL_SERVER_WORKERS`` processes with this many model threads each; a worker
        answers one request at a time, so one model stream each."""
        return {"SAGEMAKER_MODEL_SERVER_WORKERS": str(self.workers), "BERTOPT_THREADS": str(self.model_threads),
                "OMP_NUM_THREADS": str(self.model_threads), "BERTOPT_MODEL_STREAMS": "1", **SERVING_ENV}


def local_vcpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def thread_plan(vcpus: int, batching: bool = True, gpu: bool = False) -> ThreadPlan:
    """Workers and threads for ``vcpus``. On CPU, with up to 2 vCPUs one intra-op thread per model
    run and concurrent runs (ONNX Runtime releases the GIL), larger hosts up to 4 intra-op threads
    a run. Per request: that many runs at once (on SageMaker as many model-server workers, which
    answer one request at a time: 1 worker on 2 vCPUs left one idle; the local server runs them on
    its HTTP threads in one process); micro-batching: one process with as many batch runners, and
    enough HTTP threads to hold the waiting requests. Measured on 2 vCPUs, INT8 MiniLM, the model
    alone: per request 2 x 1 thread 1,935 texts/s against 970 at 2 threads a run; batches of 32,
    2 runners x 1 thread 3,223 against 2,340 for 1 runner x 2 threads. On a GPU, one worker (one
    runner) with every vCPU."""
    vcpus = max(1, int(vcpus))
    if gpu:
        return ThreadPlan(vcpus, 1, vcpus, max(32, 4 * vcpus))
    threads = 1 if vcpus <= 2 else min(4, vcpus)
    runs = max(1, vcpus // threads)
    if batching:
        return ThreadPlan(vcpus, 1, threads, max(32, 4 * vcpus), batch_runners=runs)
    return ThreadPlan(vcpus, runs, threads, max(4, 2 * vcpus))


def instance_plan(instance_type: str, gpu: bool = False) -> Optional[ThreadPlan]:
    """The SageMaker container's plan (model-server workers, per request), or None for an unknown type."""
    vcpus = VCPUS.get(instance_type)
    return thread_plan(vcpus, batching=False, gpu=gpu) if vcpus else None


def cost_per_million(requests_per_s: float, instance_type: str) -> Optional[float]:
    """USD per million requests for one instance serving ``requests_per_s`` around the clock."""
    price = PRICE_PER_HOUR.get(instance_type)
    if not price or not requests_per_s or requests_per_s <= 0:
        return None
    return round(price / (requests_per_s * 3600.0) * 1e6, 4)
