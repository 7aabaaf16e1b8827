"""The Predictor protocol, its torch / ONNX Runtime / TensorRT implementations, and
:func:`open_predictor`, the one function that turns a registered variant
(:mod:`bertopt.variants`) and its file into a predictor. The ONNX stage, compare.py (and its
fresh-process memory probe) and the SageMaker handler use these; nothing else builds inference
sessions by hand. The OpenVINO predictor lives with its converter in
:mod:`bertopt.openvino_backend` and is reached through the registry like the others.

A batch is what :func:`bertopt.data.pad_batch` returns: a dict of int64 numpy arrays
``input_ids``, ``attention_mask`` and (for BERT) ``token_type_ids``, shape (batch, seq).
"""
from __future__ import annotations

import threading
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Predictor(Protocol):
    name: str        # e.g. "torch-fp32", "ort-int8"
    backend: str     # torch | onnxruntime | tensorrt | openvino
    precision: str   # fp32 | fp16 | bf16 | int8 | int4
    device: str      # cpu | cuda
    input_names: tuple  # the batch keys the model reads (input_ids, attention_mask[, token_type_ids])

    def predict_logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """float32 logits of shape (batch, num_labels)."""
        ...


class TorchPredictor:
    """PyTorch eager inference of a save_pretrained directory (or an already loaded model)."""

    backend = "torch"

    def __init__(self, model, name: str = "torch-fp32", device: str = "cpu", precision: str = "fp32",
                 threads: int | None = None):
        import torch

        from . import modeling

        if threads:
            torch.set_num_threads(threads)
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            model = modeling.load_model(str(model))
        self.model = model.eval().to(device)
        self.name, self.device, self.precision = name, device, precision
        self._autocast = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.input_names = ("input_ids", "attention_mask") + (
            ("token_type_ids",) if modeling.uses_token_type_ids(self.model) else ())

    def predict_logits(self, batch):
        import torch

        inputs = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device)
                  for k, v in batch.items() if k in self.input_names}
        with torch.inference_mode(), torch.autocast(torch.device(self.device).type, dtype=self._autocast,
                                                    enabled=self._autocast is not None):
            logits = self.model(**inputs).logits
        if self.device != "cpu":
            torch.cuda.synchronize()
        return logits.float().cpu().numpy()


# ----------------------------------------------------------------------------- ONNX Runtime
GRAPH_LEVELS = ("disable", "basic", "extended", "layout", "all")
DEVICE_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_ORT_INPUT_DTYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32}


GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def _provider_name(p) -> str:
    return p[0] if isinstance(p, (tuple, list)) else p


def gpu_provider_options(providers, precision: str) -> list:
    """The providers with the CUDA EP's TF32 mode set explicitly: off for fp32 variants (ORT's CUDA EP
    runs FP32 MatMul/Conv as TF32 by default, which would make an "fp32" row a TF32 row), on
    otherwise. Options already given by the caller win."""
    out = []
    for p in providers:
        name, opts = (p[0], dict(p[1])) if isinstance(p, (tuple, list)) else (p, {})
        if name == "CUDAExecutionProvider":
            opts.setdefault("use_tf32", "0" if precision == "fp32" else "1")
        out.append((name, opts) if opts else name)
    return out


