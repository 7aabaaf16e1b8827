"""Predictors: torch, ONNX Runtime (and the TensorRT entry point) behind one protocol."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bertopt import artifacts
from bertopt import export as ex
from bertopt.errors import BackendUnavailable, ConfigError, MissingArtifact, ModelError
from bertopt.runtimes import OrtPredictor, Predictor, TorchPredictor, load_predictor

NAMES = ("input_ids", "attention_mask", "token_type_ids")


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """An onnx stage-like dir: model.onnx + model.int8.onnx and a manifest listing them."""
    d = tmp_path_factory.mktemp("onnx_dir")
    ex.export_onnx(tiny_model_dir, d / "model.onnx", max_length=64)
    ex.quantize_int8(d / "model.onnx", d / "model.int8.onnx")
    variants = {"fp32": {"file": "model.onnx", "precision": "fp32", "status": "ok"},
                "int8": {"file": "model.int8.onnx", "precision": "int8", "status": "ok"}}
    artifacts.write_manifest(d, stage="onnx", status="ok", config={}, fingerprint="f", metrics={"variants": variants})
    return d


@pytest.fixture(scope="module")
def batch():
    return ex.random_batches(NAMES, [(4, 19)], 30522, seed=3)[0]


def test_ort_predictor_matches_torch(onnx_dir, tiny_model_dir, batch):
    ort = OrtPredictor(onnx_dir / "model.onnx", intra_op_threads=1)
    torch_pred = TorchPredictor(tiny_model_dir)
    assert isinstance(ort, Predictor) and isinstance(torch_pred, Predictor)
    assert (ort.name, ort.backend, ort.device, ort.precision) == ("ort-fp32", "onnxruntime", "cpu", "fp32")
    assert ort.input_names == NAMES
    got = ort.predict_logits(batch)
    assert got.dtype == np.float32 and got.shape == (4, 2)
    np.testing.assert_allclose(got, torch_pred.predict_logits(batch), atol=1e-4)


def test_ort_predictor_graph_levels_agree(onnx_dir, batch):
    base = OrtPredictor(onnx_dir / "model.onnx", graph_optimization_level="disable").predict_logits(batch)
    for level in ("basic", "extended", "all"):
        np.testing.assert_allclose(OrtPredictor(onnx_dir / "model.onnx", graph_optimization_level=level)
                                   .predict_logits(batch), base, atol=1e-5)
    with pytest.raises(ConfigError, match="graph optimization level"):
        OrtPredictor(onnx_dir / "model.onnx", graph_optimization_level="max")


def test_ort_predictor_errors(onnx_dir, tmp_path, batch):
    import onnxruntime

    absent = next(p for p in ("CUDAExecutionProvider", "NoSuchExecutionProvider")
                  if p not in onnxruntime.get_available_providers())
    with pytest.raises(BackendUnavailable, match=absent):
        OrtPredictor(onnx_dir / "model.onnx", providers=[absent, "CPUExecutionProvider"])
    with pytest.raises(ModelError, match="not found"):
        OrtPredictor(tmp_path / "nope.onnx")
    pred = OrtPredictor(onnx_dir / "model.onnx")
    with pytest.raises(ModelError, match="token_type_ids"):
        pred.predict_logits({k: v for k, v in batch.items() if k != "token_type_ids"})


def test_ort_predictor_accepts_int32_batches(onnx_dir, batch):
    pred = OrtPredictor(onnx_dir / "model.onnx")
    as32 = {k: v.astype(np.int32) for k, v in batch.items()}
    np.testing.assert_allclose(pred.predict_logits(as32), pred.predict_logits(batch), atol=1e-6)


def test_load_predictor_variants(onnx_dir, tiny_model_dir, batch):
    int8 = load_predictor(onnx_dir, "int8", threads=1)
    assert (int8.name, int8.precision, int8.backend) == ("ort-int8", "int8", "onnxruntime")
    assert load_predictor(onnx_dir, "ort-fp32").name == "ort-fp32"
    torch_pred = load_predictor(tiny_model_dir, "torch")
    assert torch_pred.backend == "torch" and torch_pred.precision == "fp32"
    ref = torch_pred.predict_logits(batch)
    assert np.abs(int8.predict_logits(batch) - ref).max() < 1.0
    with pytest.raises(MissingArtifact, match="python onnx_tensorrt.py"):
        load_predictor(onnx_dir, "int4")
    with pytest.raises(MissingArtifact, match="model.fp16.plan"):
        load_predictor(onnx_dir, "trt-fp16")
    with pytest.raises(ConfigError, match="unknown variant"):
        load_predictor(onnx_dir, "int2")
    with pytest.raises(ConfigError, match="device"):
        load_predictor(onnx_dir, "fp32", device="tpu")
    with pytest.raises(ModelError, match="not a model directory"):
        load_predictor(onnx_dir / "missing", "torch")


_ARENA_PROBE = """
import sys, numpy as np, psutil
from bertopt import runtimes
if sys.argv[2] == "own":
    runtimes._SHARED_ARENA["ready"] = False  # the control: every session keeps its own arena
preds = [runtimes.OrtPredictor(sys.argv[1], intra_op_threads=1) for _ in range(3)]
batch = {k: np.ones((256, 128), np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
rss = lambda: psutil.Process().memory_info().rss
before = rss()
growth = []
for p in preds:
    p.predict_logits(batch)
    growth.append(rss() - before)
print(growth[0], growth[-1])
"""


def test_cpu_sessions_share_one_arena_so_open_variants_hold_one_peak(onnx_dir):
    """compare holds every variant open: three sessions after the same big batch hold about one
    session's working set, not three (the control switches the shared arena off)."""
    import subprocess
    import sys

    def growth(mode):
        out = subprocess.run([sys.executable, "-c", _ARENA_PROBE, str(onnx_dir / "model.onnx"), mode],
                             capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]).stdout
        first, total = map(int, out.split())
        return first, total

    first, total = growth("shared")
    own_first, own_total = growth("own")
    assert own_total > 2.5 * own_first  # the probe sees per-session arenas ...
    assert total < 1.5 * first          # ... and the shared one holds a single peak
