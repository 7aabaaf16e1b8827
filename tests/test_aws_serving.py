"""The SageMaker handler (code/inference.py), the archive it ships in, and the local endpoint that
serves that archive over HTTP (GET /ping, POST /invocations) on 127.0.0.1."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from test_aws_support import LABELS, tiny_stages, write_results

from bertopt.aws.choice import resolve_model
from bertopt.errors import ConfigError, MissingArtifact, PipelineError


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model_dir) -> Path:
    return tiny_stages(tmp_path_factory.getbasetemp() / "aws_tiny", tiny_model_dir)


def cfg_for(tmp_path, saved, **kw):
    from bertopt.aws.config import AwsDeployConfig

    kw.setdefault("model_path", str(saved / "onnx" / "baseline" / "model.onnx"))
    return AwsDeployConfig(output_dir=str(tmp_path / "out"), reports_dir=str(tmp_path / "reports"), local=True,
                           port=0, quiet=True, **kw)


@pytest.fixture(scope="module")
def served(tmp_path_factory, saved):
    """The local endpoint serving a real model.tar.gz built from the tiny ONNX model."""
    from bertopt.aws import local

    tmp = tmp_path_factory.mktemp("served")
    archive, model_dir, handler, model = local.prepare_local(cfg_for(tmp, saved, max_batch=8, max_chars=200))
    endpoint = local.LocalEndpoint(local.InvocationsApp(handler, model), "127.0.0.1", 0, threads=4).start()
    yield {"endpoint": endpoint, "archive": archive, "model_dir": model_dir, "handler": handler, "model": model}
    endpoint.stop()


def http(url, path, body=None, content_type="application/json", method=None, accept=None):
    req = urllib.request.Request(url + path, data=body, method=method)
    if content_type:
        req.add_header("Content-Type", content_type)
    if accept:
        req.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers.get("Content-Type"), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type"), exc.read().decode()


# ------------------------------------------------------------------------------------ hooks
@pytest.fixture(scope="module")
def handler():
    from bertopt.aws.serving import inference

    return inference


@pytest.fixture(scope="module")
def model(handler, served):
    return handler.model_fn(str(served["model_dir"]))


def test_model_fn_takes_batch_runners_and_ort_spinning_from_the_environment(handler, served, monkeypatch):
    monkeypatch.setenv("BERTOPT_BATCH_WAIT_MS", "1")
    monkeypatch.setenv("BERTOPT_BATCH_RUNNERS", "3")
    monkeypatch.setenv("BERTOPT_ORT_SPINNING", "0")
    m = handler.model_fn(str(served["model_dir"]))
    try:
        assert len(m.batcher._threads) == 3
        opts = m.predictor.session.get_session_options()
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    finally:
        m.batcher.close()
    monkeypatch.setenv("BERTOPT_ORT_SPINNING", "on")
    assert handler.load_settings(str(served["model_dir"]))["ort_spinning"] is True
    monkeypatch.delenv("BERTOPT_ORT_SPINNING")
    assert handler.load_settings(str(served["model_dir"]))["ort_spinning"] is None  # ONNX Runtime's default
    for var, bad in (("BERTOPT_ORT_SPINNING", "maybe"), ("BERTOPT_BATCH_RUNNERS", "two")):
        monkeypatch.setenv(var, bad)
        with pytest.raises(ValueError, match=f"{var}='{bad}': expected"):
            handler.load_settings(str(served["model_dir"]))
        monkeypatch.delenv(var)


def test_input_fn_json_and_csv(handler):
    assert handler.input_fn('{"inputs": "a fine film"}', "application/json") == ["a fine film"]
    assert handler.input_fn(b'{"inputs": ["a", "b"]}', "application/json; charset=utf-8") == ["a", "b"]
    csv_body = 'good, really good\n"quoted, with comma"\n\n"spans\ntwo lines"\n'
    assert handler.input_fn(csv_body, "text/csv") == ["good, really good", "quoted, with comma", "spans\ntwo lines"]


@pytest.mark.parametrize("body,ctype,status,fragment", [
    (b'{"inputs": ', "application/json", 400, "malformed JSON"),
    (b'["a"]', "application/json", 400, "\"inputs\" key"),
    (b'{"inputs": 3}', "application/json", 400, "string or a list"),
    (b'{"inputs": ["ok", 5]}', "application/json", 400, "input 1 is int"),
    (b'{"inputs": []}', "application/json", 400, "no input texts"),
    (b'{"inputs": ["  "]}', "application/json", 400, "input 0 is empty"),
    (b'', "application/json", 400, "empty request body"),
    (b'\xff\xfe', "application/json", 400, "UTF-8"),
    (b'\n\n', "text/csv", 400, "no input texts"),
    (b'hello', "text/plain", 415, "text/plain"),
    (b'hello', None, 415, "missing Content-Type"),
])
def test_input_fn_rejects(handler, body, ctype, status, fragment):
    with pytest.raises(handler.RequestError) as err:
        handler.input_fn(body, ctype)
    assert err.value.status == status and fragment in str(err.value)
    assert json.loads(err.value.body()) == {"error": str(err.value), "status": status}


def test_model_fn_and_predict_match_the_torch_model(handler, model, saved):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["a wonderful, moving film", "boring and far too long", "the plot was fine"]
    out = handler.predict_fn(texts, model)
    assert [set(p) for p in out] == [{"label", "score"}] * 3
    assert model.label_names == LABELS and model.max_batch == 8 and model.max_chars == 200
    torch_model = AutoModelForSequenceClassification.from_pretrained(saved / "baseline").eval()
    enc = AutoTokenizer.from_pretrained(saved / "baseline")(texts, padding=True, truncation=True, max_length=64,
                                                             return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(torch_model(**enc).logits, dim=-1).numpy()
    assert [p["label"] for p in out] == [LABELS[i] for i in probs.argmax(1)]
    np.testing.assert_allclose([p["score"] for p in out], probs.max(1), atol=1e-4)


def test_predict_fn_limits(handler, model):
    with pytest.raises(handler.RequestError) as err:
        handler.predict_fn(["x"] * 9, model)
    assert err.value.status == 413 and "limit is 8" in str(err.value)
    with pytest.raises(handler.RequestError) as err:
        handler.predict_fn(["ok", "y" * 201], model)
    assert err.value.status == 413 and "input 1 has 201 characters" in str(err.value)


def test_output_fn(handler):
    pred = [{"label": "positive", "score": 0.9}]
    assert json.loads(handler.output_fn(pred, "application/json")) == pred
    assert json.loads(handler.output_fn(pred, "*/*")) == pred
    assert json.loads(handler.output_fn(pred, None)) == pred
    with pytest.raises(handler.RequestError) as err:
        handler.output_fn(pred, "text/html")
    assert err.value.status == 406


# ---------------------------------------------------------------------------------- archive
def test_archive_layout_and_reproducibility(tmp_path, saved, served):
    from bertopt.aws import packaging

    archive = served["archive"]
    assert archive.members == sorted([
        "code/bertopt_runtime/__init__.py", "code/bertopt_runtime/config.py", "code/bertopt_runtime/data.py",
        "code/bertopt_runtime/errors.py", "code/bertopt_runtime/families.py", "code/bertopt_runtime/hub.py", "code/bertopt_runtime/jsonl.py",
        "code/bertopt_runtime/logs.py", "code/bertopt_runtime/modeling.py", "code/bertopt_runtime/runtimes.py",
        "code/bertopt_runtime/tables.py", "code/bertopt_runtime/tasks.py", "code/bertopt_runtime/width.py", "code/inference.py", "code/requirements.txt", "config.json", "model.onnx", "serving.json",
        "tokenizer.json", "tokenizer_config.json"])
    with tarfile.open(archive.path) as tar:
        names = tar.getnames()
        assert "code" in names and all(not n.startswith(("/", "..")) for n in names)
        handler_src = tar.extractfile("code/inference.py").read()
        runtimes_src = tar.extractfile("code/bertopt_runtime/runtimes.py").read()
        settings = json.loads(tar.extractfile("serving.json").read())
        reqs = tar.extractfile("code/requirements.txt").read().decode()
    root = Path(packaging.__file__).resolve().parents[1]
    assert handler_src == (root / "aws" / "serving" / "inference.py").read_bytes()  # verbatim: one source
    assert runtimes_src == (root / "runtimes.py").read_bytes()
    assert settings == {"variant": "ort-fp32", "backend": "onnxruntime", "precision": "fp32", "source": "baseline",
                        "model_file": "model.onnx", "label_names": LABELS, "max_length": 64, "max_batch": 8,
                        "max_chars": 200, "batch_wait_ms": 0.0, "batch_max_texts": 64, "device": "cpu"}
    import onnxruntime

    assert f"onnxruntime=={onnxruntime.__version__}" in reqs.splitlines() and "--no-index" not in reqs
    again = packaging.build_archive(resolve_model(cfg_for(tmp_path, saved, max_batch=8, max_chars=200)),
                                    cfg_for(tmp_path, saved, max_batch=8, max_chars=200), tmp_path / "again.tar.gz")
    assert again.sha256 == archive.sha256  # byte-for-byte reproducible


def test_archive_handler_runs_without_the_bertopt_package(tmp_path, served):
    """What the container does: code/ first on sys.path, `import inference`, the four hooks; the project
    package is blocked, so the vendored bertopt_runtime must be complete."""
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "bertopt" or name.startswith("bertopt."):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        sys.path = [p for p in sys.path if p not in ("", ".", {str(Path.cwd())!r})]
        sys.path.insert(0, {str(served['model_dir'] / 'code')!r})
        import inference
        model = inference.model_fn({str(served['model_dir'])!r})
        data = inference.input_fn(b'{{"inputs": ["great", "awful"]}}', "application/json")
        print(inference.output_fn(inference.predict_fn(data, model), "application/json"))
        print(inference._data.__name__, type(model.predictor).__module__)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    preds_line, modules_line = proc.stdout.strip().splitlines()[-2:]
    assert [p["label"] in LABELS for p in json.loads(preds_line)] == [True, True]
    assert modules_line == "bertopt_runtime.data bertopt_runtime.runtimes"


def _fake_wheel(directory: Path, name: str, version: str) -> Path:
    import zipfile

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", "")
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return path


def test_vendor_wheels(tmp_path, saved):
    """--vendor-wheels ships the wheels and makes pip install from them alone (--no-index)."""
    import onnxruntime

    from bertopt.aws import packaging

    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = cfg_for(tmp_path, saved, vendor_wheels=str(empty))
    with pytest.raises(ConfigError, match="no .whl files"):
        packaging.build_archive(resolve_model(cfg), cfg, tmp_path / "a.tar.gz")
    other = tmp_path / "other"
    _fake_wheel(other, "flatbuffers", "25.1.1")
    cfg = cfg_for(tmp_path, saved, vendor_wheels=str(other))
    with pytest.raises(ConfigError, match=r"no wheel for onnxruntime==.*pip download"):
        packaging.build_archive(resolve_model(cfg), cfg, tmp_path / "a.tar.gz")

    wheels = tmp_path / "wheels"
    _fake_wheel(wheels, "onnxruntime", onnxruntime.__version__)
    cfg = cfg_for(tmp_path, saved, vendor_wheels=str(wheels))
    info = packaging.build_archive(resolve_model(cfg), cfg, tmp_path / "v.tar.gz")
    assert f"code/wheels/onnxruntime-{onnxruntime.__version__}-py3-none-any.whl" in info.members
    unpacked = packaging.extract_archive(info.path, tmp_path / "unpacked")
    reqs = (unpacked / "code" / "requirements.txt").read_text().splitlines()
    assert "--no-index" in reqs and "--find-links wheels" in reqs
    # what the container runs (from another directory: find-links resolves relative to the file)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--report", "-", "-r", str(unpacked / "code" / "requirements.txt")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PIP_CONFIG_FILE": "/dev/null", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    urls = [i["download_info"]["url"] for i in report["install"]]
    assert len(urls) == 1 and urls[0].endswith(f"code/wheels/onnxruntime-{onnxruntime.__version__}-py3-none-any.whl")


# ----------------------------------------------------------------------------- model choice
def test_resolve_model_sources(tmp_path, saved):

    reports = tmp_path / "reports"
    with pytest.raises(PipelineError, match=r"results.json \(run `python compare.py` first, or choose the model"):
        resolve_model(cfg_for(tmp_path, saved, model_path=None))
    write_results(reports, saved, "onnx")
    choice = resolve_model(cfg_for(tmp_path, saved, model_path=None))
    assert (choice.variant, choice.backend, choice.path.name, choice.label_names, choice.max_length) == (
        "ort-fp32", "onnxruntime", "model.onnx", LABELS, 64)
    assert choice.origin.startswith("recommendation in")
    write_results(reports, saved, None)
    with pytest.raises(PipelineError, match="holds no recommendation.*--variant"):
        resolve_model(cfg_for(tmp_path, saved, model_path=None))
    write_results(reports, saved, "tensorrt")
    with pytest.raises(PipelineError, match="TensorRT engine"):
        resolve_model(cfg_for(tmp_path, saved, model_path=None))
    onnx_dir = saved / "onnx" / "baseline"
    by_name = {"variant": "ort-fp32", "backend": "onnxruntime", "precision": "fp32", "source": "baseline",
               "device": "cpu", "path": None, "model_dir": str(onnx_dir), "onnx_variant": "fp32", "reason": "r"}
    write_results(reports, saved, by_name)  # a row naming its ONNX variant instead of the file
    assert resolve_model(cfg_for(tmp_path, saved, model_path=None)).path == onnx_dir / "model.onnx"
    write_results(reports, saved, {**by_name, "device": "cuda"})
    with pytest.raises(PipelineError, match="measured on cuda; deploy it on a GPU --instance-type"):
        resolve_model(cfg_for(tmp_path, saved, model_path=None))
    write_results(reports, saved, {**by_name, "path": str(onnx_dir / "model.int8.onnx")})
    with pytest.raises(MissingArtifact, match="model.int8.onnx .run `python onnx_tensorrt.py`"):
        resolve_model(cfg_for(tmp_path, saved, model_path=None))

    def by_variant(v, **kw):
        return resolve_model(_variant_cfg(tmp_path, saved, v, **kw))

    assert by_variant("ort-fp32").path == saved / "onnx" / "baseline" / "model.onnx"
    assert by_variant("baseline:torch").backend == "torch"
    with pytest.raises(PipelineError, match="int8 has status rejected .accuracy drop"):
        by_variant("int8")
    with pytest.raises(ConfigError, match="no variant 'int2'.*usable: fp16, fp32"):
        by_variant("int2")
    with pytest.raises(PipelineError, match="ort-fp16 runs on cuda only"):
        by_variant("fp16")
    assert by_variant("fp16", instance_type="ml.g5.xlarge").precision == "fp16"
    with pytest.raises(MissingArtifact, match=r"pruned.*python prune.py"):
        by_variant("pruned:torch")
    torch_dir = resolve_model(cfg_for(tmp_path, saved, model_path=str(saved / "baseline")))
    assert (torch_dir.backend, torch_dir.label_names) == ("torch", LABELS)


def _latency_results(saved, optimize_for="throughput", p50s=(3.70, 2.45)):
    """results.json rows: ov-int8 recommended for throughput, ort-int8 faster one request at a time."""
    onnx_dir = saved / "onnx" / "baseline"

    def row(name, backend, registry, p50):
        return {"name": name, "status": "ok", "backend": backend, "precision": "int8", "source": "baseline",
                "device": "cpu", "registry": registry, "latency": {"e2e_ms": {"p50": p50}}}
    rows = [row("ov-int8", "openvino", "ov-int8", p50s[0]), row("ort-int8", "onnxruntime", "ort-int8", p50s[1]),
            row("ort-fp32", "onnxruntime", "ort-fp32", 1.0), row("trt-fp16", "tensorrt", "trt-fp16", 0.2)]
    return {"config": {"optimize_for": optimize_for}, "variants": rows,
            "eligibility": [{"variant": r["name"], "eligible": r["name"] != "ort-fp32"} for r in rows],
            "recommendation": {"variant": "ov-int8", "backend": "onnxruntime", "precision": "fp32", "source": "baseline",
                               "device": "cpu", "path": str(onnx_dir / "model.onnx"), "model_dir": str(onnx_dir)}}


def test_a_throughput_pick_that_is_slower_one_request_at_a_time_is_called_out(tmp_path, saved, monkeypatch):
    """A real-time endpoint answers one request at a time per worker: a deploy of compare's throughput
    pick says when another eligible row had a clearly lower single-request p50, and how to switch."""
    from bertopt.aws import choice

    note = choice.latency_note(_latency_results(saved))
    assert "ort-int8 took 2.45 ms p50 against 3.70 ms (1.51x)" in note      # not ort-fp32 (ineligible), not TensorRT
    assert "--report-only --optimize-for latency" in note and note.endswith("--variant ort-int8")
    assert choice.latency_note(_latency_results(saved, "latency")) is None   # already chosen by latency
    assert choice.latency_note(_latency_results(saved, p50s=(2.60, 2.45))) is None  # within 10%: no note
    warnings = []
    monkeypatch.setattr(choice.log, "warning", lambda fmt, *a: warnings.append(fmt % a))
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "results.json").write_text(json.dumps(_latency_results(saved)))
    local = cfg_for(tmp_path, saved, model_path=None)
    resolve_model(local)                                                       # local micro-batching: throughput is right
    assert warnings == []
    resolve_model(cfg_for(tmp_path, saved, model_path=None, batching=False))   # one request at a time
    assert len(warnings) == 1 and "ort-int8 took 2.45 ms" in warnings[0]
    from bertopt.aws.config import AwsDeployConfig

    resolve_model(AwsDeployConfig(output_dir=local.output_dir, reports_dir=local.reports_dir, quiet=True,
                                  aws_account_id="123456789012", aws_role_arn="arn:aws:iam::123456789012:role/R",
                                  aws_region="us-east-1"))                     # a SageMaker endpoint
    assert len(warnings) == 2 and warnings[1] == warnings[0]


def _variant_cfg(tmp_path, saved, variant, **kw):
    from bertopt.aws.config import AwsDeployConfig

    return AwsDeployConfig(output_dir=str(saved), reports_dir=str(tmp_path / "reports"), variant=variant, local=True,
                           quiet=True, **kw)


def test_config_problems_name_the_flags():
    from bertopt.aws.config import AwsDeployConfig

    with pytest.raises(ConfigError) as err:
        AwsDeployConfig(aws_role_arn="role", aws_account_id="12", endpoint_name="bad_name!", serverless_memory=1500,
                        instance_type="m5.large", prepare=True, finish=True, max_batch=0)
    text = str(err.value)
    for flag in ("--aws-role-arn", "--aws-account-id", "--endpoint-name", "--serverless-memory", "--instance-type",
                 "--prepare, --finish", "--max-batch"):
        assert flag in text
    with pytest.raises(ConfigError, match="--aws-role-arn is required"):
        AwsDeployConfig()
    AwsDeployConfig(local=True)  # the local endpoint needs no AWS settings


def test_pinned_images():
    from bertopt.aws.config import dlc_image_uri

    assert dlc_image_uri("eu-west-1", gpu=False) == ("763104351884.dkr.ecr.eu-west-1.amazonaws.com/"
                                                     "huggingface-pytorch-inference:2.6.0-transformers5.5.3-cpu-py312-ubuntu22.04")
    assert dlc_image_uri("af-south-1", gpu=True).startswith("626614931356.dkr.ecr.af-south-1.amazonaws.com/")
    assert "-gpu-py312-cu124-" in dlc_image_uri("us-east-1", gpu=True)
    assert dlc_image_uri("cn-north-1", gpu=False).startswith("727897471807.dkr.ecr.cn-north-1.amazonaws.com.cn/")
    assert dlc_image_uri("xx-nowhere-1", gpu=False) is None  # the deploy then asks for --image-uri


# --------------------------------------------------------------------------- local endpoint
def test_local_endpoint_contract(served):
    url = served["endpoint"].url
    assert http(url, "/ping", content_type=None)[:2] == (200, "application/json")
    status, ctype, body = http(url, "/invocations", json.dumps({"inputs": ["a great film", "awful"]}).encode())
    assert (status, ctype) == (200, "application/json")
    preds = json.loads(body)
    assert len(preds) == 2 and all(p["label"] in LABELS and 0.5 <= p["score"] <= 1 for p in preds)
    status, _, body = http(url, "/invocations", json.dumps({"inputs": "just one"}).encode())
    assert status == 200 and len(json.loads(body)) == 1
    status, _, body = http(url, "/invocations", b'good film, really\n"bad, truly bad"\n', content_type="text/csv")
    assert status == 200 and len(json.loads(body)) == 2


def test_local_endpoint_describes_what_it_serves_from(served):
    """{"describe": true} (what the deploy's smoke test asks): the device and providers in use."""
    status, _, body = http(served["endpoint"].url, "/invocations", b'{"describe": true}')
    info = json.loads(body)
    assert status == 200 and info["device"] == "cpu" and info["backend"] == "onnxruntime"
    assert info["providers"] == ["CPUExecutionProvider"] and info["variant"] == "ort-fp32"
    status, _, body = http(served["endpoint"].url, "/invocations", b'{"describe": false}')
    assert status == 400 and "inputs" in json.loads(body)["error"]  # only the exact request describes


def test_gpu_torch_archive_refuses_to_serve_from_the_cpu(saved, monkeypatch):
    """A GPU archive on a host where torch sees no CUDA: model_fn fails (the endpoint never reports
    healthy) instead of quietly serving from the CPU."""
    import torch

    from bertopt.aws.serving import inference

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="serves from a GPU, but torch sees no CUDA device"):
        inference._make_predictor(str(saved / "baseline"), {"backend": "torch", "device": "cuda"})
    assert inference._make_predictor(str(saved / "baseline"), {"backend": "torch"}).device == "cpu"