def preload_gpu_libraries(ort) -> str | None:
    """onnxruntime.preload_dlls() where this onnxruntime has it (>= 1.21): loads the CUDA/cuDNN
    libraries from the nvidia-* wheels or torch so the CUDA EP can start. Returns the error text
    when it fails (the CUDA EP will then most likely fall back to the CPU), else None."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return None
    try:
        preload()
    except Exception as exc:  # missing libraries, wrong CUDA major
        text = str(exc).strip()
        return f"onnxruntime.preload_dlls() failed: {text.splitlines()[0][:200] if text else type(exc).__name__}"
    return None


def fallback_problem(requested, active, note: str | None = None) -> str | None:
    """Why a session is not running on the GPU execution providers it was asked for (ORT silently
    falls back to the CPU when e.g. the CUDA EP cannot load its libraries), or None."""
    names = [_provider_name(p) for p in requested]
    lost = [n for n in names if n in GPU_PROVIDERS and n not in active]
    if not lost:
        return None
    note = note or ("its CUDA/cuDNN libraries could not be loaded: check that the CUDA major of onnxruntime-gpu "
                    "matches the driver and the installed nvidia-* libraries")
    return f"onnxruntime could not start {', '.join(lost)} and fell back to {', '.join(active) or 'nothing'} ({note})"


_SHARED_ARENA: dict = {"lock": threading.Lock(), "ready": None}


def shared_cpu_arena(ort) -> bool:
    """Register one CPU arena with ONNX Runtime's environment, once per process; True when CPU
    sessions can use it (``session.use_env_allocators``). Each session otherwise keeps its own
    arena at the peak of its largest run: compare holds every variant open and runs one at a time,
    and with 16 MiniLM variants and a 64 x 256 sweep cell its peak RSS was 15.5 GB; with the shared
    arena it is 3.7 GB (same command, same run times within noise)."""
    with _SHARED_ARENA["lock"]:
        if _SHARED_ARENA["ready"] is None:
            try:
                info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
                ort.create_and_register_allocator(info, None)
                _SHARED_ARENA["ready"] = True
            except Exception:  # a build without the call: every session keeps its own arena
                _SHARED_ARENA["ready"] = False
        return _SHARED_ARENA["ready"]


class OrtPredictor:
    """An ONNX Runtime session over one .onnx file.

    ``providers`` None = CPU only; pass e.g. ``DEVICE_PROVIDERS["cuda"]`` (names or (name, options)
    pairs). A missing, truncated or corrupt file raises :class:`bertopt.errors.ModelError`; a
    requested execution provider this onnxruntime build lacks raises BackendUnavailable."""

    backend = "onnxruntime"

    def __init__(self, path, name: str | None = None, providers=None, intra_op_threads: int | None = None,
                 graph_optimization_level: str = "all", precision: str = "fp32", spinning: bool | None = None):
        from pathlib import Path

        import onnxruntime as ort

        from .errors import BackendUnavailable, ConfigError, ModelError, first_line

        self.path = Path(path)
        if graph_optimization_level not in GRAPH_LEVELS:
            raise ConfigError(f"graph optimization level must be one of {', '.join(GRAPH_LEVELS)} "
                              f"(got {graph_optimization_level!r})")
        providers = gpu_provider_options(list(providers or DEVICE_PROVIDERS["cpu"]), precision)
        available = set(ort.get_available_providers())
        missing = [_provider_name(p) for p in providers if _provider_name(p) not in available]
        if missing:
            raise BackendUnavailable(
                f"onnxruntime {ort.__version__} here has no {', '.join(missing)} (available: "
                f"{', '.join(sorted(available))}); install onnxruntime-gpu (requirements-gpu.txt) on a CUDA machine")
        if not self.path.is_file():
            raise ModelError(f"ONNX file not found: {self.path} (run `python onnx_tensorrt.py` to create it)")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, {
            "disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
            "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}[graph_optimization_level])
        if intra_op_threads:
            opts.intra_op_num_threads = int(intra_op_threads)
        if spinning is not None:  # idle intra-op threads busy-wait for the next run (ORT's default: on)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        opts.log_severity_level = 3  # errors only; session problems surface as exceptions
        wants_gpu = any(_provider_name(p) in GPU_PROVIDERS for p in providers)
        if not wants_gpu and shared_cpu_arena(ort):
            opts.add_session_config_entry("session.use_env_allocators", "1")
        preload_note = preload_gpu_libraries(ort) if wants_gpu else None
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as exc:  # InvalidProtobuf, Fail, NotImplemented, ...
            text = str(exc).strip()
            first = first_line(exc)
            if "protobuf" in text.lower() or "invalid_protobuf" in text.lower() or self.path.stat().st_size == 0:
                reason = "the file is corrupt or truncated"
            else:
                reason = "the model cannot run with this onnxruntime build"
            raise ModelError(f"cannot load {self.path}: {first} ({reason}; re-create it with "
                             "`python onnx_tensorrt.py --force`)") from None
        self.providers = self.session.get_providers()
        problem = fallback_problem(providers, self.providers, preload_note)
        if problem:
            raise BackendUnavailable(f"{self.path.name}: {problem}")
        self.device = "cuda" if any(p in self.providers for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")) else "cpu"
        self.precision = precision
        parts = self.path.name.split(".")  # model.onnx -> fp32, model.int8.onnx -> int8
        self.name = name or f"ort-{parts[1] if len(parts) == 3 else 'fp32'}"
        inputs = self.session.get_inputs()
        self.input_names = tuple(i.name for i in inputs)
        self._input_dtypes = {i.name: _ORT_INPUT_DTYPES.get(i.type, np.int64) for i in inputs}
        self.output_names = [self.session.get_outputs()[0].name]

    def predict_logits(self, batch):
        from .errors import ModelError

        missing = [n for n in self.input_names if n not in batch]
        if missing:
            raise ModelError(f"{self.path.name} needs input(s) {', '.join(missing)} that the batch lacks")
        feed = {n: np.ascontiguousarray(batch[n], dtype=self._input_dtypes[n]) for n in self.input_names}
        out = self.session.run(self.output_names, feed)[0]
        return np.asarray(out, dtype=np.float32)


# ----------------------------------------------------------------------------- TensorRT
class TensorRTPredictor:
    """A TensorRT engine (``.plan``) run on torch CUDA tensors; see :mod:`bertopt.tensorrt`.

    Refuses a plan whose manifest records a different TensorRT version or GPU (engines are not
    portable). Imports tensorrt lazily; without CUDA or tensorrt it raises BackendUnavailable."""

    backend = "tensorrt"
    device = "cuda"

    def __init__(self, plan_path, name: str | None = None, precision: str | None = None,
                 check_manifest: bool = True, device: str = "cuda"):
        from pathlib import Path

        from . import tensorrt as trt_mod

        self.path = Path(plan_path)
        self.runner = trt_mod.EngineRunner(self.path, check_manifest=check_manifest, device=device)
        if precision is None:  # model.<precision>.plan
            parts = self.path.name.split(".")
            precision = parts[1] if len(parts) == 3 else "fp32"
        self.precision = precision
        self.name = name or f"trt-{self.precision}"
        self.device = device
        self.input_names = self.runner.input_names
        self.stream = self.runner.stream

    def accepts(self, shape) -> str | None:
        """None when a (batch, sequence) batch fits the engine's optimization profile, else why not."""
        return self.runner.accepts(shape)

    def predict_logits(self, batch):
        return self.runner.run(batch)


