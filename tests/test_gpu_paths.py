"""The GPU paths against fakes (no GPU here): TensorRT runner/builder failures, the process-wide
TensorRT logger, engine gates, ONNX Runtime's silent CPU fallback, GPU timing, per-compute-type
peaks, per-process GPU memory, AMP precision by compute capability, and the install files."""
from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bertopt import gpu_measure as gm
from bertopt import runtimes
from bertopt import tensorrt as trt_mod
from bertopt.aws.choice import ModelChoice
from bertopt.errors import BackendUnavailable, ModelError

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- fake CUDA + TensorRT runtime
class FakeStream:
    cuda_stream = 0

    def __init__(self, device=None):
        self.device = device

    def synchronize(self):
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as if a GPU were there, with tensors staying on the CPU (device='cpu' runners)."""
    import torch

    calls = SimpleNamespace(devices=[], streams=[], syncs=0)

    def device_ctx(index):
        calls.devices.append(index)
        return contextlib.nullcontext()

    def stream_factory(device=None):
        calls.streams.append(device)
        return FakeStream(device)

    def sync(*_):
        calls.syncs += 1

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", device_ctx)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", stream_factory)
    monkeypatch.setattr(torch.cuda, "synchronize", sync)
    return calls


def fake_trt_runtime(context_ok=True, shape_ok=True, profile=((1, 1), (8, 64), (4, 64)), loggers=None):
    """A tensorrt module with Runtime -> engine -> context (3 int64 inputs, float32 logits)."""
    names = ("input_ids", "attention_mask", "token_type_ids", "logits")

    class ILogger:
        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO = range(4)

        def __init__(self):
            pass

    class Context:
        def __init__(self):
            self.shapes = {}

        def set_input_shape(self, name, shape):
            self.shapes[name] = shape
            return shape_ok

        def set_tensor_address(self, name, ptr):
            pass

        def get_tensor_shape(self, name):
            return (self.shapes["input_ids"][0], 2)

        def execute_async_v3(self, stream):
            return True

    class Engine:
        num_io_tensors = 4
        device_memory_size_v2 = 12345

        def get_tensor_name(self, i):
            return names[i]

        def get_tensor_mode(self, n):
            return "in" if n != "logits" else "out"

        def get_tensor_dtype(self, n):
            return "f32" if n == "logits" else "i64"

        def get_tensor_profile_shape(self, n, i):
            return [profile[0], profile[1], profile[2]]

        def create_execution_context(self):
            return Context() if context_ok else None

    class Runtime:
        def __init__(self, logger):
            if loggers is not None:
                loggers.append(logger)

        def deserialize_cuda_engine(self, blob):
            return Engine()

    return SimpleNamespace(__version__="11.1.0", ILogger=ILogger, Runtime=Runtime,
                           TensorIOMode=SimpleNamespace(INPUT="in"), float32="f32", float16="f16", int32="i32",
                           int8="i8", bool="b", int64="i64")


@pytest.fixture
def plan(tmp_path):
    path = tmp_path / "model.fp32.plan"
    path.write_bytes(b"PLAN")
    return path


def _batch(b, s):
    ids = np.ones((b, s), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": ids, "token_type_ids": 0 * ids}


def test_runner_cells_outside_the_profile_are_refused_with_a_reason(monkeypatch, fake_cuda, plan):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt_runtime())
    pred = runtimes.TensorRTPredictor(plan, check_manifest=False, device="cpu")
    assert pred.accepts((4, 64)) is None and pred.predict_logits(_batch(4, 64)).shape == (4, 2)
    why = pred.accepts((4, 256))
    assert "outside the engine's profile" in why and "--trt-max-shapes" in why
    with pytest.raises(ModelError, match="outside the engine's profile"):
        pred.predict_logits(_batch(4, 256))
    from bertopt.compare.measure import cell_refusal

    assert cell_refusal(pred, 8, 64) and cell_refusal(object(), 8, 4096) is None


def test_runner_context_that_cannot_allocate_is_a_model_error(monkeypatch, fake_cuda, plan):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt_runtime(context_ok=False))
    with pytest.raises(ModelError, match="execution context.*12345 bytes"):
        trt_mod.EngineRunner(plan, check_manifest=False, device="cpu")


def test_runner_checks_set_input_shape(monkeypatch, fake_cuda, plan):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt_runtime(shape_ok=False))
    runner = trt_mod.EngineRunner(plan, check_manifest=False, device="cpu")
    with pytest.raises(ModelError, match="refused input shape"):
        runner.run(_batch(2, 8))


def test_runner_uses_the_requested_device_index(monkeypatch, fake_cuda, plan):
    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt_runtime())
    seen = []
    monkeypatch.setattr(trt_mod, "device_facts", lambda trt=None, index=0: seen.append(index) or {})
    monkeypatch.setattr(trt_mod, "check_compatible", lambda path, facts: {})
    runner = trt_mod.EngineRunner(plan, device="cuda:1")
    assert seen == [1] and fake_cuda.devices == [1] and fake_cuda.streams == [torch.device("cuda:1")]
    assert runner.device_memory_bytes == 12345


def test_one_tensorrt_logger_per_process(monkeypatch, fake_cuda, plan):
    loggers = []
    fake = fake_trt_runtime(loggers=loggers)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_mod, "_LOGGER", None)
    trt_mod.EngineRunner(plan, check_manifest=False, device="cpu")
    trt_mod.EngineRunner(plan, check_manifest=False, device="cpu")
    assert len(loggers) == 2 and loggers[0] is loggers[1] is trt_mod.process_logger(fake)


def test_tensorrt_warnings_are_logged_as_warnings(monkeypatch):
    fake = fake_trt_runtime()
    monkeypatch.setattr(trt_mod, "_LOGGER", None)
    seen = []
    monkeypatch.setattr(trt_mod, "log", SimpleNamespace(warning=lambda *a: seen.append(("warning", a)),
                                                        error=lambda *a: seen.append(("error", a)),
                                                        debug=lambda *a: seen.append(("debug", a))))
    logger = trt_mod.process_logger(fake)
    logger.log(fake.ILogger.Severity.WARNING, "weights are not fp16-representable")
    logger.log(fake.ILogger.Severity.ERROR, "out of memory")
    assert [level for level, _ in seen] == ["warning", "error"]
    assert "fp16-representable" in seen[0][1][1]


def test_builder_that_cannot_start_is_a_failed_entry(monkeypatch, tmp_path):
    import torch
    from test_tensorrt import _Recorder, fake_tensorrt

    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    for name in ("model.onnx", "model.fp16.onnx", "model.qdq.onnx"):
        (onnx_dir / name).write_bytes(b"onnx")
    fake = fake_tensorrt(_Recorder())
    fake.__version__ = "11.1.0"

    def no_builder(logger):
        raise TypeError("pybind11::init(): factory function returned nullptr")

    fake.Builder = no_builder
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "device", lambda i: contextlib.nullcontext())
    monkeypatch.setattr(trt_mod, "device_facts", lambda trt=None, index=0: {"gpu": "fake"})
    profile = trt_mod.make_profile("1x1", "8x128", None, max_length=128)
    out = trt_mod.build_engines(onnx_dir, tmp_path, ["fp32", "fp16"], profile, 256)
    for precision in ("fp32", "fp16"):
        entry = out["engines"][precision]
        assert entry["status"] == "failed" and "cannot create a builder" in entry["reason"], entry
        assert "nullptr" in entry["reason"]


def test_build_errors_of_any_type_are_per_engine(monkeypatch, tmp_path):
    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="11.1.0"))
    monkeypatch.setattr(torch.cuda, "device", lambda i: contextlib.nullcontext())
    monkeypatch.setattr(trt_mod, "device_facts", lambda trt=None, index=0: {})
    monkeypatch.setattr(trt_mod, "capabilities", lambda trt: {"strongly_typed": True})
    monkeypatch.setattr(trt_mod, "precision_plan", lambda p, caps, d: {"onnx": "m.onnx"})

    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory while building")

    monkeypatch.setattr(trt_mod, "build_engine", boom)
    profile = trt_mod.make_profile("1x1", "8x128", None, max_length=128)
    out = trt_mod.build_engines(tmp_path, tmp_path, ["fp32"], profile, 256)
    assert out["engines"]["fp32"]["status"] == "failed"
    assert "RuntimeError: CUDA out of memory" in out["engines"]["fp32"]["reason"]


# ----------------------------------------------------------------------------- engine gates
class _FakeEnginePredictor:
    outputs: dict = {}

    def __init__(self, path, precision=None, device="cuda", **_):
        if precision == "int8":
            raise ModelError("cannot create an execution context (out of GPU memory?)")
        self.logits = self.outputs[precision]
        self.runner = SimpleNamespace(device_memory_bytes=2048)


def test_engines_are_gated_like_onnx_variants(monkeypatch, tmp_path):
    from bertopt import onnx_stage, tensorrt_stage

    labels = np.array([0, 1, 0, 1])
    torch_logits = np.array([[2.0, -2.0], [-2.0, 2.0], [1.0, -1.0], [-1.0, 1.0]], dtype=np.float32)
    _FakeEnginePredictor.outputs = {
        "fp32": torch_logits + 1e-2,                     # over --parity-tolerance: failed
        "fp16": torch_logits[:, ::-1].copy(),            # every prediction flipped: rejected by the budget
    }
    monkeypatch.setattr(runtimes, "TensorRTPredictor", _FakeEnginePredictor)
    ref = SimpleNamespace(eval_set=([_batch(4, 8)], labels), torch_eval_logits=[torch_logits],
                          logits=lambda pred, batches, desc: [pred.logits])
    metrics = {"engines": {p: {"status": "ok", "file": f"model.{p}.plan"} for p in ("fp32", "fp16", "int8")}}
    cfg = onnx_stage.OnnxConfig(parity_tolerance=1e-4, onnx_accuracy_budget=0.01)
    tensorrt_stage._check_engines(cfg, ref, tmp_path, metrics, trt_mod.Profile((1, 1), (8, 8), (64, 128)))
    e = metrics["engines"]
    assert e["fp32"]["status"] == "failed" and "--parity-tolerance" in e["fp32"]["reason"]
    assert e["fp16"]["status"] == "rejected" and "accuracy-budget" in e["fp16"]["reason"]
    assert e["int8"]["status"] == "failed" and "built but cannot run" in e["int8"]["reason"]
    assert e["fp32"]["device_memory_bytes"] == 2048


def test_default_profile_reaches_the_model_position_limit():
    from bertopt import onnx_stage, tensorrt_stage

    cfg = onnx_stage.OnnxConfig(max_length=128)
    profile = tensorrt_stage.trt_profile(cfg, 512)
    assert profile.max == (64, 512) and profile.opt == (8, 128) and profile.contains((32, 256))


# ----------------------------------------------------------------------------- ONNX Runtime CUDA fallback
@pytest.fixture
def fake_ort_cuda(monkeypatch, tmp_path):
    """onnxruntime claiming a CUDA EP whose session silently runs on the CPU."""
    import onnxruntime as ort

    seen = SimpleNamespace(providers=None, preloaded=0)

    class Session:
        def __init__(self, path, sess_options=None, providers=None):
            seen.providers = providers

        def get_providers(self):
            return ["CPUExecutionProvider"]

    def preload():
        seen.preloaded += 1
        raise OSError("libcudnn.so.9: cannot open shared object file")

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", Session)
    monkeypatch.setattr(ort, "preload_dlls", preload, raising=False)
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x")
    return path, seen


def test_ort_cuda_row_that_fell_back_to_cpu_is_refused(fake_ort_cuda):
    path, seen = fake_ort_cuda
    with pytest.raises(BackendUnavailable) as err:
        runtimes.OrtPredictor(path, providers=runtimes.DEVICE_PROVIDERS["cuda"], precision="fp32")
    text = str(err.value)
    assert "fell back to CPUExecutionProvider" in text and "libcudnn.so.9" in text
    assert seen.preloaded == 1
    assert seen.providers[0] == ("CUDAExecutionProvider", {"use_tf32": "0"})  # fp32 rows are strict FP32


def test_cpu_sessions_do_not_preload_gpu_libraries(fake_ort_cuda):
    path, seen = fake_ort_cuda
    pred = runtimes.OrtPredictor.__new__(runtimes.OrtPredictor)
    assert runtimes.fallback_problem(["CPUExecutionProvider"], ["CPUExecutionProvider"]) is None
    with pytest.raises(Exception):  # the fake session has no inputs; what matters is no preload
        runtimes.OrtPredictor.__init__(pred, path)
    assert seen.preloaded == 0


def test_gpu_provider_options_tf32_by_precision():
    cuda = runtimes.DEVICE_PROVIDERS["cuda"]
    assert runtimes.gpu_provider_options(cuda, "fp32")[0] == ("CUDAExecutionProvider", {"use_tf32": "0"})
    assert runtimes.gpu_provider_options(cuda, "fp16")[0] == ("CUDAExecutionProvider", {"use_tf32": "1"})
    given = [("CUDAExecutionProvider", {"use_tf32": "1", "device_id": "1"})]
    assert runtimes.gpu_provider_options(given, "fp32") == given
    assert runtimes.gpu_provider_options(["CPUExecutionProvider"], "fp32") == ["CPUExecutionProvider"]


# ----------------------------------------------------------------------------- timing, peaks, memory
def test_cuda_timer_times_the_synchronous_call_not_default_stream_events(monkeypatch):
    import torch

    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(a))

    def no_events(*a, **k):
        raise AssertionError("default-stream CUDA events do not bracket work on a predictor's own stream")

    monkeypatch.setattr(torch.cuda, "Event", no_events)
    seconds = gm.CudaTimer("cuda:0")(lambda: sum(range(10000)))
    assert seconds > 0 and len(syncs) == 2


def test_gpu_peaks_per_compute_type(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    before = torch.backends.cuda.matmul.allow_tf32
    peaks = gm.gpu_matmul_peaks(device="cpu", sizes=(64,), repeats=1)  # the same code path, on the CPU
    assert set(peaks) == {"fp32", "tf32", "fp16", "bf16", "int8"}
    assert all(p.get("gflops") or p.get("error") for p in peaks.values())
    assert peaks["fp32"]["gflops"] > 0 and torch.backends.cuda.matmul.allow_tf32 == before
    table = {"fp32": {"gflops": 50.0}, "tf32": {"gflops": 400.0}, "fp16": {"gflops": 900.0},
             "int8": {"gflops": 1800.0}}
    assert gm.peak_for("fp16", table) == (900e9, "fp16")
    assert gm.peak_for("int8", table) == (1800e9, "int8")
    assert gm.peak_for("fp32", table) == (50e9, "fp32")
    assert gm.peak_for("fp32", table, tf32=True) == (400e9, "tf32")
    assert gm.peak_for("bf16", table) == (None, "bf16")  # not measured: no fraction rather than a wrong one


def test_nvml_memory_is_per_process_and_by_uuid(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid="1234-abcd"))
    asked = []
    fake = SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByUUID=lambda u: asked.append(u) or "h",
        nvmlDeviceGetHandleByIndex=lambda i: pytest.fail("NVML indices are not CUDA_VISIBLE_DEVICES indices"),
        nvmlDeviceGetComputeRunningProcesses=lambda h: [SimpleNamespace(pid=1, usedGpuMemory=9 << 20),
                                                         SimpleNamespace(pid=42, usedGpuMemory=300 << 20)])
    out = gm.nvml_process_memory(0, pid=42, nvml=fake)
    assert asked == ["GPU-1234-abcd"] and out["nvml_process_used_mb"] == 300
    missing = gm.nvml_process_memory(0, pid=7, nvml=fake)
    assert "nvml_process_used_mb" not in missing and "process 7" in missing["nvml_error"]
    assert set(gm.GPU_MEMORY_NOTES) >= {"cuda_max_allocated_mb", "nvml_process_used_mb", "trt_engine_device_memory_mb"}


# ----------------------------------------------------------------------------- AMP precision
@pytest.mark.parametrize("cc,name,expected", [((7, 5), "Tesla T4", "fp16"), ((7, 0), "Tesla V100", "fp16"),
                                              ((8, 0), "A100", "bf16"), ((9, 0), "H200", "bf16")])
def test_amp_precision_follows_the_compute_capability(monkeypatch, cc, name, expected):
    import torch

    from bertopt.training import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # counts emulation
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cc)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    plan = resolve_precision("amp", torch.device("cuda"))
    assert plan.name == expected and plan.grad_scaler == (expected == "fp16")
    explicit = resolve_precision("bf16", torch.device("cuda"))
    assert explicit.available == (expected == "bf16")


# ----------------------------------------------------------------------------- install files
def _reqs(name):
    lines = (ROOT / name).read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


def _names(lines):
    return {re.split(r"[<>=!~\[ ;]", ln, maxsplit=1)[0].lower() for ln in lines if not ln.startswith("-")}


def test_gpu_install_files_split_what_pypi_serves_from_tensorrt():
    gpu, trt, cpu = _reqs("requirements-gpu.txt"), _reqs("requirements-tensorrt.txt"), _reqs("requirements.txt")
    assert "onnxruntime-gpu" in _names(gpu) and "nvidia-ml-py" in _names(gpu)
    assert not {n for n in _names(gpu) if n.startswith("tensorrt")}, "TensorRT must not sit in the PyPI-only file"
    assert "onnxruntime" not in _names(gpu) and "-r requirements-base.txt" in gpu
    assert "onnxruntime" in _names(cpu) and "-r requirements-base.txt" in cpu
    assert {n for n in _names(trt) if n.startswith("tensorrt")} and not {"onnxruntime", "onnxruntime-gpu"} & _names(trt)
    base = _names(_reqs("requirements-base.txt"))
    assert "torch" in base and not {"onnxruntime", "onnxruntime-gpu"} & base
    # CUDA majors agree: torch 2.13.0 and onnxruntime-gpu from PyPI are CUDA 13 builds, so is TensorRT's wheel
    assert any(ln.startswith("tensorrt-cu13") for ln in trt)


# ----------------------------------------------------------------------------- the endpoint on a GPU
def test_gpu_archive_pins_an_onnxruntime_of_the_containers_cuda_major(tmp_path):
    from bertopt.aws import config, packaging

    choice = ModelChoice(variant="ort-int8", backend="onnxruntime", precision="int8",
                                   path=tmp_path / "model.int8.onnx", model_dir=tmp_path, label_names=["a", "b"],
                                   max_length=128, origin="test", devices=("cpu", "cuda"))
    assert "cu124" in config.IMAGE_TAGS["gpu"]
    assert packaging.requirements(choice, gpu=True) == [config.GPU_ORT_REQUIREMENT]
    major, minor = (int(x) for x in config.GPU_ORT_REQUIREMENT.split("==")[1].split(".")[:2])
    assert major == 1 and 19 <= minor <= 26  # PyPI's CUDA 12.x / cuDNN 9 builds of onnxruntime-gpu
    assert packaging.requirements(choice, gpu=False)[0].startswith("onnxruntime==")


def test_gpu_endpoint_never_silently_serves_from_the_cpu(monkeypatch, fake_ort_cuda):
    import onnxruntime as ort

    from bertopt.aws.serving import inference

    monkeypatch.delenv("BERTOPT_PROVIDERS", raising=False)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])  # CPU-only build
    assert inference._providers({"device": "cuda"})[0] == "CUDAExecutionProvider"
    assert inference._providers({"device": "cpu"}) is None
    path, _ = fake_ort_cuda
    with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider"):
        inference._make_predictor(str(path.parent), {"backend": "onnxruntime", "model_file": path.name,
                                                     "device": "cuda", "precision": "int8"})


# ----------------------------------------------------------------------------- the GPU smoke run
def test_gpu_smoke_without_cuda_skips_every_gpu_row_with_its_reason(tmp_path, tiny_model_dir, capsys):
    import gpu_smoke

    assert gpu_smoke.main(["--model", tiny_model_dir, "--output-dir", str(tmp_path), "--data-dir", str(tmp_path / "none")]) == 0
    import json

    res = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert res["cuda"] is False and len(res["rows"]) >= 11
    assert all(r["status"] == "skipped" and "CUDA" in r["reason"] for r in res["rows"]), res["rows"]
    out = capsys.readouterr().out
    assert "train-fp16" in out and "tensorrt" in out and "11 skipped" in out


def test_gpu_smoke_bad_flags_are_one_line_and_write_nothing(tmp_path, capsys):
    import gpu_smoke

    out = tmp_path / "out"
    assert gpu_smoke.main(["--rows", "-3", "--repeats", "0", "--device", "tpu", "--output-dir", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --rows must be an integer >= 16 (got -3)") and "\n" not in err
    assert "--repeats must be" in err and "--device must be cuda, cuda:N or cpu (got 'tpu')" in err
    assert not out.exists()  # no half-written synthetic data set


def test_gpu_smoke_rehearsal_runs_every_row_on_the_cpu(tmp_path, tiny_model_dir):
    from bertopt import gpu_smoke as smoke

    cfg = smoke.SmokeConfig(model=tiny_model_dir, out=str(tmp_path), rows=48, repeats=1, skip_compare=True,
                            device="cpu", data_dir=str(tmp_path / "none"), external_data=True)
    res = smoke.run(cfg)
    rows = {r["name"]: r for r in res["rows"]}
    layout = rows["onnx-layout"]   # --external-data: every ONNX file the GPU rows read has its one data file
    assert layout["status"] == "ok" and res["environment"]["external_data"] is True
    assert layout["figures"]["files"]["model.onnx"] == ["model.onnx", "model.onnx.data"]
    assert "BERTOPT_EXTERNAL_DATA_BYTES" not in os.environ
    assert rows["train-fp32"]["status"] == "ok" and rows["train-fp32"]["figures"]["samples_per_s"] > 0
    assert rows["train-fp16"]["status"] == "skipped" and "CUDA-only" in rows["train-fp16"]["reason"]
    fp32 = rows["infer-torch-fp32"]
    assert fp32["status"] == "ok", fp32
    assert fp32["figures"]["max_abs_diff_vs_cpu_fp32"] < 1e-4 and fp32["figures"]["argmax_agreement"] == 1.0
    assert fp32["figures"]["b1_p50_ms"] <= fp32["figures"]["b1_p99_ms"]
    assert rows["onnx-stage"]["status"] == "ok"
    for name in ("ort-fp32-cuda", "ort-opt-cuda", "ort-fp16-cuda"):
        assert rows[name]["status"] == "skipped" and "CUDAExecutionProvider" in rows[name]["reason"]
    assert rows["tensorrt"]["status"] == "skipped"
    assert rows["compare-quick-gpu"]["status"] == "skipped"
    assert not [r for r in res["rows"] if r["status"] == "failed"], res["rows"]


# ----------------------------------------------------------------------------- compare with engines
class _ProfiledPredictor:
    """Wraps a real predictor with a TensorRT-like profile: sequences over ``max_seq`` are refused."""

    def __init__(self, inner, max_seq):
        self.inner, self.max_seq = inner, max_seq
        for attr in ("name", "backend", "precision", "device", "input_names"):
            setattr(self, attr, getattr(inner, attr))

    def accepts(self, shape):
        return None if shape[1] <= self.max_seq else \
            f"shape {shape[0]}x{shape[1]} is outside the engine's profile 1x1..64x{self.max_seq}"

    def predict_logits(self, batch):
        if batch["input_ids"].shape[1] > self.max_seq:
            raise ModelError("input input_ids: outside the engine's profile")
        return self.inner.predict_logits(batch)


def test_compare_records_cells_outside_a_profile_and_goes_on(monkeypatch, tmp_path, trained_tiny):
    import json
    import shutil

    import compare
    from test_compare import _export_tiny_onnx

    from bertopt import artifacts
    from bertopt.compare.discover import Variant

    out = tmp_path / "out"
    shutil.copytree(trained_tiny / "baseline", out / "baseline")
    _export_tiny_onnx(out / "baseline", out / "onnx" / "baseline")
    artifacts.write_manifest(out / "tensorrt" / "baseline", stage="tensorrt", status="skipped", config={},
                             fingerprint="test", reason="no CUDA device")
    real = Variant.open
    profiles = {"ort-int8": 64, "ort-fp32": 8}  # int8: the eval texts fit, the 128 cells do not; fp32: nothing fits
    monkeypatch.setattr(Variant, "open", lambda self, threads: _ProfiledPredictor(real(self, threads), profiles[self.name])
                        if self.name in profiles else real(self, threads))
    reports = tmp_path / "reports"
    argv = ["--output-dir", str(out), "--reports-dir", str(reports), "--quick", "--quiet", "--skip-memory",
            "--sweep-batches", "1,8", "--sweep-seqs", "16,128", "--latency-requests", "3", "--threads", "1",
            "--max-eval-samples", "40"]
    assert compare.main(argv) == 0
    by = {r["name"]: r for r in json.loads((reports / "results.json").read_text())["variants"]}
    int8 = by["ort-int8"]
    assert int8["status"] == "ok" and {(c["batch"], c["seq"]) for c in int8["sweep"]} == {(1, 16), (8, 16)}
    assert {(c["batch"], c["seq"]) for c in int8["sweep_skipped"]} == {(1, 128), (8, 128)}
    assert all("outside the engine's profile" in c["reason"] for c in int8["sweep_skipped"])
    assert int8["accuracy"] is not None and int8["throughput"]["samples_per_s"]["median"] > 0
    assert by["ort-fp32"]["status"] == "failed" and "end-to-end batches" in by["ort-fp32"]["reason"]
    assert {(c["batch"], c["seq"]) for c in by["torch-fp32"]["sweep"]} == {(1, 16), (8, 16), (1, 128), (8, 128)}