@pytest.mark.parametrize("body,ctype,accept,status,fragment", [
    (b'{"inputs": ["unclosed"', "application/json", None, 400, "malformed JSON"),
    (b'{"inputs": ["x"]}', "application/xml", None, 415, "unsupported Content-Type"),
    (b'{"inputs": []}', "application/json", None, 400, "no input texts"),
    (b'', "application/json", None, 400, "empty request body"),
    (json.dumps({"inputs": ["x"] * 9}).encode(), "application/json", None, 413, "limit is 8"),
    (json.dumps({"inputs": ["y" * 201]}).encode(), "application/json", None, 413, "201 characters"),
    (b'{"inputs": ["x"]}', "application/json", "text/html", 406, "Accept"),
])
def test_local_endpoint_rejects_with_json_errors(served, body, ctype, accept, status, fragment):
    got, got_type, text = http(served["endpoint"].url, "/invocations", body, ctype, accept=accept)
    assert (got, got_type) == (status, "application/json")
    err = json.loads(text)
    assert err["status"] == status and fragment in err["error"]


def test_local_endpoint_routes_and_size_limit(served):
    from bertopt.aws.local import MAX_BODY_BYTES

    url = served["endpoint"].url
    assert http(url, "/nope", content_type=None)[0] == 404
    assert http(url, "/invocations", content_type=None)[0] == 405  # GET
    assert http(url, "/ping", b"{}", method="POST")[0] == 405
    big = json.dumps({"inputs": ["z" * (MAX_BODY_BYTES + 10)]}).encode()
    status, _, text = http(url, "/invocations", big)
    assert status == 413 and "limit is" in json.loads(text)["error"]
    assert http(url, "/ping", content_type=None)[0] == 200  # still serving