# ----------------------------------------------------------------------------- OpenVINO
# OpenVINO's inference precision per row precision. OpenVINO's own default on a CPU with native bf16
# math (AMX, and AVX512-BF16 too: seen on an AMD EPYC) is bf16, which would silently turn the f32
# parity row into a bf16 row, so every row says what it runs: fp32 forces f32, bf16 (the ov-bf16
# row, built only where the CPU has native bf16 math) asks for bf16, and an INT8 model's float
# remainder (softmax, layer norms, the matmuls NNCF leaves in float) runs f32 in ov-int8 and bf16 in
# ov-int8-bf16 (a row of its own: on the EPYC it read 0.8612 against 0.8624 on SST-2 dev, one text).
# What was compiled is read back (``inference_precision``).
OV_INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


class OpenVinoPredictor:
    """An OpenVINO CPU model compiled from ``model.onnx`` (FP32 with f32 inference precision forced,
    or BF16) or from NNCF-quantized IR (INT8): see :data:`OV_INFERENCE_PRECISION`.
    Imports openvino lazily; without it BackendUnavailable names the requirements file.

    Safe to call from several threads at once (a server's batch runners or HTTP threads): each
    calling thread gets its own InferRequest. One request shared by two threads hands one caller the
    other's outputs (MiniLM INT8, 2 threads: 128 of 600 answers wrong, no error raised). For that many
    concurrent callers compile ``streams`` CPU streams of ``threads`` threads each: on one stream
    concurrent calls queue behind each other (batch 1, 1 thread: 815 texts/s from 2 callers on one
    stream, 1,742 on two)."""

    backend = "openvino"

    def __init__(self, path, *, name: str = "ov-fp32", precision: str = "fp32", device: str = "cpu",
                 threads: int | None = None, streams: int = 1, float_precision: str | None = None):
        from pathlib import Path

        from .errors import BackendUnavailable, ModelError, first_line

        try:
            import openvino as ov
        except ImportError:
            raise BackendUnavailable("openvino is not installed (pip install -r requirements.txt installs it on "
                                     "x86-64 and arm64)") from None
        self.path, self.name, self.precision, self.device = Path(path), name, precision, "cpu"
        if not self.path.is_file():
            raise ModelError(f"OpenVINO model not found: {self.path} (run `python onnx_tensorrt.py` to create it)")
        streams = self.streams = max(1, int(streams))
        config = {"PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT"}
        hint = float_precision or OV_INFERENCE_PRECISION.get(precision)
        if hint:
            config["INFERENCE_PRECISION_HINT"] = hint
        if streams > 1:
            config["NUM_STREAMS"] = streams
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads) * streams
        try:
            self.compiled = ov.Core().compile_model(str(self.path), "CPU", config)
        except Exception as exc:  # openvino raises RuntimeError subclasses with multi-line text
            raise ModelError(f"cannot load {self.path} with openvino: {first_line(exc)}"
                             " (re-create it with `python onnx_tensorrt.py --force`)") from None
        self.inference_precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self._local = threading.local()  # this thread's InferRequest
        self.input_names = tuple(i.get_any_name() for i in self.compiled.inputs)
        self._output = self.compiled.outputs[0]

    def predict_logits(self, batch):
        feed = {n: np.ascontiguousarray(batch[n], dtype=np.int64) for n in self.input_names}
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        out = request.infer(feed)[self._output]
        return np.array(out, dtype=np.float32)  # a copy: the request reuses its output buffer

    def warm_up(self, max_seq: int, batch: int = 1) -> float:
        """Run every input length 2..``max_seq`` once at ``batch`` rows; returns the seconds taken.
        OpenVINO's CPU plugin prepares each input shape on its first call (MiniLM INT8, 2 threads:
        9-40 ms at batch 1 against ~2 ms warm), so a server calls this before its first request."""
        import time

        t0 = time.perf_counter()
        for n in range(2, int(max_seq) + 1):
            ones = np.ones((batch, n), dtype=np.int64)
            self.predict_logits({"input_ids": ones, "attention_mask": ones, "token_type_ids": 0 * ones})
        return time.perf_counter() - t0


