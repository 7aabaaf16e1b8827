"""Models over 2 GB (issue 33), rehearsed on a tiny model: BERTOPT_EXTERNAL_DATA_BYTES forced down
makes every ONNX file the pipeline writes take the external-data path (one ``<name>.onnx.data``
beside it), through export, every variant, compare --quick, the deploy archive and a local-endpoint
request; every size shown counts the data."""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from bertopt import artifacts, model_files, variants
from bertopt.errors import ModelError

THRESHOLD = "4096"  # bytes: the tiny model's embedding tables and MatMul weights are far above it
STAGE_FILES = {"config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
               "manifest.json", "stage.log", "labels.json", "added_tokens.json", "chat_template.jinja"}


@pytest.fixture(scope="module")
def external_out(tmp_path_factory, tiny_baseline) -> Path:
    """The ONNX stage run on the tiny baseline with the external-data threshold forced down."""
    from bertopt.onnx_stage import OnnxConfig, run

    out = tmp_path_factory.mktemp("external_data")
    shutil.copytree(tiny_baseline, out / "baseline")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(model_files.THRESHOLD_ENV, THRESHOLD)
        result = run(OnnxConfig(output_dir=str(out), quiet=True, calibration_samples=32))
    assert result.status == "ok", result.key_metric
    return out


def _manifest(out: Path) -> dict:
    return json.loads((out / "onnx" / "baseline" / "manifest.json").read_text())


def test_every_onnx_variant_is_one_file_plus_one_data_file(external_out):
    d = external_out / "onnx" / "baseline"
    built = {k: v for k, v in _manifest(external_out)["metrics"]["variants"].items() if v["status"] != "skipped"}
    onnx_keys = [k for k, v in built.items() if v["file"].endswith(".onnx") and k != "ov-fp32"]
    assert set(onnx_keys) >= {"fp32", "opt", "int8", "int8-unfused", "int4", "fp16", "qdq"}
    expected = set(STAGE_FILES)
    for key in onnx_keys:
        v = built[key]
        assert v["status"] in ("ok", "rejected"), (key, v["reason"])
        path = d / v["file"]
        files = model_files.model_files(path)
        assert files == [path, model_files.data_file(path)], key        # one .onnx + exactly one data file
        assert path.stat().st_size < files[1].stat().st_size, key  # the weights are in the data file
        assert v["size_bytes"] == sum(f.stat().st_size for f in files), key   # sizes count the data
        expected |= {f.name for f in files}
        if v.get("tensorrt_file"):  # qdq: the signed TensorRT file beside the CPU one, by the same rule
            trt = d / v["tensorrt_file"]
            assert model_files.model_files(trt) == [trt, model_files.data_file(trt)]
            expected |= {f.name for f in model_files.model_files(trt)}
    for key, v in built.items():
        if v["backend"] == "openvino" and v["file"].endswith(".xml"):
            expected |= {v["file"], v["file"][:-4] + ".bin"}
            assert v["size_bytes"] == model_files.model_bytes(d / v["file"])
    present = {p.name for p in d.iterdir()}
    assert present <= expected, f"loose files: {sorted(present - expected)}"   # no per-tensor files, no scratch dirs
    fp32 = built["fp32"]["size_bytes"]
    assert built["int8"]["size_pct_of_fp32"] == pytest.approx(100 * built["int8"]["size_bytes"] / fp32, abs=0.01)
    assert built["int8"]["size_bytes"] < 0.5 * fp32   # true sizes: INT8 well under FP32, not the graph file's ratio


def test_external_data_models_match_pytorch(external_out):
    variants_ = _manifest(external_out)["metrics"]["variants"]
    for key in ("fp32", "opt"):
        assert variants_[key]["parity"]["max_abs_diff"] <= 1e-4 and variants_[key]["status"] == "ok"
    assert variants_["opt"]["fused_operators"]["Attention"] == 2   # fused from the graph without its weights
    assert variants_["int8"]["parity"]["argmax_agreement"] > 0.8
    assert "MatMulNBits" in variants_["int4"]["quantized_operators"]
    assert variants_["qdq"]["quantized_operators"]["QuantizeLinear"] > 0
    if variants_["ov-fp32"]["status"] != "skipped":   # OpenVINO read model.onnx and found its data beside it
        assert variants_["ov-fp32"]["parity"]["max_abs_diff"] < 1e-3
        assert variants_["ov-int8"]["status"] in ("ok", "rejected"), variants_["ov-int8"]["reason"]