def test_local_endpoint_uses_the_archives_vendored_code(served):
    assert served["handler"].__file__ == str(served["model_dir"] / "code" / "inference.py")
    assert served["handler"]._data.__name__ == "bertopt_runtime.data"
    assert served["handler"]._data.__file__.startswith(str(served["model_dir"]))


def test_local_endpoint_serves_a_torch_archive(tmp_path, saved):
    from bertopt.aws import local

    cfg = cfg_for(tmp_path, saved, model_path=str(saved / "baseline"))
    archive, model_dir, handler, model = local.prepare_local(cfg)
    assert "model.safetensors" in archive.members and "model.onnx" not in archive.members
    assert "nothing beyond" in (model_dir / "code" / "requirements.txt").read_text()
    endpoint = local.LocalEndpoint(local.InvocationsApp(handler, model), "127.0.0.1", 0).start()
    try:
        status, _, body = http(endpoint.url, "/invocations", b'{"inputs": ["fine"]}')
    finally:
        endpoint.stop()
    assert status == 200 and json.loads(body)[0]["label"] in LABELS
    assert not endpoint._thread.is_alive()
    with pytest.raises(urllib.error.URLError):  # stopped: the port no longer answers
        http(endpoint.url, "/ping", content_type=None)


def test_open_loop_load_test_is_bounded_and_loopback_only(served):
    """A short functional run of the open-loop generator (the figures are in the issue note)."""
    from bertopt.aws.loadtest import open_loop

    result = open_loop(served["endpoint"].url, rate=40, seconds=1.0, clients=4)
    assert result["requests"] == 40 and result["errors"] == 0, result
    assert result["status_counts"] == {"200": 40} and result["p99_ms"] >= result["p50_ms"] > 0
    with pytest.raises(ValueError, match="127.0.0.1 only"):
        open_loop("http://10.0.0.1:8080", rate=1, seconds=1)


