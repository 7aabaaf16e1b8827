"""ONNX export with parity checks, ONNX Runtime graph fusion and quantization.

Every conversion here is a plain function ``src file -> dst file`` that returns facts for the
manifest; the stage (:mod:`bertopt.onnx_stage`) decides what to build and checks each result
against PyTorch with :func:`compare_logits`.

Variants (file names are registered in :mod:`bertopt.variants`, the contract compare.py and the AWS
deploy read):

========  ===================  =========  ===========================================================
variant   file                 precision  how
========  ===================  =========  ===========================================================
fp32      model.onnx           fp32       ``torch.onnx.export(dynamo=False)``, eager attention
opt       model.opt.onnx       fp32       ``onnxruntime.transformers.optimizer`` (Attention, SkipLN..)
int8      model.int8.onnx      int8       dynamic quantization of the fused graph
int4      model.int4.onnx      int4       MatMulNBits / GatherBlockQuantized weight-only 4-bit
fp16      model.fp16.onnx      fp16       float16 conversion, LayerNorm/Softmax/... kept in fp32
qdq       model.qdq.onnx       int8       static symmetric QDQ (explicit quantization for TensorRT)
========  ===================  =========  ===========================================================
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from . import model_files
from . import variants as _variants
from .errors import ModelError, PipelineError, first_line

log = logging.getLogger("bertopt.export")

# variant key -> (file, precision, devices): a view of the ONNX Runtime entries of the registry
VARIANTS = {s.key: (s.file, s.precision, s.devices) for s in _variants.for_stage("onnx", "onnxruntime")}
FP32_VARIANTS = tuple(s.key for s in _variants.for_stage("onnx") if s.fp32_parity)
OUTPUT_NAME = "logits"
MIN_OPSET = 17
# operators kept in fp32 by the fp16 conversion: normalization, softmax and the reductions /
# transcendental functions whose intermediate values overflow or lose too much in fp16
FP16_KEEP_FP32 = ("LayerNormalization", "SkipLayerNormalization", "EmbedLayerNormalization", "Softmax",
                  "ReduceMean", "ReduceSum", "Pow", "Sqrt", "Erf", "Exp", "Tanh", "Range", "CumSum")


class ExportError(PipelineError):
    """A conversion produced no usable model (the message says which and why)."""


class VariantUnavailable(ExportError):
    """This variant cannot be built for this architecture (recorded ``skipped`` with the reason)."""


class NoAttentionFused(ExportError):
    """The transformer optimizer fused no attention in the graph."""


# ----------------------------------------------------------------------------- helpers
def file_size(path: str | os.PathLike) -> int:
    """Bytes on disk of a model, its external data (or an OpenVINO IR's .bin) included."""
    return model_files.model_bytes(path)


def load_onnx(path: str | os.PathLike, data: bool = True):
    """onnx.load with a ModelError naming the file when it is missing, truncated or not ONNX
    (``data=False``: the graph only, external weights left on disk)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"ONNX file not found: {path} (run `python onnx_tensorrt.py` to create it)")
    try:
        model = onnx.load(str(path), load_external_data=data)
    except Exception as exc:  # google.protobuf DecodeError, OSError, ...
        raise ModelError(f"{path} is not a readable ONNX model ({first_line(exc)}); the file is corrupt or "
                         "truncated: re-create it with `python onnx_tensorrt.py --force`") from None
    if not model.graph.node:
        raise ModelError(f"{path} holds an empty ONNX graph; the file is corrupt or truncated: re-create it "
                         "with `python onnx_tensorrt.py --force`")
    return model


def op_counts(path_or_model) -> dict[str, int]:
    from collections import Counter

    model = load_onnx(path_or_model, data=False) if isinstance(path_or_model, (str, os.PathLike)) else path_or_model
    return dict(Counter(n.op_type for n in model.graph.node))


@contextlib.contextmanager
def quiet_quantizer_logs():
    """ONNX Runtime's quantization tools log through the root logger and their own INFO handlers;
    keep our console readable (warnings that matter are turned into our own messages)."""
    names = ["", "onnxruntime", "onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer",
             "onnxruntime.transformers", "onnx_model", "fusion_base", "onnx_model_bert", "nncf"]
    saved = {n: logging.getLogger(n).level for n in names}
    try:
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # calibrators print()
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


# ----------------------------------------------------------------------------- export
def input_names_for(model) -> tuple[str, ...]:
    from . import modeling

    return ("input_ids", "attention_mask") + (("token_type_ids",) if modeling.uses_token_type_ids(model) else ())


def dummy_batch(input_names: Sequence[str], batch: int = 2, seq: int = 8, vocab: int = 1000,
                seed: int = 0) -> dict[str, np.ndarray]:
    """A small batch whose second row is padded, so the traced mask path is the general one."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, max(vocab, 6), size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    if batch > 1:
        mask[1:, seq // 2:] = 0
    out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {k: out[k] for k in input_names}


def export_onnx(model_dir: str | os.PathLike, out_path: str | os.PathLike, opset: int = MIN_OPSET,
                max_length: int = 128) -> dict:
    """Export a save_pretrained classifier to ONNX with dynamic batch and sequence axes.

    Loads the model with eager attention: with the SDPA path the ORT transformer optimizer fuses
    no attention. Uses the TorchScript exporter (``dynamo=False``): the torch.export-based default
    of torch >= 2.9 ignores ``dynamic_axes``."""
    import torch

    from . import modeling

    if opset < MIN_OPSET:
        raise ExportError(f"--opset {opset}: at least {MIN_OPSET} is required (LayerNormalization)")
    start = time.perf_counter()
    model = modeling.load_model(str(model_dir), attn_implementation="eager").eval()
    names = input_names_for(model)
    batch = dummy_batch(names, batch=2, seq=min(8, max_length), vocab=model.config.vocab_size)
    args = tuple(torch.from_numpy(batch[n]) for n in names)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes[OUTPUT_NAME] = {0: "batch"}

    class _Logits(torch.nn.Module):  # positional inputs -> logits tensor only
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs):
            return self.inner(**dict(zip(names, inputs))).logits

    import onnx

    # a model over 2 GB comes out of torch.onnx.export as one loose file per tensor: export into a
    # private directory, and let model_files put it beside out_path by the rule (one .onnx.data)
    with model_files.scratch(out_path) as tmp:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            torch.onnx.export(_Logits(model), args, str(tmp), input_names=list(names), output_names=[OUTPUT_NAME],
                              dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False)
        config, model = model.config, None  # free the torch weights before the ONNX ones are loaded
        onnx.checker.check_model(str(tmp))
    tracer = [w for w in caught if w.category.__name__ == "TracerWarning"]
    if tracer:
        log.debug("export: %d tracer warning(s) (shape checks in transformers' mask code; parity is "
                  "verified below on shapes the model was not traced with)", len(tracer))
    return {"opset": opset, "input_names": list(names), "output_names": [OUTPUT_NAME],
            "dynamic_axes": {k: {str(a): d for a, d in v.items()} for k, v in axes.items()},
            "attn_implementation": "eager", "exporter": "torchscript (dynamo=False)",
            "num_heads": int(config.num_attention_heads), "hidden_size": int(config.hidden_size),
            "num_layers": int(getattr(config, "num_hidden_layers", 0)),
            "export_s": round(time.perf_counter() - start, 2)}


# ----------------------------------------------------------------------------- ORT fusion
def optimize(src: str | os.PathLike, dst: str | os.PathLike, num_heads: int, hidden_size: int,
             model_type: str = "bert", require_attention: bool = True) -> dict:
    """Offline graph fusion with onnxruntime.transformers.optimizer (no ORT runtime level: the
    saved graph stays portable between CPU and CUDA). Fails when no Attention was fused."""
    import onnx
    from onnxruntime.transformers import optimizer

    # the graph without its external weights: every fusion's shape-inference helper copies the whole
    # model (4-5 copies of xlm-roberta-large's 2.24 GB at once); the weights a fusion reads load
    # from beside the file (onnx resolves them against the working directory), the rest before saving
    model = load_onnx(src, data=False)  # also a clear error on a bad input
    with quiet_quantizer_logs(), contextlib.chdir(Path(src).resolve().parent):
        opt = optimizer.optimize_model(model, model_type=model_type, num_heads=num_heads,
                                       hidden_size=hidden_size, opt_level=0)
        stats = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
    opt.shape_infer_helper = None
    onnx.external_data_helper.load_external_data_for_model(opt.model, str(Path(src).resolve().parent))
    if require_attention and not stats.get("Attention", 0) and not stats.get("MultiHeadAttention", 0):
        raise NoAttentionFused(f"{src}: the ONNX Runtime transformer optimizer fused 0 Attention nodes "
                          f"(fusions: {stats or 'none'}); the graph was probably exported with SDPA attention "
                          "or the architecture is not BERT-like, so model.opt.onnx would be no faster")
    model_files.save(opt, dst)
    return {"fused_operators": stats}


# ----------------------------------------------------------------------------- INT8 dynamic
def cpu_has_vnni() -> bool:
    from .precision import cpu_flags

    flags = cpu_flags()
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def default_reduce_range() -> tuple[bool, str]:
    """reduce_range (7-bit weights) only helps x86 CPUs without VNNI, where the u8*s8 pairwise
    add of AVX2 can saturate; on VNNI CPUs and non-x86 it only costs accuracy."""
    import platform

    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "i386", "i686"):
        return False, f"{machine} CPU: no saturation issue"
    if cpu_has_vnni():
        return False, "CPU has VNNI (no u8*s8 saturation)"
    return True, "x86 CPU without VNNI: 7-bit weights avoid u8*s8 saturation"


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, per_channel: bool = False,
                  reduce_range: bool = False, nodes_to_exclude: Iterable[str] = ()) -> dict:
    """Dynamic INT8 (weights int8 offline, activations u8 at run time) of the fused graph.

    ``DefaultTensorType`` lets the quantizer continue where ONNX shape inference cannot type the
    outputs of contrib ops (Attention, SkipLayerNormalization) of the optimized graph."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    load_onnx(src, data=False)
    with quiet_quantizer_logs(), model_files.scratch(dst) as tmp:
        quantize_dynamic(str(src), str(tmp), per_channel=per_channel, reduce_range=reduce_range,
                         weight_type=QuantType.QInt8, nodes_to_exclude=list(nodes_to_exclude) or None,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                         use_external_data_format=model_files.external_for(src))
    return {"method": "quantize_dynamic", "per_channel": per_channel, "reduce_range": reduce_range,
            "weight_type": "QInt8", "activation_type": "QUInt8 (dynamic)",
            "nodes_to_exclude": list(nodes_to_exclude),
            "quantized_operators": {k: v for k, v in op_counts(dst).items()
                                    if k.startswith(("Q", "Dynamic", "MatMulInteger"))}}


# ----------------------------------------------------------------------------- INT4 weight-only
def quantize_int4(src: str | os.PathLike, dst: str | os.PathLike, block_size: int = 32,
                  symmetric: bool = True, accuracy_level: Optional[int] = 4) -> dict:
    """4-bit block-wise weight-only quantization: MatMul -> MatMulNBits, the embedding tables'
    Gather -> GatherBlockQuantized (the word embeddings are half of a small BERT's weights, so
    quantizing only the MatMuls would leave the file at ~55% of FP32). Activations stay float;
    ``accuracy_level`` 4 lets the CPU kernel compute in int8.

    Runs on the plain (unfused) graph: the fused Attention node keeps its packed QKV weight in a
    form MatMulNBits cannot take."""
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer)

    model = load_onnx(src, data=False)  # the converter serializes the graph: weights join after it
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 21:  # int4 tensors (GatherBlockQuantized) need opset 21 / IR 10
        model = version_converter.convert_version(model, 21)
        model.ir_version = max(model.ir_version, 10)
    onnx.external_data_helper.load_external_data_for_model(model, str(Path(src).parent))
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                          accuracy_level=accuracy_level, bits=4,
                                          op_types_to_quantize=("MatMul", "Gather"),
                                          quant_axes=(("MatMul", 0), ("Gather", 1)))
    with quiet_quantizer_logs():
        quantizer = MatMulNBitsQuantizer(model, algo_config=config)
        quantizer.process()
        model_files.save(quantizer.model, dst)
    counts = op_counts(dst)
    if not counts.get("MatMulNBits"):
        raise ExportError(f"{src}: the 4-bit quantizer replaced no MatMul (no constant-weight MatMul found)")
    return {"method": "MatMulNBitsQuantizer (RTN)", "bits": 4, "block_size": block_size,
            "symmetric": symmetric, "accuracy_level": accuracy_level,
            "quantized_operators": {k: counts[k] for k in ("MatMulNBits", "GatherBlockQuantized") if k in counts}}


# ----------------------------------------------------------------------------- FP16
def convert_fp16(src: str | os.PathLike, dst: str | os.PathLike,
                 keep_fp32: Sequence[str] = FP16_KEEP_FP32) -> dict:
    """FP16 weights and math with overflow-prone ops in fp32 and fp32 inputs/outputs (ORT's
    float16 converter inserts the casts). Made from the plain graph, so TensorRT can parse it."""
    from onnxruntime.transformers import float16

    load_onnx(src, data=False)
    with quiet_quantizer_logs():  # from the path: shape inference by file works above 2 GB
        model16 = float16.convert_float_to_float16(str(src), keep_io_types=True, op_block_list=list(keep_fp32))
    model_files.save(model16, dst)
    return {"method": "onnxruntime.transformers.float16", "keep_io_types": True, "fp32_ops": list(keep_fp32)}


# ----------------------------------------------------------------------------- QDQ static INT8
class _FeedReader:
    """onnxruntime.quantization.CalibrationDataReader over prepared feeds."""

    def __init__(self, feeds: list[dict]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - only used by some calibrators
        pass


FUSED_GELU_OPS = ("Gelu", "FastGelu", "BiasGelu", "QuickGelu")


def ffn_output_matmuls(model, depth: int = 4) -> list[str]:
    """The feed-forward output projections: constant-weight MatMuls whose input comes from a GELU
    (a fused GELU op directly, or an Erf within ``depth`` producer hops: found by structure, not
    by node names). Their inputs
    carry the long-tailed activations that per-tensor INT8 cannot represent (measured on the
    full-SST-2 MiniLM baseline: -2.3 pt with them quantized, +0.1 pt without)."""
    graph = model.graph
    producer = {out: n for n in graph.node for out in n.output}
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                      for o in n.output}
    return [n.name for n in graph.node
            if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in constants
            and (_fed_by(n.input[0], producer, FUSED_GELU_OPS, 1)  # fused graph: GELU op feeds it directly
                 or _fed_by(n.input[0], producer, ("Erf",), depth))]  # plain graph: x*0.5*(1+erf(x/√2))


def _fed_by(tensor: str, producer: dict, op_types: Sequence[str], depth: int) -> bool:
    """Whether one of ``op_types`` produces ``tensor`` within ``depth`` producer hops."""
    frontier = [tensor]
    for _ in range(depth):
        nodes = [producer[t] for t in frontier if t in producer]
        if any(n.op_type in op_types for n in nodes):
            return True
        frontier = [i for n in nodes for i in n.input]
    return False


def quantize_qdq(src: str | os.PathLike, dst: str | os.PathLike, calibration_feeds: list[dict],
                 per_channel: bool = True, method: str = "minmax", op_types: Sequence[str] = ("MatMul",),
                 nodes_to_exclude: Iterable[str] = (), exclude_ffn_output: bool = False) -> dict:
    """Static INT8 in explicit QuantizeLinear/DequantizeLinear form, symmetric activations and
    weights (what TensorRT's explicit quantization expects), calibrated on ``calibration_feeds``
    (histogram methods need feeds of one shape). ``exclude_ffn_output`` keeps the feed-forward
    output MatMuls in float (see :func:`ffn_output_matmuls`)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    model = load_onnx(src, data=False)
    if not calibration_feeds:
        raise ExportError("static INT8 (qdq) needs calibration data, got none")
    nodes_to_exclude = list(nodes_to_exclude) + (ffn_output_matmuls(model) if exclude_ffn_output else [])
    del model
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True}
    if method == "percentile":
        extra["CalibPercentile"] = 99.999
    with quiet_quantizer_logs(), model_files.scratch(dst) as tmp:  # the calibration copies follow the rule too
        quantize_static(str(src), str(tmp), _FeedReader(calibration_feeds), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(op_types), per_channel=per_channel,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(nodes_to_exclude) or None, calibrate_method=methods[method],
                        extra_options=extra, use_external_data_format=model_files.external_for(src))
    counts = op_counts(dst)
    return {"method": "quantize_static (QDQ)", "calibration": method, "per_channel": per_channel,
            "symmetric": True, "activation_type": "QInt8", "weight_type": "QInt8", "op_types": list(op_types),
            "calibration_batches": len(calibration_feeds),
            "calibration_rows": int(sum(len(f["input_ids"]) for f in calibration_feeds)),
            "exclude_ffn_output": exclude_ffn_output, "nodes_to_exclude": nodes_to_exclude,
            "quantized_operators": {k: counts[k] for k in ("QuantizeLinear", "DequantizeLinear") if k in counts}}


