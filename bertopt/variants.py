"""The variant registry: every model variant the pipeline builds, measures and deploys, defined once.

A :class:`VariantSpec` says what a variant is (row name, backend, precision, the devices it is
meant for), which stage produces it and under which file name (the key it has in that stage's
manifest), what it is converted from, how its predictor is opened and whether the SageMaker
handler can serve it. ``export`` and ``tensorrt`` take their file tables from here, the ONNX
stage builds the ``onnx``-stage entries, ``compare`` names its rows from it,
:func:`bertopt.runtimes.open_predictor` opens any entry, and ``aws/packaging`` asks it what is
deployable. Adding a backend = one predictor, one converter and entries here (see OpenVINO).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional


@dataclass(frozen=True)
class VariantSpec:
    name: str                   # the row name in compare/report/deploy: ort-int8, trt-fp16, ov-int8
    key: str                    # its key in the producing stage's manifest: int8, fp16, ov-int8
    backend: str                # torch | onnxruntime | tensorrt | openvino
    precision: str              # fp32 | fp16 | bf16 | int8 | int4
    stage: str                  # trained | onnx | tensorrt (the stage whose directory holds the file)
    file: Optional[str]         # the artifact's file name in that directory (None: a model directory)
    devices: tuple = ("cpu",)   # devices it is meant for
    opener: str = ""            # "module:callable" taking (path, *, name, precision, device, threads)
    built_from: Optional[str] = None   # the file it is converted from (same stage dir, or onnx/<source>)
    builder: Optional[str] = None      # "module:callable" converter (the ONNX stage calls it)
    needs: Optional[str] = None        # optional Python module the backend imports lazily
    install_hint: str = ""
    deployable: bool = False    # the SageMaker handler can serve it
    fp32_parity: bool = False   # must match PyTorch within --parity-tolerance (else the stage fails)
    batch_dependent: bool = False  # activations quantized at run time, per batch: what shares a batch
                                   # changes a text's prediction (compare measures batch-1 accuracy)
    float_math: Optional[str] = None  # its float math runs in this (bf16): needs the CPU's native math for
                                      # it (skipped with the reason elsewhere); the opener is told

    @property
    def targets(self) -> tuple[str, ...]:
        """The compare --target values it can serve."""
        return tuple(t for t, d in (("cpu", "cpu"), ("gpu", "cuda")) if d in self.devices)

    def available(self) -> tuple[bool, Optional[str]]:
        """(True, None), or (False, why) when the backend's optional module is not installed or the
        CPU lacks the native math the variant is about (bf16 on a CPU without AMX/AVX512-BF16)."""
        if self.float_math:
            from .precision import cpu_math_support

            ok, why = cpu_math_support(self.float_math)
            if not ok:
                return False, why
        if not self.needs:
            return True, None
        import importlib.util

        try:
            found = importlib.util.find_spec(self.needs) is not None
        except (ImportError, ValueError):  # a module hidden as None in sys.modules
            found = False
        if found:
            return True, None
        return False, f"{self.needs} is not installed ({self.install_hint})"


_ORT = "bertopt.runtimes:open_ort"
_BUILD = "bertopt.converters:"
OV_HINT = "pip install -r requirements.txt: OpenVINO and NNCF are in the default install on x86-64 and arm64"

REGISTRY: dict[str, VariantSpec] = {}


def register(spec: VariantSpec) -> VariantSpec:
    if spec.name in REGISTRY and REGISTRY[spec.name] != spec:
        raise ValueError(f"variant {spec.name!r} is registered twice with different definitions")
    REGISTRY[spec.name] = spec
    return spec


for _spec in (
    VariantSpec("torch-fp32", "torch", "torch", "fp32", "trained", None, ("cpu", "cuda"),
                "bertopt.runtimes:TorchPredictor", deployable=True),
    VariantSpec("torch-bf16", "bf16", "torch", "bf16", "trained", None, ("cpu", "cuda"),
                "bertopt.runtimes:TorchPredictor", deployable=True),
    VariantSpec("torch-fp16", "fp16", "torch", "fp16", "trained", None, ("cuda",),
                "bertopt.runtimes:TorchPredictor", deployable=True),
    VariantSpec("ort-fp32", "fp32", "onnxruntime", "fp32", "onnx", "model.onnx", ("cpu", "cuda"), _ORT,
                deployable=True, fp32_parity=True),
    VariantSpec("ort-opt", "opt", "onnxruntime", "fp32", "onnx", "model.opt.onnx", ("cpu", "cuda"), _ORT,
                "model.onnx", _BUILD + "build_opt", deployable=True, fp32_parity=True),
    # DynamicQuantizeMatMul/QAttention: CPU kernels only
    VariantSpec("ort-int8", "int8", "onnxruntime", "int8", "onnx", "model.int8.onnx", ("cpu",), _ORT,
                "model.opt.onnx", _BUILD + "build_int8", deployable=True,
                batch_dependent=True),
    # the same dynamic INT8 of the unfused graph (MatMulInteger; attention stays float): the fused one
    # is faster on single requests, this one can be faster on batches (compare measures both)
    VariantSpec("ort-int8-unfused", "int8-unfused", "onnxruntime", "int8", "onnx", "model.int8-unfused.onnx",
                ("cpu",), _ORT, "model.onnx", _BUILD + "build_int8_unfused", deployable=True,
                batch_dependent=True),
    VariantSpec("ort-int4", "int4", "onnxruntime", "int4", "onnx", "model.int4.onnx", ("cpu", "cuda"), _ORT,
                "model.onnx", _BUILD + "build_int4", deployable=True, batch_dependent=True),  # int8 compute
    VariantSpec("ort-fp16", "fp16", "onnxruntime", "fp16", "onnx", "model.fp16.onnx", ("cpu", "cuda"), _ORT,
                "model.onnx", _BUILD + "build_fp16", deployable=True),
    # static INT8: build_qdq calibrates once and writes two files: model.qdq.onnx (signed INT8
    # activations, zero-point 0: TensorRT's explicit-quantization input, trt-int8 below) and this
    # one, the same Q/DQ with uint8 activations (zero-point 128, same values) that ONNX Runtime's
    # CPU provider fuses into integer QLinearMatMul kernels (bertopt/qdq.py says why)
    VariantSpec("ort-qdq", "qdq", "onnxruntime", "int8", "onnx", "model.qdq-cpu.onnx", ("cpu", "cuda"), _ORT,
                "model.onnx", _BUILD + "build_qdq", deployable=True),
    VariantSpec("trt-fp32", "fp32", "tensorrt", "fp32", "tensorrt", "model.fp32.plan", ("cuda",),
                "bertopt.runtimes:open_tensorrt", "model.onnx", needs="tensorrt"),
    VariantSpec("trt-fp16", "fp16", "tensorrt", "fp16", "tensorrt", "model.fp16.plan", ("cuda",),
                "bertopt.runtimes:open_tensorrt", "model.fp16.onnx", needs="tensorrt"),
    VariantSpec("trt-int8", "int8", "tensorrt", "int8", "tensorrt", "model.int8.plan", ("cuda",),
                "bertopt.runtimes:open_tensorrt", "model.qdq.onnx", needs="tensorrt"),
    # OpenVINO (x86-64/arm64 CPUs): FP32 reads model.onnx as it is with f32 inference precision
    # forced (the parity row), BF16 the same file with bf16 inference precision (only where the CPU
    # has native bf16 math: AMX or AVX512-BF16), INT8 is NNCF post-training quantization of it,
    # saved as OpenVINO IR (model.ov-int8.xml + .bin)
    VariantSpec("ov-fp32", "ov-fp32", "openvino", "fp32", "onnx", "model.onnx", ("cpu",),
                "bertopt.runtimes:OpenVinoPredictor", "model.onnx", needs="openvino",
                install_hint=OV_HINT, deployable=True, fp32_parity=False),
    VariantSpec("ov-bf16", "ov-bf16", "openvino", "bf16", "onnx", "model.onnx", ("cpu",),
                "bertopt.runtimes:OpenVinoPredictor", "model.onnx", needs="openvino",
                install_hint=OV_HINT, deployable=True, float_math="bf16"),
    VariantSpec("ov-int8", "ov-int8", "openvino", "int8", "onnx", "model.ov-int8.xml", ("cpu",),
                "bertopt.runtimes:OpenVinoPredictor", "model.onnx",
                _BUILD + "build_ov_int8", needs="nncf", install_hint=OV_HINT, deployable=True),
    # the same IR with its float remainder in bf16 (a row of its own: one text differs on SST-2 dev)
    VariantSpec("ov-int8-bf16", "ov-int8-bf16", "openvino", "int8", "onnx", "model.ov-int8.xml", ("cpu",),
                "bertopt.runtimes:OpenVinoPredictor", "model.ov-int8.xml", needs="nncf", install_hint=OV_HINT,
                deployable=True, float_math="bf16"),
    # quantization-aware training (qat stage, nvidia-modelopt): one signed Q/DQ model.qat.onnx for all
    # three runtimes (ModelOpt gives every Linear input its own quantizer, so ONNX Runtime's CPU
    # provider fuses each into an integer MatMulIntegerToFloat without the uint8 rewrite ort-qdq needs)
    VariantSpec("ort-qat", "qat", "onnxruntime", "int8", "qat", "model.qat.onnx", ("cpu",), _ORT,
                deployable=True),
    VariantSpec("ov-qat", "ov-qat", "openvino", "int8", "qat", "model.qat.onnx", ("cpu",),
                "bertopt.runtimes:OpenVinoPredictor", needs="openvino", install_hint=OV_HINT, deployable=True),
    VariantSpec("trt-qat", "trt-qat", "tensorrt", "int8", "qat", "model.qat.plan", ("cuda",),
                "bertopt.runtimes:open_tensorrt", "model.qat.onnx", needs="tensorrt"),
):
    register(_spec)


def get(name: str) -> VariantSpec:
    """The spec of a row name (``ort-int8``, ``trt-fp16``, ``ov-fp32``, ``torch-fp32``)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown variant {name!r} (known: {', '.join(REGISTRY)})") from None


def for_stage(stage: str, backend: Optional[str] = None) -> list[VariantSpec]:
    """Registered variants of one producing stage (and backend), in registration order."""
    return [s for s in REGISTRY.values() if s.stage == stage and (backend is None or s.backend == backend)]


def by_key(stage: str, key: str) -> Optional[VariantSpec]:
    """The spec stored under ``key`` in a ``stage`` manifest (None for an unknown key)."""
    return next((s for s in for_stage(stage) if s.key == key), None)


def onnx_keys(backends: Iterable[str] = ("onnxruntime",)) -> tuple[str, ...]:
    return tuple(s.key for s in for_stage("onnx") if s.backend in tuple(backends))