def test_sweep_stops_at_the_first_failing_rate_and_refines(monkeypatch):
    from bertopt.aws import loadtest

    capacity = 300.0  # a fake server: p99 explodes above 300 requests/s
    offered = []

    def fake_step(url, rate, seconds, clients, texts_per_request, texts):
        assert texts == ["x", "y"]
        offered.append(rate)
        over = rate > capacity
        return {"offered_rps": rate, "achieved_rps": capacity if over else rate, "errors": 0,
                "p99_ms": 900.0 if over else 20.0}

    monkeypatch.setattr(loadtest, "open_loop", fake_step)
    res = loadtest.sweep("http://127.0.0.1:1", start_rate=100, factor=2, refine=2, p99_target_ms=100, texts=["x", "y"])
    assert offered == [100, 200, 400, 300.0, 350.0]
    assert res["best"]["offered_rps"] == 300.0 and res["requests_per_s_at_target"] == 300.0
    assert [s["passed"] for s in res["steps"]] == [True, True, False, True, False]
    assert not loadtest.passes({"errors": 1, "p99_ms": 1.0, "achieved_rps": 10, "offered_rps": 10}, 100)
    assert not loadtest.passes({"errors": 0, "p99_ms": 1.0, "achieved_rps": 9, "offered_rps": 10}, 100)