def test_under_the_threshold_models_stay_one_file(tmp_path, tiny_model_dir):
    from bertopt import export as ex

    ex.export_onnx(tiny_model_dir, tmp_path / "model.onnx")
    assert model_files.model_files(tmp_path / "model.onnx") == [tmp_path / "model.onnx"]
    assert {p.name for p in tmp_path.iterdir()} == {"model.onnx"}
    assert model_files.model_bytes(tmp_path / "model.onnx") == (tmp_path / "model.onnx").stat().st_size


def test_model_files_rule_and_errors(tmp_path, monkeypatch):
    import onnx
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert model_files.tensor_bytes(model) == 64 * 64 * 4
    monkeypatch.setenv(model_files.THRESHOLD_ENV, "100")
    path = tmp_path / "m.onnx"
    model_files.data_file(path).write_bytes(b"stale")             # never appended to
    assert model_files.save(onnx.load_from_string(model.SerializeToString()), path) == [path, tmp_path / "m.onnx.data"]
    assert model_files.model_bytes(path) == path.stat().st_size + 64 * 64 * 4
    assert (tmp_path / "m.onnx.data").stat().st_mode == path.stat().st_mode   # readable like the model file
    model_files.move(path, tmp_path / "n.onnx")                  # renamed: the location follows the new name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.onnx", "n.onnx.data"]
    assert onnx.load(str(tmp_path / "n.onnx")).graph.initializer[0].raw_data == w.raw_data
    monkeypatch.setenv(model_files.THRESHOLD_ENV, "1000000")
    model_files.move(tmp_path / "n.onnx", tmp_path / "o.onnx")   # back under the threshold: one file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx"]
    model_files.save(model, tmp_path / "p.onnx")
    monkeypatch.setenv(model_files.THRESHOLD_ENV, "0")
    model_files.save(onnx.load(str(tmp_path / "p.onnx")), tmp_path / "q.onnx")
    (tmp_path / "q.onnx.data").unlink()
    with pytest.raises(ModelError, match="q.onnx.data is missing"):
        model_files.model_files(tmp_path / "q.onnx")
    monkeypatch.setenv(model_files.THRESHOLD_ENV, "lots")
    with pytest.raises(Exception, match=model_files.THRESHOLD_ENV):
        model_files.threshold()


def test_compare_quick_reports_sizes_with_the_data(external_out, tmp_path):
    import compare

    out = tmp_path / "saved_models"
    shutil.copytree(external_out, out)
    artifacts.write_manifest(out / "tensorrt" / "baseline", stage="tensorrt", status="skipped", config={},
                             fingerprint="test", reason="no CUDA device: TensorRT needs an NVIDIA GPU")
    manifest_path = out / "onnx" / "baseline" / "manifest.json"   # measure two rows, not nine (CI time)
    manifest = json.loads(manifest_path.read_text())
    manifest["metrics"]["variants"] = {k: v for k, v in manifest["metrics"]["variants"].items() if k in ("fp32", "int8")}
    manifest_path.write_text(json.dumps(manifest))
    reports = tmp_path / "reports"
    argv = ["--output-dir", str(out), "--reports-dir", str(reports), "--quick", "--quiet", "--sweep-batches", "1",
            "--sweep-seqs", "16", "--latency-requests", "5", "--threads", "1", "--skip-memory"]
    assert compare.main(argv) == 0
    res = json.loads((reports / "results.json").read_text())
    by = {r["name"]: r for r in res["variants"]}
    d = out / "onnx" / "baseline"
    for name, file in (("ort-fp32", "model.onnx"), ("ort-int8", "model.int8.onnx")):
        assert by[name]["status"] == "ok" and by[name]["accuracy"] is not None, by[name].get("reason")
        assert by[name]["size_bytes"] == model_files.model_bytes(d / file) > 2 * (d / file).stat().st_size
    assert res["recommendation"] and "ort-int8" in (reports / "summary.md").read_text()