# ----------------------------------------------------------------------------- factory
def open_ort(path, *, name: str, precision: str, device: str = "cpu", threads: int | None = None,
             streams: int = 1):
    """An ONNX Runtime session; ``streams`` > 1 needs nothing more than ``threads=1``: the session
    is thread-safe and its callers' threads run their calls side by side."""
    from .errors import ConfigError

    if device not in DEVICE_PROVIDERS:
        raise ConfigError(f"device must be one of {', '.join(DEVICE_PROVIDERS)} (got {device!r})")
    return OrtPredictor(path, name=name, providers=DEVICE_PROVIDERS[device], intra_op_threads=threads,
                        precision=precision)


def open_tensorrt(path, *, name: str, precision: str, device: str = "cuda", threads: int | None = None,
                  streams: int = 1):
    return TensorRTPredictor(path, name=name, precision=precision, device=device if device.startswith("cuda") else "cuda")


def open_predictor(spec, path, *, device: str | None = None, threads: int | None = None, name: str | None = None,
                   streams: int = 1):
    """The Predictor of a registered variant (:class:`bertopt.variants.VariantSpec` or its row
    name) whose artifact is ``path`` (a model directory for torch, else the variant's file);
    ``streams`` > 1 opens it for that many concurrent calls (:mod:`bertopt.throughput`)."""
    import importlib

    from . import variants

    if isinstance(spec, str):
        spec = variants.get(spec)
    module, attr = spec.opener.split(":")
    opener = getattr(importlib.import_module(module), attr)
    extra = {"streams": int(streams)} if streams and int(streams) > 1 else {}
    if spec.float_math:  # e.g. ov-bf16: its float math in bf16
        extra["float_precision"] = spec.float_math
    return opener(path, name=name or spec.name, precision=spec.precision, device=device or spec.devices[0],
                  threads=threads, **extra)