def test_loadtest_texts_come_from_a_file_or_a_table_column(tmp_path):
    from conftest import SST2_DIR

    from bertopt.aws import loadtest

    assert loadtest.load_texts() == loadtest.SENTENCES
    lines = tmp_path / "texts.txt"
    lines.write_text("first text\n\n  second text  \n")
    assert loadtest.load_texts(str(lines)) == ["first text", "second text"]
    dev = loadtest.load_texts(str(SST2_DIR / "dev.tsv"))   # GLUE's header: sentence, label
    assert len(dev) == 872 and dev[0].startswith("it 's a charming and often affecting journey")
    table = tmp_path / "t.csv"
    table.write_text("id,review\n1,good film\n2,bad film\n")
    assert loadtest.load_texts(str(table), "review") == ["good film", "bad film"]
    assert loadtest.load_texts(str(table)) == ["1", "2"]   # no sentence/text column: the first one
    (tmp_path / "empty.txt").write_text("\n \n")
    for path, column, message in ((table, "text", r"no column 'text' \(columns: id, review\)"),
                                  (tmp_path / "gone.txt", None, "no such file"),
                                  (tmp_path / "gone.tsv", None, "data file not found"),
                                  (tmp_path / "empty.txt", None, "no texts in it")):
        with pytest.raises(ValueError, match=f"^--texts {re.escape(str(path))}: {message}"):
            loadtest.load_texts(str(path), column)


def test_open_loop_cycles_through_the_given_texts(monkeypatch):
    from bertopt.aws import loadtest

    sent = []
    monkeypatch.setattr(loadtest, "_send", lambda conn, body: sent.append(body) or 200)   # no network at all
    res = loadtest.open_loop("http://127.0.0.1:1", rate=200, seconds=0.03, clients=1, texts_per_request=2,
                             texts=["a", "b", "c"])
    assert res["ok"] == 6 and sent == [["a", "b"], ["c", "a"], ["b", "c"]] * 2


