"""Helpers shared by the AWS tests (this module holds no tests): a tiny exported ONNX classifier laid
out like the onnx stage's output, a compare.py-style results.json, and a moto server on 127.0.0.1."""
from __future__ import annotations

import contextlib
import json
import shutil
import urllib.request
import warnings
from pathlib import Path

LABELS = ["negative", "positive"]
ACCOUNT = "123456789012"  # moto's account
ROLE = f"arn:aws:iam::{ACCOUNT}:role/bertopt-test-role"
REGION = "us-east-1"
SECRET = "bertoptTESTsecretKEYdoNOTlog0123456789abcd"


def tiny_stages(base: Path, tiny_model_dir: str) -> Path:
    """``<base>/saved_models`` with baseline/ (torch model + manifest) and onnx/baseline/ (model.onnx,
    a cuda-only model.fp16.onnx, tokenizer, config.json, manifest with fp32 ok / int8 rejected /
    fp16 ok on cuda). Built once per base directory."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from bertopt import artifacts

    out = Path(base) / "saved_models"
    onnx_dir = out / "onnx" / "baseline"
    if artifacts.read_manifest(onnx_dir):
        return out
    baseline = out / "baseline"
    model = BertForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    model.config.id2label = dict(enumerate(LABELS))
    model.config.label2id = {n: i for i, n in enumerate(LABELS)}
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model.save_pretrained(baseline)
    tok.save_pretrained(baseline)
    artifacts.write_manifest(baseline, stage="baseline", status="ok", config={"max_length": 64}, fingerprint="t",
                             metrics={"best_eval_accuracy": 0.5})
    onnx_dir.mkdir(parents=True)
    ids = torch.ones(2, 8, dtype=torch.long)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer chatter
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids, ids, torch.zeros_like(ids)), str(onnx_dir / "model.onnx"), dynamo=False,
                          input_names=names, output_names=["logits"], opset_version=17,
                          dynamic_axes={**{n: {0: "batch", 1: "seq"} for n in names}, "logits": {0: "batch"}})
    shutil.copy(onnx_dir / "model.onnx", onnx_dir / "model.fp16.onnx")
    tok.save_pretrained(onnx_dir)
    model.config.save_pretrained(onnx_dir)
    variants = {
        "fp32": {"file": "model.onnx", "precision": "fp32", "status": "ok", "reason": None, "devices": ["cpu"]},
        "int8": {"file": "model.int8.onnx", "precision": "int8", "status": "rejected",
                 "reason": "accuracy drop 2.0 points > 1.0", "devices": ["cpu"]},
        "fp16": {"file": "model.fp16.onnx", "precision": "fp16", "status": "ok", "reason": None, "devices": ["cuda"]},
    }
    artifacts.write_manifest(onnx_dir, stage="onnx", status="ok", config={"max_length": 64}, fingerprint="t",
                             metrics={"source": "baseline", "source_dir": str(baseline), "label_names": LABELS,
                                      "variants": variants})
    return out


def write_results(reports: Path, saved: Path, recommendation="onnx") -> Path:
    """A compare.py-style results.json recommending the fp32 ONNX model (or the torch baseline, a
    TensorRT engine, nothing, or the given dict)."""
    reports = Path(reports)
    reports.mkdir(parents=True, exist_ok=True)
    if isinstance(recommendation, dict):
        rec = recommendation
    elif recommendation == "onnx":
        rec = {"variant": "ort-fp32", "backend": "onnxruntime", "precision": "fp32", "source": "baseline",
               "path": str(saved / "onnx" / "baseline" / "model.onnx"), "model_dir": str(saved / "onnx" / "baseline"),
               "reason": "fastest variant within 1 point of the baseline"}
    elif recommendation == "torch":
        rec = {"variant": "torch-fp32", "backend": "torch", "precision": "fp32", "source": "baseline",
               "path": str(saved / "baseline"), "model_dir": str(saved / "baseline"), "reason": "test"}
    elif recommendation == "tensorrt":
        rec = {"variant": "trt-fp16", "backend": "tensorrt", "precision": "fp16", "source": "baseline",
               "path": str(saved / "tensorrt" / "baseline" / "model.fp16.plan"), "model_dir": str(saved / "baseline"),
               "reason": "test"}
    else:
        rec = None
    path = reports / "results.json"
    path.write_text(json.dumps({"recommendation": rec}))
    return path


@contextlib.contextmanager
def moto_server():
    """A moto server on 127.0.0.1 (a free port); yields its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def moto_post(url: str, path: str, payload=None) -> None:
    data = json.dumps(payload).encode() if payload is not None else b""
    req = urllib.request.Request(url + path, data=data, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()


def aws_env(monkeypatch, url: str | None, credentials: bool = True) -> None:
    """boto3 talks only to the moto server: fake credentials, no profile files, no instance metadata."""
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/bertopt-aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/bertopt-aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    if url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    if credentials:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTBERTOPT00000")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
