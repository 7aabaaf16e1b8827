"""The SageMaker handler (code/inference.py), the archive it ships in, and the local endpoint that
serves that archive over HTTP (GET /ping, POST /invocations) on 127.0.0.1."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from test_aws_support import LABELS, tiny_stages, write_results

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
        "code/bertopt_runtime/errors.py", "code/bertopt_runtime/families.py",
        "code/bertopt_runtime/modeling.py", "code/bertopt_runtime/runtimes.py",
        "code/inference.py", "code/requirements.txt", "config.json", "model.onnx", "serving.json",
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
                        "max_chars": 200, "device": "cpu"}
    import onnxruntime

    assert f"onnxruntime=={onnxruntime.__version__}" in reqs.splitlines() and "--no-index" not in reqs
    again = packaging.build_archive(packaging.resolve_model(cfg_for(tmp_path, saved, max_batch=8, max_chars=200)),
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
        packaging.build_archive(packaging.resolve_model(cfg), cfg, tmp_path / "a.tar.gz")
    other = tmp_path / "other"
    _fake_wheel(other, "flatbuffers", "25.1.1")
    cfg = cfg_for(tmp_path, saved, vendor_wheels=str(other))
    with pytest.raises(ConfigError, match=r"no wheel for onnxruntime==.*pip download"):
        packaging.build_archive(packaging.resolve_model(cfg), cfg, tmp_path / "a.tar.gz")

    wheels = tmp_path / "wheels"
    _fake_wheel(wheels, "onnxruntime", onnxruntime.__version__)
    cfg = cfg_for(tmp_path, saved, vendor_wheels=str(wheels))
    info = packaging.build_archive(packaging.resolve_model(cfg), cfg, tmp_path / "v.tar.gz")
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
    from bertopt.aws import packaging

    reports = tmp_path / "reports"
    with pytest.raises(PipelineError, match=r"results.json \(run `python compare.py` first, or choose the model"):
        packaging.resolve_model(cfg_for(tmp_path, saved, model_path=None))
    write_results(reports, saved, "onnx")
    choice = packaging.resolve_model(cfg_for(tmp_path, saved, model_path=None))
    assert (choice.variant, choice.backend, choice.path.name, choice.label_names, choice.max_length) == (
        "ort-fp32", "onnxruntime", "model.onnx", LABELS, 64)
    assert choice.origin.startswith("recommendation in")
    write_results(reports, saved, None)
    with pytest.raises(PipelineError, match="holds no recommendation.*--variant"):
        packaging.resolve_model(cfg_for(tmp_path, saved, model_path=None))
    write_results(reports, saved, "tensorrt")
    with pytest.raises(PipelineError, match="TensorRT engine"):
        packaging.resolve_model(cfg_for(tmp_path, saved, model_path=None))
    onnx_dir = saved / "onnx" / "baseline"
    by_name = {"variant": "ort-fp32", "backend": "onnxruntime", "precision": "fp32", "source": "baseline",
               "device": "cpu", "path": None, "model_dir": str(onnx_dir), "onnx_variant": "fp32", "reason": "r"}
    write_results(reports, saved, by_name)  # a row naming its ONNX variant instead of the file
    assert packaging.resolve_model(cfg_for(tmp_path, saved, model_path=None)).path == onnx_dir / "model.onnx"
    write_results(reports, saved, {**by_name, "device": "cuda"})
    with pytest.raises(PipelineError, match="measured on cuda; deploy it on a GPU --instance-type"):
        packaging.resolve_model(cfg_for(tmp_path, saved, model_path=None))
    write_results(reports, saved, {**by_name, "path": str(onnx_dir / "model.int8.onnx")})
    with pytest.raises(MissingArtifact, match="model.int8.onnx .run `python onnx_tensorrt.py`"):
        packaging.resolve_model(cfg_for(tmp_path, saved, model_path=None))

    def by_variant(v, **kw):
        return packaging.resolve_model(_variant_cfg(tmp_path, saved, v, **kw))

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
    torch_dir = packaging.resolve_model(cfg_for(tmp_path, saved, model_path=str(saved / "baseline")))
    assert (torch_dir.backend, torch_dir.label_names) == ("torch", LABELS)


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


def test_bounded_load_test_has_no_errors(served):
    """A short functional run of the load tester (the 30 s figures are in the issue note)."""
    from bertopt.aws.loadtest import load_test

    result = load_test(served["endpoint"].url, clients=4, seconds=1.5)
    assert result["requests"] > 0 and result["errors"] == 0, result
    assert result["status_counts"] == {"200": result["requests"]}


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