def test_the_model_only_ceiling_batches_the_texts_in_arrival_order():
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from bertopt import modeling
    from bertopt.aws.loadcompare import _feeds, _texts_per_s

    tok = AutoTokenizer.from_pretrained(modeling.resolve_model(modeling.DEFAULT_MODEL))
    pred = SimpleNamespace(input_names=("input_ids", "attention_mask"))
    texts = ["a b", "a b c d e f g", "a", "a b c"]
    assert [f["input_ids"].shape for f in _feeds(pred, tok, 1, texts)] == [(1, 4), (1, 9), (1, 3), (1, 5)]
    # batches of 2 in arrival order, each cut into the handler's similar-length runs
    assert [f["input_ids"].shape for f in _feeds(pred, tok, 2, texts)] == [(1, 4), (1, 9), (1, 3), (1, 5)]
    assert sorted(f["input_ids"].shape for f in _feeds(pred, tok, 8, ["a b"] * 3 + ["a b c d e f g"])) == [
        (2, 9), (6, 4)]   # cycled up to one batch of 8: six 4-token texts, two 9-token ones
    assert "token_type_ids" not in _feeds(pred, tok, 1, texts)[0]
    # before timing, every batch shape runs once (OpenVINO prepares each new shape on first use)
    seen = []
    pred.predict_logits = lambda feed: seen.append(feed["input_ids"].shape)
    many = [" ".join(["a"] * n) for n in range(1, 40)]
    _texts_per_s(pred, tok, 1, runs=1, seconds=0.0, texts=many)
    assert {f["input_ids"].shape for f in _feeds(pred, tok, 1, many)} <= set(seen) and len(set(seen)) > 10


def test_loadtest_cli_rejects_bad_numbers_and_names_a_missing_server(capsys):
    import socket

    from bertopt.aws import loadtest

    for flag, value in (("--rate", "-5"), ("--clients", "0"), ("--seconds", "inf"), ("--p99-target-ms", "x")):
        with pytest.raises(SystemExit) as exit_:
            loadtest.main([flag, value])
        assert exit_.value.code == 2 and f"argument {flag}: expected" in capsys.readouterr().err
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for extra in ([], ["--sweep", "--start-rate", "10"]):
        assert loadtest.main(["--url", f"http://127.0.0.1:{port}", "--rate", "10", "--seconds", "0.2", *extra]) == 1
        err = capsys.readouterr().err
        assert f"error: nothing answered at http://127.0.0.1:{port} (ConnectionRefusedError" in err, err


def test_aws_deploy_local_cli(tmp_path, saved, monkeypatch):
    """aws_deploy.py --local builds, unpacks and serves; serve_forever is replaced by one request."""
    import aws_deploy
    from bertopt.aws import local

    seen = {}

    def once(self):
        self.start()
        seen["ping"] = http(self.url, "/ping", content_type=None)[0]
        seen["invoke"] = http(self.url, "/invocations", b'{"inputs": "ok"}')[0]
        self.server.close()

    monkeypatch.setattr(local.LocalEndpoint, "serve_forever", once)
    code = aws_deploy.main(["--local", "--port", "0", "--quiet", "--model-path", str(saved / "onnx" / "baseline"),
                            "--output-dir", str(tmp_path / "out")])
    assert code == 0 and seen == {"ping": 200, "invoke": 200}
    assert (tmp_path / "out" / "aws" / "local" / "model.tar.gz").is_file()
    assert not (tmp_path / "out" / "aws" / "deployment.json").exists()  # nothing deployed


# --------------------------------------------------------------- micro-batching and /metrics
def test_micro_batcher_combines_concurrent_requests_in_order(handler):

    gate, runs = threading.Event(), []

    def run(texts):
        gate.wait(5)  # the first batch blocks until every request is queued
        runs.append(list(texts))
        return [t.upper() for t in texts]

    batches = []
    batcher = handler.MicroBatcher(run, max_texts=5, wait_ms=0, on_batch=lambda r, n: batches.append((r, n)))
    results = {}

    def call(i, texts):
        results[i] = batcher.submit(texts)

    threads = [threading.Thread(target=call, args=(0, ["a"]))]
    threads[0].start()
    while batcher._queue.qsize():  # the runner took request 0 and blocks in run()
        pass
    threads += [threading.Thread(target=call, args=(i, [f"t{i}", f"u{i}"])) for i in range(1, 5)]
    for t in threads[1:]:
        t.start()
    while batcher._queue.qsize() < 4:
        pass
    gate.set()
    for t in threads:
        t.join(5)
    batcher.close()
    assert results == {0: ["A"], **{i: [f"T{i}", f"U{i}"] for i in range(1, 5)}}  # each caller its own slice
    assert runs[0] == ["a"] and [len(r) for r in runs[1:]] == [4, 4]  # 2 requests of 2 texts fit in 5
    assert batches == [(1, 1), (2, 4), (2, 4)]


def test_micro_batcher_runners_run_batches_concurrently(handler):
    """Two runners: two batches are in the model at once (a 2-party barrier inside run() passes
    only then; one runner would break it), each caller gets its own answer, close() stops both."""
    barrier = threading.Barrier(2, timeout=5)

    def run(texts):
        barrier.wait()
        return [t.upper() for t in texts]

    batcher = handler.MicroBatcher(run, max_texts=1, wait_ms=0, runners=2)
    results = {}
    callers = [threading.Thread(target=lambda t=t: results.update({t: batcher.submit([t])})) for t in "ab"]
    for c in callers:
        c.start()
    for c in callers:
        c.join(10)
    batcher.close()
    assert results == {"a": ["A"], "b": ["B"]}
    assert not any(t.is_alive() for t in batcher._threads)