def test_deploy_archive_and_local_endpoint_carry_the_data(external_out, tmp_path, monkeypatch):
    import urllib.request

    import aws_deploy
    from bertopt.aws import local

    onnx_file = external_out / "onnx" / "baseline" / "model.int8.onnx"
    seen = {}

    def once(self):
        self.start()
        req = urllib.request.Request(self.url + "/invocations", data=b'{"inputs": ["a great film", "awful"]}',
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            seen["invoke"] = (resp.status, json.loads(resp.read()))
        self.server.close()

    monkeypatch.setattr(local.LocalEndpoint, "serve_forever", once)
    code = aws_deploy.main(["--local", "--port", "0", "--quiet", "--model-path", str(onnx_file),
                            "--output-dir", str(tmp_path / "out")])
    assert code == 0 and seen["invoke"][0] == 200 and len(seen["invoke"][1]) == 2
    archive = tmp_path / "out" / "aws" / "local" / "model.tar.gz"
    with tarfile.open(archive) as tar:
        sizes = {m.name: m.size for m in tar.getmembers()}
    assert sizes["model.int8.onnx.data"] == model_files.data_file(onnx_file).stat().st_size
    assert sizes["model.int8.onnx"] + sizes["model.int8.onnx.data"] == model_files.model_bytes(onnx_file)
    served = tmp_path / "out" / "aws" / "local" / "model"
    assert model_files.model_files(served / "model.int8.onnx")[1].name == "model.int8.onnx.data"


def test_archive_check_refuses_a_model_without_its_data(external_out, tmp_path):
    from bertopt.aws import packaging
    from bertopt.aws.choice import ModelChoice

    d = tmp_path / "onnx"
    shutil.copytree(external_out / "onnx" / "baseline", d)
    (d / "model.qdq.onnx.data").unlink()
    choice = ModelChoice(variant="ort-qdq", backend="onnxruntime", precision="int8", path=d / "model.qdq.onnx",
                         model_dir=d, label_names=["negative", "positive"], max_length=64, origin="test")
    with pytest.raises(ModelError, match="model.qdq.onnx.data is missing"):
        packaging.model_members(choice)


def test_the_registry_files_are_what_the_stage_wrote(external_out):
    d = external_out / "onnx" / "baseline"
    for spec in variants.for_stage("onnx", "onnxruntime"):
        assert (d / spec.file).is_file() and model_files.data_file(d / spec.file).is_file(), spec.name


def test_tensorrt_parses_the_file_by_path_so_its_data_is_found(external_out, tmp_path):
    """build_engine hands the parser the model's path (a fake parser loads it the way TensorRT does:
    external data relative to the file), never bytes that would lose the data file."""
    import onnx
    from test_tensorrt import _Recorder, fake_tensorrt

    from bertopt import tensorrt as trt_mod

    rec = _Recorder()
    trt = fake_tensorrt(rec)
    loaded = {}

    def parse_from_file(self, path):
        model = onnx.load(path)   # raises when model.onnx.data is not beside it
        loaded[Path(path).name] = sum(len(t.raw_data) for t in model.graph.initializer)
        return True

    trt.OnnxParser.parse_from_file = parse_from_file
    onnx_dir = external_out / "onnx" / "baseline"
    plan = trt_mod.precision_plan("fp32", trt_mod.capabilities(trt), onnx_dir)
    trt_mod.build_engine(trt, plan, tmp_path / "model.fp32.plan", trt_mod.make_profile("1x1", "8x64", None, 64), 256)
    assert loaded["model.onnx"] >= model_files.data_file(onnx_dir / "model.onnx").stat().st_size
