"""TensorRT code paths that need no GPU: profile shapes, feature detection, the engine/manifest
compatibility check and the skip path. The engine build + run test needs CUDA and tensorrt."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bertopt import artifacts
from bertopt import tensorrt as trt_mod
from bertopt.errors import BackendUnavailable, ConfigError, ModelError


def _has_gpu_tensorrt() -> bool:
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


gpu = pytest.mark.skipif(not _has_gpu_tensorrt(), reason="needs an NVIDIA GPU with the tensorrt package")


# ----------------------------------------------------------------------------- profile shapes
@pytest.mark.parametrize("text, shape", [("8x128", (8, 128)), ("1X1", (1, 1)), (" 64 x 512 ", (64, 512)),
                                         ("4,32", (4, 32))])
def test_parse_shape(text, shape):
    assert trt_mod.parse_shape(text) == shape


@pytest.mark.parametrize("text", ["8", "8x", "x128", "8x128x2", "-1x5", "axb"])
def test_parse_shape_rejects(text):
    with pytest.raises(ConfigError, match="--trt-max-shapes"):
        trt_mod.parse_shape(text, "--trt-max-shapes")


def test_default_profile_follows_max_length():
    p = trt_mod.make_profile("1x1", "8x128", None, max_length=128)
    assert (p.min, p.opt, p.max) == ((1, 1), (8, 128), (64, 128))
    short = trt_mod.make_profile("1x1", "8x128", None, max_length=64)  # default opt clamped to the max
    assert short.opt == (8, 64) and short.max == (64, 64)
    assert short.contains((64, 64)) and short.contains((1, 1)) and not short.contains((65, 10))
    assert short.to_dict() == {"min": [1, 1], "opt": [8, 64], "max": [64, 64]}


def test_profile_problems_are_all_reported():
    problems = trt_mod.profile_problems((4, 200), (2, 128), (64, 600), max_positions=512)
    assert any("batch" in p and "4 <= 2 <= 64" in p for p in problems)
    assert any("sequence" in p and "200 <= 128 <= 600" in p for p in problems)
    assert any("exceeds the model's 512 positions" in p for p in problems)
    assert trt_mod.profile_problems((1, 1), (8, 128), (64, 128)) == []
    assert "positive" in trt_mod.profile_problems((0, 1), (8, 128), (64, 128))[0]
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        trt_mod.make_profile("1x1", "128x128", "64x128", max_length=128)


# ----------------------------------------------------------------------------- feature detection
TRT10 = SimpleNamespace(BuilderFlag=SimpleNamespace(FP16=1, INT8=2, TF32=3),
                        NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=5))
TRT11 = SimpleNamespace(BuilderFlag=SimpleNamespace(TF32=3),  # FP16/INT8 flags removed
                        NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=5))
OLD_WEAK = SimpleNamespace(BuilderFlag=SimpleNamespace(FP16=1, INT8=2), NetworkDefinitionCreationFlag=SimpleNamespace())


def test_capabilities_by_feature():
    assert trt_mod.capabilities(TRT10) == {"strongly_typed": True, "fp16_flag": True, "int8_flag": True,
                                           "tf32_flag": True}
    assert trt_mod.capabilities(TRT11) == {"strongly_typed": True, "fp16_flag": False, "int8_flag": False,
                                           "tf32_flag": True}
    assert trt_mod.capabilities(OLD_WEAK)["strongly_typed"] is False


@pytest.fixture()
def onnx_dir(tmp_path) -> Path:
    for name in ("model.onnx", "model.fp16.onnx", "model.qdq.onnx"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_precision_plan_trt11_uses_strong_typing(onnx_dir):
    caps = trt_mod.capabilities(TRT11)
    fp32 = trt_mod.precision_plan("fp32", caps, onnx_dir)
    assert fp32["onnx"].endswith("model.onnx") and fp32["clear_flags"] == ["TF32"] and fp32["flags"] == []
    fp16 = trt_mod.precision_plan("fp16", caps, onnx_dir)
    assert fp16["onnx"].endswith("model.fp16.onnx") and fp16["strongly_typed"] and fp16["flags"] == []
    int8 = trt_mod.precision_plan("int8", caps, onnx_dir)
    assert int8["onnx"].endswith("model.qdq.onnx") and int8["strongly_typed"] and int8["flags"] == []
    (onnx_dir / "model.fp16.onnx").unlink()
    assert "model.fp16.onnx is missing" in trt_mod.precision_plan("fp16", caps, onnx_dir)["skip"]


def test_precision_plan_trt10_falls_back_to_builder_flags(onnx_dir):
    caps = trt_mod.capabilities(TRT10)
    (onnx_dir / "model.fp16.onnx").unlink()
    fp16 = trt_mod.precision_plan("fp16", caps, onnx_dir)
    assert fp16["flags"] == ["FP16"] and fp16["onnx"].endswith("model.onnx") and not fp16["strongly_typed"]
    weak = trt_mod.capabilities(OLD_WEAK)
    int8 = trt_mod.precision_plan("int8", weak, onnx_dir)
    assert int8["flags"] == ["INT8"] and int8["onnx"].endswith("model.qdq.onnx")
    with pytest.raises(ConfigError, match="unknown precision"):
        trt_mod.precision_plan("fp8", caps, onnx_dir)


# ----------------------------------------------------------------------------- portability check
HERE = {"tensorrt": "10.9.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def test_compatibility_problems():
    assert trt_mod.compatibility_problems(HERE, dict(HERE)) == []
    other = dict(HERE, tensorrt="10.3.0", compute_capability="8.6", gpu="NVIDIA A10")
    problems = trt_mod.compatibility_problems(HERE, other)
    assert len(problems) == 3 and any("TensorRT version 10.9.0" in p for p in problems)
    assert any("none" in p for p in trt_mod.compatibility_problems(HERE, {"tensorrt": "10.9.0"}))
    assert trt_mod.compatibility_problems({}, HERE)  # nothing recorded: not trusted


def test_check_compatible_reads_the_manifest_beside_the_plan(tmp_path):
    plan = tmp_path / "model.fp16.plan"
    plan.write_bytes(b"engine")
    with pytest.raises(ModelError, match="no manifest.json"):
        trt_mod.check_compatible(plan, HERE)
    artifacts.write_manifest(tmp_path, stage="tensorrt", status="ok", config={}, fingerprint="x",
                             metrics={"engines": {}, **HERE})
    assert trt_mod.check_compatible(plan, dict(HERE))["stage"] == "tensorrt"
    with pytest.raises(ModelError, match=r"not portable|specific to the GPU") as err:
        trt_mod.check_compatible(plan, dict(HERE, compute_capability="8.0"))
    assert "8.0" in str(err.value) and "--force" in str(err.value)


# ----------------------------------------------------------------------------- skip path
def test_availability_reports_a_reason():
    usable, reason = trt_mod.availability()
    assert isinstance(usable, bool) and reason
    if not usable:
        assert "CUDA" in reason or "tensorrt" in reason


def test_import_tensorrt_missing_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "tensorrt":
            raise ImportError("No module named 'tensorrt'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(BackendUnavailable, match="requirements-gpu.txt"):
        trt_mod.import_tensorrt()


@pytest.mark.skipif(_has_gpu_tensorrt(), reason="checks the CPU-only behaviour")
def test_engine_runner_without_cuda_is_backend_unavailable(tmp_path):
    from bertopt.runtimes import TensorRTPredictor

    with pytest.raises(BackendUnavailable, match="CUDA"):
        TensorRTPredictor(tmp_path / "model.fp16.plan")


def test_stage_writes_skipped_tensorrt_manifest(tmp_path, monkeypatch):
    """Without CUDA/TensorRT the stage records 'skipped' with the reason and still succeeds."""
    from bertopt import onnx_stage

    monkeypatch.setattr(trt_mod, "availability", lambda: (False, "no CUDA device (test)"))
    onnx_dir = tmp_path / "onnx" / "baseline"
    artifacts.write_manifest(onnx_dir, stage="onnx", status="ok", config={}, fingerprint="f",
                             metrics={"max_length": 64})
    cfg = onnx_stage.OnnxConfig(output_dir=str(tmp_path), quiet=True)
    source = onnx_stage.Source("baseline", tmp_path / "baseline", None)
    manifest, cached = onnx_stage.tensorrt_source(cfg, source, None, artifacts.read_manifest(onnx_dir))
    assert not cached and manifest["status"] == "skipped" and manifest["reason"] == "no CUDA device (test)"
    on_disk = json.loads((tmp_path / "tensorrt" / "baseline" / "manifest.json").read_text())
    assert on_disk["stage"] == "tensorrt" and on_disk["metrics"]["engines"] == {}
    assert onnx_stage.tensorrt_source(cfg, source, None, on_disk)[1] is True  # up to date now


# ----------------------------------------------------------------------------- GPU only
@gpu
def test_build_and_run_engines_on_gpu(tmp_path, tiny_model_dir):
    from bertopt import export as ex
    from bertopt.runtimes import TensorRTPredictor, TorchPredictor

    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    ex.export_onnx(tiny_model_dir, onnx_dir / "model.onnx", max_length=64)
    ex.convert_fp16(onnx_dir / "model.onnx", onnx_dir / "model.fp16.onnx")
    profile = trt_mod.make_profile("1x1", "8x32", "16x64", max_length=64)
    trt_dir = tmp_path / "trt"
    trt_dir.mkdir()
    metrics = trt_mod.build_engines(onnx_dir, trt_dir, ["fp32", "fp16"], profile, 1024)
    assert metrics["engines"]["fp32"]["status"] == "ok", metrics
    artifacts.write_manifest(trt_dir, stage="tensorrt", status="ok", config={}, fingerprint="f", metrics=metrics)
    batch = ex.random_batches(("input_ids", "attention_mask", "token_type_ids"), [(5, 23)], 30522, seed=1)[0]
    want = TorchPredictor(tiny_model_dir).predict_logits(batch)
    got = TensorRTPredictor(trt_dir / "model.fp32.plan").predict_logits(batch)
    np.testing.assert_allclose(got, want, atol=1e-3)
    with pytest.raises(ModelError, match="outside the engine's profile"):
        TensorRTPredictor(trt_dir / "model.fp32.plan").predict_logits(
            ex.random_batches(("input_ids", "attention_mask", "token_type_ids"), [(32, 8)], 30522)[0])


# ----------------------------------------------------------------------------- build calls (fake TensorRT)
class _Recorder:
    def __init__(self):
        self.calls = []


def fake_tensorrt(rec: _Recorder, parse_ok=True, build_ok=True):
    """Just enough of the tensorrt API for build_engine, recording what it is asked to do."""

    class ILogger:
        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO = range(4)

        def __init__(self):
            pass

    class Input:
        def __init__(self, name):
            self.name = name

    class Network:
        num_inputs = 3

        def get_input(self, i):
            return Input(("input_ids", "attention_mask", "token_type_ids")[i])

    class Parser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            rec.calls.append(("parse", Path(path).name))
            return parse_ok

        def get_error(self, i):
            return SimpleNamespace(desc=lambda: "Unsupported operator FooOp")

    class Profile:
        def set_shape(self, name, mn, opt, mx):
            rec.calls.append(("shape", name, mn, opt, mx))

    class Config:
        def set_memory_pool_limit(self, pool, size):
            rec.calls.append(("workspace", size))

        def set_flag(self, f):
            rec.calls.append(("set_flag", f))

        def clear_flag(self, f):
            rec.calls.append(("clear_flag", f))

        def add_optimization_profile(self, p):
            rec.calls.append(("profile",))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            rec.calls.append(("network_flags", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"PLAN" if build_ok else None

    return SimpleNamespace(ILogger=ILogger, Builder=Builder, OnnxParser=Parser,
                           BuilderFlag=SimpleNamespace(TF32="TF32", FP16="FP16"),
                           NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=3),
                           MemoryPoolType=SimpleNamespace(WORKSPACE="WS"))


def test_build_engine_sequence_with_fake_tensorrt(onnx_dir, tmp_path):
    rec = _Recorder()
    trt = fake_tensorrt(rec)
    caps = trt_mod.capabilities(trt)
    profile = trt_mod.make_profile("1x1", "8x128", None, max_length=128)
    fp32 = trt_mod.build_engine(trt, trt_mod.precision_plan("fp32", caps, onnx_dir), tmp_path / "model.fp32.plan",
                                profile, workspace_mb=256)
    assert (tmp_path / "model.fp32.plan").read_bytes() == b"PLAN" and fp32["size_bytes"] == 4
    assert ("network_flags", 1 << 3) in rec.calls and ("clear_flag", "TF32") in rec.calls
    assert ("workspace", 256 << 20) in rec.calls and ("parse", "model.onnx") in rec.calls
    assert ("shape", "attention_mask", (1, 1), (8, 128), (64, 128)) in rec.calls
    rec.calls.clear()
    (onnx_dir / "model.fp16.onnx").unlink()
    weak = dict(caps, strongly_typed=False)
    trt_mod.build_engine(trt, trt_mod.precision_plan("fp16", weak, onnx_dir), tmp_path / "model.fp16.plan",
                         profile, 256)
    assert ("set_flag", "FP16") in rec.calls and ("network_flags", 0) in rec.calls
    with pytest.raises(ModelError, match="FooOp"):
        trt_mod.build_engine(fake_tensorrt(rec, parse_ok=False), trt_mod.precision_plan("fp32", caps, onnx_dir),
                             tmp_path / "x.plan", profile, 256)
    with pytest.raises(ModelError, match="failed to build"):
        trt_mod.build_engine(fake_tensorrt(rec, build_ok=False), trt_mod.precision_plan("fp32", caps, onnx_dir),
                             tmp_path / "y.plan", profile, 256)
    assert not (tmp_path / "y.plan").exists()