def test_micro_batcher_passes_model_errors_to_every_caller(handler):
    def run(texts):
        raise RuntimeError("model broke")

    batcher = handler.MicroBatcher(run, max_texts=8, wait_ms=1)
    with pytest.raises(RuntimeError, match="model broke"):
        batcher.submit(["x"])
    batcher.close()


def test_batched_serving_matches_per_request_serving(served, model, handler):
    """16 concurrent requests through the batching server answer what one-at-a-time serving does."""
    from concurrent.futures import ThreadPoolExecutor

    assert served["model"].batcher is not None and model.batcher is not None
    texts = [f"film number {i} was {'great' if i % 2 else 'dreadful and long'}" for i in range(16)]
    expected = [handler._predict([t], model)[0] for t in texts]
    url = served["endpoint"].url
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda t: http(url, "/invocations", json.dumps({"inputs": t}).encode()), texts))
    assert [a[0] for a in answers] == [200] * 16
    got = [json.loads(a[2])[0] for a in answers]
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    np.testing.assert_allclose([g["score"] for g in got], [e["score"] for e in expected], atol=1e-4)


def test_a_batch_of_mixed_lengths_runs_as_similar_length_groups_in_the_right_order(model, handler, monkeypatch):
    texts = ["good", "a long and winding story that never quite finds its ending, sadly", "bad", "dull",
             "another long sentence about a film with many words in it, too many"]
    expected = np.concatenate([handler._scores([t], model) for t in texts])
    shapes, run = [], model.predictor.predict_logits
    monkeypatch.setattr(model.predictor, "predict_logits", lambda b: shapes.append(b["input_ids"].shape) or run(b))
    np.testing.assert_allclose(handler._scores(texts, model), expected, atol=1e-4)
    assert sorted(r for r, _ in shapes) == [2, 3] and len({q for _, q in shapes}) == 2   # short ones, long ones


def test_metrics_endpoint_counts_requests_latency_and_batches(tmp_path, saved):
    from bertopt.aws import local

    archive, model_dir, handler, model = local.prepare_local(cfg_for(tmp_path, saved))
    endpoint = local.LocalEndpoint(local.InvocationsApp(handler, model), "127.0.0.1", 0, threads=8).start()
    try:
        for _ in range(3):
            assert http(endpoint.url, "/invocations", b'{"inputs": ["fine", "bad"]}')[0] == 200
        assert http(endpoint.url, "/invocations", b'{"inputs": ')[0] == 400
        status, ctype, text = http(endpoint.url, "/metrics", content_type=None)
    finally:
        endpoint.stop()
        model.batcher.close()
    from prometheus_client.parser import text_string_to_metric_families

    assert status == 200 and ctype.startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("bertopt_requests_total", (("status", "200"),))] == 3
    assert samples[("bertopt_requests_total", (("status", "400"),))] == 1
    assert samples[("bertopt_request_latency_seconds_count", ())] == 4
    assert samples[("bertopt_batch_texts_sum", ())] == 6 and 1 <= samples[("bertopt_batch_texts_count", ())] <= 3
    assert samples[("bertopt_batch_requests_sum", ())] == 3


def test_metrics_show_the_http_queue_depth_instead_of_a_warning_per_request(caplog):
    """Requests waiting for a busy HTTP thread: the gauge counts them and waitress logs nothing."""
    import logging
    import time
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from bertopt.aws import local

    release = threading.Event()
    fake = SimpleNamespace(input_fn=lambda body, ctype: body, output_fn=lambda pred, accept: "[]",
                           predict_fn=lambda data, model: release.wait(10))
    app = local.InvocationsApp(fake, SimpleNamespace(batcher=None))
    endpoint = local.LocalEndpoint(app, "127.0.0.1", 0, threads=1).start()
    depth = lambda: app.metrics.registry.get_sample_value("bertopt_http_queue_depth")  # noqa: E731
    caplog.set_level(logging.DEBUG)
    try:
        assert depth() == 0
        with ThreadPoolExecutor(3) as pool:
            answers = [pool.submit(http, endpoint.url, "/invocations", b"x") for _ in range(3)]
            deadline = time.monotonic() + 10
            while depth() < 2 and time.monotonic() < deadline:  # one request in service, two waiting
                time.sleep(0.01)
            queued = depth()
            release.set()
            statuses = [a.result()[0] for a in answers]
    finally:
        release.set()
        endpoint.stop()
    assert queued == 2 and statuses == [200] * 3 and depth() == 0
    assert not [r for r in caplog.records if r.name == "waitress.queue" and r.levelno < logging.ERROR]


