"""The smoke test of a deployed endpoint: a few sentences must come back as one {label, score}
prediction each, and the endpoint must say (``{"describe": true}``) that it serves from the device
it was deployed for, so a GPU endpoint whose container fell back to the CPU is not a success.
A failure is a PipelineError; the deploy and the update roll back on it.
"""
from __future__ import annotations

import json

from ..errors import PipelineError
from .session import Aws, aws_error

SMOKE_TEXTS = ["A gripping, beautifully acted film that stays with you.",
               "Dull, predictable and far too long.",
               "The soundtrack is fine."]


def _invoke(aws: Aws, endpoint: str, payload: dict) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        resp = aws.client("sagemaker-runtime").invoke_endpoint(
            EndpointName=endpoint, ContentType="application/json", Accept="application/json",
            Body=json.dumps(payload).encode())
        return resp["Body"].read()
    except ClientError as exc:
        original = exc.response.get("OriginalMessage")
        if original is not None:  # ModelError: the container answered; MMS's or the handler's envelope
            from .answers import describe

            raise PipelineError(f"smoke test: endpoint {endpoint} refused the request: "
                                f"{describe(exc.response.get('OriginalStatusCode'), original)}") from None
        raise aws_error(exc, f"invoking endpoint {endpoint}") from None
    except BotoCoreError as exc:
        raise aws_error(exc, f"invoking endpoint {endpoint}") from None


def check_device(aws: Aws, endpoint: str, device: str) -> dict:
    """Ask the endpoint's handler what it serves from (``{"describe": true}``): PipelineError unless
    its device is ``device``, so a GPU endpoint whose container fell back to the CPU is not called
    a success (its model_fn refuses a CPU fallback; this checks it from the outside)."""
    body = _invoke(aws, endpoint, {"describe": True})
    try:
        info = json.loads(body)
    except ValueError:
        info = None
    if not isinstance(info, dict) or "device" not in info:
        raise PipelineError(f"smoke test: endpoint {endpoint} did not describe its model ({body[:200]!r}); "
                            "is it serving a bertopt model.tar.gz?")
    if info["device"] != device:
        raise PipelineError(f"smoke test: endpoint {endpoint} serves from {info['device']} (providers "
                            f"{info.get('providers')}), but it was deployed for {device}")
    return info


def serving_device(cfg) -> str:
    """The device an endpoint deployed with ``cfg`` must serve from."""
    return "cuda" if cfg.gpu else "cpu"


def smoke_test(aws: Aws, endpoint: str, label_names: list, device: str = "cpu") -> list:
    """Invoke the endpoint with a few sentences, then check the device it serves from; PipelineError
    if the answer is not as specified."""
    body = _invoke(aws, endpoint, {"inputs": SMOKE_TEXTS})
    try:
        preds = json.loads(body)
        ok = (isinstance(preds, list) and len(preds) == len(SMOKE_TEXTS)
              and all(p.get("label") in label_names and 0.0 <= float(p.get("score")) <= 1.0 for p in preds))
    except (ValueError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise PipelineError(f"smoke test: endpoint {endpoint} answered {body[:200]!r}, expected "
                            f"{len(SMOKE_TEXTS)} {{label, score}} predictions")
    for text, p in zip(SMOKE_TEXTS, preds):
        print(f"  {p['label']:>10s} {float(p['score']):.3f}  {text}")
    info = check_device(aws, endpoint, device)
    print(f"  serving from {info['device']} ({info.get('backend')}, {info.get('variant')})")
    return preds
