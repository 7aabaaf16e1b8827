"""The qat stage on the tiny BERT: fake quant (nvidia-modelopt) -> short distilled fine-tune ->
one Q/DQ ONNX that TensorRT's explicit INT8 accepts, its CPU form, and the rows it records."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bertopt import artifacts, qdq, variants
from bertopt.errors import ConfigError

# logits of the fake-quant PyTorch model and of its ONNX export differ only where the float math
# differs (fused kernels, accumulation order): a value that lands on the other side of a rounding
# boundary moves one INT8 step (scale = amax/127, ~1% of the range) and that step propagates
# through the layers. On the tiny BERT (logits ~0.1-1) 0.05 bounds it with margin; the argmax is
# what the metric reads and must agree on (almost) every row.
PARITY_MAX_ABS = 0.05
PARITY_ARGMAX = 0.97


def qat_config(out, data_dir, **kw):
    from bertopt.qat_stage import QatConfig

    return QatConfig(output_dir=str(out), dataset=data_dir, quiet=True, device="cpu", max_length=64,
                     batch_size=16, qat_fraction=0.2, qat_calibration_samples=32, seed=0, **kw)


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory, tiny_baseline, tiny_data_dir):
    from bertopt.qat_stage import run

    out = tmp_path_factory.mktemp("qat_out")
    shutil.copytree(tiny_baseline, out / "baseline")
    result = run(qat_config(out, tiny_data_dir))
    return out, result


def test_stage_writes_one_qdq_model_per_runtime_and_records_its_rows(qat_run):
    out, result = qat_run
    assert result.status == "ok"
    d = out / "qat" / "baseline"
    files = set(artifacts.list_files(d))
    assert {"model.qat.onnx", "config.json", "tokenizer.json"} <= files and "model.qat-cpu.onnx" not in files
    assert (d / "manifest.json").is_file()
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["stage"] == "qat" and manifest["status"] == "ok"
    m = manifest["metrics"]
    assert set(m["variants"]) == {s.key for s in variants.for_stage("qat")} == {"qat", "ov-qat", "trt-qat"}
    ort = m["variants"]["qat"]
    assert ort["status"] in ("ok", "rejected") and ort["file"] == "model.qat.onnx"
    assert ort["parity"]["argmax_agreement"] > 0.5 and 0 <= ort["accuracy"] <= 1
    assert ort["accuracy_delta"] == pytest.approx(ort["accuracy"] - m["reference"]["accuracy"])
    assert m["variants"]["trt-qat"]["status"] == "skipped" and "model.qat.onnx" in m["variants"]["trt-qat"]["reason"]
    facts = m["qat"]
    assert facts["quantizers"]["weight"] == 12 and facts["quantizers"]["activation"] == 12  # 6 Linear x 2 layers
    assert facts["train"]["optimizer_steps"] >= 5 and facts["train_rows"] == 80  # 20% of 400 rows, one pass
    assert facts["dropout_modules_off"] > 0 and facts["lr"] == pytest.approx(1.5e-5)


def test_exported_model_passes_what_tensorrt_explicit_int8_needs(qat_run):
    out, _ = qat_run
    signed = out / "qat" / "baseline" / "model.qat.onnx"
    assert qdq.trt_problems(signed) == []
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(signed)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    weight_dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weight_dq) == 12 and all(inits[n.input[0]].dtype == np.int8 for n in weight_dq)
    assert all(inits[n.input[1]].shape == (inits[n.input[0]].shape[1],) for n in weight_dq)  # [in, out]: axis 1
    manifest = json.loads((out / "qat" / "baseline" / "manifest.json").read_text())
    assert manifest["metrics"]["qat"]["export"]["tensorrt_check"] == "ok"


def test_fake_quant_model_and_exported_onnx_agree_on_the_eval_slice(qat_run):
    out, _ = qat_run
    manifest = json.loads((out / "qat" / "baseline" / "manifest.json").read_text())
    export = manifest["metrics"]["qat"]["export"]
    parity = export["fake_quant_parity"]
    assert parity["rows"] == 100  # the whole eval split of the tiny data set
    assert parity["max_abs_diff"] < PARITY_MAX_ABS and parity["argmax_agreement"] >= PARITY_ARGMAX
    row = manifest["metrics"]["variants"]["qat"]
    assert abs(row["accuracy"] - export["fake_quant_metric"]) <= 1 - PARITY_ARGMAX


def test_stage_is_current_on_a_second_run(qat_run, tiny_data_dir):
    from bertopt.qat_stage import run

    out, _ = qat_run
    assert run(qat_config(out, tiny_data_dir)).status == "up-to-date"


def test_family_modelopt_cannot_quantize_is_skipped_with_the_reason(tmp_path, tiny_baseline, tiny_data_dir,
                                                                   monkeypatch):
    """A model with nothing ModelOpt quantizes (simulated: every quantizer pattern disabled, as a
    family without Linear layers would be) writes a 'skipped' manifest and no model file."""
    from bertopt import qat
    from bertopt.qat_stage import run

    shutil.copytree(tiny_baseline, tmp_path / "baseline")
    mtq = qat.modelopt()
    monkeypatch.setattr(qat, "quant_config", lambda: {"quant_cfg": [{"quantizer_name": "*", "enable": False}],
                                                      "algorithm": "max"})
    result = run(qat_config(tmp_path, tiny_data_dir))
    assert mtq is not None and result.status == "skipped"
    manifest = json.loads((tmp_path / "qat" / "baseline" / "manifest.json").read_text())
    assert manifest["status"] == "skipped" and "found no Linear layer to quantize" in manifest["reason"]
    assert not list((tmp_path / "qat" / "baseline").glob("model.qat*"))


def test_missing_modelopt_is_skipped_with_the_install_hint(tmp_path, tiny_baseline, tiny_data_dir, monkeypatch):
    import sys

    from bertopt.qat_stage import run

    shutil.copytree(tiny_baseline, tmp_path / "baseline")
    monkeypatch.setitem(sys.modules, "modelopt.torch.quantization", None)
    result = run(qat_config(tmp_path, tiny_data_dir))
    manifest = json.loads((tmp_path / "qat" / "baseline" / "manifest.json").read_text())
    assert result.status == "skipped" and "requirements-qat.txt" in manifest["reason"]


@pytest.mark.parametrize("argv,text", [
    (["--qat-fraction", "0"], "--qat-fraction must be in (0, 1]"),
    (["--qat-lr", "5"], "--qat-lr must be a small positive learning rate"),
    (["--distill-alpha", "2"], "--distill-alpha must be in [0, 1]"),
    (["--qat-source", "/no/such/dir"], "--qat-source /no/such/dir: not baseline/pruned"),
])
def test_bad_flags_are_one_line_exit_1_and_nothing_written(tmp_path, tiny_baseline, argv, text, capsys):
    import qat as script

    shutil.copytree(tiny_baseline, tmp_path / "baseline")
    code = script.main(["--output-dir", str(tmp_path), "--quiet"] + argv)
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and text in errors[0] and "Traceback" not in err
    assert not (tmp_path / "qat").exists()


def test_main_runs_qat_only_when_asked(tmp_path):
    from bertopt import stages

    qat_stage = stages.by_name()["qat"]
    import argparse

    assert qat_stage.enabled_by(argparse.Namespace(qat=True)) and not qat_stage.enabled_by(argparse.Namespace())
    names = [s.name for s in stages.STAGES]
    assert names.index("qat") > names.index("prune") and names.index("qat") < names.index("compare")


def test_onnx_runtime_runs_the_qat_file_on_integer_kernels(qat_run, tmp_path):
    """One quantizer per Linear input: ONNX Runtime's CPU provider fuses every quantized MatMul of
    the signed file into an integer kernel, no float MatMul reads a dequantized weight."""
    import onnxruntime as ort

    from bertopt import export as ex

    out, _ = qat_run
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(out / "qat" / "baseline" / "model.qat.onnx"), so, providers=["CPUExecutionProvider"])
    counts = ex.op_counts(tmp_path / "optimized.onnx")
    integer = counts.get("MatMulIntegerToFloat", 0) + counts.get("QLinearMatMul", 0)
    assert integer == 12 and counts.get("DequantizeLinear", 0) == 0