def test_thread_plan_container_env_and_cost():
    from bertopt.aws import instances
    from bertopt.aws.config import AwsDeployConfig
    from bertopt.aws.deploy import container_env

    # micro-batching on 2 vCPUs: two single-threaded batch runners; on 16, four runners of 4 threads
    assert instances.thread_plan(2, batching=True) == instances.ThreadPlan(2, 1, 1, 32, batch_runners=2)
    assert instances.thread_plan(16, batching=True) == instances.ThreadPlan(16, 1, 4, 64, batch_runners=4)
    assert instances.thread_plan(8, batching=True, gpu=True) == instances.ThreadPlan(8, 1, 8, 32)
    assert instances.thread_plan(16, batching=False) == instances.ThreadPlan(16, 4, 4, 32)
    # per request on 2 vCPUs: two SageMaker workers (each answers one request at a time; one left a vCPU idle)
    assert instances.thread_plan(2, batching=False) == instances.ThreadPlan(2, 2, 1, 4)
    assert [instances.thread_plan(n, batching=b).concurrent_runs for n, b in ((2, False), (2, True), (16, True))] == [2, 2, 4]
    env = container_env(AwsDeployConfig(aws_role_arn="arn:aws:iam::123456789012:role/r",
                                        instance_type="ml.c5.2xlarge"), "us-east-1")
    assert (env["SAGEMAKER_MODEL_SERVER_WORKERS"], env["BERTOPT_THREADS"], env["BERTOPT_BATCH_WAIT_MS"]) == ("2", "4", "0")
    assert env["TOKENIZERS_PARALLELISM"] == "false" and env["BERTOPT_MODEL_STREAMS"] == "1"
    small = container_env(AwsDeployConfig(aws_role_arn="arn:aws:iam::123456789012:role/r",
                                          instance_type="ml.m5.large"), "us-east-1")
    assert (small["SAGEMAKER_MODEL_SERVER_WORKERS"], small["BERTOPT_THREADS"]) == ("2", "1")
    serverless = container_env(AwsDeployConfig(serverless_memory=2048, local=True), "us-east-1")
    assert "SAGEMAKER_MODEL_SERVER_WORKERS" not in serverless and serverless["BERTOPT_BATCH_WAIT_MS"] == "0"
    # $0.1345/h at 100 requests/s: 360,000 requests an hour -> $0.3736 per million
    assert instances.cost_per_million(100.0, "ml.m5.large") == pytest.approx(0.3736, abs=1e-4)
    assert instances.cost_per_million(100.0, "ml.unknown") is None and instances.PRICES_AS_OF


def test_handler_ceiling_runs_the_archives_handler_without_http_and_restores_the_process(served, monkeypatch):
    """The handler-only figure: the archive's own input_fn -> predict_fn -> output_fn on concurrent
    callers, in this process, loaded as the local server loads it, with the environment put back."""
    import time

    from bertopt.aws import loadcompare, local

    real, calls = local.load_handler, []

    def slowed(model_dir):  # a 5 ms model run, so that 8 callers queue behind it and share runs
        handler, model = real(model_dir)
        predict = model.predictor.predict_logits

        def slow(batch):
            calls.append(len(batch["input_ids"]))
            time.sleep(0.005)
            return predict(batch)
        model.predictor.predict_logits = slow
        return handler, model

    monkeypatch.setattr(local, "load_handler", slowed)
    monkeypatch.delenv("BERTOPT_THREADS", raising=False)
    switch = sys.getswitchinterval()
    out = loadcompare.handler_ceiling(served["model_dir"], batching=True, callers=8, seconds=0.4)
    assert out["callers"] == 8 and out["requests_per_s"] > 0 and out["cpu_ms_per_request"] > 0
    assert out["texts_per_model_run"] > 1 and max(calls) > 1     # concurrent requests shared model runs
    assert "BERTOPT_THREADS" not in os.environ and sys.getswitchinterval() == switch


def test_loadtest_compare_serves_both_modes_and_writes_results(tmp_path, saved, monkeypatch):
    """--compare with a one-step sweep (the real sweep is bounded the same way, only longer)."""
    from bertopt.aws import loadcompare, loadtest

    def one_step(url, **kw):
        step = loadtest.open_loop(url, 20, 0.5, kw["clients"])
        step["passed"] = loadtest.passes(step, kw["p99_target_ms"])
        return {"steps": [step], "best": step, "requests_per_s_at_target": step["achieved_rps"]}

    monkeypatch.setattr(loadcompare, "sweep", one_step)
    out = tmp_path / "reports" / "loadtest.json"
    texts = tmp_path / "texts.txt"
    texts.write_text("a fine film\nnot good at all, sadly\nok\n")
    code = loadtest.main(["--compare", "--model-path", str(saved / "onnx" / "baseline" / "model.onnx"), "--clients",
                          "4", "--seconds", "0.5", "--p99-target-ms", "2000", "--out", str(out), "--texts", str(texts)])
    res = json.loads(out.read_text())
    assert res["protocol"]["texts_from"] == str(texts) and res["protocol"]["sentences"] == 3
    assert code == 0 and res["schema"] == "bertopt.loadtest/3" and set(res["modes"]) == {"per-request", "micro-batching"}
    for mode in res["modes"].values():
        assert mode["steps"][0]["errors"] == 0 and mode["requests_per_s_at_target"] > 0
    assert res["modes"]["micro-batching"]["at_2x_per_request"]["requests"] > 0
    assert res["pricing"]["instance_type"] == "ml.m5.large" and res["pricing"]["as_of"]
    assert res["cost_per_million"]["per-request"] > 0 and res["speedup"] > 0
    ceiling = res["model_only"]  # the bare model as each server runs it: what batches gain in the model
    per, batched = ceiling["per_request"], ceiling["micro_batching"]
    assert (per["batch"], batched["batch"]) == (1, 32) and per["texts_per_s"] > 0
    assert ceiling["ratio"] == pytest.approx(batched["texts_per_s"] / per["texts_per_s"], abs=0.01)
    hand = res["handler_only"]  # each archive's handler in-process, as many callers as its server has HTTP threads
    assert (hand["per_request"]["callers"], hand["micro_batching"]["callers"]) == (4, 4)   # min(--clients 4, threads)
    assert hand["per_request"]["requests_per_s"] > 0 and hand["per_request"]["cpu_ms_per_request"] > 0
    assert "texts_per_model_run" not in hand["per_request"] and hand["micro_batching"]["texts_per_model_run"] >= 1
    assert hand["ratio"] == pytest.approx(hand["micro_batching"]["requests_per_s"] / hand["per_request"]["requests_per_s"],
                                          abs=0.01)
    cpu = res["modes"]["per-request"]["cpu_ms_per_request"]  # server and load generator CPU per request
    assert cpu["server"] > 0 and cpu["load_generator"] > 0 and cpu["bound_rps"] > 0