# ----------------------------------------------------------------------------- parity
def parity_shapes(max_length: int) -> list[tuple[int, int]]:
    """batch 1/7/32 x seq 8/64/max, de-duplicated (optimum-style validation shapes)."""
    seqs = sorted({min(8, max_length), min(64, max_length), max_length})
    return [(b, s) for b in (1, 7, 32) for s in seqs]


def random_batches(input_names: Sequence[str], shapes: Sequence[tuple[int, int]], vocab_size: int,
                   seed: int = 0, cls_id: int = 101, sep_id: int = 102, pad_id: int = 0) -> list[dict[str, np.ndarray]]:
    """Seeded random token batches, varied padding per row (the first row is never padded), padded
    with the tokenizer's ``pad_id`` (RoBERTa-style models derive positions from it)."""
    rng = np.random.default_rng(seed)
    out = []
    for batch, seq in shapes:
        ids = rng.integers(min(999, vocab_size // 2), vocab_size, size=(batch, seq), dtype=np.int64)
        mask = np.ones((batch, seq), dtype=np.int64)
        for i in range(1, batch):
            mask[i, int(rng.integers(1, seq + 1)):] = 0
        ids[:, 0] = cls_id if cls_id < vocab_size else 1
        ids[mask == 0] = pad_id
        full = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        out.append({k: full[k] for k in input_names})
    return out


def compare_logits(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> dict:
    """max |Δlogits| and argmax agreement over a list of batches."""
    ref = np.concatenate([np.asarray(r, dtype=np.float32) for r in reference])
    out = np.concatenate([np.asarray(c, dtype=np.float32) for c in candidate])
    if ref.shape != out.shape:
        raise ExportError(f"output shape {out.shape} differs from the PyTorch reference {ref.shape}")
    finite = bool(np.isfinite(out).all())
    diff = float(np.abs(ref - out).max()) if ref.size else 0.0
    return {"max_abs_diff": diff if finite else float("inf"),
            "argmax_agreement": float((ref.argmax(-1) == out.argmax(-1)).mean()) if len(ref) else 1.0,
            "rows": int(len(ref))}



# ----------------------------------------------------------------------------- OpenVINO (optional)
def quantize_nncf(src: str | os.PathLike, dst: str | os.PathLike, feeds: Sequence[dict]) -> dict:
    """INT8 post-training quantization with NNCF (OpenVINO backend): read the FP32 ONNX graph
    into OpenVINO, calibrate activations on ``feeds`` (the same seeded training batches as the QDQ
    variant), save OpenVINO IR ``dst`` (.xml + .bin). ``model_type=TRANSFORMER`` keeps the
    softmax/layer-norm paths in float, as NNCF recommends for BERT-family models."""
    import nncf
    import openvino as ov

    start = time.perf_counter()
    load_onnx(src, data=False)  # a clear error on a bad input (OpenVINO reads the external data itself)
    model = ov.Core().read_model(str(src))
    names = [i.get_any_name() for i in model.inputs]
    dataset = nncf.Dataset(list(feeds), lambda b: {n: b[n] for n in names})
    with quiet_quantizer_logs():
        quantized = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds))
    ov.save_model(quantized, str(dst), compress_to_fp16=False)
    return {"method": "nncf post-training quantization (OpenVINO backend, ModelType.TRANSFORMER)",
            "calibration_batches": len(feeds), "nncf": _dist_version("nncf"), "openvino": ov.__version__,
            "quantize_s": round(time.perf_counter() - start, 2)}


def _dist_version(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