def open_from_dict(d: dict):
    """open_predictor from a JSON-able dict (what crosses into compare's fresh-process memory probe)."""
    return open_predictor(d["spec"], d["path"], device=d.get("device"), threads=d.get("threads"),
                          name=d.get("name"))


def _variant_from_manifest(directory, variant):
    from . import artifacts

    manifest = artifacts.read_manifest(directory)
    if manifest and manifest.get("stage") == "onnx":
        return manifest.get("metrics", {}).get("variants", {}).get(variant)
    return None


def load_predictor(onnx_dir_or_model_dir, variant: str, device: str = "cpu", threads: int | None = None):
    """The Predictor for ``variant`` of a stage directory (a user-facing name, resolved through
    the registry):

    - ``torch`` (or ``torch-fp32``/``torch-fp16``/``torch-bf16``): a save_pretrained model directory;
    - ``fp32|opt|int8|int4|fp16|qdq`` (optionally ``ort-`` prefixed) or ``ov-fp32|ov-int8``: a file of
      an ONNX stage dir (``saved_models/onnx/<source>``); ``device`` cpu, cuda or tensorrt (ORT provider);
    - ``trt-fp32|trt-fp16|trt-int8``: a plan of a TensorRT stage dir (``saved_models/tensorrt/<source>``).
    """
    from pathlib import Path

    from . import variants
    from .errors import ConfigError, MissingArtifact, ModelError

    directory = Path(onnx_dir_or_model_dir)
    v = variant.lower()
    if v == "torch" or v.startswith("torch-"):
        precision = v.split("-", 1)[1] if "-" in v else "fp32"
        if not (directory / "config.json").is_file():
            raise ModelError(f"{directory} is not a model directory (no config.json)")
        dev = "cuda" if device.startswith("cuda") else "cpu"
        return TorchPredictor(str(directory), name=f"torch-{precision}", device=dev, precision=precision,
                              threads=threads)
    name = v if v in variants.REGISTRY else f"ort-{v}"
    spec = variants.REGISTRY.get(name)
    if spec is None or spec.stage == "trained":
        known = [s.name for s in variants.REGISTRY.values() if s.stage != "trained"]
        raise ConfigError(f"unknown variant {variant!r} (torch, {', '.join(known)})")
    file = spec.file
    info = _variant_from_manifest(directory, spec.key) if spec.stage == "onnx" else None
    if info:
        file = info.get("file") or file
    path = directory / file
    if not path.is_file():
        hint = "  # on an NVIDIA GPU with tensorrt installed" if spec.backend == "tensorrt" else ""
        raise MissingArtifact(path, "python onnx_tensorrt.py" + hint)
    if spec.backend == "onnxruntime":
        return open_ort(path, name=name, precision=(info or {}).get("precision") or spec.precision,
                        device=device, threads=threads)
    return open_predictor(spec, path, threads=threads)
